"""The instruction job: its ``data`` section and job class (no torch: read by config tools)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gptft.config import GenerateConfig, JobConfig, ModelConfig, TrainConfig
from gptft.validation import positive, seed_problems, split_problems


@dataclass
class InstructionData:
    path: str | None = None
    """Local JSON array or JSONL of {instruction, input?, output}; unset: the book's set, which
    gptft carries."""
    format: Literal["auto", "json", "jsonl"] = "auto"
    """File format: json (one array of records), jsonl (one record a line); auto: by content."""
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])
    """Train / validation / test fractions (the book: 85% train, 10% test, 5% validation)."""
    shuffle: bool = False
    """Shuffle with ``seed`` before splitting; false: file order, as the book."""
    seed: int = 123
    """Seed of the shuffle."""
    prompt_style: Literal["alpaca", "phi3"] = "alpaca"
    """Prompt template (gptft.prompts.PROMPT_STYLES)."""
    mask_prompt: bool = False
    """Train on the response only: the prompt's targets are ignored by the loss."""
    max_length: int | None = None
    """Truncate examples to this many tokens; unset: the model's context length."""
    packing: bool = False
    """Pack several examples into each row (attention and positions kept per example)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding), the batches in a random order;
    false: random batches, as the book."""

    def problems(self) -> list[str]:
        return split_problems(self.split) + positive(self, "max_length") + seed_problems(self, "seed")



@dataclass
class InstructionJob(JobConfig):
    task: str = "instruction"
    """Which job this is."""
    output_dir: str = "runs/instruction"
    """Run folder: config, weights, metrics, logs, responses, checkpoints."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="gpt2-medium", trainable="all"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2))
    data: InstructionData = field(default_factory=InstructionData)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
