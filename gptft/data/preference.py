"""Preference data: pairs of responses to one instruction, the preferred one first.

A record is ``{"instruction": str, "input": str (optional), "chosen": str, "rejected": str}``
(``output``, when present, is kept: the judge compares responses with it; when absent, ``chosen``
stands in for it). Each response is scored after ``format_prompt(record)``: the prompt's tokens,
then the response's and one end-of-text token, as the instruction task trains on them. Records
are read with the instruction reader and split with the book's arithmetic, in file order
(``gptft.data.instruction``); batching is ``gptft.data.collate.preference_collate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import Dataset

from gptft.data.config import PreferenceData
from gptft.data.conversations import Record, preference_record, read_examples, read_rows
from gptft.data.instruction import InstructionSplits, split_records, text_records
from gptft.download import seed_file
from gptft.errors import GPTFTError
from gptft.prompts import PromptStyle, format_prompt
from gptft.tokenizer import Tokenizer

PREFERENCE_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
    "instruction-data-with-preference.json"
)
FIELDS = "instruction, input, chosen, rejected"
IDENTICAL = "'chosen' and 'rejected' are the same text (data.drop_identical=true leaves such pairs out)"


def load_preference_data(cfg: PreferenceData, chat: bool = False) -> InstructionSplits:
    """Read ``cfg.path`` (unset: the book's set, which gptft carries), check every pair and split
    them in file order (``split_records``); with ``cfg.drop_identical``, pairs whose two responses
    are the same text are left out after splitting (so the splits are the book's records)."""
    name = "instruction-data-with-preference.json"
    path = cfg.path if cfg.path else str(seed_file(name, [PREFERENCE_URL], name))
    rows = read_rows(path, cfg.format, cfg.dataset_split, cfg.columns)
    if chat:
        records = read_examples(path, rows, partial(_chat_pair, allow_identical=cfg.drop_identical))
    else:
        problem = partial(_pair_problem, allow_identical=cfg.drop_identical)
        records = [Record.at({**r, "output": r.get("output") or r["chosen"]}, r.where)
                   for r in text_records(path, rows, problem)]
    splits = split_records(records, cfg.split, cfg.shuffle, cfg.seed, str(path))
    if cfg.drop_identical:
        for name in ("train", "val", "test"):
            setattr(splits, name, [r for r in getattr(splits, name) if r["chosen"] != r["rejected"]])
        if not splits.train:
            raise GPTFTError(f"{path}: every pair of the training split has 'chosen' equal to "
                             "'rejected': data.drop_identical=true leaves no pair to train on")
    return splits


def _chat_pair(value: Any, allow_identical: bool) -> tuple[dict | None, str | None]:
    record, problem = preference_record(value)
    if record is not None and record["chosen"] == record["rejected"] and not allow_identical:
        return None, IDENTICAL
    return record, problem


def _pair_problem(record: Any, allow_identical: bool) -> str | None:
    if not isinstance(record, dict):
        return f"expected an object with {FIELDS}, got {type(record).__name__}"
    for key in ("instruction", "chosen", "rejected"):
        if key not in record:
            return f"missing key {key!r}"
    for key in ("instruction", "input", "chosen", "rejected", "output"):
        value = record.get(key)
        if not isinstance(value, str) and not (key in ("input", "output") and value is None):
            return f"{key!r} must be a string, got {type(value).__name__}"
    for key in ("chosen", "rejected"):
        if not record[key].strip():
            return f"{key!r} is empty"
    if record["chosen"] == record["rejected"] and not allow_identical:
        return IDENTICAL
    return None


class PreferenceDataset(Dataset):
    """Pairs tokenized once: for each of chosen and rejected, prompt + response + end-of-text,
    truncated to ``max_length + 1`` tokens (``max_length`` inputs/targets).

    Attributes:
        lengths: token count of each pair's longer sequence (after truncation).
        reference: the reference model's summed log-probabilities of each pair's responses,
            (n, 2) float32 (chosen, rejected), once computed; items carry their row.
    """

    def __init__(self, records: Sequence[dict], tokenizer: Tokenizer, style: str | PromptStyle,
                 max_length: int):
        self.items: list[dict] = []
        eot = [tokenizer.eot_id]
        for record in records:
            prompt = tokenizer.encode(format_prompt(record, style))
            chosen, rejected = ((prompt + tokenizer.encode(record[k]) + eot)[: max_length + 1]
                                for k in ("chosen", "rejected"))
            self.items.append({"chosen": chosen, "rejected": rejected,
                               "prompt_len": min(len(prompt), max_length + 1)})
        self.lengths: list[int] = [max(len(i["chosen"]), len(i["rejected"])) for i in self.items]
        self.reference: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return item if self.reference is None else {**item, "reference": self.reference[index]}
