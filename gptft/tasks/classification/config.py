"""The classification job: its ``data`` section and job class (no torch: read by config tools)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gptft.config import JobConfig
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



@dataclass
class ClassificationJob(JobConfig):
    task: str = "classification"
    """Which job this is."""
    output_dir: str = "runs/classification"
    """Run folder: config, weights, metrics, logs, plots, checkpoints."""
    data: ClassificationData = field(default_factory=ClassificationData)
