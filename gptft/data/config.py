"""The ``data`` sections of the jobs, beside the readers that take them (no torch: read by config
tools). Each task's job class (``gptft/tasks/<task>/config.py``) holds its section from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gptft.validation import in_range, positive, seed_problems, split_problems


@dataclass
class ClassificationData:
    path: str | None = None
    """Local data file (CSV/TSV/JSONL). Unset: the SMS Spam Collection gptft carries (gptft/assets/data)."""
    format: Literal["auto", "csv", "tsv", "jsonl", "sms"] = "auto"
    """File format; auto: by extension (SMSSpamCollection / .tsv without header: sms)."""
    text_column: str = "text"
    """Column (or JSON key) holding the text."""
    label_column: str = "label"
    """Column (or JSON key) holding the label."""
    labels: list[str] | None = None
    """Label names in class-index order; unset: sorted names found in the training data
    (the SMS set maps ham → 0, spam → 1)."""
    train_path: str | None = None
    """Ready-made training split (then val_path and test_path are needed too; path is unused)."""
    val_path: str | None = None
    """Ready-made validation split."""
    test_path: str | None = None
    """Ready-made test split."""
    balance: bool = True
    """Undersample every class to the size of the smallest (the book: 747 ham, 747 spam)."""
    balance_min_kept: float = 0.1
    """Balancing must keep at least this fraction of the rows, else it is an error (a few mistyped
    labels make a tiny class that would cut every class down to its size); the SMS set keeps 27%.
    0: no limit."""
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    """Train / validation / test fractions of a single file, after shuffling with ``seed``."""
    seed: int = 123
    """Seed of the balancing and the split."""
    max_length: int | None = None
    """Truncate texts to this many tokens; unset: the longest training text, capped by the context."""
    group_by_length: bool = True
    """Batch texts of similar length together (less padding), the batches in a random order."""

    def problems(self) -> list[str]:
        out = (split_problems(self.split) + positive(self, "max_length")
               + in_range(self, "balance_min_kept", 0, 1) + seed_problems(self, "seed"))
        if self.text_column == self.label_column:  # it would train on the labels themselves
            out.append(f"text_column: names the label column too ({self.text_column!r}): set "
                       "text_column to the column of the texts")
        return out


def source_problems(data) -> list[str]:
    """A data section's source keys that cannot go together."""
    out = []
    if data.format == "hf" and not data.path:
        out.append("format: hf needs path (a Hugging Face dataset name or a saved folder)")
    if data.columns and not data.path:
        out.append("columns: only with path (the carried data sets have gptft's keys)")
    return out


@dataclass
class RecordsData:
    """The keys the instruction and preference sections share: records read from a file or a
    ``datasets`` source (``gptft.data.conversations``), split by fractions, and the prompt style
    that makes them tokens. Each section says what its records are in its own ``path``."""

    path: str | None = None
    """JSON array, JSONL or Parquet of records, a datasets save_to_disk folder, or with format=hf a
    Hugging Face dataset name; unset: the book's set, which gptft carries."""
    format: Literal["auto", "json", "jsonl", "parquet", "hf"] = "auto"
    """json (one array of records), jsonl (one record a line), parquet, hf (datasets.load_dataset,
    or load_from_disk for a folder); auto: by content, suffix (.parquet) or a saved folder."""
    dataset_split: str = "train"
    """The split of a Hugging Face dataset to read (then divided by ``split``)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename the source's columns to gptft's keys, {gptft key: column}, e.g. {messages: chat} or
    {prompt: question}."""
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])
    """Train / validation / test fractions (the book: 85% train, 10% test, 5% validation)."""
    shuffle: bool = False
    """Shuffle with ``seed`` before splitting; false: file order, as the book."""
    seed: int = 123
    """Seed of the shuffle."""
    prompt_style: Literal["template", "chatml", "llama3", "alpaca", "phi3"] | None = None
    """template: the tokenizer's chat template; chatml, llama3: built-in chat templates (any
    model, GPT-2 included); alpaca, phi3: one-turn text formats (gptft.prompts); unset: template
    when the tokenizer has one, else alpaca. A preference run: use the instruction run's."""


@dataclass
class InstructionData(RecordsData):
    path: str | None = None
    """JSON array, JSONL or Parquet of records ({messages}, ShareGPT {conversations} or
    {instruction, input?, output}), a datasets save_to_disk folder, or with format=hf a Hugging
    Face dataset name; unset: the book's set, which gptft carries."""
    train_on: Literal["assistant", "last_assistant", "all"] | None = None
    """Which tokens the loss learns with a chat template: every assistant turn (each with its
    end-of-turn token), the last one only, or all tokens; unset: assistant (with alpaca / phi3,
    mask_prompt decides)."""
    turns: int = 1
    """With a chat template: join this many consecutive records (in file order, before the split)
    into one conversation of that many turns; 1: each record is one conversation."""
    mask_prompt: bool = False
    """alpaca / phi3: train on the response only (the prompt's targets are ignored by the loss)."""
    max_length: int | None = None
    """Truncate examples to this many tokens; unset: the model's context length."""
    packing: bool = False
    """Pack several examples into each row (attention and positions kept per example)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding), the batches in a random order;
    false: random batches, as the book."""

    def problems(self) -> list[str]:
        out = split_problems(self.split) + positive(self, "max_length", "turns")
        if self.turns > 1 and self.prompt_style in ("alpaca", "phi3"):
            out.append(f"turns: only with a chat template (prompt_style {self.prompt_style} formats "
                       "one instruction)")
        if self.train_on is not None and self.prompt_style in ("alpaca", "phi3"):
            out.append(f"train_on: only with a chat template (prompt_style {self.prompt_style} "
                       "uses mask_prompt)")
        if self.mask_prompt and self.prompt_style in ("template", "chatml", "llama3"):
            out.append("mask_prompt: only with prompt_style alpaca or phi3 (chat templates use "
                       "train_on)")
        return out + source_problems(self) + seed_problems(self, "seed")


@dataclass
class PreferenceData(RecordsData):
    path: str | None = None
    """JSON array, JSONL or Parquet of pairs ({instruction, input?, chosen, rejected}, {prompt,
    chosen, rejected} as strings or message lists, or {chosen, rejected} conversations sharing
    their prompt), a datasets save_to_disk folder, or with format=hf a Hugging Face dataset name;
    unset: the book's set, which gptft carries."""
    max_length: int | None = None
    """Truncate prompt + response to this many tokens; unset: the model's context length."""
    drop_identical: bool = False
    """Leave out pairs whose chosen and rejected responses are the same text (their loss is log 2
    whatever the weights: they teach nothing); false: such a pair is an error."""
    group_by_length: bool = False
    """Batch pairs of similar length together (less padding), the batches in a random order;
    false: random batches, as the book."""

    def problems(self) -> list[str]:
        return (split_problems(self.split) + positive(self, "max_length") + source_problems(self)
                + seed_problems(self, "seed"))
