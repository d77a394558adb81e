"""Figures of a run from its ``log.jsonl``: the values measured during training against examples
seen (the book's figures), with markers, epoch ticks and the kept (best) step marked.

Only what was measured while training is drawn: the training loss averaged over each logging
window (``train/loss_mean``), each validation (``val/*``) and the epoch-end samples of the
training split (``train_sample/*``). The final evaluation of the kept model (``final/*``) is not a
point of the training curve; the step whose weights were kept is marked instead. A task declares
its figures (``gptft.runfolder.Figure``: a metric and, if not the default ones, its curves).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gptft.io import atomic_write
from gptft.runfolder import LOG, Curve, Figure


def curves_of(figure: Figure) -> tuple[Curve, ...]:
    """The curves of `figure`: its own, else the training sample and validation of its metric."""
    metric = figure.metric
    return figure.curves or (("train (sample at epoch ends)", f"train_sample/{metric}", "--", "s"),
                             ("val", f"val/{metric}", "-.", "o"))


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``log.jsonl``; a line that is not a JSON object with a step (edited or damaged
    by hand) is left out with a warning, not the end of a run that trained."""
    rows, bad = [], []
    for number, line in enumerate((run_dir / LOG).read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except (ValueError, RecursionError):
            row = False
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif row is not None:
            bad.append(number)
    if bad:
        print(f"warning: {run_dir / LOG}: line {', '.join(map(str, bad[:5]))}"
              f"{' ...' if len(bad) > 5 else ''} not a logged row (a JSON object with a step): "
              "left out of the plots", file=sys.stderr)
    return rows


def points(rows: list[dict], key: str) -> list[tuple[int, int, float]]:
    """(examples seen, step, value) of every row with a finite number under `key`."""
    return [(r["examples_seen"], r["step"], r[key]) for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def epoch_ends(rows: list[dict]) -> list[tuple[int, int]]:
    """(epoch, examples seen at its end) of each finished epoch: its first row logged after it."""
    ends: dict[int, int] = {}
    for r in rows:
        e = r.get("epoch", 0)
        if e >= 1:
            ends[e] = min(ends.get(e, r["examples_seen"]), r["examples_seen"])
    return sorted(ends.items())


def run_figures(run_dir: Path, figures: Sequence[Figure | str], best_step: int | None = None,
                title: str | None = None) -> dict[str, Any]:
    """A matplotlib figure per declared figure (a name: ``Figure(name)``), by metric name (the
    caller saves and closes them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter

    rows = read_log(run_dir)
    name = title or run_dir.name
    drawn_figures = {}
    for figure in (Figure(f) if isinstance(f, str) else f for f in figures):
        metric = figure.metric
        fig, ax = plt.subplots(figsize=(6.4, 4))
        drawn, starred = [], False
        for label, key, style, marker in curves_of(figure):
            data = points(rows, key)
            if data:
                x, _, y = zip(*data)
                ax.plot(x, y, linestyle=style, marker=marker, markersize=4, label=label)
                drawn += y
            if key.startswith("val/") and best_step is not None:
                starred = _mark_best(ax, data, best_step, legend=not starred) or starred
        if drawn and min(drawn) > 0 and max(drawn) / min(drawn) > 10:
            ax.set_yscale("log")  # a falling loss spans decades: a linear axis flattens its end
        if metric == "loss" and any("val/perplexity" in r for r in rows):
            right = ax.secondary_yaxis("right", functions=(_exp, _log))
            # exp of a linear loss axis: perplexity grows by factors, so ticks by factors too
            right.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            right.yaxis.set_major_formatter(ScalarFormatter())
            right.yaxis.set_minor_locator(NullLocator())
            right.set_ylabel("perplexity")
        _epoch_ticks(ax, rows)
        ax.set_xlabel("examples seen")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{name}: {metric.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        if drawn:
            # Below the axes: a legend inside would cover the curves' ends.
            ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
                      frameon=False)
        fig.tight_layout()
        drawn_figures[metric] = fig
    return drawn_figures


def plot_run(run_dir: Path, figures: Sequence[Figure | str], best_step: int | None = None,
             title: str | None = None) -> list[Path]:
    """Write each figure's file, ``<metric>.png`` (see ``run_figures``); the paths written."""
    import matplotlib.pyplot as plt

    written = []
    for metric, fig in run_figures(run_dir, figures, best_step, title).items():
        path = run_dir / Figure(metric).file
        atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=100, format="png",
                                                                bbox_inches="tight"))
        plt.close(fig)
        written.append(path)
    return written


def _mark_best(ax, data: list[tuple[int, int, float]], best_step: int, legend: bool = True) -> bool:
    """A star on the validation point whose weights the run kept (its value when measured);
    whether there was one (`legend`: name it in the legend, once per figure)."""
    for x, step, y in data:
        if step == best_step:
            label = f"kept (best) model, step {step}" if legend else "_kept"
            ax.plot([x], [y], linestyle="none", marker="*", markersize=12, color="gold",
                    markeredgecolor="black", label=label, zorder=5)
            return True
    return False


def _epoch_ticks(ax, rows: list[dict]) -> None:
    """Epoch ends as dotted lines, numbered on a top axis."""
    ends = epoch_ends(rows)
    if not ends:
        return
    for _, x in ends:
        ax.axvline(x, color="grey", linestyle=":", linewidth=0.8)
    top = ax.secondary_xaxis("top")
    top.set_xticks([x for _, x in ends], labels=[str(e) for e, _ in ends])
    top.set_xlabel("epoch")


def _exp(x):
    import numpy as np

    return np.exp(np.clip(x, None, 50))


def _log(x):
    import numpy as np

    return np.log(np.clip(x, 1e-12, None))
