"""``gptft finetune`` with the token and position embeddings frozen on top of ``model.trainable``.

The control run of docs/lora.md: full fine-tuning of everything LoRA's frozen base leaves fixed
except the embeddings, to tell what LoRA loses from what frozen random embeddings lose.

    python benchmarks/frozen_embeddings.py --config configs/spam-tiny.yaml [key=value ...]
"""

from __future__ import annotations

import sys

import gptft.tasks.classification.task as classification
from gptft.cli import main
from gptft.trainable import set_trainable


def set_trainable_frozen_embeddings(model, policy, lora=None) -> int:
    set_trainable(model, policy, lora)
    model.backbone.wte.requires_grad_(False)
    model.backbone.wpe.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    classification.set_trainable = set_trainable_frozen_embeddings
    sys.exit(main(["finetune", *sys.argv[1:]]))
