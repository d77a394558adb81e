"""Instruction data: loading and splitting records, and tokenizing them into a dataset.

A record is ``{"instruction": str, "input": str (optional), "output": str}``. Training text is
``format_prompt(record)`` (the prompt up to and including the response header, ``gptft.prompts``)
followed by the output and one end-of-text token, as in chapter 7 of *Build a Large Language Model
(From Scratch)*. Batching (one example per row, or packed) is in ``gptft.data.collate``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset

from gptft.data.config import InstructionData
from gptft.data.conversations import Record, conversation_record, locate, read_examples, read_rows
from gptft.data.readers import JsonRecord, check_records, parse_json_records, read_text
from gptft.download import seed_file
from gptft.errors import GPTFTError
from gptft.prompts import PromptStyle, format_example
from gptft.tokenizer import Tokenizer

INSTRUCTION_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
    "instruction-data.json"
)


# ---- reading and splitting records ---------------------------------------------------------------

@dataclass
class InstructionSplits:
    """Records (``instruction``, ``input``, ``output`` and any extra keys) of each split."""

    train: list[dict]
    val: list[dict]
    test: list[dict]


def load_instruction_data(cfg: InstructionData, chat: bool = False) -> InstructionSplits:
    """Read ``cfg.path`` (unset: the book's set, which gptft carries) and split it (``split_records``).

    With `chat` (a chat template renders the data) every record becomes a conversation
    (``gptft.data.conversations.conversation_record``: messages, ShareGPT or Alpaca); without,
    records are Alpaca's ``{instruction, input?, output}`` (a text prompt style's). Records are
    ``Record`` s: they know the file and line they were read from.
    """
    name = "instruction-data.json"
    path = cfg.path if cfg.path else str(seed_file(name, [INSTRUCTION_URL], name))
    rows = read_rows(path, cfg.format, cfg.dataset_split, cfg.columns)
    if chat:
        records = join_turns(read_examples(str(path), rows, conversation_record), cfg.turns)
    else:
        records = text_records(str(path), rows, _text_style_problem)
    return split_records(records, cfg.split, cfg.shuffle, cfg.seed, str(path))


def join_turns(records: list[Record], turns: int) -> list[Record]:
    """Every `turns` consecutive conversations as one (the first one's system message kept, the
    others' dropped; a last group with fewer records is kept shorter), named after its first
    record; ``instruction`` / ``output`` are its last turn's."""
    if turns == 1:
        return records
    out = []
    for i in range(0, len(records), turns):
        group = records[i : i + turns]
        messages = [m for k, r in enumerate(group) for m in r["messages"] if k == 0 or m["role"] != "system"]
        joined = {**group[-1], "messages": messages}
        out.append(Record.at(joined, f"{group[0].where} (+{len(group) - 1} joined)" if len(group) > 1
                             else group[0].where))
    return out


def text_records(name: str, rows: list[JsonRecord], problem: Callable[[Any], str | None]) -> list[Record]:
    """Alpaca-shaped records (a missing or null ``input`` as ``""``), each checked by `problem`."""
    check_records(name, rows, problem)
    return [Record.at({**r.value, "input": r.value.get("input") or ""}, f"{name}: {locate(r)}")
            for r in rows]


def _text_style_problem(record: Any) -> str | None:
    problem = _record_problem(record)
    if problem and isinstance(record, dict) and ("messages" in record or "conversations" in record):
        return ("a conversation: set data.prompt_style to template, chatml or llama3 (alpaca and "
                "phi3 format one instruction)")
    return problem


def split_records(records: list[dict], split: Sequence[float], shuffle: bool, seed: int,
                  name: str) -> InstructionSplits:
    """Split `records` (read from `name`) with the book's arithmetic: ``train = int(n * split[0])``
    records, then ``test = int(n * split[2])``, then validation gets the rest, taken in that order
    from the file (train | test | val), after a seeded shuffle if `shuffle`."""
    if shuffle:
        records = list(records)
        random.Random(seed).shuffle(records)
    n = len(records)
    n_train, n_test = int(n * split[0]), int(n * split[2])
    if n_train == 0:
        raise GPTFTError(f"{name}: {n} record(s) leave the training split empty "
                         f"(split {list(split)}); add records or raise the training fraction")
    return InstructionSplits(
        train=records[:n_train],
        test=records[n_train : n_train + n_test],
        val=records[n_train + n_test :],
    )


def read_records(path: str | Path, fmt: Literal["auto", "json", "jsonl"] = "auto",
                 problem: Callable[[Any], str | None] | None = None,
                 fields: str = "instruction, input, output") -> list[dict]:
    """Read and validate instruction records from a JSON array or a JSON Lines file.

    ``auto`` decides by content: a file starting with ``[`` is a JSON array, one starting with
    ``{`` is JSON Lines (blank lines skipped). Each record needs ``instruction`` and ``output``
    strings; ``input`` is an optional string (missing or null: ``""``); other keys are kept. Every
    problem raises one ``GPTFTError`` naming the file, and the (0-based) record index and line
    where it applies. Other kinds of records pass their own `problem` check (a message for a bad
    record, else None) and `fields` (named when the file is not a list of records).
    """
    path = Path(path)
    text = read_text(path)
    if fmt == "auto" and text.lstrip()[0] not in "[{":
        raise GPTFTError(f"{path}: not a list of records (expected a JSON array of "
                         f"{{{fields}}} objects or JSON Lines)")
    records = parse_json_records(text, str(path), fmt)
    if not records:
        raise GPTFTError(f"{path}: no records")
    check_records(str(path), records, problem or _record_problem)
    return [{**r.value, "input": r.value.get("input") or ""} for r in records]


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
        full_lengths: the same before truncation.
    """

    def __init__(self, records: Sequence[dict], tokenizer: Tokenizer, style: str | PromptStyle,
                 max_length: int):
        self.records = list(records)
        self.items: list[dict] = []
        self.full_lengths: list[int] = []  # before truncation
        for record in self.records:
            prompt, response = format_example(record, style)
            prompt_ids = tokenizer.encode(prompt)
            full = prompt_ids + tokenizer.encode(response) + [tokenizer.eot_id]
            ids = full[: max_length + 1]
            self.items.append({"input_ids": ids, "prompt_len": min(len(prompt_ids), len(ids))})
            self.full_lengths.append(len(full))
        self.lengths: list[int] = [len(item["input_ids"]) for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]
