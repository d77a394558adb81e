"""End-to-end fine-tunes of tiny models on the real data, through the command line."""

import json
from pathlib import Path

import pytest
from conftest import shared_path

from gptft.classifier import load_classifier
from gptft.cli import main
from gptft.config import load_job
from gptft.data.classification import load_classification_data

pytestmark = pytest.mark.slow  # whole runs on the shared data

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.n_layers=2", "model.emb_dim=32", "model.n_heads=2", "model.context_length=128"]


@pytest.fixture(scope="module")
def spam_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spam")
    data = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv")
    args = ["finetune", "--config", str(CONFIGS / "spam-tiny.yaml"), *TINY, f"data.path={data}",
            f"output_dir={out}", "train.epochs=2", "train.eval_every=40", "train.lr=2e-3"]
    assert main(args) == 0
    return out


def test_classification_run_folder(spam_run):
    for name in ("config.yaml", "model.safetensors", "gptft.json", "metrics.json", "log.jsonl",
                 "loss.png", "accuracy.png"):
        assert (spam_run / name).is_file(), name
    # A short run with the default policy (every 15 minutes) writes no resumable checkpoint.
    assert not (spam_run / "checkpoints").exists()
    metrics = json.loads((spam_run / "metrics.json").read_text())
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "test_loss", "test_precision",
                "test_recall", "test_f1", "confusion_matrix", "trainable_parameters"):
        assert key in metrics
    assert sum(map(sum, metrics["confusion_matrix"])) == 300
    assert metrics["test_accuracy"] > 0.6  # learns something in 2 epochs of a 2-layer model
    log = [json.loads(line) for line in (spam_run / "log.jsonl").read_text().splitlines()]
    assert any("val/accuracy" in r for r in log) and any("train/loss" in r for r in log)
    assert load_job(spam_run / "config.yaml").output_dir == str(spam_run)


def test_saved_classifier_reproduces_test_metrics(spam_run):
    job = load_job(spam_run / "config.yaml")
    test = load_classification_data(job.data).test
    clf = load_classifier(spam_run)
    preds = clf.predict(test.texts)
    accuracy = sum(clf.labels.index(p.label) == y for p, y in zip(preds, test.labels)) / len(test.labels)
    metrics = json.loads((spam_run / "metrics.json").read_text())
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)  # metrics.json: 6 decimals
    again = load_classifier(spam_run).predict(test.texts[:10])
    assert [p.label for p in again] == [p.label for p in preds[:10]]
    assert [p.probability for p in again] == pytest.approx([p.probability for p in preds[:10]], abs=1e-6)


def test_classify_command(spam_run, capsys, tmp_path):
    texts = ["You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
             "Hey, just wanted to check if we're still on for dinner tonight? Let me know!"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    assert main(["classify", str(spam_run), *texts, "--file", str(tmp_path / "texts.txt")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    label, prob, _ = lines[0].split("\t")
    assert label in ("ham", "spam") and 0.5 <= float(prob) <= 1.0
    assert lines[0] == lines[2] and lines[1] == lines[3]


def test_classify_errors(tmp_path, capsys):
    assert main(["classify", str(tmp_path / "missing"), "hi"]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_instruction_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    records = json.loads(shared_path("data", "instruction-data.json").read_text())[:300]
    data = tmp_path / "records.json"
    data.write_text(json.dumps(records))
    args = ["finetune", "--config", str(CONFIGS / "instruct-tiny.yaml"), *TINY, f"data.path={data}",
            f"output_dir={tmp_path / 'run'}", "train.epochs=1", "train.eval_every=30", "train.lr=3e-3",
            "data.max_length=128", "generate.max_new_tokens=4", "data.mask_prompt=true",
            "tracking.wandb=true", "tracking.run_name=tiny-test"]
    assert main(args) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("train_loss", "val_loss", "test_loss", "train_perplexity", "val_perplexity",
                "test_perplexity"):
        assert key in metrics
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in log if "val/loss" in r]
    assert val[-1] < val[0]  # validation loss falls
    assert any("val/sample_response" in r for r in log)
    responses = json.loads((run / "responses.json").read_text())
    assert len(responses) == 30 and all("model_response" in r for r in responses)
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline run not written"
    meta = json.loads((run / "gptft.json").read_text())
    assert meta["task"] == "instruction" and meta["prompt_style"] == "alpaca"
