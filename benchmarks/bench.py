"""Training-step throughput: gptft against transformers and the textbook's pipeline.

Times optimizer steps (forward + backward + AdamW) on the real data for both tasks and prints
examples/s, tokens/s (all computed positions, real = non-padding inputs, labels = loss targets),
the real-token share, peak memory and, on a GPU, the MFU. Implementations (``--impl``):

* ``gptft``: this package as its trainer runs it: ``GPTClassifier`` on length-grouped batches
  (``EpochBatchSampler`` + ``classification_collate``) for spam; ``GPT(..., labels=)`` on
  ``instruction_collate`` (or ``packed_collate`` with ``--packing``) batches for instructions.
  Variants, timed in the same run: ``gptft:packing``, ``gptft:mask_prompt``, ``gptft:group``
  (length-grouped instruction batches), ``gptft:fused_adamw`` (``AdamW(fused=True)`` on the CPU
  too, where gptft's Trainer asks for it on CUDA only); combine them with commas
  (``gptft:packing,mask_prompt``).
* ``transformers``: ``GPT2ForSequenceClassification`` / ``GPT2LMHeadModel`` (SDPA attention) on
  dynamically padded batches with an attention mask, labels -100 where no loss is wanted.
* ``textbook``: a re-implementation of the pipeline of *Build a Large Language Model (From
  Scratch)*, chapters 6 and 7: its own attention with an explicit causal mask, LayerNorm and GELU;
  spam examples padded to the longest training example, class logits read at position -1;
  instruction batches padded to the batch maximum with full-vocabulary logits and cross-entropy
  at every position.

Every implementation trains on the same examples, the pool, batched its own way; each timed pass
goes through the pool once (``--steps`` batches of ``--batch-size`` examples). Spam: the pool is
``--steps`` of gptft's epoch-0 batches (its sampler groups the whole training split by length in
windows of 64 batches), evenly spaced in the order of their total length so that the pool's
lengths follow the epoch's; the others batch the same examples in the order of the seeded
shuffle the grouping starts from, and the real-token share of each over a whole epoch is printed
too. Instructions: the pool is the first ``steps * batch_size`` examples of the seeded shuffle,
in that order for everyone (gptft's trainer does not group instruction batches unless packing).
``--task lm``: the same shuffled instruction examples as one token stream cut into full rows of
``--seq-len`` tokens, a loss at every position (the canonical tokens/s and MFU measurement).
Passes are interleaved (A, B, C, A, B, C, ...) so that load from other processes hits all alike;
numbers are medians over ``--repeats`` passes, after ``--warmup`` untimed steps. Batches are
built (and moved to the device) before timing: collation is not timed.

    python benchmarks/bench.py --task spam --impl textbook transformers gptft --steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptft.classifier import GPTClassifier
from gptft.config import SHAPE_KEYS
from gptft.cpu import cpu_name
from gptft.data.classification import (
    ClassificationDataset,
    TextExamples,
    load_classification_data,
    longest_length,
)
from gptft.data.collate import classification_collate, instruction_collate, length_buckets, packed_collate
from gptft.data.instruction import InstructionDataset, load_instruction_data
from gptft.data.sampler import EpochBatchSampler
from gptft.model import GPT, IGNORE_INDEX, PRESETS, GPTConfig
from gptft.tasks.classification.config import ClassificationData
from gptft.tasks.instruction.config import InstructionData
from gptft.tokenizer import Tokenizer
from gptft.trainable import set_trainable
from gptft.trainer import param_groups

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPAM_FILE = DATA / "sms_spam_collection" / "SMSSpamCollection.tsv"
INSTRUCT_FILE = DATA / "instruction-data.json"
PAD_ID = 50256  # <|endoftext|>: the padding token of every pipeline here
LR, WEIGHT_DECAY = 5e-5, 0.1  # the book's AdamW settings, for every implementation
IMPLS = ("gptft", "transformers", "textbook")
GPTFT_VARIANTS = ("packing", "mask_prompt", "group", "fused_adamw")

# Dense bf16 peaks (TFLOP/s) for the MFU, matched against torch.cuda.get_device_name();
# the first matching key wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


# ---- what a pass is made of ----------------------------------------------------------------------


@dataclass
class Batch:
    """One training step's input for one implementation, with its token counts."""

    tensors: dict[str, torch.Tensor]
    examples: int
    positions: int
    """Positions computed: rows x row length, padding included."""
    real: int
    """Non-padding input tokens."""
    labels: int
    """Loss targets (instructions: tokens not -100; spam: one per example)."""
    lengths: list[int]
    """Each example's real length (for the attention FLOPs)."""


@dataclass
class Runner:
    """An implementation ready to train: `step(batch)` runs one optimizer step."""

    name: str
    step: Callable[[dict[str, torch.Tensor]], None]
    batches: list[Batch]
    trainable_params: int
    head_trainable: bool
    note: str = ""


@dataclass
class Result:
    impl: str
    examples_per_s: float
    tokens_per_s: float
    real_tokens_per_s: float
    label_tokens_per_s: float
    real_share: float
    step_ms: float
    peak_mem_mb: float | None
    mem_delta_mb: float | None
    mfu: float | None
    trainable_params: int
    pass_seconds: list[float] = field(default_factory=list)
    note: str = ""


# ---- data: one seeded shuffle, one pool of examples --------------------------------------------


def seeded_order(n: int, batch_size: int, seed: int) -> list[int]:
    """The example order gptft's sampler uses in epoch 0 before any length grouping."""
    sampler = EpochBatchSampler([1] * n, batch_size, seed=seed, shuffle=True, group_by_length=False)
    return [i for batch in sampler for i in batch]


def pool_indices(n_available: int, opts: argparse.Namespace) -> list[int]:
    n = opts.steps * opts.batch_size
    if n > n_available:
        raise SystemExit(f"--steps {opts.steps} x --batch-size {opts.batch_size} = {n} examples, "
                         f"but the training split has only {n_available}")
    return seeded_order(n_available, opts.batch_size, opts.seed)[:n]


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def grouped(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """gptft's length-grouped batches of positions 0..len(lengths)-1."""
    return list(EpochBatchSampler(lengths, batch_size, seed=seed, shuffle=True, group_by_length=True))


@dataclass
class SpamData:
    dataset: ClassificationDataset
    """The pool: the examples of the ``steps`` gptft batches picked from epoch 0."""
    grouped: list[list[int]]
    """gptft's batches (length-grouped), as positions in ``dataset``."""
    shuffled: list[list[int]]
    """The same examples in the seeded shuffle's order, cut into batches (the others' batches)."""
    max_length: int
    """The longest training example in tokens (the book pads every example to it)."""
    epoch_real_share: dict[str, float]
    """Each implementation's real-token share over a whole epoch of its batches."""


def load_spam(opts: argparse.Namespace, tokenizer: Tokenizer, context: int) -> SpamData:
    """`steps` of gptft's epoch-0 batches, evenly spaced in the order of their total length (so
    that the pool's lengths follow the whole epoch's); the other implementations batch the same
    examples in the order of the seeded shuffle that the grouping starts from."""
    train = load_classification_data(ClassificationData(path=str(opts.spam_file))).train
    max_length = min(longest_length(train, tokenizer), context)
    full = ClassificationDataset(train, tokenizer, max_length)
    epoch = list(EpochBatchSampler(full.lengths, opts.batch_size, seed=opts.seed, shuffle=True,
                                   group_by_length=True))
    whole = [b for b in epoch if len(b) == opts.batch_size]
    if opts.steps > len(whole):
        raise SystemExit(f"--steps {opts.steps}: an epoch has only {len(whole)} full batches")
    by_length = sorted(whole, key=lambda b: sum(full.lengths[i] for i in b))
    picked = {tuple(by_length[int((k + 0.5) * len(by_length) / opts.steps)]) for k in range(opts.steps)}
    batches = [b for b in whole if tuple(b) in picked]  # in the epoch's order
    chosen = {i for batch in batches for i in batch}
    order = [i for i in seeded_order(len(full), opts.batch_size, opts.seed) if i in chosen]
    position = {i: k for k, i in enumerate(order)}
    pool = TextExamples([train.texts[i] for i in order], [train.labels[i] for i in order])
    shares = {"textbook": sum(full.lengths) / (len(full) * max_length),
              "transformers": real_share(full.lengths, chunks(seeded_order(len(full), opts.batch_size,
                                                                          opts.seed), opts.batch_size)),
              "gptft": real_share(full.lengths, epoch)}
    return SpamData(ClassificationDataset(pool, tokenizer, max_length),
                    [[position[i] for i in batch] for batch in batches],
                    chunks(list(range(len(order))), opts.batch_size), max_length, shares)


def real_share(lengths: list[int], batches: list[list[int]]) -> float:
    """Real tokens over positions when each batch is padded to its longest example."""
    real = sum(lengths[i] for b in batches for i in b)
    return real / sum(len(b) * max(lengths[i] for i in b) for b in batches)


def load_instruct(opts: argparse.Namespace, tokenizer: Tokenizer, context: int) -> InstructionDataset:
    records = load_instruction_data(InstructionData(path=str(opts.instruct_file))).train
    pool = pool_indices(len(records), opts)
    return InstructionDataset([records[i] for i in pool], tokenizer, "alpaca", context)


def load_lm(opts: argparse.Namespace, tokenizer: Tokenizer, context: int) -> list[list[int]]:
    """`steps * batch_size` rows of `seq_len + 1` tokens: the shuffled training examples (each
    ending with end-of-text) as one stream, cut into consecutive rows (repeated if too short)."""
    records = load_instruction_data(InstructionData(path=str(opts.instruct_file))).train
    dataset = InstructionDataset(records, tokenizer, "alpaca", context)
    stream = [t for i in seeded_order(len(dataset), opts.batch_size, opts.seed)
              for t in dataset[i]["input_ids"]]
    width, n = opts.seq_len + 1, opts.steps * opts.batch_size
    stream *= -(-n * width // len(stream))  # ceil: repeat the stream if needed
    return [stream[k * width : (k + 1) * width] for k in range(n)]


# ---- batches ---------------------------------------------------------------------------------------


def spam_batch(tensors: dict[str, torch.Tensor], lengths: list[int]) -> Batch:
    return Batch(tensors, len(lengths), tensors["input_ids"].numel(), sum(lengths), len(lengths), lengths)


def spam_dynamic_batches(dataset: ClassificationDataset, order: list[list[int]]) -> list[Batch]:
    """Batches right-padded to their longest example (gptft and transformers)."""
    out = []
    for idx in order:
        t = classification_collate([dataset[i] for i in idx], PAD_ID)
        width = t["input_ids"].size(1)  # transformers reads a mask; gptft's classifier the lengths
        t["attention_mask"] = (torch.arange(width)[None, :] < t["lengths"][:, None]).long()
        out.append(spam_batch(t, t["lengths"].tolist()))
    return out


def spam_book_batches(dataset: ClassificationDataset, max_length: int, order: list[list[int]]) -> list[Batch]:
    """The book's SpamDataset: every example padded to `max_length` with <|endoftext|>."""
    out = []
    for idx in order:
        ids = torch.full((len(idx), max_length), PAD_ID, dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : dataset.lengths[i]] = torch.tensor(dataset.input_ids[i])
        labels = torch.tensor([dataset.labels[i] for i in idx])
        out.append(spam_batch({"input_ids": ids, "labels": labels}, [dataset.lengths[i] for i in idx]))
    return out


def instruct_batch(tensors: dict[str, torch.Tensor], items: list[dict]) -> Batch:
    lengths = [len(item["input_ids"]) - 1 for item in items]  # inputs are tokens[:-1]
    labels = int((tensors["labels"] != IGNORE_INDEX).sum())
    return Batch(tensors, len(items), tensors["input_ids"].numel(), sum(lengths), labels, lengths)


def instruct_gptft_batches(dataset: InstructionDataset, opts: argparse.Namespace, variant: set[str],
                           context: int) -> list[Batch]:
    """gptft's training batches: as its InstructionTask builds them."""
    mask_prompt = opts.mask_prompt or "mask_prompt" in variant
    packing = opts.packing or "packing" in variant
    if packing or "group" in variant:
        order = grouped(dataset.lengths, opts.batch_size, opts.seed)
    else:
        order = chunks(list(range(len(dataset))), opts.batch_size)
    if packing:
        collate = partial(packed_collate, pad_id=PAD_ID, mask_prompt=mask_prompt, max_length=context)
    else:
        collate = partial(instruction_collate, pad_id=PAD_ID, mask_prompt=mask_prompt, max_length=context,
                          buckets=length_buckets([n - 1 for n in dataset.lengths], context)
                          if opts.compile else None)
    out = []
    for idx in order:
        items = [dataset[i] for i in idx]
        t = collate(items)  # right padding needs no mask (causal attention); packed rows bring one
        out.append(instruct_batch(t, items))
    return out


def instruct_padded_batches(dataset: InstructionDataset, batch_size: int, mask_prompt: bool) -> list[Batch]:
    """Batches padded to their longest example, in pool order, with an attention mask."""
    out = []
    for idx in chunks(list(range(len(dataset))), batch_size):
        items = [dataset[i] for i in idx]
        t = instruction_collate(items, PAD_ID, mask_prompt=mask_prompt)
        width = t["input_ids"].size(1)  # a real input: an item's tokens (its end-of-text too)
        real = torch.tensor([min(len(item["input_ids"]), width) for item in items])
        t["attention_mask"] = (torch.arange(width)[None, :] < real[:, None]).long()
        out.append(instruct_batch(t, items))
    return out


def lm_batches(rows: list[list[int]], batch_size: int, with_mask: bool) -> list[Batch]:
    out = []
    for chunk in chunks(rows, batch_size):
        tokens = torch.tensor(chunk)
        t = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if with_mask:  # transformers' collators always give one
            t["attention_mask"] = torch.ones_like(t["input_ids"])
        n = t["input_ids"].numel()
        out.append(Batch(t, len(chunk), n, n, n, [t["input_ids"].size(1)] * len(chunk)))
    return out


def book_collate(token_lists: list[list[int]], pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """Chapter 7's collate: append one <|endoftext|>, pad to the batch maximum, shift by one;
    the first end-of-text stays a target, every later padding target becomes -100."""
    width = max(len(t) for t in token_lists) + 1
    inputs, targets = [], []
    for tokens in token_lists:
        padded = torch.tensor(tokens + [pad_id] * (width - len(tokens)))
        target = padded[1:].clone()
        pads = (target == pad_id).nonzero().flatten()
        target[pads[1:]] = IGNORE_INDEX
        inputs.append(padded[:-1])
        targets.append(target)
    return {"input_ids": torch.stack(inputs), "labels": torch.stack(targets)}


def instruct_book_batches(dataset: InstructionDataset, batch_size: int) -> list[Batch]:
    out = []
    for idx in chunks(list(range(len(dataset))), batch_size):
        items = [dataset[i] for i in idx]
        # The book encodes the text without end-of-text; its collate appends one.
        out.append(instruct_batch(book_collate([item["input_ids"][:-1] for item in items]), items))
    return out


# ---- the textbook's model (chapter 4), written out again ---------------------------------------


class BookLayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * ((x - mean) / torch.sqrt(var + self.eps)) + self.shift


class BookGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class BookAttention(nn.Module):
    """Multi-head causal attention with separate q/k/v projections and an explicit mask buffer."""

    def __init__(self, dim: int, n_heads: int, context_length: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.W_query = nn.Linear(dim, dim, bias=True)
        self.W_key = nn.Linear(dim, dim, bias=True)
        self.W_value = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(0.0)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        scores = q @ k.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:n, :n], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim**0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).contiguous().view(b, n, dim))


class BookBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, context_length: int):
        super().__init__()
        self.att = BookAttention(dim, n_heads, context_length)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), BookGELU(), nn.Linear(4 * dim, dim))
        self.norm1, self.norm2 = BookLayerNorm(dim), BookLayerNorm(dim)
        self.drop_shortcut = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPT(nn.Module):
    """GPT-2 as the book builds it: untied output head, its own LayerNorm, GELU and attention."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(0.0)
        self.trf_blocks = nn.Sequential(*(BookBlock(cfg.emb_dim, cfg.n_heads, cfg.context_length)
                                          for _ in range(cfg.n_layers)))
        self.final_norm = BookLayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.size(1), device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(positions))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


# ---- building each implementation ------------------------------------------------------------------


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_step_fn(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                  opts: argparse.Namespace, clip: bool) -> Callable[[dict], None]:
    """forward + loss under autocast, backward, optional clipping, AdamW step, zero_grad."""
    device_type = torch.device(opts.device).type
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=opts.dtype == "bf16"):
            loss = loss_fn(model, batch)
        loss.backward()
        if clip and opts.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def maybe_compile(model: nn.Module, opts: argparse.Namespace) -> nn.Module:
    return torch.compile(model) if opts.compile else model


def gptft_loss_spam(model: nn.Module, batch: dict) -> torch.Tensor:
    """ClassificationTask.loss, divided by the example count as Trainer.train_step does."""
    logits = model(batch["input_ids"], batch["lengths"])
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum") / len(batch["labels"])


def gptft_loss_instruct(model: nn.Module, batch: dict) -> torch.Tensor:
    """InstructionTask.loss (summed per-row losses), divided by the label count (Trainer)."""
    rows = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                 position_ids=batch.get("position_ids"), labels=batch["labels"])
    return rows.sum() / (batch["labels"] != IGNORE_INDEX).sum().clamp(min=1)


def build_gptft(opts: argparse.Namespace, variant: set[str], cfg: GPTConfig, data) -> Runner:
    gpt = GPT(cfg)
    if opts.task == "spam":
        model = GPTClassifier(gpt, 2)
        batches = spam_dynamic_batches(data.dataset, data.grouped)
        loss_fn = gptft_loss_spam
    else:
        model = gpt
        if opts.task == "lm":
            batches = lm_batches(data, opts.batch_size, with_mask=False)
        else:
            batches = instruct_gptft_batches(data, opts, variant, cfg.context_length)
        loss_fn = gptft_loss_instruct
    set_trainable(model, opts.trainable)
    model.to(opts.device).train()
    # As Trainer builds it: decay on matrices only, fused AdamW (CUDA and CPU).
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, fused=True)
    step = train_step_fn(maybe_compile(model, opts), optimizer, loss_fn, opts, clip=True)
    return Runner("gptft", step, batches, count_trainable(model), opts.trainable == "all")


def hf_config(cfg: GPTConfig, **extra):
    import transformers

    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="sdpa", **extra)


def hf_loss_spam(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"]).loss


def hf_loss_instruct(model: nn.Module, batch: dict) -> torch.Tensor:
    # The labels are already shifted (labels[t] is the target of position t): shift_labels
    # makes transformers use them as they are, so its loss equals gptft's exactly.
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"], shift_labels=batch["labels"]).loss


def build_transformers(opts: argparse.Namespace, cfg: GPTConfig, data) -> Runner:
    import transformers

    transformers.logging.set_verbosity_error()
    if opts.task == "spam":
        model = transformers.GPT2ForSequenceClassification(
            hf_config(cfg, num_labels=2, pad_token_id=PAD_ID))
        batches = spam_dynamic_batches(data.dataset, data.shuffled)
        head, loss_fn = model.score, hf_loss_spam
    else:
        model = transformers.GPT2LMHeadModel(hf_config(cfg))
        if opts.task == "lm":
            batches = lm_batches(data, opts.batch_size, with_mask=True)
        else:
            batches = instruct_padded_batches(data, opts.batch_size, opts.mask_prompt)
        head, loss_fn = None, hf_loss_instruct
    model.requires_grad_(opts.trainable == "all")
    if opts.trainable == "last_block":
        for module in (model.transformer.h[-1], model.transformer.ln_f, head):
            if module is not None:
                module.requires_grad_(True)
    model.to(opts.device).train()
    fused = torch.device(opts.device).type == "cuda"  # transformers' Trainer: adamw_torch_fused
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=fused or None)
    step = train_step_fn(maybe_compile(model, opts), optimizer, loss_fn, opts, clip=True)
    return Runner("transformers", step, batches, count_trainable(model), opts.trainable == "all")


def book_loss_spam(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["input_ids"])[:, -1, :], batch["labels"])


def book_loss_instruct(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


def build_textbook(opts: argparse.Namespace, cfg: GPTConfig, data) -> Runner:
    model = BookGPT(cfg)
    note = ""
    if opts.task == "spam":
        model.out_head = nn.Linear(cfg.emb_dim, 2)  # chapter 6 replaces the vocabulary head
        batches = spam_book_batches(data.dataset, data.max_length, data.shuffled)
        loss_fn = book_loss_spam
    else:
        batches = (lm_batches(data, opts.batch_size, with_mask=False) if opts.task == "lm"
                   else instruct_book_batches(data, opts.batch_size))
        loss_fn = book_loss_instruct
        note = "no prompt masking (the book's pipeline)" if opts.mask_prompt else ""
    model.requires_grad_(opts.trainable == "all")
    if opts.trainable == "last_block":
        model.trf_blocks[-1].requires_grad_(True)
        model.final_norm.requires_grad_(True)
        if opts.task == "spam":
            model.out_head.requires_grad_(True)
    model.to(opts.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    step = train_step_fn(maybe_compile(model, opts), optimizer, loss_fn, opts, clip=False)
    return Runner("textbook", step, batches, count_trainable(model), opts.trainable == "all", note)


def parse_impl(spec: str) -> tuple[str, set[str]]:
    name, _, variant = spec.partition(":")
    flags = {v for v in variant.split(",") if v}
    if name not in IMPLS:
        raise SystemExit(f"--impl {spec}: unknown implementation (choose from {', '.join(IMPLS)})")
    unknown = flags - set(GPTFT_VARIANTS) if name == "gptft" else flags
    if unknown:
        raise SystemExit(f"--impl {spec}: unknown variant {', '.join(sorted(unknown))} "
                         f"(gptft variants: {', '.join(GPTFT_VARIANTS)})")
    return name, flags


def build_runner(spec: str, opts: argparse.Namespace, cfg: GPTConfig, data) -> Runner:
    name, variant = parse_impl(spec)
    torch.manual_seed(opts.seed)
    if name == "gptft":
        runner = build_gptft(opts, variant, cfg, data)
    elif name == "transformers":
        runner = build_transformers(opts, cfg, data)
    else:
        runner = build_textbook(opts, cfg, data)
    runner.name = spec
    for batch in runner.batches:
        batch.tensors = {k: v.to(opts.device) for k, v in batch.tensors.items()}
    return runner


# ---- measuring -------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory during a `with` block: CUDA allocator stats, or the process RSS sampled
    every few milliseconds on the CPU (psutil; without it, the process's RSS high-water mark)."""

    def __init__(self, device: str, interval: float = 0.005):
        self.cuda = torch.device(device).type == "cuda"
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            import psutil
        except ImportError:
            self.base = 0
            return self
        process = psutil.Process()
        self.base = self.peak = process.memory_info().rss

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def timed_pass(runner: Runner, device: str) -> tuple[float, PeakMemory]:
    synchronize(device)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        for batch in runner.batches:
            runner.step(batch.tensors)
        synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, memory


def model_flops(batch: Batch, cfg: GPTConfig, task: str, trainable: str, head_trainable: bool) -> float:
    """Useful training FLOPs of a batch, counted on real tokens only.

    Per real token: 2 N forward over the blocks' matmul weights (N = 12 d^2 a block) and 4 N backward
    over the trainable blocks (6 N when all train), plus attention 4 L d n forward and 8 L_t d n
    backward (n: the example's length, PaLM's convention). Language modelling adds the vocabulary
    projection at each label token: 2 V d forward, 2 V d for its input gradient, 2 V d more when
    the (tied) embedding trains.
    """
    d, layers, vocab = cfg.emb_dim, cfg.n_layers, cfg.vocab_size
    trained = layers if trainable == "all" else 1
    n_block = 12 * d * d
    tokens, squares = sum(batch.lengths), sum(n * n for n in batch.lengths)
    flops = (2 * layers + 4 * trained) * n_block * tokens + (4 * layers + 8 * trained) * d * squares
    if task != "spam":
        flops += (4 + 2 * head_trainable) * vocab * d * batch.labels
    return float(flops)


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def summarize(runner: Runner, seconds: list[float], memories: list[PeakMemory], opts: argparse.Namespace,
              cfg: GPTConfig) -> Result:
    batches = runner.batches
    t = statistics.median(seconds)
    examples = sum(b.examples for b in batches)
    positions, real = sum(b.positions for b in batches), sum(b.real for b in batches)
    labels = sum(b.labels for b in batches)
    peak = max((m.peak for m in memories), default=0)
    delta = max((m.peak - m.base for m in memories), default=0)
    mfu = None
    peak_tf = peak_tflops(opts.device, opts.peak_tflops)
    if peak_tf:
        flops = sum(model_flops(b, cfg, opts.task, opts.trainable, runner.head_trainable) for b in batches)
        mfu = flops / t / (peak_tf * 1e12)
    return Result(
        impl=runner.name, examples_per_s=examples / t, tokens_per_s=positions / t,
        real_tokens_per_s=real / t, label_tokens_per_s=labels / t, real_share=real / positions,
        step_ms=1000 * t / len(batches), peak_mem_mb=peak / 2**20 if peak else None,
        mem_delta_mb=delta / 2**20 if peak else None, mfu=mfu, trainable_params=runner.trainable_params,
        pass_seconds=seconds, note=runner.note)


def paired_ratios(results: dict[str, Result], reference: str) -> dict[str, float]:
    """Median over repeats of (reference examples/s) / (other's), pass by pass: interleaved
    passes share the machine's load, so pairing them removes part of the noise."""
    ref = results[reference].pass_seconds
    return {name: statistics.median(o / r for o, r in zip(res.pass_seconds, ref))
            for name, res in results.items() if name != reference}


# ---- the run ---------------------------------------------------------------------------------------


def model_config(opts: argparse.Namespace, vocab_size: int) -> GPTConfig:
    shape = {k: getattr(opts, k, None) for k in SHAPE_KEYS if getattr(opts, k, None) is not None}
    return GPTConfig.from_name(opts.model, vocab_size=vocab_size, drop_rate=0.0, **shape)


def environment(opts: argparse.Namespace) -> dict:
    import transformers

    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cpu": cpu_name(),
           "threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    if torch.device(opts.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def run_benchmark(opts: argparse.Namespace) -> dict:
    """Build every implementation, interleave the timed passes; return the settings and results."""
    env = environment(opts)  # the load average before this run adds its own
    tokenizer = Tokenizer()
    cfg = model_config(opts, tokenizer.vocab_size)
    loaders = {"spam": load_spam, "instruct": load_instruct, "lm": load_lm}
    data = loaders[opts.task](opts, tokenizer, cfg.context_length)
    runners = [build_runner(spec, opts, cfg, data) for spec in opts.impl]
    for runner in runners:
        for i in range(opts.warmup):
            runner.step(runner.batches[i % len(runner.batches)].tensors)
    synchronize(opts.device)
    seconds: dict[str, list[float]] = {r.name: [] for r in runners}
    memories: dict[str, list[PeakMemory]] = {r.name: [] for r in runners}
    for _ in range(opts.repeats):
        for runner in runners:
            t, memory = timed_pass(runner, opts.device)
            seconds[runner.name].append(t)
            memories[runner.name].append(memory)
    results = {r.name: summarize(r, seconds[r.name], memories[r.name], opts, cfg) for r in runners}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()}
    out = {"settings": settings, "environment": env,
           "model": {"n_layers": cfg.n_layers, "emb_dim": cfg.emb_dim, "n_heads": cfg.n_heads,
                     "context_length": cfg.context_length},
           "results": {k: asdict(v) for k, v in results.items()}}
    if opts.task == "spam":
        out["epoch_real_share"] = data.epoch_real_share
    reference = next((r.name for r in runners if r.name.startswith("gptft")), None)
    if reference and len(runners) > 1:
        out["speedup"] = {"reference": reference, "vs": paired_ratios(results, reference)}
    return out


def format_report(out: dict) -> str:
    s, env, m = out["settings"], out["environment"], out["model"]
    device = env.get("gpu") or f"{env['cpu']} ({env['threads']} threads)"
    load = " ".join(f"{x:.2f}" for x in env["load_average"])
    lines = [
        f"device {device}; torch {env['torch']}, transformers {env['transformers']}; {env['date']}; "
        f"load average at start {load}",
        f"task {s['task']}: L={m['n_layers']} d={m['emb_dim']} H={m['n_heads']}, batch {s['batch_size']}, "
        f"trainable {s['trainable']}, {s['dtype']}{', compiled' if s['compile'] else ''}; "
        f"{s['steps']} steps a pass, {s['warmup']} warm-up steps, median of {s['repeats']} passes",
        "",
        f"{'impl':<22}{'ex/s':>8}{'tok/s':>9}{'real/s':>9}{'label/s':>9}{'real%':>7}"
        f"{'ms/step':>9}{'peak MB':>9}{'+MB':>8}{'MFU':>7}  passes (s)",
    ]
    for r in out["results"].values():
        mem = (f"{r['peak_mem_mb']:>9.0f}{r['mem_delta_mb']:>8.0f}" if r["peak_mem_mb"]
               else f"{'-':>9}{'-':>8}")
        mfu = f"{100 * r['mfu']:>6.1f}%" if r["mfu"] is not None else f"{'-':>7}"
        passes = " ".join(f"{t:.2f}" for t in r["pass_seconds"])
        lines.append(
            f"{r['impl']:<22}{r['examples_per_s']:>8.2f}{r['tokens_per_s']:>9.1f}{r['real_tokens_per_s']:>9.1f}"
            f"{r['label_tokens_per_s']:>9.1f}{100 * r['real_share']:>6.1f}%{r['step_ms']:>9.0f}{mem}{mfu}"
            f"  {passes}" + (f"  [{r['note']}]" if r["note"] else ""))
    if "epoch_real_share" in out:
        shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in out["epoch_real_share"].items())
        lines += ["", f"real-token share over a whole epoch of each one's batches: {shares}"]
    if "speedup" in out:
        ref = out["speedup"]["reference"]
        lines.append("")
        lines += [f"{ref} / {name}: {ratio:.2f}x (median of paired passes)"
                  for name, ratio in out["speedup"]["vs"].items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=("spam", "instruct", "lm"), default="spam",
                   help="lm: full rows of --seq-len tokens of the instruction data, loss everywhere")
    p.add_argument("--impl", nargs="+", default=["textbook", "transformers", "gptft"],
                   help="implementations, timed in this order each repeat; gptft takes variants: "
                        "gptft:packing, gptft:mask_prompt, gptft:group, gptft:fused_adamw, "
                        "gptft:packing,mask_prompt")
    p.add_argument("--model", choices=tuple(PRESETS), default="gpt2-small")
    p.add_argument("--n-layers", type=int)
    p.add_argument("--emb-dim", type=int)
    p.add_argument("--n-heads", type=int)
    p.add_argument("--context-length", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, help="--task lm: row length (default: the context length)")
    p.add_argument("--trainable", choices=("last_block", "all"),
                   help="default: last_block for spam, all for instruct and lm")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps a timed pass")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation first")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per implementation")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--packing", action="store_true", help="gptft: pack instruction examples into rows")
    p.add_argument("--mask-prompt", action="store_true",
                   help="gptft and transformers: no loss on the prompt's tokens")
    p.add_argument("--max-grad-norm", type=float,
                   help="clip gradients (gptft, transformers); default: off, as in configs/*.yaml")
    p.add_argument("--peak-tflops", type=float, help="device peak for the MFU (default: table)")
    p.add_argument("--seed", type=int, default=123, help="data shuffle and model init")
    p.add_argument("--spam-file", type=Path, default=SPAM_FILE)
    p.add_argument("--instruct-file", type=Path, default=INSTRUCT_FILE)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--json", type=Path, help="also write the results here")
    opts = p.parse_args(argv)
    opts.trainable = opts.trainable or ("last_block" if opts.task == "spam" else "all")
    for spec in opts.impl:
        _, variant = parse_impl(spec)
        if opts.task != "instruct" and variant - {"fused_adamw"}:
            p.error(f"--impl {spec}: packing, mask_prompt and group are --task instruct variants")
    if opts.task != "instruct" and (opts.packing or opts.mask_prompt):
        p.error("--packing and --mask-prompt apply to --task instruct")
    if opts.task == "lm":
        context = opts.context_length or GPTConfig.from_name(opts.model).context_length
        opts.seq_len = opts.seq_len or context
        if opts.seq_len > context:
            p.error(f"--seq-len {opts.seq_len} is longer than the context ({context})")
    if len(set(opts.impl)) != len(opts.impl):
        p.error("--impl: each implementation once")
    if min(opts.steps, opts.repeats, opts.batch_size) < 1 or opts.warmup < 0:
        p.error("--steps, --repeats and --batch-size must be positive, --warmup not negative")
    return opts


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if opts.threads:
            torch.set_num_threads(opts.threads)
        out = run_benchmark(opts)
    finally:
        torch.set_num_threads(threads)
    print(format_report(out), flush=True)
    if opts.json:
        opts.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
