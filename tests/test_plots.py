"""The book's figures from ``log.jsonl``: what each curve is made of."""

import json

import matplotlib.axes

from gptft.plots import plot_run


def test_curves_take_step_losses_and_evaluations(tmp_path, monkeypatch):
    rows = [
        {"step": 1, "examples_seen": 8, "train/loss": 0.9, "train/lr": 1e-4},
        {"step": 2, "examples_seen": 16, "val/loss": 0.7, "val/accuracy": 0.6},
        {"step": 2, "examples_seen": 16, "train/loss": 0.8, "train/lr": 1e-4},
        {"step": 2, "examples_seen": 16, "train/loss": 0.5, "train/accuracy": 0.75},  # epoch-end eval
        {"step": 2, "examples_seen": 16, "train/loss": 0.4, "train/accuracy": 0.8, "val/loss": None},
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = {}
    real_plot = matplotlib.axes.Axes.plot

    def spy(self, x, y, *args, label, **kwargs):
        curves[label] = (list(x), list(y))
        return real_plot(self, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    paths = plot_run(tmp_path, ["loss", "accuracy"])
    assert [p.name for p in paths] == ["loss.png", "accuracy.png"] and all(p.is_file() for p in paths)
    assert curves == {"train loss": ([8, 16], [0.9, 0.8]), "val loss": ([16], [0.7]),
                      "train accuracy": ([16, 16], [0.75, 0.8]), "val accuracy": ([16], [0.6])}
