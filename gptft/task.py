"""The task contract: what a task supplies to the trainer and to the run (``gptft.run``).

A task (subclass ``TaskBase``; see ``gptft/tasks/``) supplies its data, model, loss, metrics and
the files its run writes (``outputs``); ``gptft.registry`` names it. The trainer
(``gptft.trainer``) calls ``count``, ``loss``, ``eval_outputs``, ``eval_metrics`` and
``on_epoch_end``; the run calls the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.utils.data import DataLoader

from gptft.accelerator import use_compile
from gptft.console import metrics_table
from gptft.data.collate import length_buckets
from gptft.runfolder import LOSS, Figure, Output

if TYPE_CHECKING:
    from gptft.config import Job


@dataclass
class EpochReport:
    """What a task reports at an epoch's end: metrics to log and a line to print."""

    metrics: dict[str, Any] = field(default_factory=dict)
    text: str = ""


@dataclass
class EpochContext:
    """What a task may use at an epoch's end (it does not get the trainer itself)."""

    epoch: int  # the epoch just finished (1-based)
    step: int
    model: nn.Module  # unwrapped, in eval mode for the hook's duration
    evaluate: Callable[..., dict[str, float]]  # evaluate(split, max_batches) -> metrics
    val_metrics: dict[str, float]  # this epoch's validation metrics (val_ prefixed)
    autocast: Callable[[], Any]
    epochs: int = 0  # train.epochs


class TaskBase:
    """What a task supplies to the trainer and the run (subclass it; see the classification and
    instruction tasks). ``__init__(job, accelerator)`` reads the data and builds ``self.model``,
    so bad input fails before the run folder is touched.

    Attributes:
        best_metric: the validation metric that picks the weights kept, e.g. ``val_accuracy``.
        higher_is_better: its direction.
        outputs: what the run writes besides the files every run writes (``gptft.runfolder``):
            figures drawn from ``log.jsonl``, files of records, tables of the metrics. Overwrite
            removes these files, W&B gets them and the closing summary lists them.
        model: the model to train (trainable parameters set).
        counts: parameter counts for ``metrics.json`` (``trainable_summary``).
    """

    best_metric: str = "val_loss"
    higher_is_better: bool = False
    outputs: tuple[Output, ...] = (LOSS,)
    eval_names: tuple[str, ...] = ("loss",)  # the names eval_metrics returns (set by the final evaluation)
    model: nn.Module
    counts: dict[str, int]

    def __init__(self, job: Job, accelerator: Accelerator):
        self.job, self.accelerator = job, accelerator

    # ---- data ----------------------------------------------------------------------------------

    def loader(self, split: str, train: bool = False) -> DataLoader:
        """The DataLoader of a split (``train=True``: the training loader, shuffled)."""
        raise NotImplementedError

    def has_split(self, split: str) -> bool:
        """Whether `split` holds any example."""
        return True

    def buckets(self, lengths: Sequence[int], cap: int) -> list[int] | None:
        """The lengths to pad batches to (``train.length_buckets``: a few for the data's `lengths`,
        capped at `cap`), or None: each batch padded to its longest example."""
        setting, device = self.job.train.length_buckets, self.accelerator.device
        on = setting is True or (setting == "auto" and (
            device.type == "cuda" or use_compile(self.job.train.compile, device)))
        return length_buckets(lengths, cap) if on else None

    # ---- what the trainer calls ----------------------------------------------------------------

    def count(self, batch: dict) -> torch.Tensor:
        """Number of loss units (examples, or label tokens) in a micro-batch, on its device."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Summed loss of one micro-batch on this process (call `model` itself: DDP needs it)."""
        raise NotImplementedError

    def eval_outputs(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Per-example tensors (first dimension = batch) to gather across processes."""
        raise NotImplementedError

    def eval_metrics(self, out: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics (without split prefix) from the gathered outputs of a whole split."""
        raise NotImplementedError

    def on_epoch_end(self, ctx: EpochContext) -> EpochReport | None:
        """Metrics and text to log at an epoch's end, e.g. a sample generation (none by default)."""
        return None

    # ---- what the run calls --------------------------------------------------------------------

    def split_report(self, split: str, gathered: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Extra final metrics of a split from its gathered outputs (none by default)."""
        return {}

    def meta(self) -> dict[str, Any]:
        """The task's fields of ``gptft.json`` besides task, model and tokenizer."""
        return {}

    def backbone(self) -> nn.Module:
        """The language model inside the task's model (the model itself, or its ``backbone``)."""
        return getattr(self.model, "backbone", self.model)

    def gpt_config(self):
        return self.backbone().config

    def write_outputs(self, trainer, metrics: dict) -> None:
        """Write the declared ``outputs`` after the weights and metrics are saved (`trainer`: the
        ``gptft.trainer.Trainer`` that trained): here the figures (main process); a task writing
        files of its own extends it."""
        figures = [o for o in self.outputs if isinstance(o, Figure)]
        if figures and self.accelerator.is_main_process:
            from gptft.plots import plot_run

            with trainer.phases("saving"):
                plot_run(Path(self.job.output_dir), figures, best_step=trainer.state.best_step,
                         title=self.job.tracking.run_name)

    def summary(self, metrics: dict) -> str:
        """The final metrics printed at the end: a table of each split's evaluation (tasks add
        their own lines, e.g. precision / recall / F1)."""
        return metrics_table(metrics, self.eval_names)

    def next_commands(self, run_dir: str) -> list[str]:
        """Commands to try on the finished run, printed at the end."""
        return []
