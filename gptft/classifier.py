"""Label texts with a fine-tuned model: ``gptft classify RUN_DIR "text" ...``.

Also the classifier module itself (GPT backbone + linear head on the last real token) and the
trainable-parameter policies shared by both tasks.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from gptft.errors import GPTFTError
from gptft.model import GPT, GPTConfig
from gptft.runs import load_meta, load_state_into
from gptft.tokenizer import Tokenizer


class GPTClassifier(nn.Module):
    """A GPT backbone with a linear head read at each sequence's last real token.

    Inputs are right-padded, so causal attention alone keeps padding out of every real position;
    the head is applied at ``lengths - 1`` only (never at position -1, a pad), and the vocabulary
    projection is never computed.
    """

    def __init__(self, backbone: GPT, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.emb_dim, num_classes)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes) for right-padded `input_ids` with real `lengths`."""
        return self.head(self.backbone.pooled_hidden_states(input_ids, lengths - 1))


def set_trainable(model: nn.Module, policy: str, lora=None) -> int:
    """Freeze all but what `policy` trains; return the number of trainable parameters.

    Policies: ``head`` (classification head only), ``last_block`` (+ last block and final
    LayerNorm, the book's choice), ``last_two_blocks``, ``all``, ``lora`` (LoRA adapters from
    `lora`, a ``LoRAConfig``, plus the head). For a plain GPT (instruction tuning) the same
    policies apply without a head.
    """
    gpt = model.backbone if isinstance(model, GPTClassifier) else model
    head = model.head if isinstance(model, GPTClassifier) else None
    if policy == "lora":
        from gptft.lora import apply_lora

        apply_lora(model, lora)
    else:
        model.requires_grad_(policy == "all")
    if policy in ("last_block", "last_two_blocks"):
        for block in gpt.h[-1 if policy == "last_block" else -2 :]:
            block.requires_grad_(True)
        gpt.ln_f.requires_grad_(True)
    if head is not None:
        head.requires_grad_(True)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n == 0:
        raise GPTFTError(f"model.trainable={policy}: leaves no parameter to train for this task")
    return n


@dataclass
class Prediction:
    label: str
    probability: float


class Classifier:
    """A fine-tuned classifier ready to label texts (see ``load_classifier``)."""

    def __init__(self, model: GPTClassifier, labels: list[str], max_length: int,
                 tokenizer: Tokenizer, device: str | torch.device = "cpu"):
        self.model, self.labels, self.max_length = model.eval().to(device), labels, max_length
        self.tokenizer, self.device = tokenizer, torch.device(device)

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 32) -> list[Prediction]:
        """Label and probability of the most likely class for each text."""
        out = []
        for i in range(0, len(texts), batch_size):
            ids = [t[: self.max_length] or [self.tokenizer.eot_id]
                   for t in self.tokenizer.encode_batch(texts[i : i + batch_size])]
            lengths = torch.tensor([len(t) for t in ids])
            batch = torch.full((len(ids), int(lengths.max())), self.tokenizer.eot_id)
            for row, t in enumerate(ids):
                batch[row, : len(t)] = torch.tensor(t)
            probs = self.model(batch.to(self.device), lengths.to(self.device)).float().softmax(-1)
            p, k = probs.max(-1)
            out += [Prediction(self.labels[j], float(q)) for j, q in zip(k.tolist(), p.tolist())]
        return out


def load_classifier(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Classifier:
    """Rebuild the classifier saved in a run folder: ``load_classifier(RUN).predict([...])``."""
    meta = load_meta(run_dir, task="classification")
    model = GPTClassifier(GPT(GPTConfig(**meta["model"])), len(meta["labels"]))
    load_state_into(model, run_dir)
    return Classifier(model, meta["labels"], meta["max_length"], Tokenizer(meta["tokenizer"]), device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder of a classification fine-tune")
    parser.add_argument("texts", nargs="*", help="texts to label")
    parser.add_argument("--file", help="texts to label: one per line, or a CSV/TSV/JSONL with a "
                        "'text' column")
    parser.add_argument("--batch-size", type=int, default=32)


def run(args: argparse.Namespace) -> int:
    texts = list(args.texts)
    if args.file:
        from gptft.data.classification import read_texts_file

        texts += read_texts_file(args.file)
    if not texts:
        raise GPTFTError("no text to classify: give texts as arguments or --file")
    for text, pred in zip(texts, load_classifier(args.run_dir).predict(texts, args.batch_size)):
        short = text if len(text) <= 60 else text[:57] + "..."
        sys.stdout.write(f"{pred.label}\t{pred.probability:.4f}\t{short}\n")
    return 0
