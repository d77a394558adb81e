"""The preference (DPO) job: its ``data`` and ``dpo`` sections and job class (no torch: read by
config tools)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gptft.config import GenerateConfig, JobConfig, ModelConfig, TrainConfig
from gptft.tasks.instruction.config import source_problems
from gptft.validation import in_range, positive, seed_problems, split_problems


@dataclass
class PreferenceData:
    path: str | None = None
    """JSON array, JSONL or Parquet of pairs ({instruction, input?, chosen, rejected}, {prompt,
    chosen, rejected} as strings or message lists, or {chosen, rejected} conversations sharing
    their prompt), a datasets save_to_disk folder, or with format=hf a Hugging Face dataset name;
    unset: the book's set, which gptft carries."""
    format: Literal["auto", "json", "jsonl", "parquet", "hf"] = "auto"
    """json (one array of records), jsonl (one record a line), parquet, hf (datasets.load_dataset,
    or load_from_disk for a folder); auto: by content, suffix (.parquet) or a saved folder."""
    dataset_split: str = "train"
    """The split of a Hugging Face dataset to read (then divided by ``split``)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Rename the source's columns to gptft's keys, {gptft key: column}, e.g. {prompt: question}."""
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])
    """Train / validation / test fractions (the book: 85% train, 10% test, 5% validation)."""
    shuffle: bool = False
    """Shuffle with ``seed`` before splitting; false: file order, as the book."""
    seed: int = 123
    """Seed of the shuffle."""
    prompt_style: Literal["template", "chatml", "llama3", "alpaca", "phi3"] | None = None
    """As the instruction task's (use the instruction run's); unset: template when the tokenizer
    has one, else alpaca."""
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


@dataclass
class DPOConfig:
    beta: float = 0.1
    """β: how strongly the tuned model is held near the reference (the starting model); the
    rewards are β x the log-probability ratios. For ipo, the regularisation τ."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's -log σ(β Δ) (Rafailov et al., 2023); ipo: (Δ / tokens - 1 / 2β)² on the
    length-normalised log-ratios (Azar et al., 2023), as TRL."""
    label_smoothing: float = 0.0
    """Conservative DPO (sigmoid only): the assumed probability that a pair's preference is
    flipped; 0: plain DPO."""
    precompute_reference: bool = True
    """Compute the reference log-probabilities of every pair once before training, so no second
    model is kept; false: a frozen copy of the starting model (with model.trainable=lora: the
    model with its adapters disabled) scores each batch."""

    def problems(self) -> list[str]:
        out = positive(self, "beta") + in_range(self, "label_smoothing", 0.0, 0.5, high_open=True)
        if self.loss_type == "ipo" and self.label_smoothing:
            out.append("label_smoothing: only with loss_type=sigmoid (conservative DPO)")
        return out


@dataclass
class PreferenceJob(JobConfig):
    task: str = "preference"
    """Which job this is."""
    output_dir: str = "runs/preference"
    """Run folder: config, weights, metrics, logs, responses, checkpoints."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="gpt2-medium", trainable="all"))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=5e-6, weight_decay=0.01))
    data: PreferenceData = field(default_factory=PreferenceData)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
