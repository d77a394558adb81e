"""The Accelerator a run trains with, and the process-wide settings of PyTorch's backends that go
with it (set where the run is set up, ``gptft.run``, not as a side effect of training)."""

from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import InitProcessGroupKwargs

from gptft.config import Job


def set_backend_flags() -> None:
    """TF32 matmuls on Ampere and later (fp32 jobs), and no cuDNN attention: it builds a plan for
    every new sequence length (~0.3 s each on an H200); the flash and memory-efficient kernels
    need none and are as fast at GPT-2's sizes."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)


def make_accelerator(job: Job) -> Accelerator:
    """The Accelerator for a job: device, mixed precision, the W&B tracker and the collective
    timeout (``train.timeout_minutes``); the backend flags set (``set_backend_flags``)."""
    set_backend_flags()
    return Accelerator(
        cpu=job.train.device == "cpu",
        mixed_precision=job.train.mixed_precision,
        log_with="wandb" if job.tracking.wandb else None,
        project_dir=job.output_dir,
        dataloader_config=DataLoaderConfiguration(non_blocking=True),  # with pinned memory on CUDA
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=job.train.timeout_minutes))],
    )


def use_compile(setting: str | bool, device: torch.device) -> bool:
    """``train.compile``: true / false, or auto (on for CUDA, off on the CPU)."""
    return setting is True or (setting == "auto" and device.type == "cuda")
