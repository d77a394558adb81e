"""The ``data`` sections of the jobs, beside the readers that take them (no torch: read by config
tools). Each task's job class (``gptft/tasks/<task>/config.py``) holds its section from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gptft.validation import in_range, positive, split_problems


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
        return (split_problems(self.split) + positive(self, "max_length")
                + in_range(self, "balance_min_kept", 0, 1))


@dataclass
class RecordsData:
    """What the instruction and preference sections share: prompt records read from JSON, split
    in file order (or shuffled) and formatted with a prompt style."""

    path: str | None = None
    """Local JSON array or JSONL of records: {instruction, input?, output} (instruction), {instruction,
    input?, chosen, rejected} (preference); unset: the book's set, which gptft carries."""
    format: Literal["auto", "json", "jsonl"] = "auto"
    """File format: json (one array of records), jsonl (one record a line); auto: by content."""
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])
    """Train / validation / test fractions (the book: 85% train, 10% test, 5% validation)."""
    shuffle: bool = False
    """Shuffle with ``seed`` before splitting; false: file order, as the book."""
    seed: int = 123
    """Seed of the shuffle."""
    prompt_style: Literal["alpaca", "phi3"] = "alpaca"
    """Prompt template (gptft.prompts.PROMPT_STYLES); preference tuning: use the instruction run's."""
    max_length: int | None = None
    """Truncate examples (prompt + response) to this many tokens; unset: the model's context length."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding), the batches in a random order;
    false: random batches, as the book."""

    def problems(self) -> list[str]:
        return split_problems(self.split) + positive(self, "max_length")


@dataclass
class InstructionData(RecordsData):
    mask_prompt: bool = False
    """Train on the response only: the prompt's targets are ignored by the loss."""
    packing: bool = False
    """Pack several examples into each row (attention and positions kept per example)."""


@dataclass
class PreferenceData(RecordsData):
    drop_identical: bool = False
    """Leave out pairs whose chosen and rejected responses are the same text (their loss is log 2
    whatever the weights: they teach nothing); false: such a pair is an error."""
