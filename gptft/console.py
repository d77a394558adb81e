"""What a run prints for people: metrics, durations, the final metrics table, progress bars."""

from __future__ import annotations

import os
from typing import Any

SPLITS = ("train", "val", "test")


def format_value(name: str, value: float) -> str:
    """A metric for people: accuracies as percentages, perplexities to 2 decimals, else 4."""
    if "accuracy" in name:
        return f"{value:.2%}"
    return f"{value:.2f}" if "perplexity" in name else f"{value:.4f}"


def format_metrics(metrics: dict[str, float], prefix: str = "") -> str:
    """``val loss 0.4123, val accuracy 95.30%``: accuracies as percentages, the rest to 4 digits."""
    return ", ".join(f"{prefix}{k.replace('_', ' ')} {format_value(k, v)}"
                     for k, v in metrics.items() if isinstance(v, (int, float)))


def metrics_table(metrics: dict, names: tuple[str, ...]) -> str:
    """One row per split evaluated, one column per metric (accuracies as percentages)."""
    splits = [s for s in SPLITS if any(f"{s}_{n}" in metrics for n in names)]
    widths = [max(len(n), 8) + 2 for n in names]
    header = f"{'':6}" + "".join(f"{n.replace('_', ' '):>{w}}" for n, w in zip(names, widths))
    rows = [f"{s:6}" + "".join(f"{_fmt(n, metrics.get(f'{s}_{n}')):>{w}}" for n, w in zip(names, widths))
            for s in splits]
    return "\n".join([header, *rows])


def _fmt(name: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return format_value(name, value)


def duration(seconds: float) -> str:
    """``42.0 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def progress_disabled(accelerator) -> bool | None:
    """tqdm's ``disable`` for a bar: shown on the local main process when stderr is a terminal
    (None lets tqdm check), so a log file gets the per-evaluation lines instead of bar redraws;
    ``GPTFT_PROGRESS=1`` shows it anyway (benchmarks time the steps by it), ``0`` never."""
    if not accelerator.is_local_main_process:
        return True
    setting = os.environ.get("GPTFT_PROGRESS", "")
    return {"1": False, "0": True}.get(setting)
