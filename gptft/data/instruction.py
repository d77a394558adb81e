"""Instruction data: prompt styles, loading and splitting records, tokenized datasets, collation.

A record is ``{"instruction": str, "input": str (optional), "output": str}``. Training text is
``format_prompt(record)`` (the prompt up to and including the response header) followed by the
output and one end-of-text token, as in chapter 7 of *Build a Large Language Model (From Scratch)*.

Two ways to batch examples:

* ``instruction_collate``: one example per row, right-padded (the book's ``custom_collate_fn``,
  plus optional prompt masking and padding to a multiple).
* ``packed_collate``: several examples per row, with a block-diagonal causal attention mask and
  positions restarting at 0 for each example, so every example is computed exactly as if alone.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from gptft.config import InstructionData
from gptft.data.files import read_text
from gptft.download import download
from gptft.errors import GPTFTError
from gptft.tokenizer import Tokenizer

INSTRUCTION_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
    "instruction-data.json"
)
IGNORE_INDEX = -100
_MAX_REPORTED = 10  # invalid records listed in one error


# ---- prompt styles -------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptStyle:
    """How a record becomes text.

    Attributes:
        name: the style's name (``data.prompt_style``).
        template: the prompt's start; ``{instruction}`` (and ``{input}``) are filled in.
        input_template: appended only when the record's input is non-empty; ``{input}`` filled in.
        response_header: what precedes the response (the prompt ends with it).
    """

    name: str
    template: str
    input_template: str
    response_header: str


PROMPT_STYLES: dict[str, PromptStyle] = {
    style.name: style
    for style in (
        PromptStyle(
            name="alpaca",
            template="Below is an instruction that describes a task. Write a response that "
                     "appropriately completes the request.\n\n### Instruction:\n{instruction}",
            input_template="\n\n### Input:\n{input}",
            response_header="\n\n### Response:\n",
        ),
        PromptStyle(
            name="phi3",
            template="<|user|>\n{instruction}",
            input_template="\n{input}",
            response_header="\n<|assistant|>\n",
        ),
    )
}


def get_style(style: str | PromptStyle) -> PromptStyle:
    """The ``PromptStyle`` named `style` (or `style` itself)."""
    if isinstance(style, PromptStyle):
        return style
    if style not in PROMPT_STYLES:
        raise GPTFTError(f"unknown prompt style {style!r} (known: {', '.join(PROMPT_STYLES)})")
    return PROMPT_STYLES[style]


def format_prompt(record: dict, style: str | PromptStyle) -> str:
    """The prompt of `record`, ending with the response header: ready for generation.

    Args:
        record: ``{"instruction", "input"?, ...}``; an empty or missing input adds no input part.
        style: a name in ``PROMPT_STYLES`` or a ``PromptStyle``.
    """
    style = get_style(style)
    fields = {"instruction": record["instruction"], "input": record.get("input") or ""}
    text = style.template.format(**fields)
    if fields["input"]:
        text += style.input_template.format(**fields)
    return text + style.response_header


def format_example(record: dict, style: str | PromptStyle) -> tuple[str, str]:
    """``(prompt, response)``: ``prompt + response`` is the full training text of `record`."""
    return format_prompt(record, style), record["output"]


# ---- reading and splitting records ---------------------------------------------------------------

@dataclass
class InstructionSplits:
    """Records (``instruction``, ``input``, ``output`` and any extra keys) of each split."""

    train: list[dict]
    val: list[dict]
    test: list[dict]


def load_instruction_data(cfg: InstructionData) -> InstructionSplits:
    """Read ``cfg.path`` (or download the book's set into the cache) and split it.

    Splits follow the book's arithmetic: ``train = int(n * split[0])`` records, then
    ``test = int(n * split[2])``, then validation gets the rest, taken in that order from the
    file (train | test | val), after a seeded shuffle if ``cfg.shuffle``.
    """
    path = Path(cfg.path) if cfg.path else download([INSTRUCTION_URL], "instruction-data.json")
    records = read_records(path)
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(records)
    n = len(records)
    n_train, n_test = int(n * cfg.split[0]), int(n * cfg.split[2])
    if n_train == 0:
        raise GPTFTError(f"{path}: {n} record(s) leave the training split empty "
                         f"(split {cfg.split}); add records or raise the training fraction")
    return InstructionSplits(
        train=records[:n_train],
        test=records[n_train : n_train + n_test],
        val=records[n_train + n_test :],
    )


def read_records(path: str | Path) -> list[dict]:
    """Read and validate instruction records from a JSON array or a JSON Lines file.

    The format is decided by content: a file starting with ``[`` is a JSON array, one starting
    with ``{`` is JSON Lines (blank lines skipped). Each record needs ``instruction`` and
    ``output`` strings; ``input`` is an optional string (missing or null: ``""``); other keys are
    kept. Every problem raises one ``GPTFTError`` naming the file, and the (0-based) record index
    and line where it applies.
    """
    path = Path(path)
    text = read_text(path)
    stripped = text.lstrip()
    if stripped[0] == "[":
        records = _parse_array(path, text)
        lines = [None] * len(records)
    elif stripped[0] == "{":
        lines, records = _parse_jsonl(path, text)
    else:
        raise GPTFTError(f"{path}: not a list of records (expected a JSON array of "
                         "{instruction, input, output} objects or JSON Lines)")
    if not records:
        raise GPTFTError(f"{path}: no records")
    return _validate(path, records, lines)


def _parse_array(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise GPTFTError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise GPTFTError(f"{path}: not a list of records")
    return data


def _parse_jsonl(path: Path, text: str) -> tuple[list[int], list[Any]]:
    lines, records = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            _raise_for_single_object(path, text)
            raise GPTFTError(f"{path}:{lineno}:{e.colno}: invalid JSON Lines record: {e.msg}") from None
        lines.append(lineno)
    return lines, records


def _raise_for_single_object(path: Path, text: str) -> None:
    """A pretty-printed JSON object is not JSON Lines: say so rather than blame a line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return
    raise GPTFTError(f"{path}: not a list of records (found a single JSON {type(data).__name__}; "
                     "expected a JSON array of records or JSON Lines)")


def _validate(path: Path, records: list[Any], lines: Sequence[int | None]) -> list[dict]:
    problems, out = [], []
    for i, (record, line) in enumerate(zip(records, lines, strict=True)):
        problem = _record_problem(record)
        where = f"record {i}" + (f" (line {line})" if line is not None else "")
        if problem:
            problems.append(f"{where}: {problem}")
        else:
            out.append({**record, "input": record.get("input") or ""})
    if problems:
        more = len(problems) - _MAX_REPORTED
        shown = problems[:_MAX_REPORTED] + ([f"... and {more} more"] if more > 0 else [])
        raise GPTFTError(f"{path}: {len(problems)} invalid record(s) (records count from 0): "
                         + "; ".join(shown))
    return out


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"expected an object with instruction, input, output, got {type(record).__name__}"
    for key in ("instruction", "output"):
        if key not in record:
            return f"missing key {key!r}"
    for key in ("instruction", "input", "output"):
        value = record.get(key)
        if not isinstance(value, str) and not (key == "input" and value is None):
            return f"{key!r} must be a string, got {type(value).__name__}"
    return None


# ---- tokenized dataset ---------------------------------------------------------------------------

class InstructionDataset(Dataset):
    """Records tokenized once: prompt tokens + response tokens + end-of-text.

    Prompt and response are encoded separately so that the prompt's tokens are exactly those the
    model sees at generation time (on the book's data this equals encoding the full text). Items
    are truncated to ``max_length + 1`` tokens (``max_length`` inputs/targets).

    Attributes:
        lengths: token count of each item (after truncation); an item fills ``length - 1``
            positions of a row (inputs and targets are shifted by one).
    """

    def __init__(self, records: Sequence[dict], tokenizer: Tokenizer, style: str | PromptStyle,
                 max_length: int):
        self.records = list(records)
        self.items: list[dict] = []
        for record in self.records:
            prompt, response = format_example(record, style)
            prompt_ids = tokenizer.encode(prompt)
            ids = (prompt_ids + tokenizer.encode(response) + [tokenizer.eot_id])[: max_length + 1]
            self.items.append({"input_ids": ids, "prompt_len": min(len(prompt_ids), len(ids))})
        self.lengths: list[int] = [len(item["input_ids"]) for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


# ---- collation -----------------------------------------------------------------------------------

def _truncated(item: dict, max_length: int | None) -> list[int]:
    ids = list(item["input_ids"])
    return ids if max_length is None else ids[: max_length + 1]


def _shifted(item: dict, mask_prompt: bool, max_length: int | None) -> tuple[list[int], list[int]]:
    """An item's (inputs, targets): tokens[:-1] and tokens[1:], truncated to max_length."""
    ids = _truncated(item, max_length)
    inputs, targets = ids[:-1], ids[1:]
    if mask_prompt:
        n = min(max(item["prompt_len"] - 1, 0), len(targets))
        targets[:n] = [IGNORE_INDEX] * n
    return inputs, targets


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def instruction_collate(items: Sequence[dict], pad_id: int, mask_prompt: bool,
                        max_length: int | None = None, pad_to_multiple: int = 1) -> dict:
    """One example per row, right-padded: the book's ``custom_collate_fn`` as tensors.

    Each item's tokens end with end-of-text; that first end-of-text is the last target of the
    row, every later (padding) target is ``IGNORE_INDEX``.

    Args:
        items: ``InstructionDataset`` items ``{"input_ids", "prompt_len"}``.
        pad_id: padding token (the end-of-text id, as in the book).
        mask_prompt: ignore the targets that predict prompt tokens (train on the response only).
        max_length: truncate each item to ``max_length + 1`` tokens first.
        pad_to_multiple: round the row length up to a multiple of this (steadier shapes for
            ``torch.compile``).

    Returns:
        ``input_ids``, ``labels`` and ``attention_mask`` (1 real, 0 padding), all (B, T) long,
        on the CPU. The model does not need ``attention_mask``: with right padding, causal
        attention never lets a real token see the padding after it. It is returned for
        completeness.
    """
    tokens = [_truncated(item, max_length) for item in items]
    targets = [_shifted(item, mask_prompt, max_length)[1] for item in items]
    T = _round_up(max((len(t) for t in targets), default=0), pad_to_multiple)
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), T), dtype=torch.long)
    for row, (ids, target) in enumerate(zip(tokens, targets, strict=True)):
        n = min(len(ids), T)  # inputs are tokens[:-1]; a shorter item's end-of-text is an input too
        input_ids[row, :n] = torch.tensor(ids[:n], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, : len(target)] = torch.tensor(target, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


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
                   max_length: int, pad_to_multiple: int = 1) -> dict:
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
        pad_to_multiple: round the row length up to a multiple of this.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` (B, T) long and ``attention_mask``
        (B, 1, T, T) bool, on the CPU.
    """
    rows = _rows(items, mask_prompt, max_length)
    T = _round_up(max((sum(len(i) for i, _ in row) for row in rows), default=0), pad_to_multiple)
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
