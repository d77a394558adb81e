"""gptft.cpu: large blocks freed by one training step are reused by the next, without page faults."""

import json
import os
import platform
import subprocess
import sys

import pytest

# Allocate, touch and free a 64 MiB tensor (the size class of GPT-2's embedding gradient) 25
# times, as training steps do; count the minor page faults of the last five (the steady state: the
# heap takes a few rounds to settle).
SCRIPT = """
import json, resource, torch
from gptft.cpu import keep_freed_memory
tuned = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(25):
    if i == 20:
        before = faults()
    x = torch.ones(16 << 20)  # 64 MiB, every page written
    del x
print(json.dumps({"tuned": tuned, "faults": faults() - before}))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt")


def _run(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={**os.environ, **env}, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.slow
def test_freed_blocks_are_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    tuned, default = _run(), _run(GPTFT_CPU_ALLOCATOR="default")
    assert tuned["tuned"] and not default["tuned"]
    assert default["faults"] >= 5 * pages * 0.9  # glibc maps each block afresh: every page faults
    assert tuned["faults"] < pages  # the block is reused from the heap
