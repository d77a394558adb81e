"""Which parameters train: the policies of ``model.trainable``, for any task's model.

A task model is a language model of any family (``gptft.models``: its ``blocks`` and
``final_norm``) or wraps one as ``backbone``, optionally with a
task ``head`` (e.g. ``GPTClassifier``); the policies apply to the language model, and a head always trains.
"""

from __future__ import annotations

import torch.nn as nn

from gptft.config import LoRAConfig
from gptft.errors import GPTFTError

POLICIES = ("head", "last_block", "last_two_blocks", "all", "lora")


def set_trainable(model: nn.Module, policy: str, lora: LoRAConfig | None = None) -> int:
    """Freeze all but what `policy` trains; return the number of trainable parameters.

    Policies: ``head`` (the task head only), ``last_block`` (+ last block and final LayerNorm,
    the book's choice), ``last_two_blocks``, ``all``, ``lora`` (LoRA adapters from `lora`, a
    ``LoRAConfig``, plus the head). A model without a head (a plain GPT) has the same policies.

    Raises:
        GPTFTError: when the policy leaves nothing to train (``head`` on a model without one).
    """
    if policy not in POLICIES:
        raise GPTFTError(f"model.trainable: must be one of {', '.join(POLICIES)} (got {policy!r})")
    gpt = getattr(model, "backbone", model)
    head = getattr(model, "head", None)
    if policy == "lora":
        from gptft.lora import apply_lora

        apply_lora(model, lora or LoRAConfig())
    else:
        model.requires_grad_(policy == "all")
    if policy in ("last_block", "last_two_blocks"):
        for block in gpt.blocks[-1 if policy == "last_block" else -2 :]:
            block.requires_grad_(True)
        gpt.final_norm.requires_grad_(True)
    if head is not None:
        head.requires_grad_(True)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise GPTFTError(f"model.trainable={policy}: leaves no parameter to train for this task")
    return n
