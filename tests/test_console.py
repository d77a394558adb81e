"""What a user sees of tiny runs, through the real command line (stdout and stderr captured
together, not a terminal): one line per evaluation, epoch lines with that epoch's values, the
closing summary; logged keys with one meaning each; the plots drawn from what was measured."""

import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import shared_path

from gptft.plots import run_figures
from gptft.runfolder import LOSS

pytestmark = pytest.mark.slow  # whole runs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["model.n_layers=1", "model.emb_dim=32", "model.n_heads=2"]
KEYS = {"train/loss", "train/loss_mean", "train/lr", "train/skipped_steps"}
PREFIXES = ("val/", "train_sample/", "final/")


def finetune(config: str, out: Path, *overrides: str) -> str:
    """The console of a ``gptft finetune`` run (stdout + stderr, as a log file gets them)."""
    proc = subprocess.run([sys.executable, "-m", "gptft", "finetune", "--config", str(CONFIGS / config),
                           *TINY, f"output_dir={out}", *overrides],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def spam(tmp_path_factory):
    out = tmp_path_factory.mktemp("spam") / "run"
    data = shared_path("data", "sms_spam_collection", "SMSSpamCollection.tsv")
    console = finetune("spam-tiny.yaml", out, f"data.path={data}", "train.epochs=2",
                       "train.batch_size=32", "train.eval_every=10", "train.log_every=5",
                       "tracking.run_name=spam-console")
    return out, console


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("instruct")
    records = json.loads(shared_path("data", "instruction-data.json").read_text())[:120]
    (tmp / "records.json").write_text(json.dumps(records))
    out = tmp / "run"
    console = finetune("instruct-tiny.yaml", out, f"data.path={tmp / 'records.json'}", "train.epochs=2",
                       "train.eval_every=5", "train.log_every=2", "data.max_length=64",
                       "generate.max_new_tokens=4", "train.final_eval_batches=1")
    return out, console


def test_console_of_a_classification_run(spam):
    out, console = spam
    assert "\r" not in console  # no progress-bar redraws in a log file
    log = read_log(out)
    lines = console.splitlines()
    # One line per evaluation, with its step and epoch, the values logged.
    evals = [m for m in map(re.compile(r"step (\d+)/(\d+), epoch (\d+\.\d\d)/2: val loss (\S+), "
                                       r"val accuracy (\S+)%").match, lines) if m]
    val_rows = [r for r in log if "val/accuracy" in r]
    assert [int(m[1]) for m in evals] == [r["step"] for r in val_rows] and len(evals) >= 6
    for m, r in zip(evals, val_rows):
        assert m[4] == f"{r['val/loss']:.4f}" and m[5] == f"{100 * r['val/accuracy']:.2f}"
    steps_per_epoch = int(evals[0][2]) // 2
    assert all(float(m[3]) == pytest.approx(int(m[1]) / steps_per_epoch, abs=0.01) for m in evals)
    # Epoch lines carry that epoch's values (its sample of the training split, its validation).
    ends = [m for m in map(re.compile(r"epoch (\d)/2 done \(step (\d+)\): train \(sample\) loss (\S+), "
                                      r"train \(sample\) accuracy (\S+)%; val loss (\S+), "
                                      r"val accuracy (\S+)%").match, lines) if m]
    assert [int(m[1]) for m in ends] == [1, 2]
    for m in ends:
        step = int(m[2])
        sample = next(r for r in log if r["step"] == step and "train_sample/accuracy" in r)
        val = next(r for r in val_rows if r["step"] == step)
        assert m[3] == f"{sample['train_sample/loss']:.4f}"
        assert m[4] == f"{100 * sample['train_sample/accuracy']:.2f}"
        assert m[5] == f"{val['val/loss']:.4f}" and m[6] == f"{100 * val['val/accuracy']:.2f}"
    assert ends[0].groups()[4:] != ends[1].groups()[4:]  # not one value printed twice
    # The closing summary: every split's metrics, F1, elapsed time, the run folder, what next.
    metrics = json.loads((out / "metrics.json").read_text())
    tail = console[console.index("final evaluation of the kept model"):]
    assert f"(step {metrics['best_step']} of {metrics['steps']}, the best by val_accuracy)" in tail
    for split in ("train", "val", "test"):
        row = re.search(rf"^{split}\s+(\S+)\s+(\S+)%$", tail, re.M)
        assert float(row[1]) == pytest.approx(metrics[f"{split}_loss"], abs=1e-4)
        assert float(row[2]) == pytest.approx(100 * metrics[f"{split}_accuracy"], abs=1e-2)
    assert f"F1 {metrics['test_f1']:.4f} (spam)" in tail
    assert re.search(r"^elapsed: (\d+\.\d s|\d+ min \d\d s) \(startup", tail, re.M)
    assert f"run folder: {out} (" in tail and "loss.png" in tail
    assert f"next:\n  gptft classify {out} " in tail and f"gptft evaluate {out} " in tail


def test_each_logged_key_has_one_meaning(spam, instruct):
    for out, _ in (spam, instruct):
        log = read_log(out)
        keys = Counter((r["step"], k) for r in log for k in r if k not in ("step", "epoch", "examples_seen"))
        assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]  # a key once per step
        assert {k for _, k in keys if k not in KEYS and not k.startswith(PREFIXES)} == set()
        last = max(r["step"] for r in log)
        final = [r for r in log if any(k.startswith("final/") for k in r)]
        assert len(final) == 1 and final[0]["step"] == last
        assert not any(k.startswith(("val/", "train")) for k in final[0] if "/" in k)
        metrics = json.loads((out / "metrics.json").read_text())
        for key, value in final[0].items():
            if key.startswith("final/"):
                assert metrics[key[len("final/"):]] == pytest.approx(value, rel=1e-5)
        # metrics.json: numbers rounded to 6 decimals (no float32 noise)
        floats = [v for v in metrics.values() if isinstance(v, float)]
        assert floats and all(round(v, 6) == v for v in floats)


def _curves(fig) -> dict[str, tuple[list, list, str]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_marker())
            for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}


def test_classification_plots(spam):
    out, _ = spam
    log, metrics = read_log(out), json.loads((out / "metrics.json").read_text())
    assert (out / "loss.png").is_file() and (out / "accuracy.png").is_file()
    figures = run_figures(out, [LOSS, "accuracy"], best_step=metrics["best_step"], title="spam-console")
    for metric, fig in figures.items():
        ax = fig.axes[0]
        assert ax.get_title() == f"spam-console: {metric}"
        curves = _curves(fig)
        assert all(marker not in (None, "None", "") for _, _, marker in curves.values())
        val = [r for r in log if f"val/{metric}" in r]
        # Validation: the evaluations made during training, and no end-of-run re-evaluation.
        assert curves["val"][:2] == ([r["examples_seen"] for r in val], [r[f"val/{metric}"] for r in val])
        best = next(r for r in val if r["step"] == metrics["best_step"])
        star = curves[f"kept (best) model, step {metrics['best_step']}"]
        assert star[:2] == ([best["examples_seen"]], [best[f"val/{metric}"]]) and star[2] == "*"
        top = [a for a in ax.child_axes if a.get_xlabel() == "epoch"]
        assert len(top) == 1 and [t.get_text() for t in top[0].get_xticklabels()] == ["1", "2"]
    train = [r for r in log if "train/loss_mean" in r]
    assert _curves(figures["loss"])["train (mean since the previous point)"][:2] == (
        [r["examples_seen"] for r in train], [r["train/loss_mean"] for r in train])
    # Training accuracy only where it was measured: the epoch-end samples.
    samples = [r for r in log if "train_sample/accuracy" in r]
    assert len(samples) == 2 and _curves(figures["accuracy"])["train (sample at epoch ends)"][1] == [
        r["train_sample/accuracy"] for r in samples]


def test_instruction_run_console_and_plot(instruct):
    out, console = instruct
    log, metrics = read_log(out), json.loads((out / "metrics.json").read_text())
    assert "\r" not in console
    val = [r for r in log if "val/loss" in r]
    evals = re.findall(r"^step (\d+)/\d+, epoch \S+/2: val loss (\S+), val perplexity (\S+)", console, re.M)
    assert [int(s) for s, _, _ in evals] == [r["step"] for r in val]
    ends = re.findall(r"^epoch (\d)/2 done \(step (\d+)\): val loss (\S+), val perplexity (\S+); sample",
                      console, re.M)
    assert [e[0] for e in ends] == ["1", "2"]
    for _, step, loss, ppl in ends:
        row = next(r for r in val if r["step"] == int(step))
        assert loss == f"{row['val/loss']:.4f}" and ppl == f"{row['val/perplexity']:.2f}"
    # A bounded final evaluation says so; the summary has perplexities and the next commands.
    assert metrics["final_eval_batches"] == 1
    assert "final evaluation on at most 1 batches per split (train.final_eval_batches)" in console
    row = re.search(r"^test\s+(\S+)\s+(\S+)$", console, re.M)
    assert float(row[1]) == pytest.approx(metrics["test_loss"], abs=1e-4)
    assert float(row[2]) == pytest.approx(metrics["test_perplexity"], rel=1e-5)
    assert "generating responses to the 12 test instructions" in console
    assert f"gptft chat {out}" in console and "elapsed: " in console
    fig = run_figures(out, [LOSS], best_step=metrics["best_step"])["loss"]
    ax = fig.axes[0]
    assert ax.get_title() == "run: loss"
    curves = _curves(fig)
    assert curves["val"][1] == [r["val/loss"] for r in val]
    right = [a for a in ax.child_axes if a.get_ylabel() == "perplexity"]
    assert len(right) == 1
    # The perplexity axis reads exp(loss).
    assert right[0]._functions[0](2.0) == pytest.approx(math.exp(2.0))
    # Its ticks go by factors (1, 2, 5 x 10^k; linear ticks when less than a decade shows), so they
    # spread over the axis instead of crowding where exp() is steep: no two visible ticks closer
    # than 5% of the loss axis.
    fig.canvas.draw()
    low, high = ax.get_ylim()
    ticks = [t for t in right[0].get_yticks() if low <= math.log(t) <= high]
    assert len(ticks) >= 2
    gaps = [math.log(b) - math.log(a) for a, b in zip(ticks, ticks[1:])]
    assert min(gaps) >= 0.05 * (high - low), ticks
