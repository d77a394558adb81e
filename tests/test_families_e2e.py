"""Every task on the new model families, end to end: tiny Qwen3- and Llama-architecture runs
(random init, the packaged tiny-chatml tokenizer, the packaged data) that train, reload through
the commands, export to folders ``transformers`` opens with equal outputs, and LoRA adapters that
``peft`` loads onto the ``transformers`` model with equal logits."""

import json
from pathlib import Path

import pytest
import torch

from gptft.classifier import load_classifier
from gptft.cli import main
from gptft.runs import load_gpt

pytestmark = pytest.mark.slow  # whole runs

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAMILIES = {"qwen3": "qwen3-0.6b", "llama": "llama-3.2-1b"}
SHAPE = ["model.tokenizer=tiny-chatml", "model.weights=random", "model.n_layers=2",
         "model.emb_dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
         "model.intermediate_size=128", "model.context_length=256"]
QUICK = ["train.max_steps=4", "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1",
         "train.final_eval_batches=1", "train.device=cpu", "train.lr=1e-3"]


def run(config: str, out: Path, *args: str) -> Path:
    assert main(["finetune", "--config", str(CONFIGS / config), f"output_dir={out}", *QUICK, *args]) == 0
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def spam_run(family, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"{family}-spam")
    return run("qwen3-spam-tiny.yaml", out, f"model.name={FAMILIES[family]}", *SHAPE)


@pytest.fixture(scope="module")
def instruct_run(family, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"{family}-instruct")
    return run("llama-instruct-tiny.yaml", out, f"model.name={FAMILIES[family]}", *SHAPE,
               "generate.max_new_tokens=4", "data.max_length=256")


def test_classifier_run_records_its_family_and_exports(spam_run, family, tmp_path):
    meta = json.loads((spam_run / "gptft.json").read_text())
    assert meta["architecture"] == family and (spam_run / "tokenizer" / "tokenizer.json").is_file()
    clf = load_classifier(spam_run)
    texts = ["WINNER!! You have won a prize, call now", "ok, see you at the station at 5"]
    ours = torch.tensor([list(p.probabilities.values()) for p in clf.predict(texts)])

    assert main(["export", str(spam_run), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__.lower().startswith(family)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**batch).logits.softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_classify_command(spam_run, capsys):
    assert main(["classify", str(spam_run), "free entry in a weekly competition"]) == 0
    assert capsys.readouterr().out.strip().split()[0] in ("ham", "spam")


def test_instruction_run_generates_and_exports(instruct_run, family, tmp_path):
    model, meta = load_gpt(instruct_run)
    assert meta["architecture"] == family and model.architecture == family
    assert main(["generate", str(instruct_run), "--instruction", "Name a colour."]) == 0
    assert main(["export", str(instruct_run), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tok.encode("Below is an instruction that describes a task.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    stops = json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"]
    assert stops[0] == tok.convert_tokens_to_ids("<|im_end|>")  # then the end-of-text token


def test_preference_run_from_the_instruction_run(instruct_run, family, tmp_path):
    out = run("dpo-tiny.yaml", tmp_path / "dpo", f"model.checkpoint={instruct_run}", "model.trainable=all",
              "generate.max_new_tokens=4", "data.max_length=256")
    model, meta = load_gpt(out)
    assert meta["architecture"] == family and meta["task"] == "preference"


def _hf_base(family: str, folder: Path) -> Path:
    """A tiny random checkpoint written by transformers' own class, with the tiny tokenizer."""
    from gptft.tokenizer import load_tokenizer

    cls = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[family]
    tok = load_tokenizer("tiny-chatml")
    config = cls[0](vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                    tie_word_embeddings=True, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    cls[1](config).save_pretrained(folder)
    tok.save(folder)
    return folder


def test_lora_adapter_loads_in_peft(family, tmp_path):
    peft = pytest.importorskip("peft")
    base = _hf_base(family, tmp_path / "base")
    shape = [f"model.{k}=null" for k in ("tokenizer", "n_layers", "emb_dim", "n_heads", "n_kv_heads",
                                          "head_dim", "intermediate_size", "context_length")]
    out = run("llama-instruct-tiny.yaml", tmp_path / "lora", f"model.checkpoint={base}", *shape,
              "model.weights=pretrained", "model.trainable=lora", "lora.rank=4", "lora.alpha=8",
              "train.lr=1e-2", "generate.max_new_tokens=2", "data.max_length=256")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    hf = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                        out / "adapter").eval()
    model, _ = load_gpt(out)  # the merged weights
    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    with torch.no_grad():
        theirs, base_logits = hf(ids).logits, hf.get_base_model()(ids).logits
        with hf.disable_adapter():
            base_logits = hf(ids).logits
        torch.testing.assert_close(model(ids), theirs, atol=1e-4, rtol=0)
    assert (theirs - base_logits).abs().max() > 1e-3  # the adapter changed the model


def test_two_processes_equal_one_and_kill_resume_is_exact(tmp_path):
    """A Qwen3-architecture instruction run: 2 processes of batch b give the losses and weights of
    1 process of batch 2b (test_distributed's bar for GPT-2), and a run killed after its first
    checkpoint and resumed ends with the uninterrupted run's weights and log."""
    import os
    import signal

    from conftest import run_results, start_until_checkpoint
    from test_distributed import assert_same_training, one_and_two_processes

    family = [f"model.name={FAMILIES['qwen3']}", *SHAPE, "model.n_layers=1", "model.context_length=96",
              "data.max_length=96", "data.mask_prompt=true", "train.max_steps=6",
              "generate.max_new_tokens=2", "generate.batch_size=4", "train.final_eval_batches=1",
              "train.checkpoint_every=3"]
    runs = one_and_two_processes("llama-instruct-tiny.yaml", tmp_path, family)
    assert_same_training(runs["one"], runs["two"])

    args = ["--config", str(CONFIGS / "llama-instruct-tiny.yaml"), *family, "train.batch_size=4",
            "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=3", "train.device=cpu",
            "train.lr=1e-3", "model.drop_rate=0.1", "train.max_steps=10"]
    ref = tmp_path / "ref"
    assert main(["finetune", *args, f"output_dir={ref}"]) == 0
    out = tmp_path / "killed"
    proc = start_until_checkpoint([*args, f"output_dir={out}"], out, dict(os.environ))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "model.safetensors").exists()  # it died during training
    assert main(["finetune", *args, f"output_dir={out}", "train.resume=true"]) == 0
    for name in ("log.jsonl", "metrics.json"):
        assert run_results(out, name) == run_results(ref, name), name
    from safetensors.torch import load_file

    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
