"""Batching: tokenized examples → padded tensors, for every task.

* ``classification_collate``: texts right-padded, with their real lengths and labels.
* ``instruction_collate``: one example per row, right-padded (the book's ``custom_collate_fn``,
  plus optional prompt masking).
* ``preference_collate``: a pair of responses per row (chosen, rejected), prompts masked out.
* ``packed_collate``: several examples per row, with a block-diagonal causal attention mask and
  positions restarting at 0 for each example, so every example is computed exactly as if alone.

Row lengths are rounded up to a few sizes (``length_buckets``: quantiles of the data's lengths),
so an epoch meets a bounded number of shapes: each new shape costs compilation or kernel
planning on a GPU.
Right padding needs no attention mask: causal attention never lets a real token see the padding
after it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from gptft.model import IGNORE_INDEX


def length_buckets(lengths: Sequence[int], cap: int | None = None, n: int = 16) -> list[int]:
    """At most `n` row lengths to pad batches to, chosen for a dataset's example lengths (capped
    at `cap`) so that padding each example to the next one adds the fewest positions (an exact
    dynamic programme over the distinct lengths). Length-grouped batches then pad little while an
    epoch meets at most `n` shapes, each costing compilation or kernel planning once on a GPU."""
    counts = Counter(min(x, cap) if cap else x for x in lengths)
    values = sorted(counts)
    m = len(values)
    if m <= n:
        return values
    v = np.array(values, dtype=np.float64)
    c = np.array([counts[x] for x in values], dtype=np.float64)
    num, tot = np.concatenate([[0], np.cumsum(c)]), np.concatenate([[0], np.cumsum(c * v)])
    # best[j]: the least padding of values[0..j] with the buckets so far, the last one at values[j]
    best = v * num[1:] - tot[1:]
    picks = []
    for _ in range(1, n):
        new, pick = best.copy(), np.full(m, -1)  # -1: as with one bucket fewer
        for j in range(1, m):  # the previous bucket ends at i < j; this one covers i+1..j
            i = np.arange(j)
            total = best[:j] + v[j] * (num[j + 1] - num[i + 1]) - (tot[j + 1] - tot[i + 1])
            k = int(np.argmin(total))
            if total[k] < new[j]:
                new[j], pick[j] = total[k], k
        best = new
        picks.append(pick)
    out, j = [values[m - 1]], m - 1
    for pick in reversed(picks):
        if pick[j] >= 0:
            j = int(pick[j])
            out.append(values[j])
    return sorted(out)


def bucket_length(n: int, buckets: Sequence[int] | None, cap: int | None = None) -> int:
    """The smallest of `buckets` that holds `n`; past the largest, `cap` (or `n` itself)."""
    for size in buckets or ():
        if size >= n:
            return size
    return max(n, cap) if cap and buckets else n


def classification_collate(items: list[dict], pad_id: int, buckets: Sequence[int] | None = None,
                           max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch of dataset items to its longest item (rounded up to one of `buckets`,
    see ``length_buckets``; past them, to `max_length`).

    Use ``functools.partial(classification_collate, pad_id=...)`` as a DataLoader's ``collate_fn``.

    Returns:
        ``input_ids`` (B, T), ``lengths`` (B,) real-token counts and ``labels`` (B,), all
        ``torch.long`` on the CPU.
    """
    lengths = torch.tensor([len(item["input_ids"]) for item in items], dtype=torch.long)
    width = bucket_length(int(lengths.max()), buckets, max_length)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, : len(item["input_ids"])] = torch.tensor(item["input_ids"], dtype=torch.long)
    labels = torch.tensor([item["label"] for item in items], dtype=torch.long)
    return {"input_ids": input_ids, "lengths": lengths, "labels": labels}


def _truncated(item: dict, max_length: int | None) -> list[int]:
    ids = list(item["input_ids"])
    return ids if max_length is None else ids[: max_length + 1]


def _shifted(item: dict, mask_prompt: bool, max_length: int | None) -> tuple[list[int], list[int]]:
    """An item's (inputs, targets): tokens[:-1] and tokens[1:], truncated to max_length. An item
    with a ``target_mask`` (a chat template's, ``gptft.data.chat``) keeps the targets it marks."""
    ids = _truncated(item, max_length)
    inputs, targets = ids[:-1], ids[1:]
    if "target_mask" in item:
        keep = item["target_mask"][1 : len(ids)]
        targets = [t if k else IGNORE_INDEX for t, k in zip(targets, keep, strict=True)]
    elif mask_prompt:
        n = min(max(item["prompt_len"] - 1, 0), len(targets))
        targets[:n] = [IGNORE_INDEX] * n
    return inputs, targets


def instruction_collate(items: Sequence[dict], pad_id: int, mask_prompt: bool,
                        max_length: int | None = None, buckets: Sequence[int] | None = None) -> dict:
    """One example per row, right-padded: the book's ``custom_collate_fn`` as tensors.

    Each item's tokens end with end-of-text; that first end-of-text is the last target of the
    row, every later (padding) target is ``IGNORE_INDEX``.

    Args:
        items: ``InstructionDataset`` items ``{"input_ids", "prompt_len"}`` (or ``ChatDataset``
            items ``{"input_ids", "target_mask"}``: their own targets, `mask_prompt` unused).
        pad_id: padding token (the end-of-text id, as in the book).
        mask_prompt: ignore the targets that predict prompt tokens (train on the response only).
        max_length: truncate each item to ``max_length + 1`` tokens first.
        buckets: row lengths to round up to (``length_buckets``; past them, `max_length`).

    Returns:
        ``input_ids`` and ``labels``, both (B, T) long, on the CPU.
    """
    tokens = [_truncated(item, max_length) for item in items]
    targets = [_shifted(item, mask_prompt, max_length)[1] for item in items]
    T = bucket_length(max((len(t) for t in targets), default=0), buckets, max_length)
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, target) in enumerate(zip(tokens, targets, strict=True)):
        n = min(len(ids), T)  # inputs are tokens[:-1]; a shorter item's end-of-text is an input too
        input_ids[row, :n] = torch.tensor(ids[:n], dtype=torch.long)
        labels[row, : len(target)] = torch.tensor(target, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels}


def preference_collate(items: Sequence[dict], pad_id: int, max_length: int | None = None,
                       buckets: Sequence[int] | None = None) -> dict:
    """A pair per row: its chosen and rejected sequences, right-padded to one length (as
    ``instruction_collate``), with every target that predicts a prompt token ignored, so that a
    row's labelled targets are its response and end-of-text only.

    Args:
        items: ``PreferenceDataset`` items ``{"chosen", "rejected", "prompt_len"}`` (token ids),
            with ``reference`` (2,) once the reference log-probabilities are computed.
        pad_id: padding token (the end-of-text id).
        max_length: truncate each sequence to ``max_length + 1`` tokens first.
        buckets: row lengths to round up to (``length_buckets``; past them, `max_length`).

    Returns:
        ``input_ids`` and ``labels`` (B, 2, T) long (index 0 chosen, 1 rejected: one forward of
        the 2B sequences serves both), and ``reference`` (B, 2) float32 when the items have it;
        on the CPU.
    """
    rows = [{"input_ids": item[key], "prompt_len": item["prompt_len"]}
            for item in items for key in ("chosen", "rejected")]
    batch = instruction_collate(rows, pad_id, mask_prompt=True, max_length=max_length, buckets=buckets)
    out = {k: v.view(len(items), 2, -1) for k, v in batch.items()}
    if items and "reference" in items[0]:
        out["reference"] = torch.stack([item["reference"] for item in items]).float()
    return out


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Greedy first-fit-decreasing bin packing of example indices.

    Args:
        lengths: the row positions each example fills (for ``InstructionDataset`` items:
            ``length - 1``, see ``InstructionDataset.lengths``).
        max_length: a bin's capacity.

    Returns:
        Bins of indices, longest examples first; every index is in exactly one bin and each
        bin's total length is at most ``max_length``.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"example {too_long[0]} has length {lengths[too_long[0]]} > {max_length}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, r in enumerate(room) if r >= lengths[i]), len(bins))
        if b == len(bins):
            bins.append([])
            room.append(max_length)
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def packed_collate(items: Sequence[dict] | Sequence[Sequence[dict]], pad_id: int, mask_prompt: bool,
                   max_length: int, buckets: Sequence[int] | None = None) -> dict:
    """Several examples per row, each computed exactly as if alone.

    Each example contributes its own shifted inputs/targets (no target crosses an example
    boundary); positions restart at 0 per example; token i attends to token j iff both belong to
    the same example and j <= i. Padding inputs attend only to themselves and their targets are
    ``IGNORE_INDEX``. Rows are padded to the longest row of the batch.

    Args:
        items: ``InstructionDataset`` items, packed into rows here with ``pack``; or a list of
            bins (lists of items, e.g. from ``pack`` over the whole dataset), one row each.
        pad_id: padding token.
        mask_prompt: ignore the targets that predict prompt tokens.
        max_length: row capacity; each example is first truncated to ``max_length + 1`` tokens.
        buckets: row lengths to round up to (``length_buckets``; past them, `max_length`).

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` (B, T) long and ``attention_mask``
        (B, 1, T, T) bool, on the CPU.
    """
    rows = _rows(items, mask_prompt, max_length)
    T = bucket_length(max((sum(len(i) for i, _ in row) for row in rows), default=0), buckets, max_length)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    attention_mask = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1, 1)
    for b, row in enumerate(rows):
        start = 0
        for inputs, targets in row:
            end = start + len(inputs)
            input_ids[b, start:end] = torch.tensor(inputs, dtype=torch.long)
            labels[b, start:end] = torch.tensor(targets, dtype=torch.long)
            position_ids[b, start:end] = torch.arange(len(inputs))
            attention_mask[b, 0, start:end, start:end] = torch.ones(
                len(inputs), len(inputs), dtype=torch.bool).tril()
            start = end
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": attention_mask}


def _rows(items: Sequence[dict] | Sequence[Sequence[dict]], mask_prompt: bool,
          max_length: int) -> list[list[tuple[list[int], list[int]]]]:
    """Shifted (inputs, targets) pairs grouped into rows of at most max_length positions."""
    if items and isinstance(items[0], dict):
        pairs = [_shifted(item, mask_prompt, max_length) for item in items]
        return [[pairs[i] for i in b] for b in pack([len(i) for i, _ in pairs], max_length)]
    rows = [[_shifted(item, mask_prompt, max_length) for item in b] for b in items]
    for row in rows:
        if sum(len(i) for i, _ in row) > max_length:
            raise ValueError(f"a bin holds {sum(len(i) for i, _ in row)} positions > {max_length}")
    return rows
