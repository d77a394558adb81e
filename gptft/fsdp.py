"""FSDP2: shard a model over processes with PyTorch's ``fully_shard``, block by block.

Each of the model interface's ``blocks`` is its own unit (its parameters gathered just before its
forward and backward, and freed after), the rest (embeddings, final norm, head) the root's; with
``mixed_precision`` the gathered parameters are bf16/fp16 and gradients are reduced in fp32; with
``cpu_offload`` the sharded parameters, gradients and optimizer state live on the host.

Accelerate does the same from a launcher config (``configs/accelerate/fsdp.yaml``: ``fsdp_version:
2``, ``fsdp_transformer_layer_cls_to_wrap`` the family's block class) on GPUs; this module is the
same sharding without Accelerate, so that it runs (and is tested) on gloo CPU processes, and holds
the sharded checkpoint (``torch.distributed.checkpoint``: every process writes its own shards, and
a checkpoint loads on another number of processes) and the gathering of the full weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from gptft.activations import decoder_of

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def shard(model: nn.Module, mesh=None, mixed_precision: str = "no", cpu_offload: bool = False) -> nn.Module:
    """Shard `model` in place with ``fully_shard``: each block, then the root; returns it.

    Args:
        model: a model with the model interface (or a task model wrapping one).
        mesh: a 1-D ``DeviceMesh`` of the processes (default: all of the default process group).
        mixed_precision: ``no``, ``bf16`` or ``fp16`` (``train.mixed_precision``).
        cpu_offload: keep the shards on the host.
    """
    dtype = _DTYPES.get(mixed_precision)
    options = {"mesh": mesh,
               "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
               if dtype else MixedPrecisionPolicy(),
               "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for block in decoder_of(model).blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered onto the CPU of process 0 (empty elsewhere): what
    ``model.safetensors`` holds. Every process must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str | Path) -> None:
    """Save the model's and optimizer's shards into `folder` (every process writes its own)."""
    import torch.distributed.checkpoint as dcp

    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(folder))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str | Path) -> None:
    """Load `folder` (``save_sharded``) into the sharded `model` and its `optimizer`."""
    import torch.distributed.checkpoint as dcp

    weights, optim = get_state_dict(model, optimizer)
    state = {"model": weights, "optimizer": optim}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
