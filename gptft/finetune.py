"""Run a fine-tuning job to the end: ``finetune(load_job("configs/spam.yaml"))``.

The order matters: the run folder is locked first (``gptft.runfolder``: one run at a time), then
every check that can fail (a resumption that cannot be, bad data, bad weights, a folder that is
not a new or empty one or an earlier gptft run) runs before the run folder is touched.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from accelerate.utils import set_seed

from gptft.accelerator import make_accelerator
from gptft.checkpoints import resume_point
from gptft.config import Job
from gptft.cpu import keep_freed_memory
from gptft.errors import GPTFTError
from gptft.lora import with_adapter_config
from gptft.runfolder import RunLock, check_new_run
from gptft.signals import watch_parent
from gptft.tasks import get_task
from gptft.tasks.base import run_task, start_run_folder
from gptft.timing import Phases
from gptft.tracking import finish_tracking, init_tracking


def finetune(job: Job, started: float | None = None) -> dict:
    """Run `job` (a validated job config) and return its final metrics.

    `started` (a ``time.time()``) is when the job began, for its phase timings: the ``gptft``
    command passes its process's start (``gptft.timing.process_start``); default: now.
    """
    phases = Phases(started if started is not None else time.time())
    watch_parent()
    job = with_adapter_config(job)  # model.adapter: its LoRA config is the run's
    accelerator = make_accelerator(job)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # no page faults for the same large blocks every step (gptft.cpu)
    warn_if_fsdp_ignored(accelerator)
    resuming_here = _resumes_in_place(job)
    lock = _on_main(accelerator, lambda: RunLock.acquire(job.output_dir))
    try:
        # A resumption that cannot be (no checkpoint, changed config, other process count) fails first.
        resume = resume_point(job, accelerator.num_processes, warn=_warn(accelerator))
        set_seed(job.train.seed)
        task = get_task(job.task).task_class()(job, accelerator)  # reads data and weights
        _on_main(accelerator, lambda: check_new_run(Path(job.output_dir), job.train.overwrite,
                                                    resuming_here))
        start_run_folder(job, accelerator, resuming=resuming_here)
        init_tracking(job, accelerator)
        try:
            metrics = run_task(task, resume, phases)
            finish_tracking(accelerator, job, metrics, task.outputs)
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
    finally:
        if lock is not None:
            lock.release()


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
