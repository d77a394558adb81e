"""Run a fine-tuning job to the end: ``finetune(load_job("configs/spam.yaml"))``.

The order matters: the run folder is locked first (``gptft.runfolder``: one run at a time), then
every check that can fail (a resumption that cannot be, bad data, bad weights, a folder that is
not a new or empty one or an earlier gptft run) runs before the run folder is touched.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from accelerate.utils import set_seed

from gptft import runfolder
from gptft.accelerator import make_accelerator
from gptft.checkpoints import ResumePoint, resume_point
from gptft.config import Job
from gptft.cpu import keep_freed_memory
from gptft.errors import GPTFTError
from gptft.lora import with_adapter_config
from gptft.runfolder import RunLock, check_new_run
from gptft.signals import Interrupted, StopRequest, signal_at, watch_parent
from gptft.tasks import get_task
from gptft.tasks.base import run_task, start_run_folder
from gptft.timing import Phases
from gptft.tracking import finish_tracking, init_tracking


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
    signal_at("start-up")
    watch_parent()
    job = with_adapter_config(job)  # model.adapter: its LoRA config is the run's
    accelerator = make_accelerator(job)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # no page faults for the same large blocks every step (gptft.cpu)
    warn_if_fsdp_ignored(accelerator)
    report_processes(accelerator, job)
    resuming_here = _resumes_in_place(job)
    lock = _on_main(accelerator, lambda: RunLock.acquire(job.output_dir))
    started_folder = False
    try:
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
        start_run_folder(job, accelerator, resuming=resuming_here)
        started_folder = True
        init_tracking(job, accelerator)
        try:
            metrics = run_task(task, resume, phases, stop=stop)
            finish_tracking(accelerator, job, metrics, task.outputs)
            if stop.signum and accelerator.is_main_process:
                print(f"gptft: {stop.name} came as the run finished; it is complete", file=sys.stderr)
            # Every process leaves together: a rank that exits while the main one still writes
            # outputs can abort in its collective library's threads (gloo: SIGABRT at exit).
            accelerator.wait_for_everyone()
            return metrics
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
    except Interrupted:
        if started_folder and not resuming_here and accelerator.is_main_process:
            _undo_start(Path(job.output_dir))
        raise
    finally:
        if lock is not None:
            lock.release()


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
    from gptft.tasks.base import SPLITS

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
    import os

    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.distributed_type != DistributedType.FSDP:
        accelerator.print(f"warning: FSDP was requested, but Accelerate runs these processes as "
                          f"{accelerator.distributed_type.value} (data parallel, no sharding): "
                          "it shards only on GPUs / accelerators, see docs/distributed.md")
