"""FSDP (configs/accelerate/fsdp.yaml) for real: what it does on the CPU, and on GPUs.

On the CPU, Accelerate 1.15 does not shard: its ``AcceleratorState`` honours an FSDP plugin only
for accelerator process groups (``MULTI_GPU``, ``MULTI_XPU``, ...), and CPU processes over gloo
are ``MULTI_CPU``, i.e. DDP. (Before that, ``fsdp_sync_module_states: true`` stops a CPU-only
launch with "There are currently no available devices found".) gptft says so in one warning line,
and the run equals the DDP run. With two or more CUDA GPUs the FSDP run (a shard unit per Block,
full state dict) must equal the DDP run, its checkpoints included, and resume to the same end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cpu_launch_env, free_port
from safetensors.torch import load_file
from test_distributed import (
    COMMON,
    CONFIGS,
    ROOT,
    B,
    _train_losses,
    _wait,
    assert_same_training,
    run_two_processes,
    spam_splits,  # noqa: F401  (a fixture)
)

pytestmark = pytest.mark.slow  # real multi-process launches


def fsdp_config(tmp: Path, cpu: bool) -> Path:
    """configs/accelerate/fsdp.yaml for 2 processes in fp32 (on the CPU: no device to sync on)."""
    cfg = yaml.safe_load((CONFIGS / "accelerate" / "fsdp.yaml").read_text())
    cfg.update(num_processes=2, mixed_precision="no")
    if cpu:
        cfg.update(use_cpu=True, gpu_ids=None)
        cfg["fsdp_config"]["fsdp_sync_module_states"] = False
    path = tmp / "fsdp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_with(config_file: Path, out: Path, overrides: list[str], env: dict[str, str]) -> Path:
    job = ["--config", str(CONFIGS / "spam-tiny.yaml"), *COMMON, *overrides, f"train.batch_size={B}",
           f"output_dir={out}"]
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                 str(config_file), "--main_process_port", str(free_port()),
                                 str(ROOT / "launch" / "finetune.py"), *job],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    _wait([proc], [log])
    return out


def test_fsdp_config_on_cpu_runs_as_ddp_and_says_so(tmp_path, spam_splits):  # noqa: F811
    ddp = run_two_processes("spam-tiny.yaml", tmp_path / "ddp", spam_splits)
    fsdp = run_with(fsdp_config(tmp_path, cpu=True), tmp_path / "fsdp", spam_splits, cpu_launch_env())
    log = (tmp_path / "fsdp.log").read_text()
    assert log.count("warning: FSDP was requested, but Accelerate runs these processes as MULTI_CPU "
                     "(data parallel, no sharding)") == 1  # the main process only
    assert "warning: FSDP" not in (tmp_path / "ddp.log").read_text()
    assert_same_training(ddp, fsdp)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP over NCCL needs 2 CUDA GPUs")
def test_fsdp_on_gpus_equals_ddp_and_resumes(tmp_path, spam_splits):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               CUDA_VISIBLE_DEVICES=env.get("CUDA_VISIBLE_DEVICES", "0,1"))
    gpu = ["train.device=auto", "train.compile=false"]
    multi_gpu = yaml.safe_load((CONFIGS / "accelerate" / "multi-gpu.yaml").read_text())
    multi_gpu.update(num_processes=2, mixed_precision="no", gpu_ids="all")
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(multi_gpu))
    ddp = run_with(tmp_path / "ddp.yaml", tmp_path / "ddp", [*spam_splits, *gpu], env)
    config = fsdp_config(tmp_path, cpu=False)
    fsdp = run_with(config, tmp_path / "fsdp", [*spam_splits, *gpu], env)
    assert "warning: FSDP" not in (tmp_path / "fsdp.log").read_text()
    assert_same_training(ddp, fsdp)  # per-step losses, final weights and last checkpoint to 1e-5
    first = min((fsdp / "checkpoints").glob("step-*"))  # the end of epoch 1
    resumed = run_with(config, tmp_path / "resumed",
                       [*spam_splits, *gpu, f"train.resume={first}"], env)
    after = _train_losses(resumed)
    assert after and [s[:2] for s in after] == [s[:2] for s in _train_losses(fsdp)[-len(after):]]
    assert [s[2] for s in after] == pytest.approx([s[2] for s in _train_losses(fsdp)[-len(after):]],
                                                  abs=1e-5, rel=1e-5)
    last = max((fsdp / "checkpoints").glob("step-*")).name
    for name in ("model.safetensors", f"checkpoints/{last}/model.safetensors"):
        wa, wb = load_file(fsdp / name), load_file(resumed / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)
