"""The instruction job: its ``data`` section and job class (no torch: read by config tools)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gptft.config import GenerateConfig, JobConfig, ModelConfig, TrainConfig
from gptft.validation import positive, seed_problems, split_problems


@dataclass
class InstructionData:
    path: str | None = None
    """JSON array, JSONL or Parquet of records ({messages}, ShareGPT {conversations} or
    {instruction, input?, output}), a datasets save_to_disk folder, or with format=hf a Hugging
    Face dataset name; unset: the book's set, which gptft carries."""
    format: Literal["auto", "json", "jsonl", "parquet", "hf"] = "auto"
    """json (one array of records), jsonl (one record a line), parquet, hf (datasets.load_dataset,
    or load_from_disk for a folder); auto: by content, suffix (.parquet) or a saved folder."""
    dataset_split: str = "train"
    """The split of a Hugging Face dataset to read (then divided by ``split``)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename the source's columns to gptft's keys, {gptft key: column}, e.g. {messages: chat}."""
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])
    """Train / validation / test fractions (the book: 85% train, 10% test, 5% validation)."""
    shuffle: bool = False
    """Shuffle with ``seed`` before splitting; false: file order, as the book."""
    seed: int = 123
    """Seed of the shuffle."""
    prompt_style: Literal["template", "chatml", "llama3", "alpaca", "phi3"] | None = None
    """template: the tokenizer's chat template; chatml, llama3: built-in chat templates (any
    model, GPT-2 included); alpaca, phi3: one-turn text formats (gptft.prompts); unset: template
    when the tokenizer has one, else alpaca."""
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


def source_problems(data) -> list[str]:
    """A data section's source keys that cannot go together."""
    out = []
    if data.format == "hf" and not data.path:
        out.append("format: hf needs path (a Hugging Face dataset name or a saved folder)")
    if data.columns and not data.path:
        out.append("columns: only with path (the carried data sets have gptft's keys)")
    return out



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
