"""One fine-tuning run, top to bottom: ``finetune(load_job("configs/spam.yaml"))``.

    set up      the accelerator, the folder's lock, the resume point, the task (its data and
                weights) and every check that can fail, before the run folder is touched
    start       the folder marked ``running``, the resolved ``config.yaml``, tracking
    fit         the training loop (``gptft.trainer``)
    evaluate    every split, with the kept weights
    save        the weights, ``gptft.json``, ``metrics.json`` (a LoRA run's adapter, a tokenizer)
    outputs     the files the task declares (``TaskBase.outputs``: figures, records)
    finish      the metrics with the phases' times, the marker ``finished``, the closing summary

The run folder is locked first (``gptft.runfolder``: one run at a time); a new run stopped before
its first checkpoint leaves the folder as it found it. Each phase begins with ``signal_at(phase)``
(the tests' hook to send a signal there, ``gptft.signals``); from the end of training on, a phase
ends at a stop point: a signal that came stops the run there, with a checkpoint to resume from.
A task (``gptft.task.TaskBase``) supplies the data, model, loss, metrics and outputs;
``gptft.registry`` names it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from gptft import runfolder
from gptft.accelerator import make_accelerator
from gptft.checkpoints import ResumePoint, resume_point
from gptft.config import Job, job_to_yaml
from gptft.console import SPLITS, duration
from gptft.cpu import keep_freed_memory
from gptft.errors import GPTFTError
from gptft.io import write_json, write_text
from gptft.lora import with_adapter_config
from gptft.model import tied_names
from gptft.registry import declared_outputs, get_task
from gptft.runfolder import RunFolder, RunLock, check_new_run
from gptft.runs import TOKENIZER_DIR, save_model
from gptft.signals import Interrupted, StopRequest, signal_at, watch_parent
from gptft.task import TaskBase
from gptft.timing import Phases
from gptft.tokenizer import HFTokenizer
from gptft.tracking import finish_tracking, init_tracking
from gptft.trainer import Trainer

CONFIG_HEADER = "# The resolved configuration of this run. Re-run it with:\n" \
                "#   accelerate launch launch/finetune.py --config {path}\n"


def finetune(job: Job, started: float | None = None) -> dict:
    """Run `job` (a validated job config) and return its final metrics.

    `started` (a ``time.time()``) is when the job began, for its phase timings: the ``gptft``
    command passes its process's start (``gptft.timing.process_start``); default: now.

    SIGTERM, SIGINT and SIGUSR1 stop the job at the end of the phase they arrive in (the training
    loop: at the next step), with a checkpoint of the last step where training ran
    (``gptft.signals``); a job stopped before anything was saved leaves its folder as a plain rerun
    finds it.
    """
    phases = Phases(started if started is not None else time.time())
    stop = StopRequest()  # from here to the end: a signal asks to stop, it does not kill
    stop.install()
    try:
        return _finetune(job, phases, stop)
    finally:
        stop.restore()


def _finetune(job: Job, phases: Phases, stop: StopRequest) -> dict:
    """Set up, start the folder, run, with the folder's lock held throughout; a new run stopped
    before its first checkpoint removes what it wrote."""
    signal_at("start-up")
    watch_parent()
    job = with_adapter_config(job)  # model.adapter: its LoRA config is the run's
    accelerator = set_up_accelerator(job)
    resuming_here = _resumes_in_place(job)
    lock = _on_main(accelerator, lambda: RunLock.acquire(job.output_dir))
    started_folder = False
    try:
        task, resume = set_up(job, accelerator, stop, resuming_here)
        job = task.job  # relaid to resume with its global batch, if it must be
        start_run_folder(job, accelerator, resuming=resuming_here)
        started_folder = True
        init_tracking(job, accelerator)
        with _collectives(job, accelerator):
            metrics = run(task, resume, phases, stop)
            finish_tracking(accelerator, job, metrics, task.outputs)
            if stop.signum and accelerator.is_main_process:
                print(f"gptft: {stop.name} came as the run finished; it is complete", file=sys.stderr)
            # Every process leaves together: a rank that exits while the main one still writes
            # outputs can abort in its collective library's threads (gloo: SIGABRT at exit).
            accelerator.wait_for_everyone()
        return metrics
    except Interrupted:
        if started_folder and not resuming_here and accelerator.is_main_process:
            _undo_start(Path(job.output_dir))
        raise
    finally:
        if lock is not None:
            lock.release()


# ---- set up ---------------------------------------------------------------------------------------

def set_up_accelerator(job: Job) -> Accelerator:
    """The job's accelerator (``gptft.accelerator``), with what it runs on said."""
    accelerator = make_accelerator(job)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # no page faults for the same large blocks every step (gptft.cpu)
    warn_if_fsdp_ignored(accelerator)
    report_processes(accelerator, job)
    return accelerator


def set_up(job: Job, accelerator: Accelerator, stop: StopRequest,
           resuming_here: bool) -> tuple[TaskBase, ResumePoint | None]:
    """The task (it reads the data and the weights) and the point to resume from, after every check
    that can fail and before the run folder changes (a signal here stops with nothing to save)."""
    _stop_before_the_folder(stop, accelerator, "start-up")
    # A resumption that cannot be (no checkpoint, changed config, other process count) fails first.
    resume = resume_point(job, accelerator.num_processes, warn=_warn(accelerator))
    if resume is not None and resuming_here:
        _check_not_finished(job, resume)
    if resume is not None and resume.relaid:
        job = relaid_job(job, resume, accelerator)
    signal_at("data loading")
    set_seed(job.train.seed)
    task = get_task(job.task).task_class()(job, accelerator)  # reads data and weights
    warn_empty_splits(task, accelerator)
    _stop_before_the_folder(stop, accelerator, "data loading")
    _on_main(accelerator, lambda: check_new_run(Path(job.output_dir), job.train.overwrite,
                                                resuming_here))
    return task, resume


# ---- start ----------------------------------------------------------------------------------------

def start_run_folder(job: Job, accelerator: Accelerator, resuming: bool = False) -> None:
    """Mark ``output_dir`` as a running gptft run and write the resolved ``config.yaml`` (main
    process), after ``gptft.runfolder.check_new_run`` allowed it; a new run with
    ``train.overwrite`` first removes the earlier run's files (only those gptft wrote)."""
    out = RunFolder(job.output_dir)
    if accelerator.is_main_process:
        out.root.mkdir(parents=True, exist_ok=True)
        runfolder.mark(out.root, "running")  # first: readers refuse the folder until the run has finished
        if not resuming and job.train.overwrite:  # (a reset that fails midway: not "finished")
            runfolder.reset_run_folder(out.root, declared_outputs())  # of any task: it may be another's
        write_text(out.config, job_to_yaml(job, CONFIG_HEADER.format(path=out.config)))
    accelerator.wait_for_everyone()


@contextmanager
def _collectives(job: Job, accelerator: Accelerator) -> Iterator[None]:
    """Around the processes' work together: a collective that timed out is one line; tracking and
    the process group end however the run ends."""
    try:
        yield
    except RuntimeError as e:  # gloo: "Timed out waiting ...", NCCL: "... timed out"
        if accelerator.num_processes > 1 and "timed out" in str(e).lower():
            raise GPTFTError(
                f"another process did not answer within train.timeout_minutes="
                f"{job.train.timeout_minutes:g} (a collective operation timed out: a process is "
                "stuck, stopped or gone); the last checkpoint can be resumed with "
                "train.resume=true") from None
        raise
    finally:
        accelerator.end_training()
        accelerator.state.destroy_process_group()  # no-op without a process group


# ---- fit -> final evaluation -> save -> outputs -> finish -----------------------------------------

def run(task: TaskBase, resume: ResumePoint | None = None, phases: Phases | None = None,
        stop: StopRequest | None = None) -> dict:
    """Train, evaluate every split, write the run folder and the task's outputs; the metrics.

    `stop` (``finetune``'s): a signal after training stops the run where a phase ends, with a
    checkpoint of the last step (``Trainer.save_last_checkpoint``) to resume from.
    """
    phases = phases or Phases()
    trainer = fit(task, resume, phases)
    stop_point = _stop_point(trainer, stop)
    stop_point("end of training")
    signal_at("final evaluation")
    metrics = final_evaluation(task, trainer, phases, stop_point)
    signal_at("saving")
    with phases("saving"):
        save(task, trainer.model, metrics)
    stop_point("final save")
    signal_at("outputs")
    with trainer.checkpoint_on_write_failure():  # a full disk at responses.json: resumable
        task.write_outputs(trainer, metrics)
    stop_point("outputs (plots, responses)")
    signal_at("marking finished")
    finish(task, metrics, phases)
    return metrics


def fit(task: TaskBase, resume: ResumePoint | None, phases: Phases) -> Trainer:
    """The training loop, from `resume` if given; the trainer, holding the kept weights."""
    signal_at("resume loading")
    if task.job.model.adapter:  # a PEFT adapter to continue from (a checkpoint, if resuming, comes later)
        from gptft.lora import load_adapter

        load_adapter(task.model, task.job.model.adapter)
    trainer = Trainer(task.job, task.accelerator, task, task.model, task.loader("train", train=True),
                      task.loader("val"), eval_loader=task.loader, resume=resume, phases=phases)
    trainer.fit()
    return trainer


def _stop_point(trainer: Trainer, stop: StopRequest | None) -> Callable[[str], None]:
    """``stop_point(phase)``: where a phase after training ends, stop if a signal came (every
    process alike), saving the last step's checkpoint first."""
    def stop_point(phase: str) -> None:
        if stop is not None and stop.agreed(trainer.accelerator):
            path = trainer.save_last_checkpoint()
            raise Interrupted(f"stopped by {stop.name} during the {phase}, after training: "
                              f"checkpoint {path} of step {trainer.state.step} saved; continue with "
                              "the same command and train.resume=true (it evaluates and saves then)")
    return stop_point


def final_evaluation(task: TaskBase, trainer: Trainer, phases: Phases,
                     stop_point: Callable[[str], None]) -> dict[str, Any]:
    """Every split's metrics with the kept weights (``train.final_eval_batches``: at most that
    many batches a split), the counts and steps beside them; logged as ``final/...``."""
    metrics: dict[str, Any] = {**task.counts, "steps": trainer.state.step,
                               "best_step": trainer.state.best_step}
    bound = task.job.train.final_eval_batches
    if bound:
        metrics["final_eval_batches"] = bound
        trainer.print(f"final evaluation on at most {bound} batches per split "
                      "(train.final_eval_batches): not the whole splits")
    with phases("final_evaluation"):
        for split in (s for s in SPLITS if task.has_split(s)):
            gathered = trainer.gather(trainer.loader(split), bound, desc=f"evaluate {split}")
            values = task.eval_metrics(gathered)
            task.eval_names = tuple(values)
            metrics.update({f"{split}_{k}": v for k, v in values.items()})
            metrics.update(task.split_report(split, gathered))
            stop_point("final evaluation")
    trainer.log({f"final/{k}": v for k, v in metrics.items() if isinstance(v, float)})
    return metrics


def save(task: TaskBase, model: torch.nn.Module, metrics: dict) -> None:
    """The final weights, ``gptft.json`` (what rebuilds the model and what the run produces),
    ``metrics.json``, and a Hugging Face tokenizer's files."""
    job, accelerator = task.job, task.accelerator
    meta = {"task": job.task, "produces": get_task(job.task).produces,
            "architecture": task.backbone().architecture, "model": task.gpt_config().to_dict(),
            "tokenizer": task.tokenizer.name, **task.meta()}
    if accelerator.is_main_process and isinstance(task.tokenizer, HFTokenizer):  # its files go along
        (Path(job.output_dir) / TOKENIZER_DIR).mkdir(exist_ok=True)
        task.tokenizer.save(Path(job.output_dir) / TOKENIZER_DIR)
    save_final(accelerator, model, job, meta, metrics)


def save_final(accelerator: Accelerator, model: torch.nn.Module, job: Job, meta: dict,
               metrics: dict) -> None:
    """Write the final weights, ``gptft.json`` and ``metrics.json`` (main process, atomically).

    A LoRA run also keeps its adapter (``adapter/``) and saves the merged plain model. Both come
    from the gathered state dict, which every process helps build (a collective under FSDP).
    """
    state = accelerator.get_state_dict(model)  # the full weights on the main process (FSDP too)
    state = {_state_name(k): v for k, v in state.items()}
    tied = {_state_name(k) for k in tied_names(accelerator.unwrap_model(model))}
    if accelerator.is_main_process:
        out = RunFolder(job.output_dir)
        if job.model.trainable == "lora":
            from gptft.lora import base_model_name, split_state_dict, write_adapter

            adapter, state = split_state_dict(state, _trainable_names(accelerator, model), job.lora)
            write_adapter(adapter, out.adapter, job.lora,
                          extra={"base_model": base_model_name(job.model), **meta})
        save_model(out.root, state, meta, tied)
        write_json(out.metrics, metrics)
    accelerator.wait_for_everyone()


def _trainable_names(accelerator: Accelerator, model: torch.nn.Module) -> set[str]:
    """State-dict names of the parameters that train."""
    return {_state_name(n) for n, p in accelerator.unwrap_model(model).named_parameters()
            if p.requires_grad}


def _state_name(name: str) -> str:
    """A parameter's name in the plain model: without the wrappers' parts (FSDP, checkpointing,
    torch.compile's ``_orig_mod``, which Accelerate's ``get_state_dict`` keeps)."""
    return re.sub(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.", "", name)


def finish(task: TaskBase, metrics: dict, phases: Phases) -> None:
    """The metrics with the phases' times, then the marker ``finished`` (last: the final files form
    one set), then the closing summary (main process)."""
    metrics["time"] = phases.report()
    if task.accelerator.is_main_process:
        out = RunFolder(task.job.output_dir)
        write_json(out.metrics, rounded(metrics))
        runfolder.mark(out.root, "finished")
        print(closing_summary(task, metrics), flush=True)


def rounded(value: Any, digits: int = 6) -> Any:
    """Floats to `digits` decimals (no float32 noise in ``metrics.json``), recursively."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def closing_summary(task: TaskBase, metrics: dict) -> str:
    """What the run ends with: the final metrics, where the time went, the run folder and the
    commands to try next."""
    out = task.job.output_dir
    time = metrics["time"]
    phases = ", ".join(f"{k.replace('_', ' ')} {duration(v)}" for k, v in time.items() if k != "total")
    bounded = metrics.get("final_eval_batches")
    kept = (f"step {metrics['best_step']} of {metrics['steps']}, the best by {task.best_metric}"
            if metrics["best_step"] >= 0 else f"the last weights, step {metrics['steps']}: no validation ran")
    files = RunFolder(out).files(task.outputs)
    lines = [f"final evaluation of the kept model ({kept}"
             + (f"; at most {bounded} batches per split)" if bounded else ")") + ":",
             task.summary(metrics),
             f"elapsed: {duration(time['total'])} ({phases})",
             f"run folder: {out} ({', '.join(files)})"]
    commands = task.next_commands(out)
    if commands:
        lines += ["next:", *(f"  {c}" for c in commands)]
    return "\n".join(lines)


# ---- the set-up's checks and messages -------------------------------------------------------------

def relaid_job(job: Job, point: ResumePoint, accelerator) -> Job:
    """`job` with the batch size and accumulation that resume `point` with its global batch on
    this run's processes (``checkpoints.keep_global_batch``), saying what changed."""
    (b0, n0, a0), (b, n, a) = point.saved_layout, point.layout
    changed = [f"train.{k} {old} → {new}" for k, old, new in
               (("batch_size", job.train.batch_size, b), ("grad_accum_steps", job.train.grad_accum_steps, a))
               if old != new]
    accelerator.print(
        f"resuming {point.path.name} (saved as {b0} x {n0} process(es) x {a0}) as {b} x {n} x {a}: "
        f"the same global batch of {b * n * a} examples a step"
        + (f" ({'; '.join(changed)} to keep it)" if changed else ""))
    return dataclasses.replace(job, train=dataclasses.replace(job.train, batch_size=b, grad_accum_steps=a))


def _check_not_finished(job: Job, resume) -> None:
    """Refuse ``train.resume=true`` on a finished run that would train no further (same epochs
    and max_steps as its checkpoint): nothing to resume, and its files stay as they are (a named
    earlier checkpoint, ``train.resume=PATH``, trains again from there)."""
    import yaml

    from gptft.runfolder import run_state

    if job.train.resume is not True or run_state(Path(job.output_dir)) != "finished":
        return
    saved = (yaml.safe_load((resume.path / "config.yaml").read_text(encoding="utf-8")) or {}).get("train", {})
    if saved.get("epochs") == job.train.epochs and saved.get("max_steps") == job.train.max_steps:
        raise GPTFTError(f"output_dir {job.output_dir}: this run has finished; there is nothing to "
                         "resume (raise train.epochs or train.max_steps to train on from its last "
                         "checkpoint, or set train.overwrite=true to run it again)")


def _stop_before_the_folder(stop: StopRequest, accelerator, phase: str) -> None:
    if stop.agreed(accelerator):
        raise Interrupted(f"stopped by {stop.name} during {phase}, before the run folder changed: "
                          "nothing to save; run the same command again")


def _undo_start(out: Path) -> None:
    """A new run stopped before its first checkpoint: remove what it wrote (its marker, config,
    log), so that the same command starts it again instead of finding a ``running`` folder."""
    from gptft.checkpoints import latest_checkpoint

    if latest_checkpoint(out) is None:
        runfolder.reset_run_folder(out)
        (out / runfolder.MARKER).unlink(missing_ok=True)


def _resumes_in_place(job: Job) -> bool:
    """Whether the job resumes a run of its own ``output_dir`` (``train.resume=true``, or a path
    inside it)."""
    resume = job.train.resume
    if resume is False:
        return False
    return resume is True or Path(job.output_dir).resolve() in Path(resume).resolve().parents


def _on_main(accelerator, fn: Callable):
    """``fn()`` on the main process; its ``GPTFTError`` raised on every process."""
    result, error = None, [None]
    if accelerator.is_main_process:
        try:
            result = fn()
        except GPTFTError as e:
            error = [str(e)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(error)
    if error[0] is not None:
        raise GPTFTError(error[0])
    return result


def _warn(accelerator) -> Callable[[str], None]:
    def warn(message: str) -> None:
        if accelerator.is_main_process:
            print(message, file=sys.stderr, flush=True)
    return warn


def warn_empty_splits(task, accelerator) -> None:
    """Say so when a split holds no example (a few records split by fractions): its final
    metrics will be missing."""
    empty = [s for s in SPLITS if not task.has_split(s)]
    if empty:
        accelerator.print(f"warning: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} "
                          "empty (too few records for data.split's fractions): no final "
                          f"{' / '.join(empty)} metrics; give more records or other fractions")


def report_processes(accelerator, job: Job) -> None:
    """Print the process count and the global batch; warn when the launcher was asked for
    another count (``accelerate launch --num_processes N`` with a config file whose
    ``distributed_type: 'NO'`` runs one process) or for fp16 on the CPU (Accelerate ignores it)."""
    n, train = accelerator.num_processes, job.train
    accelerator.print(f"{n} process{'es' if n > 1 else ''} on {accelerator.device.type}: global batch "
                      f"{n * train.batch_size * train.grad_accum_steps} examples per step "
                      f"({n} x batch_size {train.batch_size} x grad_accum_steps {train.grad_accum_steps})")
    asked = launcher_num_processes()
    if asked is not None and asked != n:
        accelerator.print(f"warning: the launcher was asked for --num_processes {asked}, but {n} "
                          f"process{'es run' if n > 1 else ' runs'}: a --config_file with "
                          "distributed_type 'NO' runs one process whatever --num_processes says; "
                          "add --multi_gpu (or use a multi-process config file)")
    if train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        accelerator.print("warning: train.mixed_precision=fp16 has no effect on the CPU (Accelerate "
                          "runs fp32 there); use bf16, or no")


def launcher_num_processes(cmdline: bytes | None = None) -> int | None:
    """The ``--num_processes`` given to the ``accelerate launch`` that started this process (its
    parent's command line, Linux), or None."""
    if cmdline is None:
        try:
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            return None
    args = [a.decode(errors="replace") for a in cmdline.split(b"\0")]
    if not any("accelerate" in a for a in args[:3]):
        return None
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--num_processes=") else (
            args[i + 1] if a == "--num_processes" and i + 1 < len(args) else None)
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def warn_if_fsdp_ignored(accelerator) -> None:
    """Say so when the launcher asked for FSDP (``distributed_type: FSDP``) but Accelerate runs
    plain data parallelism: it shards only on accelerators (GPUs and the like); CPU processes over
    gloo are ``MULTI_CPU``, i.e. DDP, every process holding the whole model (docs/distributed.md)."""
    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.distributed_type != DistributedType.FSDP:
        accelerator.print(f"warning: FSDP was requested, but Accelerate runs these processes as "
                          f"{accelerator.distributed_type.value} (data parallel, no sharding): "
                          "it shards only on GPUs / accelerators, see docs/distributed.md")
