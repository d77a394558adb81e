"""Fine-tune a model from a YAML job: ``gptft finetune --config configs/spam.yaml key=value ...``.

``accelerate launch launch/finetune.py --config ...`` runs the same on any number of processes.
"""

from __future__ import annotations

import argparse

from accelerate.utils import set_seed

from gptft.config import Job, load_job
from gptft.trainer import make_accelerator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML job file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.epochs=1 model.weights=random")


def finetune(job: Job) -> dict:
    """Run a job to the end and return its final metrics."""
    from gptft.tasks.common import start_run_folder
    from gptft.trainer import resume_checkpoint

    accelerator = make_accelerator(job)
    # A resumption that cannot be (no checkpoint, changed config, other process count) fails first.
    resume_checkpoint(job, accelerator.num_processes)
    set_seed(job.train.seed)
    if job.task == "classification":
        from gptft.tasks.classification import ClassificationTask as Task
    else:
        from gptft.tasks.instruction import InstructionTask as Task
    task = Task(job, accelerator)  # reads the data and weights: bad input fails before output_dir is touched
    start_run_folder(job, accelerator)
    if job.tracking.wandb:
        from gptft.config import job_to_dict

        accelerator.init_trackers(job.tracking.project, config=job_to_dict(job), init_kwargs={
            "wandb": {"name": job.tracking.run_name or _run_name(job), "tags": job.tracking.tags,
                      "dir": job.output_dir}})
    try:
        return task.run()
    finally:
        accelerator.end_training()


def _run_name(job: Job) -> str:
    from pathlib import Path

    return Path(job.output_dir).name


def run(args: argparse.Namespace) -> int:
    finetune(load_job(args.config, args.overrides))
    return 0
