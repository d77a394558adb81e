"""gptft's FSDP2 (gptft/fsdp.py: ``fully_shard`` per block) on two gloo CPU processes, with
PyTorch directly (Accelerate shards only on GPUs): the same losses and weights as DDP (1e-5), also
with activation checkpointing, and a run resumed from its sharded checkpoint equals the
uninterrupted one (tests/fsdp2_worker.py does the training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cpu_launch_env, free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fsdp2_equals_ddp_and_resumes_from_its_sharded_checkpoint(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "tests/fsdp2_worker.py", str(out)],
                          cwd=ROOT, env=cpu_launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert 0.45 < r["local_share"] < 0.55  # each process holds half of the parameters
    assert r["fsdp"] == pytest.approx(r["ddp"], abs=1e-5)
    assert r["checkpointed"] == pytest.approx(r["ddp"], abs=1e-5)
    assert r["fsdp_vs_ddp_weights"] <= 1e-5
    assert r["resumed"] == pytest.approx(r["fsdp"], abs=1e-5)
    assert r["resumed_vs_fsdp_weights"] <= 1e-5
    assert "wte.weight" in r["weights"] and "h.1.mlp.c_fc.weight" in r["weights"]  # gptft's names
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(r["sharded_files"])  # one shard file a process
