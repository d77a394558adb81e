"""The instruction job class (its ``data`` section: ``gptft.data.config``; no torch: read by config
tools)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptft.config import GenerateConfig, JobConfig, ModelConfig, TrainConfig
from gptft.data.config import (
    InstructionData,
    source_problems,  # noqa: F401 (moved)
)


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
