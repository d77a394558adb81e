"""The training loop shared by every task, in Accelerate's canonical order.

``Trainer`` knows nothing about classification or instructions: a ``Task`` says how to compute a
micro-batch's summed loss and its number of loss units (examples or label tokens), what to gather
for evaluation and how to turn it into metrics. The loss of an optimizer step is the sum over all
its micro-batches on all processes divided by their total number of units, so gradient
accumulation and any number of processes give the same update as one big batch.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
from accelerate import Accelerator, DataLoaderConfiguration
from tqdm.auto import tqdm

from gptft.config import Job, job_to_dict, job_to_yaml
from gptft.errors import GPTFTError
from gptft.io import load_safetensors, read_json, save_safetensors, write_json, write_text

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # in each checkpoint: TrainState and the LR schedule
# Keys that may change between a run and its resumption (prefixes): what to resume, where the run
# folder is, how long to train (a cosine schedule then follows the new length), how often to
# evaluate, log and checkpoint, whether to skip non-finite steps from now on, tracking and the
# sample generations. Every other change (lr, model shape, data, seed...) would not continue the
# same run, so it stops the resumption.
RESUMABLE_CHANGES = ("train.resume", "output_dir", "train.epochs", "train.max_steps",
                     "train.eval_every", "train.eval_batches", "train.log_every",
                     "train.checkpoint_every", "train.keep_last", "train.skip_nonfinite",
                     "tracking.", "generate.")


class Task(Protocol):
    """What the trainer needs from a task."""

    best_metric: str  # e.g. "val_accuracy"; the best model by it is kept
    higher_is_better: bool

    def count(self, batch: dict) -> torch.Tensor:
        """Number of loss units (examples, or label tokens) in a micro-batch on this process."""

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Summed loss of one micro-batch on this process (call `model` itself: DDP needs it)."""

    def eval_outputs(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Per-example tensors (first dimension = batch) to gather across processes."""

    def eval_metrics(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics (without split prefix) from the gathered outputs of a whole split."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """Optional hook (e.g. log a sample generation)."""


@dataclass
class TrainState:
    """Progress counters, saved in every checkpoint."""

    epoch: int = 0
    step: int = 0
    batches_in_epoch: int = 0
    examples_seen: int = 0
    best_value: float | None = None
    best_step: int = -1
    skipped_steps: int = 0
    log_lines: int = 0  # lines in log.jsonl: a resumed run drops those written after the checkpoint

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def make_accelerator(job: Job) -> Accelerator:
    """The Accelerator for a job: device, mixed precision and the W&B tracker."""
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and later (fp32 jobs)
    torch.backends.cudnn.allow_tf32 = True
    return Accelerator(
        cpu=job.train.device == "cpu",
        mixed_precision=job.train.mixed_precision,
        log_with="wandb" if job.tracking.wandb else None,
        project_dir=job.output_dir,
        dataloader_config=DataLoaderConfiguration(non_blocking=True),  # with pinned memory on CUDA
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters: weight decay on matrices (≥ 2-D) only, not on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at `step` (linear warm-up, then constant or cosine)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Fits `model` on `train_loader`, evaluating on `val_loader`, checkpointing into ``output_dir``.

    Args:
        job: the validated job configuration.
        accelerator: from ``make_accelerator``.
        task: loss and metrics (see ``Task``).
        model: the model to train, with ``requires_grad`` already set by the trainable policy.
        train_loader: a DataLoader whose ``batch_sampler`` has ``set_epoch`` (EpochBatchSampler).
        val_loader: validation DataLoader.
    """

    def __init__(self, job: Job, accelerator: Accelerator, task: Task, model: nn.Module,
                 train_loader: torch.utils.data.DataLoader, val_loader: torch.utils.data.DataLoader):
        self.job, self.cfg, self.accelerator, self.task = job, job.train, accelerator, task
        self.output_dir = Path(job.output_dir)
        self.sampler = train_loader.batch_sampler
        self.state = TrainState()
        # Fused AdamW (one kernel for all parameters) runs on CUDA and CPU: 1.17x a CPU step.
        optimizer = torch.optim.AdamW(param_groups(model, self.cfg.weight_decay), lr=self.cfg.lr,
                                      betas=tuple(self.cfg.betas), fused=True)
        if self.cfg.compile:
            model = torch.compile(model)
        self.model, self.optimizer, self.train_loader, self.val_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader)
        self.total_steps = self._total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, self.total_steps, self.cfg.warmup_steps, self.cfg.schedule, self.cfg.min_lr_ratio))
        # The schedule and the counters go in the checkpoint as JSON (trainer_state.json), not
        # through register_for_checkpointing, whose files Accelerate unpickles (weights_only=False).
        self.best: dict[str, torch.Tensor] | None = None

    def _total_steps(self) -> int:
        per_epoch = math.ceil(len(self.train_loader) / self.cfg.grad_accum_steps)
        total = per_epoch * self.cfg.epochs
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train for ``epochs`` (or ``max_steps``), resuming first if ``train.resume`` says so."""
        if self.cfg.resume:
            self.resume()
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc="train",
                   disable=not self.accelerator.is_local_main_process, dynamic_ncols=True)
        try:
            while self.state.epoch < self.cfg.epochs and not self._done():
                for micro_batches in self._epoch_batches():
                    loss = self.train_step(micro_batches)
                    bar.update(1)
                    self._after_step(loss, bar)
                    if self._done():
                        break
                else:
                    self._end_epoch()
        finally:
            bar.close()  # also on an error: its message then starts a line of its own
        self._restore_best()

    def _done(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    def _epoch_batches(self) -> Iterator[list[dict]]:
        """The micro-batches of the current epoch, grouped per optimizer step, resuming mid-epoch."""
        self.sampler.set_epoch(self.state.epoch)
        self.train_loader.set_epoch(self.state.epoch)
        loader = self.train_loader
        if self.state.batches_in_epoch:
            loader = self.accelerator.skip_first_batches(loader, self.state.batches_in_epoch)
        it = iter(loader)
        while micro_batches := list(islice(it, self.cfg.grad_accum_steps)):
            yield micro_batches

    def train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        """One optimizer step over `micro_batches`; returns the step's mean loss (all processes)."""
        self.model.train()
        acc = self.accelerator
        counts = torch.stack([self.task.count(b) for b in micro_batches]).to(acc.device)
        total = acc.reduce(counts.sum().float(), reduction="sum")
        loss_sum = torch.zeros((), device=acc.device)
        for i, batch in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            with acc.no_sync(self.model) if not sync else nullcontext(), acc.autocast():
                batch_loss = self.task.loss(self.model, batch)
                # DDP averages gradients over processes: scale so the result is sum / total.
                acc.backward(batch_loss * acc.num_processes / total.clamp(min=1))
            loss_sum += batch_loss.detach().float()
        grad_norm = None
        if self.cfg.max_grad_norm:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        step_loss = acc.reduce(loss_sum, reduction="sum") / total.clamp(min=1)
        if not self._finite(step_loss, grad_norm, len(micro_batches)):
            return step_loss
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.batches_in_epoch += len(micro_batches)
        self.state.examples_seen += sum(len(b["input_ids"]) for b in micro_batches) * acc.num_processes
        return step_loss

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, n_batches: int) -> bool:
        """False (and the step skipped) for a non-finite loss or gradient when allowed; else stop."""
        check = loss if grad_norm is None else loss + grad_norm
        if torch.isfinite(check).item():
            return True
        step = self.state.step + 1
        if not self.cfg.skip_nonfinite:
            last = latest_checkpoint(self.output_dir)
            raise GPTFTError(
                f"non-finite loss or gradient at step {step} (loss {loss.item()}); "
                + (f"the last good checkpoint is {last}" if last else "no checkpoint saved yet")
                + ". Lower train.lr, use mixed_precision=bf16 instead of fp16, or set "
                "train.skip_nonfinite=true")
        self.optimizer.zero_grad(set_to_none=True)
        self.state.skipped_steps += 1
        self.state.step += 1
        self.state.batches_in_epoch += n_batches
        self.log({"train/skipped_steps": self.state.skipped_steps})
        return False

    def _after_step(self, loss: torch.Tensor, bar: tqdm) -> None:
        step = self.state.step
        if step % self.cfg.log_every == 0 or step == 1:
            value = loss.item()
            bar.set_postfix(loss=f"{value:.4f}")
            self.log({"train/loss": value, "train/lr": self.scheduler.get_last_lr()[0]})
        if self.cfg.eval_every and step % self.cfg.eval_every == 0:
            self.evaluate_and_track()
        epoch_ends = self.state.batches_in_epoch >= len(self.train_loader) and not self._done()
        if self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0 and not epoch_ends:
            self.save_checkpoint()  # (at an epoch's last step, _end_epoch saves it once, complete)

    def _end_epoch(self) -> None:
        self.state.epoch += 1
        self.state.batches_in_epoch = 0
        self.evaluate_and_track()
        self.task.on_epoch_end(self)
        self.save_checkpoint()

    # ---- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def gather(self, loader, max_batches: int | None = None) -> dict[str, torch.Tensor]:
        """The task's eval outputs over `loader` from all processes, without the duplicates that
        even batches add."""
        model = self.model
        was_training = model.training
        model.eval()
        gathered: dict[str, list[torch.Tensor]] = {}
        for batch in islice(loader, max_batches):
            with self.accelerator.autocast():
                out = self.task.eval_outputs(model, batch)
            for k, v in self.accelerator.gather_for_metrics(out).items():
                gathered.setdefault(k, []).append(v.cpu())
        model.train(was_training)
        return {k: torch.cat(v) for k, v in gathered.items()}

    def evaluate(self, loader, max_batches: int | None = None) -> dict[str, float]:
        """Task metrics over `loader` (or its first `max_batches`)."""
        return self.task.eval_metrics(self.gather(loader, max_batches))

    def evaluate_and_track(self) -> dict[str, float]:
        """Evaluate on validation; keep the best weights by ``task.best_metric``."""
        metrics = {f"val_{k}": v for k, v in
                   self.evaluate(self.val_loader, self.cfg.eval_batches).items()}
        self.log({f"val/{k[4:]}": v for k, v in metrics.items()})
        value = metrics[self.task.best_metric]
        best = self.state.best_value
        if best is None or (value > best if self.task.higher_is_better else value < best):
            self.state.best_value, self.state.best_step = value, self.state.step
            self.best = {n: p.detach().cpu().clone() for n, p in self._trainable()}
        return metrics

    def _trainable(self) -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, p) for n, p in self.accelerator.unwrap_model(self.model).named_parameters()
                if p.requires_grad)

    def _restore_best(self) -> None:
        if self.best is None:
            return
        with torch.no_grad():
            for n, p in self._trainable():
                p.copy_(self.best[n])
        self.accelerator.print(f"kept the best model: step {self.state.best_step}, "
                               f"{self.task.best_metric} {self.state.best_value:.4f}")

    # ---- logging -------------------------------------------------------------------------------

    def log(self, metrics: dict[str, Any]) -> None:
        """Log to the trackers (W&B) and append a line to ``log.jsonl`` on the main process."""
        step, seen = self.state.step, self.state.examples_seen
        self.accelerator.log({**metrics, "examples_seen": seen}, step=step)
        self.state.log_lines += 1  # on every process: the count is saved in each one's checkpoint
        if self.accelerator.is_main_process:
            line = {"step": step, "epoch": self.state.epoch, "examples_seen": seen,
                    **{k: _json_number(v) for k, v in metrics.items()}}
            with open(self.output_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")

    # ---- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """``save_state`` into ``checkpoints/step-N`` atomically (written under a temporary name)."""
        acc = self.accelerator
        root = self.output_dir / CHECKPOINTS
        final, tmp = root / f"step-{self.state.step:08d}", root / f".tmp-step-{self.state.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.best is not None:
            save_safetensors(self.best, tmp / f"best_{acc.process_index}.safetensors")
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json(tmp / TRAINER_STATE, {"progress": self.state.state_dict(),
                                             "scheduler": self.scheduler.state_dict(),
                                             "num_processes": acc.num_processes})
            write_text(tmp / "config.yaml", job_to_yaml(self.job))  # last: marks it complete
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            prune_checkpoints(root, self.cfg.keep_last, keep=final)
        acc.wait_for_everyone()
        return final

    def resume(self) -> None:
        """Load the checkpoint ``train.resume`` names (the latest when true), after checking the
        config matches; drop the lines the interrupted run logged after it."""
        path, saved = resume_checkpoint(self.job, self.accelerator.num_processes)
        if self.accelerator.is_main_process:  # later checkpoints here belong to the abandoned run
            for later in complete_checkpoints(self.output_dir / CHECKPOINTS):
                if _step_of(later) > _step_of(path):
                    shutil.rmtree(later, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.load_state(str(path))
        self.state.load_state_dict(saved["progress"])
        self.scheduler.load_state_dict(saved["scheduler"])
        best = path / f"best_{self.accelerator.process_index}.safetensors"
        self.best = load_safetensors(best) if best.is_file() else None
        if self.accelerator.is_main_process:
            _truncate_lines(self.output_dir / "log.jsonl", self.state.log_lines)
        self.accelerator.wait_for_everyone()
        self.accelerator.print(f"resumed from {path} (step {self.state.step}, epoch "
                               f"{self.state.epoch}, batch {self.state.batches_in_epoch})")


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint folders (``step-N`` with their config written last), oldest first.

    A ``.tmp-step-N`` folder (a save cut short) or a ``step-N`` without ``config.yaml`` is not one.
    """
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if re.fullmatch(r"step-\d+", p.name) and (p / "config.yaml").is_file())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    done = complete_checkpoints(Path(output_dir) / CHECKPOINTS)
    return done[-1] if done else None


def prune_checkpoints(root: Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest `keep_last` (≥ 1) complete checkpoints, never `keep` (the one
    just saved), and leftover temporary folders of saves cut short. Called right after a save
    completes, so the checkpoint a run resumed from goes only once a newer one is complete."""
    done = complete_checkpoints(root)
    for old in done[: max(0, len(done) - max(1, keep_last))]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def resume_checkpoint(job: Job, num_processes: int) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint ``train.resume`` names and its ``trainer_state.json`` (None when not
    resuming), checked against `job` and the number of processes (each one's data position and
    RNG are in it).

    ``finetune`` calls it before touching the run folder, so a bad resumption changes nothing.
    """
    resume = job.train.resume
    if resume is False:
        return None
    path = latest_checkpoint(job.output_dir) if resume is True else Path(resume)
    if path is None:
        raise GPTFTError(f"train.resume: no complete checkpoint in {Path(job.output_dir) / CHECKPOINTS}")
    if not (path / "config.yaml").is_file():
        raise GPTFTError(f"train.resume: {path} is not a complete gptft checkpoint (no config.yaml)")
    check_resumable(path / "config.yaml", job)
    saved = read_json(path / TRAINER_STATE)
    if saved.get("num_processes") != num_processes:
        raise GPTFTError(f"cannot resume from {path}: it was saved by {saved.get('num_processes')} "
                         f"process(es), this run has {num_processes}; launch with the same "
                         "--num_processes")
    return path, saved


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def check_resumable(saved_config: Path, job: Job) -> None:
    """Raise one error, on one line, naming every setting that differs from the checkpoint's
    (old → new), bar the ``RESUMABLE_CHANGES``."""
    import yaml

    saved = _flatten(yaml.safe_load(saved_config.read_text(encoding="utf-8")))
    now = _flatten(job_to_dict(job))
    missing = object()
    diffs = [f"{k} {_show(saved.get(k, missing))} → {_show(now.get(k, missing))}"
             for k in sorted(saved.keys() | now.keys())
             if saved.get(k, missing) != now.get(k, missing) and not k.startswith(RESUMABLE_CHANGES)]
    if diffs:
        raise GPTFTError(f"cannot resume from {saved_config.parent}: the configuration differs from "
                         f"the checkpoint's: {'; '.join(diffs)} (only "
                         f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUMABLE_CHANGES)} "
                         "may change)")


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, int, float, bool, list, type(None))) else "(unset)"


def _json_number(value: Any) -> Any:
    """Non-finite floats as null: strict JSON readers reject NaN and Infinity."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _truncate_lines(path: Path, n: int) -> None:
    """Keep the first `n` lines of `path` (the lines a resumed run had written at its checkpoint)."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        lines = f.readlines()
    if len(lines) > n:
        write_text(path, b"".join(lines[:n]).decode("utf-8"))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
