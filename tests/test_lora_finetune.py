"""LoRA end to end: fine-tune a tiny pretrained base (written by transformers) through the command
line, rebuild the model from base + adapter, export the merged model, run on 2 processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_only_known_run_files, cpu_launch_env, free_port, launcher
from torch.testing import assert_close

from gptft.classifier import GPTClassifier, load_classifier
from gptft.cli import main
from gptft.io import load_safetensors
from gptft.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, merge_lora
from gptft.model import GPT, GPTConfig
from gptft.runs import load_gpt, save_model

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHAPE_NULL = [f"model.{k}=null" for k in ("n_layers", "emb_dim", "n_heads", "context_length")]
SHORT = ["train.batch_size=4", "train.eval_every=0", "train.eval_batches=1", "train.device=cpu",
         "train.log_every=1", "train.lr=1e-2", "lora.rank=4", "lora.alpha=8"]  # scaling 2


def _base(folder: Path) -> Path:
    """A tiny random GPT-2 saved by transformers: the 'pretrained' base of the LoRA runs."""
    torch.manual_seed(1)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2,
                                                              n_positions=64))
    hf.save_pretrained(folder, safe_serialization=True)
    return folder


def _spam_csv(path: Path, n: int = 40) -> Path:
    rows = [(f"message {i}: " + ("WIN cash now, call to claim your prize" if i % 2 else
                                 "see you at dinner later tonight"), "spam" if i % 2 else "ham")
            for i in range(n)]
    path.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows), encoding="utf-8")
    return path


def _records(path: Path, n: int = 24) -> Path:
    path.write_text(json.dumps([{"instruction": f"Repeat the number {i}.", "input": "",
                                 "output": f"{i}"} for i in range(n)]))
    return path


EXPORTED = sorted(["config.json", "model.safetensors", "generation_config.json", "prompt_style.json",
                   "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   ".gptft-export"])


def _ids(n: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 50257, (n, length), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def spam_lora_run(tmp_path_factory, base) -> Path:
    tmp = tmp_path_factory.mktemp("spam-lora")
    out = tmp / "run"
    args = ["finetune", "--config", str(CONFIGS / "spam-lora.yaml"), f"model.checkpoint={base}",
            *SHAPE_NULL, f"data.path={_spam_csv(tmp / 'sms.csv')}", *SHORT, "train.max_steps=6",
            f"output_dir={out}"]
    assert main(args) == 0
    return out


@pytest.mark.slow
def test_lora_classification_run_folder(spam_lora_run, base):
    adapter = spam_lora_run / "adapter"
    assert (adapter / ADAPTER_WEIGHTS).is_file() and (adapter / ADAPTER_CONFIG).is_file()
    assert_only_known_run_files(spam_lora_run)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())  # PEFT's adapter_config.json
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, str(base))
    assert (config["peft_type"], config["task_type"], config["modules_to_save"]) == \
        ("LORA", "SEQ_CLS", ["score", "ln_f"])
    extra = json.loads((adapter / "gptft_adapter.json").read_text())
    assert extra["task"] == "classification" and extra["labels"] == ["ham", "spam"]

    # The adapter holds the LoRA tensors of every block's four linears and the head (PEFT's
    # score) with the final LayerNorm it reads: no other tensor trained.
    tensors = load_safetensors(adapter / ADAPTER_WEIGHTS)
    lora = {k for k in tensors if k.endswith((".lora_A.weight", ".lora_B.weight"))}
    assert len(lora) == 2 * 4 * 2 and set(tensors) - lora == {
        "base_model.model.score.weight", "base_model.model.transformer.ln_f.weight",
        "base_model.model.transformer.ln_f.bias"}
    metrics = json.loads((spam_lora_run / "metrics.json").read_text())
    head = 2 * 32 + 2
    assert metrics["trainable_parameters"] == sum(tensors[k].numel() for k in lora) + head
    assert metrics["trainable_parameters"] < 0.05 * metrics["total_parameters"]
    assert any(tensors[k].abs().sum() > 0 for k in lora if "lora_B" in k)  # B trained

    # model.safetensors holds the merged model: untouched base weights, W + (alpha/rank) B @ A.
    base_gpt = GPT.from_pretrained(base).state_dict()
    merged = load_safetensors(spam_lora_run / "model.safetensors")
    peft_name = "base_model.model.transformer.{}.{}.weight".format
    for name, value in base_gpt.items():
        if name == "lm_head.weight":
            continue
        layer = name.removesuffix(".weight")
        if peft_name(layer, "lora_A") in tensors:
            delta = tensors[peft_name(layer, "lora_B")] @ tensors[peft_name(layer, "lora_A")] * 2.0
            assert_close(merged[f"backbone.{name}"], value + delta, atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(merged[f"backbone.{name}"], value), name
    assert torch.equal(merged["head.weight"], tensors["base_model.model.score.weight"])


@pytest.mark.slow
def test_base_plus_adapter_rebuilds_the_saved_classifier(spam_lora_run, base):
    saved = load_classifier(spam_lora_run).model
    model = GPTClassifier(GPT.from_pretrained(base), 2).eval()
    load_adapter(model, spam_lora_run / "adapter")
    x, lengths = _ids(), torch.tensor([12, 7, 3])
    with torch.no_grad():
        expected = saved(x, lengths)
        assert_close(model(x, lengths), expected, atol=1e-5, rtol=1e-5)
        assert_close(merge_lora(model)(x, lengths), expected, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in model.state_dict())


@pytest.mark.slow
def test_instruction_lora_export_matches_transformers(tmp_path, base, capsys):
    run, out = tmp_path / "run", tmp_path / "exported"
    args = ["finetune", "--config", str(CONFIGS / "instruct-lora.yaml"), f"model.checkpoint={base}",
            *SHAPE_NULL, f"data.path={_records(tmp_path / 'records.json')}", *SHORT,
            "train.max_steps=3", "data.max_length=null", "generate.max_new_tokens=2",
            f"output_dir={run}"]
    assert main(args) == 0
    assert (run / "adapter" / ADAPTER_WEIGHTS).is_file()
    capsys.readouterr()
    assert main(["export", str(run), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == EXPORTED

    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ours, _ = load_gpt(run)
    peft = pytest.importorskip("peft")  # the run's adapter is a PEFT adapter of the base
    peft_model = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base),
                                                run / "adapter").eval()
    rebuilt = GPT.from_pretrained(base).eval()
    load_adapter(rebuilt, run / "adapter")
    original = transformers.GPT2LMHeadModel.from_pretrained(base).eval()
    x = _ids()
    with torch.no_grad():
        logits = ours(x)
        assert_close(hf(x).logits, logits, atol=1e-5, rtol=1e-5)
        assert_close(rebuilt(x), logits, atol=1e-5, rtol=1e-5)
        assert_close(peft_model(input_ids=x).logits, logits, atol=1e-5, rtol=0)
        assert not torch.allclose(original(x).logits, logits, atol=1e-3)  # LoRA changed the model

    # A second export refuses the non-empty folder unless --overwrite (then it replaces it).
    (out / "note.txt").write_text("keep")
    assert main(["export", str(run), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "note.txt").is_file()
    assert main(["export", str(run), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == EXPORTED
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def _instruction_run(folder: Path) -> Path:
    """A finished instruction run folder without training (a random tiny GPT)."""
    cfg = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=2)
    folder.mkdir(parents=True)
    save_model(folder, GPT(cfg), {"task": "instruction", "model": cfg.to_dict(), "tokenizer": "gpt2",
                                  "prompt_style": "alpaca"})
    return folder


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.slow
def test_export_of_a_lora_classification_run(spam_lora_run, tmp_path, capsys):
    before = {p: p.read_bytes() for p in spam_lora_run.rglob("*") if p.is_file()}
    assert main(["export", str(spam_lora_run), str(tmp_path / "out")]) == 0
    assert {p: p.read_bytes() for p in spam_lora_run.rglob("*") if p.is_file()} == before
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    x = _ids()  # no padding: every row's last token is real
    with torch.no_grad():
        expected = load_classifier(spam_lora_run).model(x, torch.tensor([12, 12, 12]))
        assert_close(hf(input_ids=x).logits, expected, atol=1e-5, rtol=0)


def test_export_errors(tmp_path, capsys):
    run = _instruction_run(tmp_path / "inst")
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "run folder not found" in _one_error_line(capsys)
    assert main(["export", str(run), str(run), "--overwrite"]) == 2  # never over the run itself
    assert "would replace the run folder" in _one_error_line(capsys)
    assert main(["export", str(run), str(tmp_path), "--overwrite"]) == 2  # nor over its parent
    assert "would replace the run folder" in _one_error_line(capsys)
    assert (run / "model.safetensors").is_file()
    (tmp_path / "file").write_text("x")
    assert main(["export", str(run), str(tmp_path / "file")]) == 2
    assert "not a folder" in _one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["export", str(run), str(tmp_path / "empty")]) == 0  # an empty folder is fine
    assert (tmp_path / "empty" / "config.json").is_file()


@pytest.mark.slow
def test_lora_two_process_cpu_run(tmp_path, base):
    out = tmp_path / "run"
    cmd = [*launcher("--num_processes", "2", "--main_process_port", str(free_port())),
           "--config", str(CONFIGS / "spam-lora.yaml"), f"model.checkpoint={base}", *SHAPE_NULL,
           f"data.path={_spam_csv(tmp_path / 'sms.csv')}", *SHORT, "train.max_steps=2",
           f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter" / ADAPTER_WEIGHTS).is_file() and (out / "model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["trainable_parameters"] < 0.05 * metrics["total_parameters"]
    rebuilt = GPTClassifier(GPT.from_pretrained(base), 2).eval()
    load_adapter(rebuilt, out / "adapter")
    x, lengths = _ids(), torch.tensor([12, 7, 3])
    with torch.no_grad():
        assert_close(rebuilt(x, lengths), load_classifier(out).model(x, lengths), atol=1e-5, rtol=1e-5)



def test_failed_export_leaves_the_old_folder(tmp_path, monkeypatch):
    from gptft.export import export_run

    run, out = _instruction_run(tmp_path / "inst"), tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / ".gptft-export").write_text("{}")  # an earlier export: --overwrite may replace it

    def broken(self, folder):
        (Path(folder) / "config.json").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(GPT, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        export_run(run, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".gptft-export", "config.json"]
    assert (out / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inst", "out"]  # no temporary folder left
