"""The CPU allocator: keep freed blocks for the next training step instead of returning them.

glibc's malloc serves a block above its mmap threshold (at most 32 MiB by its own adjustment) with
a fresh ``mmap`` and returns it to the kernel on ``free``; the kernel then zeroes every page of
the next such block on first touch. A training step frees and allocates the same large blocks
every time (the 51 MiB dense gradient of GPT-2's embedding table, activations), so each step pays
thousands of page faults: a quarter of a spam-tiny step on this project's CPU. ``keep_freed_memory``
raises the mmap and trim thresholds with ``mallopt`` (what the ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` variables do at start-up), so those blocks are reused from the heap, as
PyTorch's caching allocator reuses GPU memory and as its CPU tuning guide's jemalloc / tcmalloc
advice achieves. The process keeps its peak memory instead of returning it between steps.
``GPTFT_CPU_ALLOCATOR=default`` leaves glibc as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from pathlib import Path

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
THRESHOLD = 1 << 30  # blocks under 1 GiB come from (and go back to) the heap


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (Linux with glibc; once per process is enough).
    Returns whether both settings took effect."""
    if os.environ.get("GPTFT_CPU_ALLOCATOR", "").lower() == "default":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows), for reports."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
