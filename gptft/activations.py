"""Activation checkpointing (``train.activation_checkpointing``): keep only each checkpointed
block's input in the forward pass and recompute the block in the backward pass.

A block's activations (attention input, q/k/v, the MLP's 4x-wide hidden layer...) are most of the
memory a long sequence takes; with every block checkpointed, only one block's worth is alive at
the peak of the backward pass, at the cost of one more forward pass per step (about +33% compute).

The unit is the model interface's ``blocks`` (every family has them), wrapped with PyTorch's
non-reentrant ``torch.utils.checkpoint`` (it saves and restores the RNG, so dropout draws the same
masks when recomputed: gradients equal the run without checkpointing). Only the block's
``forward`` and ``forward_at`` change (the instance's class becomes a subclass that checkpoints
them): the module tree, the parameter names and so the state dict, checkpoints, LoRA and FSDP
wrapping stay as they are.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from gptft.errors import GPTFTError


def decoder_of(model: nn.Module) -> nn.Module:
    """The language model inside `model` (itself, a classifier's ``backbone``, ...): the first
    module offering the model interface's ``blocks``."""
    for module in model.modules():
        if isinstance(getattr(module, "blocks", None), nn.ModuleList) and hasattr(module, "block_class"):
            return module
    raise GPTFTError(f"{type(model).__name__}: no model with blocks inside (the model interface)")


def checkpointed_blocks(n_blocks: int, setting: bool | int) -> list[int]:
    """Indices of the blocks to checkpoint: none (false), all (true), every Nth (an int N: blocks
    N-1, 2N-1, ...; 1 is every block)."""
    if setting is False or setting is None:
        return []
    every = 1 if setting is True else int(setting)
    return [i for i in range(n_blocks) if (i + 1) % every == 0]


def apply_activation_checkpointing(model: nn.Module, setting: bool | int) -> list[int]:
    """Checkpoint the blocks ``checkpointed_blocks`` picks in `model`'s language model; returns
    their indices. Evaluation (no gradients) runs the blocks plainly."""
    blocks = decoder_of(model).blocks
    chosen = checkpointed_blocks(len(blocks), setting)
    for i in chosen:
        block = blocks[i]
        if not getattr(block, "_checkpointed", False):
            block.__class__ = _checkpointed_class(type(block))
    return chosen


@functools.cache
def _checkpointed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of the block class `cls` whose ``forward`` (and ``forward_at``, if any) run under
    ``checkpoint`` when gradients are on. Swapping an instance's class (as FSDP2's ``fully_shard``
    does) keeps the instance, its parameters and its name; a ``deepcopy`` copies it correctly."""

    def wrap(name: str):
        method = getattr(cls, name)

        def run(self, *args, **kwargs):
            if not torch.is_grad_enabled():
                return method(self, *args, **kwargs)
            return checkpoint(method, self, *args, use_reentrant=False, **kwargs)
        return functools.wraps(method)(run)

    body = {name: wrap(name) for name in ("forward", "forward_at") if hasattr(cls, name)}
    body["_checkpointed"] = True
    return type(cls.__name__, (cls,), {**body, "__qualname__": cls.__qualname__,
                                         "__module__": cls.__module__})
