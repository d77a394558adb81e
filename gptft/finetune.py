"""Run a fine-tuning job to the end: ``finetune(load_job("configs/spam.yaml"))``.

The order matters: every check that can fail (a resumption that cannot be, bad data, bad weights)
runs before the run folder is touched.
"""

from __future__ import annotations

import time

from accelerate.utils import set_seed

from gptft.checkpoints import resume_point
from gptft.config import Job
from gptft.lora import with_adapter_config
from gptft.tasks import get_task
from gptft.tasks.base import run_task, start_run_folder
from gptft.timing import Phases
from gptft.tracking import finish_tracking, init_tracking
from gptft.trainer import make_accelerator


def finetune(job: Job, started: float | None = None) -> dict:
    """Run `job` (a validated job config) and return its final metrics.

    `started` (a ``time.time()``) is when the job began, for its phase timings: the ``gptft``
    command passes its process's start (``gptft.timing.process_start``); default: now.
    """
    phases = Phases(started if started is not None else time.time())
    job = with_adapter_config(job)  # model.adapter: its LoRA config is the run's
    accelerator = make_accelerator(job)
    # A resumption that cannot be (no checkpoint, changed config, other process count) fails first.
    resume = resume_point(job, accelerator.num_processes)
    set_seed(job.train.seed)
    task = get_task(job.task).task_class()(job, accelerator)  # reads data and weights
    start_run_folder(job, accelerator)
    init_tracking(job, accelerator)
    try:
        metrics = run_task(task, resume, phases)
        finish_tracking(accelerator, job, metrics)
        # Every process leaves together: a rank that exits while the main one still writes
        # outputs can abort in its collective library's threads (gloo: SIGABRT at exit).
        accelerator.wait_for_everyone()
        return metrics
    finally:
        accelerator.end_training()
        accelerator.state.destroy_process_group()  # no-op without a process group
