"""The figures from ``log.jsonl``: what each curve is made of (by data, not by pixels)."""

import json

from gptft.plots import epoch_ends, plot_run, run_figures
from gptft.runfolder import LOSS
from gptft.tasks.preference.task import REWARDS

ROWS = [
    {"step": 1, "epoch": 0, "examples_seen": 8, "train/loss": 0.9, "train/loss_mean": 0.9, "train/lr": 1e-4},
    {"step": 2, "epoch": 0, "examples_seen": 16, "train/loss": 0.7, "train/loss_mean": 0.8, "train/lr": 1e-4},
    {"step": 2, "epoch": 1, "examples_seen": 16, "val/loss": 0.7, "val/accuracy": 0.6},
    {"step": 2, "epoch": 1, "examples_seen": 16, "train_sample/loss": 0.5, "train_sample/accuracy": 0.75},
    {"step": 4, "epoch": 1, "examples_seen": 32, "train/loss": 0.01, "train/loss_mean": 0.05,
     "train/lr": 1e-4},
    {"step": 4, "epoch": 2, "examples_seen": 32, "val/loss": 0.5, "val/accuracy": 0.7},
    {"step": 4, "epoch": 2, "examples_seen": 32, "train_sample/loss": 0.2, "train_sample/accuracy": 0.9},
    # The final evaluation of the kept model: not a point of any training curve.
    {"step": 4, "epoch": 2, "examples_seen": 32, "final/train_loss": 0.25, "final/val_loss": 0.45,
     "final/val_accuracy": 0.72, "final/train_accuracy": 0.95},
]


def _curves(fig):
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_marker())
            for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}


def test_curves_are_what_was_measured_during_training(tmp_path):
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    figs = run_figures(tmp_path, [LOSS, "accuracy"], best_step=4, title="my-run")
    loss, acc = _curves(figs["loss"]), _curves(figs["accuracy"])
    assert loss == {"train (mean since the previous point)": ([8, 16, 32], [0.9, 0.8, 0.05], "."),
                    "val": ([16, 32], [0.7, 0.5], "o"),
                    "kept (best) model, step 4": ([32], [0.5], "*")}
    assert acc == {"train (sample at epoch ends)": ([16, 32], [0.75, 0.9], "s"),
                   "val": ([16, 32], [0.6, 0.7], "o"), "kept (best) model, step 4": ([32], [0.7], "*")}
    assert figs["loss"].axes[0].get_title() == "my-run: loss"
    assert figs["loss"].axes[0].get_yscale() == "log"  # 0.9 down to 0.05: a log scale
    assert figs["accuracy"].axes[0].get_yscale() == "linear"
    assert epoch_ends(ROWS) == [(1, 16), (2, 32)]
    paths = plot_run(tmp_path, [LOSS, "accuracy"], best_step=4)
    assert [p.name for p in paths] == ["loss.png", "accuracy.png"] and all(p.is_file() for p in paths)


def test_preference_reward_curves(tmp_path):
    rows = [{"step": s, "epoch": 0, "examples_seen": 4 * s, "val/loss": 0.69 - 0.01 * s,
             "val/reward_chosen": 0.1 * s, "val/reward_rejected": -0.1 * s, "val/reward_margin": 0.2 * s}
            for s in (1, 2, 3)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figs = run_figures(tmp_path, [REWARDS, "reward_margin"], best_step=3)
    rewards = _curves(figs["rewards"])
    assert rewards["val chosen"][1] == [0.1, 0.2, 0.30000000000000004]
    assert rewards["val rejected"][1] == [-0.1, -0.2, -0.30000000000000004]
    assert _curves(figs["reward_margin"])["val"][1] == [r["val/reward_margin"] for r in rows]
    # The kept step starred on both reward curves, named once in the legend.
    stars = [line for line in figs["rewards"].axes[0].get_lines() if line.get_marker() == "*"]
    assert [(list(s.get_xdata()), list(s.get_ydata())) for s in stars] == [([12], [0.30000000000000004]),
                                                                          ([12], [-0.30000000000000004])]
    assert [t.get_text() for t in figs["rewards"].axes[0].get_legend().get_texts()].count(
        "kept (best) model, step 3") == 1
    assert figs["rewards"].axes[0].get_title() == f"{tmp_path.name}: rewards"


def test_perplexity_ticks_spread_over_a_falling_loss(tmp_path):
    """A loss falling from 10.8 to 3.6 spans perplexities 37 to 49,000: ticks by factors, not the
    linear 10,000-steps that crowd at the top of the axis and leave the rest unlabelled."""
    import math

    rows = [{"step": s, "epoch": 0, "examples_seen": 8 * s, "train/loss_mean": 10.8 - 0.6 * s,
             "val/loss": 10.5 - 0.6 * s, "val/perplexity": math.exp(10.5 - 0.6 * s)} for s in range(1, 13)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = run_figures(tmp_path, [LOSS], best_step=12)["loss"]
    ax = fig.axes[0]
    right = next(a for a in ax.child_axes if a.get_ylabel() == "perplexity")
    fig.canvas.draw()
    low, high = ax.get_ylim()
    ticks = [t for t in right.get_yticks() if low <= math.log(t) <= high]
    assert len(ticks) >= 4
    gaps = [math.log(b) - math.log(a) for a, b in zip(ticks, ticks[1:])]
    assert min(gaps) >= 0.05 * (high - low), ticks
    assert math.log(ticks[0]) - low < 0.25 * (high - low)  # the low end (the trained model) is labelled
