"""The training loop shared by every task, in Accelerate's canonical order.

``Trainer`` knows nothing about classification or instructions: a ``Task`` says how to compute a
micro-batch's summed loss and its number of loss units (examples or label tokens), what to gather
for evaluation and how to turn it into metrics. The loss of an optimizer step is the sum over all
its micro-batches on all processes divided by their total number of units, so gradient
accumulation and any number of processes give the same update as one big batch.

A plain step never waits for the device: the finite check, the loss and the counters stay on it
(a non-finite step is skipped on the device by the fused AdamW's ``found_inf``) and are read at
logging steps only. Checkpoints (``gptft.checkpoints``) are saved by step count, by time and at
epoch ends as configured, and at the step where a stop signal is agreed (``gptft.signals``).

Logged keys (``log.jsonl`` and W&B; each has one meaning, so no two meanings share a key at a
step): ``train/loss`` the logging step's loss, ``train/loss_mean`` the mean loss of the steps since
the previous logging step, ``train/lr``; ``val/<metric>`` each validation during training (every
``eval_every`` steps and at epoch ends, once per step); ``train_sample/<metric>`` a task's
epoch-end evaluation of a sample of the training split; ``final/<split>_<metric>`` the kept model's
final evaluation (``gptft.run``). The console gets one line per evaluation (step,
epoch, validation metrics, learning rate, training examples/s).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from itertools import islice
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from gptft import checkpoints
from gptft.accelerator import make_accelerator, use_compile  # noqa: F401 (make_accelerator: moved)
from gptft.checkpoints import ResumePoint, TrainState
from gptft.config import Job
from gptft.console import format_metrics, format_value, progress_disabled  # noqa: F401 (moved)
from gptft.errors import GPTFTError
from gptft.io import append_text
from gptft.modes import eval_mode
from gptft.runfolder import LOG
from gptft.signals import BatchStops, Interrupted, StopRequest
from gptft.task import EpochContext, EpochReport, TaskBase
from gptft.timing import Phases
from gptft.tracking import tracker_values

# Where every process holds whole gradients, already averaged by backward().
_PLAIN = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


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
        task: loss and metrics (see ``gptft.task.TaskBase``).
        model: the model to train, with ``requires_grad`` already set by the trainable policy.
        train_loader: a DataLoader whose ``batch_sampler`` has ``set_epoch`` (EpochBatchSampler).
        val_loader: validation DataLoader.
        eval_loader: ``eval_loader(split)`` gives the (unprepared) evaluation loader of a split.
        resume: the checked checkpoint to resume from (``checkpoints.resume_point``), if any.
        phases: where the wall time goes (``gptft.timing``).
    """

    def __init__(self, job: Job, accelerator: Accelerator, task: TaskBase, model: nn.Module,
                 train_loader: torch.utils.data.DataLoader, val_loader: torch.utils.data.DataLoader,
                 eval_loader: Callable[[str], torch.utils.data.DataLoader] | None = None,
                 resume: ResumePoint | None = None, phases: Phases | None = None):
        self.job, self.cfg, self.accelerator, self.task = job, job.train, accelerator, task
        self.output_dir = Path(job.output_dir)
        self.sampler = train_loader.batch_sampler
        self.sampler.set_grad_accum_steps(self.cfg.grad_accum_steps)  # whole steps of examples
        self.state = TrainState()
        self.resume_from = resume
        self.phases = phases or Phases()
        self._eval_loader, self._prepared = eval_loader, {}
        # Fused AdamW (one kernel for all parameters) runs on CUDA and CPU: 1.17x a CPU step. It
        # also skips a step on the device when told its gradients are not finite (found_inf).
        if self.cfg.activation_checkpointing:
            from gptft.activations import apply_activation_checkpointing

            apply_activation_checkpointing(model, self.cfg.activation_checkpointing)
        self.plan = memory_plan(job, accelerator, model)
        self._split = 1  # each micro-batch cut into this many (train.auto_batch, after an OOM)
        optimizer = torch.optim.AdamW(param_groups(model, self.cfg.weight_decay), lr=self.cfg.lr,
                                      betas=tuple(self.cfg.betas), fused=True)
        if use_compile(self.cfg.compile, accelerator.device):
            if self.cfg.compile == "auto":  # a model torch.compile cannot handle runs eagerly
                torch._dynamo.config.suppress_errors = True
            model = torch.compile(model)
        self.model, self.optimizer, self.train_loader, self.val_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader)
        self._prepared["val"] = self.val_loader
        self.total_steps = self._total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, self.total_steps, self.cfg.warmup_steps, self.cfg.schedule, self.cfg.min_lr_ratio))
        # The schedule and the counters go in the checkpoint as JSON (trainer_state.json), not
        # through register_for_checkpointing, whose files Accelerate unpickles (weights_only=False).
        self.best: dict[str, torch.Tensor] | None = None  # on the device: no copy to the CPU
        self._evaluated: tuple[int, dict[str, float]] | None = None  # (step, val metrics)
        dev = accelerator.device
        self._bad_steps = torch.zeros((), dtype=torch.long, device=dev)  # non-finite since last read
        self._first_bad = torch.full((), -1, dtype=torch.long, device=dev)
        self._window = torch.zeros(2, device=dev)  # loss sum and steps since the last log
        self._last_save = time.time()
        self._saved_step = -1
        self._fit_log_lines = 0  # log lines when fit ended (a checkpoint saved later keeps these)
        self._data_sha256: dict[str, str] | None = None  # of the data files, in each checkpoint
        self.stop = StopRequest(dev, loops=False)  # acted on at step ends
        self._rate_mark = (0.0, 0)  # (training seconds, examples seen) at the last evaluation line
        self._bar: tqdm | None = None

    def _total_steps(self) -> int:
        per_epoch = math.ceil(len(self.train_loader) / self.cfg.grad_accum_steps)
        total = per_epoch * self.cfg.epochs
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    # ---- the loop ------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train for ``epochs`` (or ``max_steps``), resuming first if a resume point was given."""
        if self.resume_from is not None:
            self.resume(self.resume_from)
        bar = self._bar = tqdm(total=self.total_steps, initial=self.state.step, unit="step",
                               disable=progress_disabled(self.accelerator), dynamic_ncols=True)
        self.phases.add("startup", self.phases.elapsed())
        self._rate_mark = (self.phases.seconds["train"], self.state.examples_seen)
        begin = time.perf_counter()
        self.stop.install()
        try:
            if self.stop.agreed(self.accelerator):  # a signal during start-up or resume loading
                self._interrupt()
            while self.state.epoch < self.cfg.epochs and not self._done():
                bar.set_description(f"epoch {self.state.epoch + 1}/{self.cfg.epochs}")
                for micro_batches in self._epoch_batches():
                    with self.phases("train"):
                        loss = self.train_step(micro_batches)
                    if begin is not None:
                        self._first_step(begin)
                        begin = None
                    bar.update(1)
                    self._after_step(loss, bar)
                    if self.stop.due():
                        self._interrupt()
                    if self._done():
                        break
                else:
                    self._end_epoch()
            self._fit_log_lines = self.state.log_lines  # the loop's end, as a checkpoint there
            if self._done():  # stopped by max_steps: the last weights are validated too
                self.evaluate_and_track()
            self._check_finite()
        finally:
            self.stop.restore()  # a signal from now on: the job's (gptft.run)
            bar.close()  # also on an error: its message then starts a line of its own
            self._bar = None
        self._restore_best()

    def _interrupt(self) -> None:
        """Every process agreed to stop after this step: save it (unless just saved) and stop."""
        if self.state.step == 0:
            raise Interrupted(f"stopped by {self.stop.name or 'a signal'} before the first step: "
                              "nothing trained, nothing to save; run the same command again")
        path = checkpoints.checkpoint_path(self.output_dir, self.state.step)
        if self._saved_step != self.state.step:
            path = self.save_checkpoint()
        raise Interrupted(f"stopped by {self.stop.name or 'a signal'} at step {self.state.step}: "
                          f"checkpoint {path} saved; continue with the same command and "
                          "train.resume=true")

    def save_last_checkpoint(self) -> Path:
        """After ``fit``: a checkpoint of the last step, as the loop would have saved it (its
        weights, not the best ones restored since, and the log lines of training only), unless
        one exists; every process takes part."""
        if self._saved_step == self.state.step:
            return checkpoints.checkpoint_path(self.output_dir, self.state.step)
        lines, self.state.log_lines = self.state.log_lines, self._fit_log_lines
        self._swap_best()  # the last weights back in the model, the best ones in self.best
        try:
            return self.save_checkpoint()
        finally:
            self._swap_best()
            self.state.log_lines = lines

    def batch_stops(self, phase: str, batches: int | None = None) -> BatchStops:
        """Stop checks between the batches of a loop after ``fit`` named `phase` (the final
        evaluation, a task's outputs): see ``gptft.signals.BatchStops``."""
        return BatchStops(self.accelerator, phase, self.stop_after_training, batches)

    def stop_after_training(self, name: str, where: str) -> NoReturn:
        """Stop on a signal every process agreed on after ``fit``: a checkpoint of the last step
        (``save_last_checkpoint``), then ``Interrupted``."""
        path = self.save_last_checkpoint()
        raise Interrupted(f"stopped by {name} during the {where}, after training: checkpoint {path} "
                          f"of step {self.state.step} saved; continue with the same command and "
                          "train.resume=true (it evaluates and saves then)")

    @contextmanager
    def checkpoint_on_write_failure(self) -> Iterator[None]:
        """A write that fails after ``fit`` (a full disk or a read-only folder at the task's
        outputs, raised on every process: ``on_every_process``) first saves a checkpoint
        of the last step, if it can be written, so that ``train.resume=true`` ends the run as the
        uninterrupted one, bit for bit; the error line says which."""
        try:
            yield
        except GPTFTError as error:
            alike = self.accelerator.num_processes == 1 or getattr(error, "on_every_process", False)
            if getattr(error, "reason", None) is None or not alike:  # not a failed write; one rank's
                raise
            try:
                path = self.save_last_checkpoint()
            except GPTFTError as again:
                raise GPTFTError(f"{error}; no checkpoint of step {self.state.step} could be saved "
                                 f"either ({getattr(again, 'reason', again)})") from None
            raise GPTFTError(f"{error}; checkpoint {path} of step {self.state.step} saved: once the "
                             "file can be written, continue with the same command and "
                             "train.resume=true") from None

    def print(self, text: str) -> None:
        """A line on the main process's console, above the progress bar (not glued onto it)."""
        if not self.accelerator.is_main_process:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def _first_step(self, begin: float) -> None:
        seconds = time.perf_counter() - begin
        self.phases.seconds["train"] -= seconds
        self.phases.add("first_step", seconds)
        self.print(f"first step after {self.phases.elapsed():.1f} s "
                   f"(start-up {self.phases.seconds['startup']:.1f} s, first step {seconds:.1f} s)")

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
        """One optimizer step over `micro_batches`; returns the step's mean loss (all processes),
        on the device: nothing here waits for it. Out of memory, it stops with one line quoting the
        memory plan, or with ``train.auto_batch`` cuts each micro-batch in two and goes again."""
        while True:
            try:
                return self._train_step(micro_batches)
            except torch.OutOfMemoryError:
                self._out_of_memory(micro_batches)

    def _out_of_memory(self, micro_batches: list[dict]) -> None:
        """After an out-of-memory error in a step (nothing of it applied yet): with
        ``train.auto_batch`` halve the micro-batch (twice the accumulation, the same global
        batch) if it can be, else stop with one line naming the plan's figures and what to change."""
        import gc

        self.optimizer.zero_grad(set_to_none=True)  # the failed attempt's partial gradients
        gc.collect()
        if self.accelerator.device.type == "cuda":
            torch.cuda.empty_cache()
        rows = max(map(_rows, micro_batches))
        size = -(-rows // self._split)
        if self.cfg.auto_batch and size > 1:
            self._split *= 2
            self.print(f"out of memory at step {self.state.step + 1} with micro-batches of {size}: "
                       f"train.auto_batch goes on with {-(-rows // self._split)} per micro-batch and "
                       f"{self.cfg.grad_accum_steps * self._split} micro-batches a step (the same "
                       "global batch)")
            return
        from gptft.plan import human

        p, device = self.plan, self.accelerator.device
        total = (f" of {human(torch.cuda.get_device_properties(device).total_memory)}"
                 if device.type == "cuda" else "")
        figures = "" if p is None else (
            f" x up to {p.setup.seq_len} tokens): the memory plan's peak is {human(p.peak)} per device"
            f"{total} (" + ", ".join(f"{k.replace('_', ' ')} {human(v)}" for k, v in p.parts.items() if v))
        raise GPTFTError(
            f"out of memory at step {self.state.step + 1} (micro-batches of {size}{figures}); "
            f"lower train.batch_size and raise train.grad_accum_steps as much (the same "
            "global batch), set train.activation_checkpointing=true, train.auto_batch=true, "
            "model.trainable=lora or a shorter data.max_length, or shard with FSDP "
            "(gptft plan --config ... --gpu-memory SIZE shows what fits)")

    def _train_step(self, micro_batches: list[dict]) -> torch.Tensor:
        self.model.train()
        acc = self.accelerator
        counts = torch.stack([self.task.count(b) for b in micro_batches])
        # One reduction carries the loss units and the stop votes (gptft.signals) of all processes.
        summed = acc.reduce(torch.stack([counts.sum().float(),
                                         torch.full((), self.stop.vote(), device=acc.device)]),
                            reduction="sum")
        total = summed[0].clamp(min=1)
        self.stop.record(summed[1])
        loss_sum = torch.zeros((), device=acc.device)
        pieces = [piece for batch in micro_batches for piece in _split_rows(batch, self._split)]
        for i, batch in enumerate(pieces):
            sync = i == len(pieces) - 1
            with acc.no_sync(self.model) if not sync else nullcontext(), acc.autocast():
                batch_loss = self.task.loss(self.model, batch)
                # DDP averages gradients over processes: scale so the result is sum / total.
                acc.backward(batch_loss * acc.num_processes / total)
            loss_sum += batch_loss.detach().float()
        step_loss = acc.reduce(loss_sum, reduction="sum") / total
        check = step_loss
        if self.cfg.max_grad_norm:
            check = check + self._clip_gradients()
        bad = ~torch.isfinite(check)
        self._note_finite(bad, step_loss)
        self.optimizer.optimizer.found_inf = bad.float()  # the fused AdamW skips a bad step
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.batches_in_epoch += len(micro_batches)
        self.state.examples_seen += sum(map(_rows, micro_batches)) * acc.num_processes
        return step_loss

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the gradients' total norm to ``train.max_grad_norm``; returns the norm.

        Without a loss scaler (fp16) or sharded parameters (FSDP), the clipping factor rides in the
        fused AdamW's ``grad_scale`` (its kernel divides each gradient by it) instead of a pass of
        its own that multiplies every gradient in place: the same update, one sweep over the
        gradients fewer (a whole-model ``_foreach_mul_``, ~1/2 of AdamW's own time on a CPU).
        """
        acc = self.accelerator
        if acc.scaler is not None or acc.distributed_type not in _PLAIN:
            return acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        # torch.nn.utils.clip_grad_norm_'s factor, as a divisor: max_norm / (norm + 1e-6), at most 1
        self.optimizer.optimizer.grad_scale = ((norm + 1e-6) / self.cfg.max_grad_norm).clamp(min=1.0)
        return norm

    def _note_finite(self, bad: torch.Tensor, loss: torch.Tensor) -> None:
        """Count a non-finite step and remember the first, on the device (read at logging)."""
        self._bad_steps += bad.long()
        unset = self._first_bad < 0
        self._first_bad = torch.where(bad & unset, self.state.step + 1, self._first_bad)
        good = (~bad).float()
        self._window += torch.stack([torch.nan_to_num(loss) * good, good])

    def _check_finite(self) -> None:
        """Read the non-finite count (a host sync: at logging steps and before saving); stop, or
        count the skipped steps with ``train.skip_nonfinite``."""
        bad = int(self._bad_steps.item())
        if not bad:
            return
        first = int(self._first_bad.item())
        self._bad_steps.zero_()
        self._first_bad.fill_(-1)
        if not self.cfg.skip_nonfinite:
            last = checkpoints.latest_checkpoint(self.output_dir)
            raise GPTFTError(
                f"non-finite loss or gradient at step {first} (the step was skipped); "
                + (f"the last good checkpoint is {last}" if last else "no checkpoint saved yet")
                + ". Lower train.lr, use mixed_precision=bf16 instead of fp16, or set "
                "train.skip_nonfinite=true")
        self.state.skipped_steps += bad
        self.log({"train/skipped_steps": self.state.skipped_steps})

    def _after_step(self, loss: torch.Tensor, bar: tqdm) -> None:
        step = self.state.step
        logging = step % self.cfg.log_every == 0 or step == 1
        if logging:
            self._check_finite()
            total, n = self._window.tolist()
            self._window.zero_()
            value = loss.item()
            bar.set_postfix(loss=f"{value:.4f}")
            self.log({"train/loss": value if math.isfinite(value) else float("nan"),
                      "train/loss_mean": total / n if n else float("nan"),
                      "train/lr": self.scheduler.get_last_lr()[0]})
        if self.cfg.eval_every and step % self.cfg.eval_every == 0:
            self.evaluate_and_track()
        epoch_ends = self.state.batches_in_epoch >= len(self.train_loader) and not self._done()
        if epoch_ends and self.cfg.checkpoint_epochs:
            return  # _end_epoch saves it, complete
        by_steps = self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0
        if by_steps or (logging and self._time_to_save()):
            self.save_checkpoint()

    def _time_to_save(self) -> bool:
        """Whether ``checkpoint_minutes`` have passed (the main process decides for all)."""
        if self.cfg.checkpoint_minutes is None:
            return False
        due = [time.time() - self._last_save >= 60 * self.cfg.checkpoint_minutes]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(due)
        return bool(due[0])

    def _end_epoch(self) -> None:
        self.state.epoch += 1
        self.state.batches_in_epoch = 0
        val = self.evaluate_and_track()
        with self.phases("epoch_end"):
            report = self._epoch_report(val)
        if report is not None:
            if report.metrics:
                self.log(report.metrics)
            if report.text:
                self.print(report.text)
        if self.cfg.checkpoint_epochs:
            self.save_checkpoint()

    def _epoch_report(self, val: dict[str, float]) -> EpochReport | None:
        hook = getattr(self.task, "on_epoch_end", None)
        if hook is None:
            return None
        with eval_mode(self.accelerator.unwrap_model(self.model)) as model:
            return hook(EpochContext(self.state.epoch, self.state.step, model, self.evaluate_split,
                                     val, self.accelerator.autocast, self.cfg.epochs))

    # ---- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def gather(self, loader, max_batches: int | None = None,
               desc: str | None = None) -> dict[str, torch.Tensor]:
        """The task's eval outputs over `loader` from all processes, without the duplicates that
        even batches add; with `desc`, a progress bar of that name. After ``fit`` (the final
        evaluation) a stop signal ends it between two batches (``stop_after_training``)."""
        gathered: dict[str, list[torch.Tensor]] = {}
        stops = self.batch_stops("final evaluation")  # (inactive in fit: its stops are at step ends)
        total = len(loader) if max_batches is None else min(len(loader), max_batches)
        bar = tqdm(islice(loader, max_batches), total=total, desc=desc, leave=False, dynamic_ncols=True,
                   disable=True if desc is None else progress_disabled(self.accelerator))
        with eval_mode(self.model) as model:
            for batch in bar:
                with self.accelerator.autocast():
                    out = self.task.eval_outputs(model, batch)
                for k, v in self.accelerator.gather_for_metrics(out).items():
                    gathered.setdefault(k, []).append(v)
                stops()
        return {k: torch.cat(v).cpu() for k, v in gathered.items()}

    def evaluate(self, loader, max_batches: int | None = None) -> dict[str, float]:
        """Task metrics over `loader` (or its first `max_batches`)."""
        return self.task.eval_metrics(self.gather(loader, max_batches))

    def loader(self, split: str):
        """The prepared evaluation loader of `split` (built once)."""
        if split not in self._prepared:
            self._prepared[split] = self.accelerator.prepare(self._eval_loader(split))
        return self._prepared[split]

    def evaluate_split(self, split: str, max_batches: int | None = None) -> dict[str, float]:
        return self.evaluate(self.loader(split), max_batches)

    def evaluate_and_track(self) -> dict[str, float]:
        """Evaluate on validation (once per step); keep the best weights by ``task.best_metric``."""
        if self._evaluated is not None and self._evaluated[0] == self.state.step:
            return self._evaluated[1]
        self._check_finite()
        with self.phases("validation"):
            metrics = {f"val_{k}": v for k, v in
                       self.evaluate(self.val_loader, self.cfg.eval_batches).items()}
        self._evaluated = (self.state.step, metrics)
        self.log({f"val/{k[4:]}": v for k, v in metrics.items()})
        value = metrics[self.task.best_metric]
        best = self.state.best_value
        improved = best is None or (value > best if self.task.higher_is_better else value < best)
        if improved:
            self.state.best_value, self.state.best_step = value, self.state.step
            self._keep_best()
        self.print(self._evaluation_line(metrics, improved))
        return metrics

    def _evaluation_line(self, metrics: dict[str, float], best: bool) -> str:
        """``step 50/650, epoch 0.38/5: val loss 0.41, val accuracy 95.30% (best) | lr 4.9e-04 |
        812 examples/s``: the throughput of the training steps since the previous such line."""
        seconds, seen = self.phases.seconds["train"], self.state.examples_seen
        examples, elapsed = seen - self._rate_mark[1], seconds - self._rate_mark[0]
        self._rate_mark = (seconds, seen)
        rate = f" | {examples / elapsed:,.0f} examples/s" if examples > 0 and elapsed > 0 else ""
        epoch = self.state.epoch + self.state.batches_in_epoch / max(1, len(self.train_loader))
        return (f"step {self.state.step}/{self.total_steps}, epoch {epoch:.2f}/{self.cfg.epochs}: "
                f"{format_metrics({k[4:]: v for k, v in metrics.items()}, 'val ')}"
                f"{' (best so far)' if best else ''} | lr {self.scheduler.get_last_lr()[0]:.2e}{rate}")

    @torch.no_grad()
    def _keep_best(self) -> None:
        """Copy the trainable weights into buffers on their own device (allocated once)."""
        params = dict(self._trainable())
        if self.best is None:
            self.best = {n: torch.empty_like(p) for n, p in params.items()}
        torch._foreach_copy_(list(self.best.values()), [params[n] for n in self.best])

    @torch.no_grad()
    def _swap_best(self) -> None:
        """Exchange the trainable weights with ``self.best`` (one tensor's copy at a time)."""
        if self.best is None:
            return
        for n, p in self._trainable():
            last = p.detach().clone()
            p.copy_(self.best[n])
            self.best[n].copy_(last)

    def _trainable(self) -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, p) for n, p in self.accelerator.unwrap_model(self.model).named_parameters()
                if p.requires_grad)

    def _check_best(self, best: dict[str, torch.Tensor], path: Path) -> None:
        """The best weights of a checkpoint: one tensor per trainable parameter, of its shape."""
        params = dict(self._trainable())
        wrong = sorted(set(params) ^ set(best)) or [
            n for n in params if best[n].shape != params[n].shape or best[n].dtype != params[n].dtype]
        if wrong:
            raise GPTFTError(f"{path}: not this model's trainable weights ({', '.join(wrong[:3])}"
                             f"{' ...' if len(wrong) > 3 else ''}: missing, extra or of another "
                             "shape or type); resume from another checkpoint or start afresh")

    def _restore_best(self) -> None:
        if self.best is None:
            return
        self._swap_best()  # the last weights stay in self.best, for save_last_checkpoint
        self.print(f"kept the best model: step {self.state.best_step}, "
                   f"{self.task.best_metric} {self.state.best_value:.4f}")

    # ---- logging -------------------------------------------------------------------------------

    def log(self, metrics: dict[str, Any]) -> None:
        """Log to the trackers (W&B) and append a line to ``log.jsonl`` on the main process."""
        step, seen = self.state.step, self.state.examples_seen
        self.accelerator.log(tracker_values(self.accelerator, {**metrics, "examples_seen": seen,
                                                              "epoch": self.state.epoch}), step=step)
        self.state.log_lines += 1  # on every process: the count is saved in each one's checkpoint
        if self.accelerator.is_main_process:
            line = {"step": step, "epoch": self.state.epoch, "examples_seen": seen,
                    **{k: _json_number(v) for k, v in metrics.items()}}
            append_text(self.output_dir / LOG, json.dumps(line) + "\n")  # never via a link

    # ---- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """A resumable checkpoint of this step (``gptft.checkpoints``); its size and time printed
        and logged."""
        self._check_finite()  # never save the state of a run that has gone bad
        begin = time.perf_counter()
        if self._data_sha256 is None and self.accelerator.is_main_process:
            self._data_sha256 = checkpoints.data_hashes(self.job)  # once a run
        state = {"progress": self.state.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "loss_window": self._window.tolist(),  # train/loss_mean's steps since the last log
                 "data_sha256": self._data_sha256}
        with self.phases("checkpoints"):
            path = checkpoints.save_checkpoint(self.accelerator, self.job, self.state.step, state,
                                               self.best)
        seconds = time.perf_counter() - begin
        self._last_save = time.time()
        self._saved_step = self.state.step
        if self.accelerator.is_main_process:
            size = checkpoints.folder_bytes(path)
            self.print(f"checkpoint {path.name}: {size / 2**20:.1f} MiB in {seconds:.1f} s")
            # To the trackers only: log.jsonl holds what a resumed run reproduces exactly.
            self.accelerator.log({"checkpoint/seconds": round(seconds, 3), "checkpoint/bytes": size},
                                 step=self.state.step)
        return path

    def resume(self, point: ResumePoint) -> None:
        """Load the checked checkpoint `point`; drop the lines the interrupted run logged after it."""
        best = checkpoints.load_checkpoint(self.accelerator, point, self.output_dir)
        self.state.load_state_dict(point.state["progress"])
        saved = point.path / checkpoints.TRAINER_STATE
        try:
            self.scheduler.load_state_dict(point.state["scheduler"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise GPTFTError(f"{saved}: scheduler: not this run's learning-rate schedule "
                             f"({type(e).__name__}: {e})") from None
        if point.relaid:
            self._relay(point)
        if self.state.batches_in_epoch > len(self.train_loader):
            raise GPTFTError(f"{saved}: progress.batches_in_epoch={self.state.batches_in_epoch} is "
                             f"past the end of the epoch ({len(self.train_loader)} batches): the "
                             "checkpoint does not belong to this data and batch size")
        window = point.state.get("loss_window")
        if window is not None:
            self._window = torch.tensor(window, dtype=self._window.dtype, device=self._window.device)
        if best is not None:
            self._check_best(best, point.path / f"best_{self.accelerator.process_index}.safetensors")
            self.best = {k: v.to(self.accelerator.device) for k, v in best.items()}
        if point.path.parent.resolve() == (self.output_dir / checkpoints.CHECKPOINTS).resolve():
            self._saved_step = self.state.step  # this step's checkpoint exists: the one loaded
        if self.accelerator.is_main_process:
            _truncate_lines(self.output_dir / LOG, self.state.log_lines)
        self.accelerator.wait_for_everyone()
        self.accelerator.print(f"resumed from {point.path} (step {self.state.step}, epoch "
                               f"{self.state.epoch}, batch {self.state.batches_in_epoch})")

    def _relay(self, point: ResumePoint) -> None:
        """Resuming with the steps split otherwise (another number of processes, batch size or
        accumulation; the same global batch): the position in the epoch is counted in this run's
        micro-batches, and each process's RNG is seeded from the seed, the step and its rank
        (a process may have no saved state, or another process's)."""
        from accelerate.utils import set_seed

        steps_in_epoch = self.state.batches_in_epoch // point.saved_layout[2]
        self.state.batches_in_epoch = steps_in_epoch * point.layout[2]
        set_seed(self.cfg.seed * 1_000_003 + self.state.step, device_specific=True)


def memory_plan(job: Job, accelerator: Accelerator, model: nn.Module):
    """The memory plan (``gptft.plan``) of this run on its processes, its peak printed (None for
    a model without the model interface's blocks)."""
    from gptft.activations import decoder_of
    from gptft.plan import Shape, plan_job, summary_line

    try:
        decoder = decoder_of(model)
    except GPTFTError:  # a task's own model without the model interface: no plan
        return None
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    p = plan_job(job, accelerator.num_processes, fsdp, shape=Shape.from_model(decoder))
    accelerator.print(summary_line(p))
    return p


def _split_rows(batch: dict, parts: int) -> list[dict]:
    """`batch` cut into `parts` batches of consecutive rows (fewer if it has fewer rows)."""
    if parts == 1:
        return [batch]
    size = -(-_rows(batch) // parts)
    n = -(-_rows(batch) // size)
    rows = _rows(batch)
    return [{k: v[i * size : (i + 1) * size] if isinstance(v, torch.Tensor) and v.dim() and len(v) == rows
             else v for k, v in batch.items()} for i in range(n)]


def _rows(batch: dict | torch.Tensor) -> int:
    """Rows in a batch: of its ``input_ids``, else of its first tensor."""
    if isinstance(batch, dict):
        batch = batch["input_ids"] if "input_ids" in batch else next(iter(batch.values()))
    return len(batch)


def _json_number(value: Any) -> Any:
    """Non-finite floats as null: strict JSON readers reject NaN and Infinity."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _truncate_lines(path: Path, n: int) -> None:
    """Keep the first `n` lines of `path` (the lines a resumed run had written at its checkpoint)."""
    from gptft.io import write_text

    if not path.is_file():
        return
    with open(path, "rb") as f:
        lines = f.readlines()
    if len(lines) > n:
        write_text(path, b"".join(lines[:n]).decode("utf-8"))
