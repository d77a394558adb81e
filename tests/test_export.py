"""``gptft export``: transformers folders (classifier and language model) with GPT-2's tokenizer
files, the generation settings and the prompt style, used offline through transformers."""

import json
from pathlib import Path

import pytest
import torch
from conftest import shared_path
from torch.testing import assert_close

from gptft.classifier import load_classifier
from gptft.cli import main
from gptft.data.classification import load_classification_data
from gptft.model import GPT, GPTConfig
from gptft.runs import save_model
from gptft.tasks.classification.config import ClassificationData
from gptft.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.n_layers=2", "model.emb_dim=32", "model.n_heads=2", "model.context_length=128"]


@pytest.fixture(scope="module")
def spam_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spam") / "run"
    args = ["finetune", "--config", str(CONFIGS / "spam-tiny.yaml"), *TINY, "train.max_steps=40",
            "train.warmup_steps=0", "train.lr=3e-3", "train.eval_every=0", "train.eval_batch_size=128",
            f"output_dir={out}"]
    assert main(args) == 0
    return out


def _lm_run(folder: Path, style: str = "alpaca") -> Path:
    """A finished instruction run folder without training (a random tiny GPT)."""
    cfg = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=2)
    folder.mkdir(parents=True)
    save_model(folder, GPT(cfg), {"task": "instruction", "model": cfg.to_dict(), "tokenizer": "gpt2",
                                  "prompt_style": style, "max_length": 64})
    (folder / "config.yaml").write_text("generate:\n  max_new_tokens: 40\n  temperature: 0.7\n  top_k: 5\n")
    return folder


@pytest.mark.slow
def test_exported_classifier_pipeline_labels_the_test_split_as_gptft(spam_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(spam_run), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["id2label"] == {"0": "ham", "1": "spam"} and config["label2id"] == {"ham": 0, "spam": 1}
    assert config["pad_token_id"] == 50256

    texts = load_classification_data(ClassificationData()).test.texts  # the run's test split
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["classify", str(spam_run), "--file", str(tmp_path / "texts.txt")]) == 0
    ours = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert len(ours) == len(texts) == 300 and set(ours) == {"ham", "spam"}  # a trained model

    clf = transformers.pipeline("text-classification", model=str(out), device="cpu")
    theirs = [r["label"] for r in clf(texts, truncation=True, batch_size=64)]  # padded batches
    assert theirs == ours

    # and the logits themselves, on a right-padded batch
    gptft_model = load_classifier(spam_run).model
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(out).eval()
    ids = [Tokenizer().encode(t) for t in texts[:4]]
    lengths = torch.tensor([len(t) for t in ids])
    batch = torch.full((4, int(lengths.max())), 50256)
    for row, t in enumerate(ids):
        batch[row, : len(t)] = torch.tensor(t)
    with torch.no_grad():
        assert_close(hf(input_ids=batch).logits, gptft_model(batch, lengths), atol=1e-5, rtol=0)


def test_exported_tokenizer_encodes_as_gptft_offline(tmp_path):
    run = _lm_run(tmp_path / "run")
    out = tmp_path / "exported"
    assert main(["export", str(run), str(out)]) == 0
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "prompt_style.json", "config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    tok = transformers.AutoTokenizer.from_pretrained(out)  # HF_HUB_OFFLINE=1 (conftest)
    text = shared_path("data", "instruction-data.json").read_text(encoding="utf-8")
    assert tok(text)["input_ids"] == Tokenizer().encode(text)
    assert tok.eos_token_id == Tokenizer().eot_id == tok.pad_token_id
    records = json.loads(text)
    outputs = [r["output"] for r in records]
    assert [tok.encode(t) for t in outputs] == Tokenizer().encode_batch(outputs)


def test_exported_generation_config_and_prompt_style(tmp_path):
    from gptft.prompts import format_prompt

    run = _lm_run(tmp_path / "run")
    out = tmp_path / "exported"
    assert main(["export", str(run), str(out)]) == 0
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert (gen.eos_token_id, gen.max_new_tokens, gen.do_sample, gen.temperature, gen.top_k) == \
        (50256, 40, True, 0.7, 5)
    style = json.loads((out / "prompt_style.json").read_text())
    record = {"instruction": "Name a colour.", "input": "warm"}
    prompt = style["template"].format(**record) + style["input_template"].format(**record) + \
        style["response_header"]
    assert prompt == format_prompt(record, "alpaca")

    # greedy generation through transformers from the exported folder equals gptft's
    from gptft.config import GenerateConfig
    from gptft.generate import generate_texts
    from gptft.runs import load_gpt

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        new = hf.generate(ids, do_sample=False, max_new_tokens=8)[0, ids.shape[1]:]
    model, _ = load_gpt(run)
    ours = generate_texts(model, Tokenizer(), [prompt], GenerateConfig(max_new_tokens=8))[0]
    assert len(new) > 0 and ours.strip() == tok.decode(new, skip_special_tokens=True).strip()


def test_checkpoint_run_folder_with_the_configs_shape_keys(tmp_path):
    """``model.checkpoint=RUN`` continues from a gptft run; a config's shape keys (the -tiny configs
    set them) may stay when they match the run's, and a mismatch is one error naming each."""
    from gptft.config import job_from_dict
    from gptft.errors import GPTFTError
    from gptft.runs import load_gpt
    from gptft.tasks.base import build_gpt

    run = _lm_run(tmp_path / "run")
    shape = {"n_layers": 2, "emb_dim": 32, "n_heads": 2, "context_length": 64}
    job = job_from_dict({"task": "instruction", "model": {"weights": "pretrained", "checkpoint": str(run),
                                                         **shape}})
    model = build_gpt(job.model, 50257)
    saved, _ = load_gpt(run)
    x = torch.randint(0, 50257, (2, 8))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), saved(x))
    job.model.n_layers, job.model.emb_dim = 4, 64
    with pytest.raises(GPTFTError, match=r"model.n_layers=4 \(the checkpoint has 2\), model.emb_dim=64"):
        build_gpt(job.model, 50257)


@pytest.mark.slow
def test_a_classification_run_continues_as_a_checkpoint(tmp_path, capsys):
    """A classification job with ``model.checkpoint`` = a classification run starts from its whole
    classifier, head included (lr ~ 0: the new run's model is the old one)."""
    from gptft.classifier import GPTClassifier

    cfg = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=2)
    run = tmp_path / "spam"
    run.mkdir()
    old = GPTClassifier(GPT(cfg), 2)
    save_model(run, old, {"task": "classification", "model": cfg.to_dict(), "tokenizer": "gpt2",
                          "labels": ["ham", "spam"], "max_length": 64})
    args = ["finetune", "--config", str(CONFIGS / "spam-tiny.yaml"), "model.weights=pretrained",
            f"model.checkpoint={run}", "model.n_layers=2", "model.emb_dim=32", "model.n_heads=2",
            "model.context_length=64", "data.max_length=32", "train.lr=1e-12", "train.max_steps=1",
            "train.eval_every=0", "train.eval_batch_size=256", f"output_dir={tmp_path / 'more'}"]
    assert main(args) == 0
    new = load_classifier(tmp_path / "more").model
    ids, lengths = torch.randint(0, 50257, (3, 10)), torch.tensor([10, 6, 2])
    with torch.no_grad():
        assert_close(new(ids, lengths), old.eval()(ids, lengths), atol=1e-6, rtol=0)
    capsys.readouterr()
    assert main([*args[:-1], "data.labels=[spam,ham]", f"output_dir={tmp_path / 'other'}"]) == 2
    assert "a classifier of labels ['ham', 'spam'], the data has ['spam', 'ham']" in capsys.readouterr().err
