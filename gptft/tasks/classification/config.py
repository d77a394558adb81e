"""The classification job class (its ``data`` section: ``gptft.data.config``; no torch: read by
config tools)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gptft.config import JobConfig
from gptft.data.config import ClassificationData


@dataclass
class ClassificationJob(JobConfig):
    task: str = "classification"
    """Which job this is."""
    output_dir: str = "runs/classification"
    """Run folder: config, weights, metrics, logs, plots, checkpoints."""
    data: ClassificationData = field(default_factory=ClassificationData)
