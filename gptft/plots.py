"""Figures of a run (the book's loss and accuracy curves against examples seen)."""

from __future__ import annotations

import json
from pathlib import Path

from gptft.io import atomic_write


def plot_run(run_dir: Path, metrics: list[str]) -> list[Path]:
    """Write ``<metric>.png`` for each metric: train/val values from ``log.jsonl`` against examples seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line]
    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(5, 3))
        for split in ("train", "val"):
            # The training loss: the logged steps' (rows with the learning rate), not the
            # evaluations of the training split that share its key (epoch ends, the final metrics).
            step_rows = split == "train" and metric == "loss"
            points = [(r["examples_seen"], r[f"{split}/{metric}"]) for r in rows
                      if isinstance(r.get(f"{split}/{metric}"), (int, float))
                      and (not step_rows or "train/lr" in r)]
            if points:
                ax.plot(*zip(*points), label=f"{split} {metric}",
                        linestyle="-" if split == "train" else "-.")
        ax.set_xlabel("examples seen")
        ax.set_ylabel(metric)
        ax.legend()
        fig.tight_layout()
        path = run_dir / f"{metric}.png"
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
        written.append(path)
    return written
