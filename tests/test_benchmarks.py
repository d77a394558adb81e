"""Smoke test of benchmarks/bench.py: every implementation runs two steps on a tiny model."""

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import shared_path

pytest.importorskip("transformers")
pytest.importorskip("tiktoken")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
TINY = ["--n-layers", "1", "--emb-dim", "32", "--n-heads", "4", "--context-length", "256",
        "--batch-size", "2", "--steps", "2", "--warmup", "1", "--repeats", "1", "--threads", "1"]
FIELDS = {"examples_per_s", "tokens_per_s", "real_tokens_per_s", "label_tokens_per_s", "real_share",
          "step_ms", "peak_mem_mb", "mem_delta_mb", "mfu", "pass_seconds"}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task, impls", [
    ("spam", ["textbook", "transformers", "gptft"]),
    ("instruct", ["textbook", "transformers", "gptft", "gptft:packing,mask_prompt"]),
])
def test_bench_runs_every_implementation(task, impls, capsys):
    bench = load_bench()
    files = ["--spam-file", str(shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv")),
             "--instruct-file", str(shared_path("data", "instruction-data.json"))]
    out = bench.main(["--task", task, "--impl", *impls, *TINY, *files])

    assert list(out["results"]) == impls
    for name, result in out["results"].items():
        assert FIELDS <= result.keys(), name
        assert result["examples_per_s"] > 0 and len(result["pass_seconds"]) == 1
        assert 0 < result["real_share"] <= 1
        assert result["mfu"] is None  # CPU: no peak to compare with
    assert set(out["speedup"]["vs"]) == set(impls) - {"gptft"}
    assert {"cpu", "torch", "transformers", "date", "threads"} <= out["environment"].keys()
    printed = capsys.readouterr().out
    for header in ("ex/s", "tok/s", "real/s", "label/s", "real%", "peak MB", "MFU", "gptft / textbook"):
        assert header in printed
    if task == "spam":  # the textbook pads every example to the longest one; gptft groups by length
        results = out["results"]
        assert results["textbook"]["real_share"] < results["gptft"]["real_share"]


def test_bench_rejects_unknown_impl():
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--impl", "gptft:flash"])



def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sms_lm_corpus_leaves_out_evaluation_texts(tmp_path):
    from gptft.config import load_job
    from gptft.data.classification import load_classification_data

    data = f"data.path={shared_path('data', 'sms_spam_collection', 'SMSSpamCollection.tsv')}"
    config = str(BENCH.parents[1] / "configs" / "spam-tiny.yaml")
    records = _script("sms_lm_corpus").main([str(tmp_path / "corpus.json"), "--config", config, data])
    splits = load_classification_data(load_job(config, [data]).data)
    held_out = set(splits.val.texts) | set(splits.test.texts)
    texts = {r["output"] for r in records}
    assert len(held_out) == 434 and len(records) == 5028 and not texts & held_out
    assert set(splits.train.texts) - held_out <= texts  # (the collection repeats some texts)


def test_frozen_embeddings_control_run(tmp_path, monkeypatch):
    import json

    import gptft.tasks.classification.task as classification

    script = _script("frozen_embeddings")
    monkeypatch.setattr(classification, "set_trainable", script.set_trainable_frozen_embeddings)
    from gptft.cli import main

    data = f"data.path={shared_path('data', 'sms_spam_collection', 'SMSSpamCollection.tsv')}"
    assert main(["finetune", "--config", str(BENCH.parents[1] / "configs" / "spam-tiny.yaml"), data,
                 "model.n_layers=1", "model.emb_dim=32", "model.n_heads=2", "train.max_steps=1",
                 "train.eval_every=0", "train.eval_batches=1", f"output_dir={tmp_path}"]) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    embeddings = 50257 * 32 + 256 * 32  # wte + wpe
    assert m["trainable_parameters"] == m["total_parameters"] - embeddings
