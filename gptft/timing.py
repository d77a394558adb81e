"""Where a job's wall time goes: named phases, summed, reported in ``metrics.json`` and the log."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


def process_start() -> float:
    """When this job started, on ``time.time()``'s clock: the ``accelerate launch`` launcher's
    start when it started this process (its own imports count too), else this process's."""
    try:
        import psutil

        proc = psutil.Process()
        parent = proc.parent()
        if parent is not None and any("accelerate" in part for part in parent.cmdline()[:3]):
            return parent.create_time()
        return proc.create_time()
    except Exception:  # no psutil, no /proc: count from the first call instead
        return time.time()


class Phases:
    """Seconds spent in each named phase (``with phases("validation"): ...``), plus the time
    since the job started (`start`, a ``time.time()``; default: now)."""

    def __init__(self, start: float | None = None):
        self.start = start if start is not None else time.time()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - begin

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def elapsed(self) -> float:
        """Seconds since the job started."""
        return time.time() - self.start

    def report(self) -> dict[str, float]:
        """Every phase and the total, rounded to milliseconds."""
        return {**{k: round(v, 3) for k, v in self.seconds.items()}, "total": round(self.elapsed(), 3)}
