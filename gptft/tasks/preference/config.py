"""The preference (DPO) job: its ``dpo`` section and job class (its ``data`` section:
``gptft.data.config``; no torch: read by config tools)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gptft.config import GenerateConfig, JobConfig, ModelConfig, TrainConfig
from gptft.data.config import PreferenceData
from gptft.validation import in_range, positive


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
