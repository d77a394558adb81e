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


@pytest.mark.slow
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


# ---- benchmarks/e2e.py ---------------------------------------------------------------------------


def load_e2e():
    spec = importlib.util.spec_from_file_location("e2e", BENCH.parent / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["e2e"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


E2E_TINY = ["model.n_layers=1", "model.emb_dim=32", "model.n_heads=2", "train.max_steps=3", "train.epochs=1"]


@pytest.mark.slow
def test_e2e_runs_the_job_and_the_textbook(tmp_path, capsys):
    import json

    e2e = load_e2e()
    lines = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv").read_text().splitlines()
    small = tmp_path / "SMSSpamCollection"  # 60 spam, 60 ham: 84 / 12 / 24 texts
    small.write_text("\n".join([x for x in lines if x.startswith("spam")][:60]
                               + [x for x in lines if x.startswith("ham")][:60]) + "\n")
    sets = [arg for s in (f"data.path={small}", *E2E_TINY) for arg in ("--set", s)]
    config = str(BENCH.parents[1] / "configs" / "spam-tiny.yaml")
    out = e2e.main(["--config", config, *sets, "--textbook", "--output", str(tmp_path / "e2e.json")])

    assert json.loads((tmp_path / "e2e.json").read_text()) == json.loads(json.dumps(out))
    gptft_label, textbook = list(out["summary"])
    assert textbook == "textbook" and out["reference"] == gptft_label
    assert [r["label"] for r in out["runs"]] == [gptft_label, textbook]
    for run in out["runs"]:
        assert run["returncode"] == 0 and "error" not in run, run.get("error")
        assert set(run["phases"]) == set(e2e.PHASES)
        phases = run["phases"]
        assert all(phases[k] is not None and phases[k] >= 0
                   for k in ("startup", "first_step", "steps", "final"))
        assert sum(v for v in phases.values() if v is not None) <= run["wall_s"] + 1e-6
        assert run["metrics"]["steps"] == 3
        assert all(0 <= run["metrics"][k] <= 1 for k in e2e.ACCURACY_KEYS)
        assert run["run_dir_bytes"] > 0 and run["checkpoint_bytes"] == 0  # no epoch end: no checkpoint
        assert 0.5 < run["cpu_s"] < 4 * run["wall_s"]  # a job's processes, not this one's
    gptft_run = out["runs"][0]
    assert gptft_run["bar"]["steps_seen"] == 3 and gptft_run["bar"]["evaluations"] >= 1
    assert {"imports", "data", "model", "first_step", "train", "evaluation", "final_accuracy",
            "saving", "total"} <= out["runs"][1]["time"].keys()
    assert out["textbook_implementation"].startswith(("llms-from-scratch", "re-implementation"))
    assert out["speedup_vs_textbook"][gptft_label] > 0
    entry = out["summary"][gptft_label]
    assert entry["runs"] == 1 and entry["wall_vs_reference"] == 1.0
    assert 0 < entry["outside_steps_share_median"] < 1
    printed = capsys.readouterr().out
    for header in ("wall", "cpu", "startup", "1st step", "between", "outside", "test acc", "ckpt MB",
                   "textbook code"):
        assert header in printed


def test_e2e_phases_from_the_progress_bar():
    e2e = load_e2e()
    bar = "train:  {p:>3}%|##| {n}/10 [00:01<00:02, 5.00it/s]"
    # step k ends at 2 + k (s), the first at 3.5; an evaluation after step 5 (+1.5 s), then the loop
    # ends at 13.5 (an end-of-epoch evaluation after step 10) and the last line at 15.
    times = {0: 2.0, 1: 3.5, **{k: 2.5 + k for k in range(2, 6)}, **{k: 4.0 + k for k in range(6, 11)}}
    stderr = [(t, bar.format(p=10 * n, n=n)) for n, t in times.items()] + [(15.5, bar.format(p=100, n=10))]
    proc = e2e.Process(0, 17.0, 30.0, 0.0, [(1.0, "trainable parameters"), (16.0, "test accuracy 90%")],
                       stderr)
    phases, info = e2e.bar_phases(proc, {5, 10})
    assert info["median_step_s"] == pytest.approx(1.0) and info["steps_seen"] == 10
    assert phases["startup"] == 2.0 and phases["first_step"] == pytest.approx(1.5)
    assert phases["steps"] == pytest.approx(9.0)  # steps 2..10 at 1 s each
    assert phases["between_steps"] == pytest.approx(3.0)  # 1.5 s after step 5, 1.5 s after step 10
    assert phases["final"] == pytest.approx(0.5) and phases["exit"] == pytest.approx(1.0)
    # Without a bar only the total is known.
    phases, _ = e2e.bar_phases(e2e.Process(0, 5.0, 9.0, 0.0, [(1.0, "done")], []), set())
    assert all(v is None for v in phases.values())


@pytest.mark.slow
def test_e2e_textbook_copy_matches_the_book_package(tmp_path, capsys, monkeypatch):
    ch04 = pytest.importorskip("llms_from_scratch.ch04")
    ch06 = pytest.importorskip("llms_from_scratch.ch06")
    import tiktoken
    import torch

    monkeypatch.syspath_prepend(str(BENCH.parent))  # as for e2e.py: bench.py beside it
    import textbook_ch06 as copy

    cfg = {"vocab_size": 50257, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    models = []
    for module in (ch04, copy):
        torch.manual_seed(7)
        model = module.GPTModel(cfg)
        torch.manual_seed(8)
        model.out_head = torch.nn.Linear(16, 2)
        models.append(model)
    x = torch.randint(0, 50257, (3, 12))
    torch.testing.assert_close(models[0](x), models[1](x))

    csv = tmp_path / "train.csv"
    csv.write_text('Label,Text\n0,"Hello, there"\n1,WINNER!! Claim your prize now\n0,ok\n', encoding="utf-8")
    tokenizer = tiktoken.get_encoding("gpt2")
    book_data, copy_data = ch06.SpamDataset(csv, tokenizer), copy.SpamDataset(csv, tokenizer)
    assert book_data.max_length == copy_data.max_length and book_data.encoded_texts == copy_data.encoded_texts
    assert all(torch.equal(a, b) for i in range(3) for a, b in zip(book_data[i], copy_data[i]))

    batches = [(torch.randint(0, 50257, (2, 6)), torch.tensor([0, 1])) for _ in range(4)]
    results = []
    for module, model in zip((ch06, copy), models):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        results.append(module.train_classifier_simple(model, batches, batches[:2], optimizer, "cpu",
                                                      num_epochs=2, eval_freq=3, eval_iter=1))
    for book_values, copy_values in zip(*results):  # losses, accuracies, examples seen
        assert copy_values == pytest.approx(book_values)
    assert capsys.readouterr().out.count("Validation accuracy") == 4
