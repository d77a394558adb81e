"""Weights & Biases through Accelerate: one W&B run per gptft run, and its results at the end.

The W&B run id is kept in the run folder (``wandb_run.json``), and a resumed job
(``train.resume``) continues that W&B run (``resume="allow"``, ``id=``) instead of starting a
second one. W&B never rewrites a step it has: a resumed job logs again the steps after its
checkpoint, which W&B keeps from the first attempt (a resumed run logs the same values, see
``tests/test_resume.py``) and ignores now; ``log.jsonl`` is truncated to the checkpoint and
rewritten. At the end the summary gets every final metric, and what the task declares it writes
(``TaskBase.outputs``: figures as images, files of records and matrices of the metrics as tables,
e.g. ``responses.json`` and the confusion matrix), the run's own files and, with
``tracking.log_model``, the model (an Artifact) are uploaded.
"""

from __future__ import annotations

import html
import re
import secrets
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from gptft.config import Job, job_to_dict
from gptft.io import read_json, write_json
from gptft.runfolder import CONFIG, LOG, META, METRICS, WANDB_RUN, Figure, Matrix, Output, Records, RunFolder

RUN_FILE = WANDB_RUN  # the name of earlier versions


def init_tracking(job: Job, accelerator: Accelerator) -> None:
    """Start the W&B tracker (``tracking.wandb``), continuing the run folder's W&B run on resume."""
    if not job.tracking.wandb:
        return
    accelerator.init_trackers(job.tracking.project, config=job_to_dict(job), init_kwargs={"wandb": {
        "name": run_name(job), "tags": job.tracking.tags, "dir": job.output_dir,
        "id": wandb_run_id(job, accelerator), "resume": "allow"}})


def run_name(job: Job) -> str:
    return job.tracking.run_name or Path(job.output_dir).name


def wandb_run_id(job: Job, accelerator: Accelerator) -> str:
    """The W&B run id of this run folder: the saved one when resuming, else a new one (saved)."""
    path = RunFolder(job.output_dir).wandb_run
    if job.train.resume and path.is_file():
        return read_json(path)["id"]
    run_id = secrets.token_hex(6)  # W&B run ids: letters, digits, - and _
    if accelerator.is_main_process:  # only the main process starts the W&B run
        write_json(path, {"id": run_id, "project": job.tracking.project})
    return run_id


def tracker_values(accelerator: Accelerator, values: dict[str, Any]) -> dict[str, Any]:
    """`values` for the trackers: a text (e.g. a sample response, many lines) becomes W&B text
    media rather than a string in the history."""
    if not accelerator.trackers or not any(isinstance(v, str) for v in values.values()):
        return values
    import wandb

    return {k: wandb.Html(f"<pre>{html.escape(v)}</pre>") if isinstance(v, str) else v
            for k, v in values.items()}


def finish_tracking(accelerator: Accelerator, job: Job, metrics: dict[str, Any],
                    outputs: tuple[Output, ...] = ()) -> None:
    """Upload the run's results to W&B (main process; before ``end_training``): the final
    metrics and the task's declared `outputs`."""
    if not job.tracking.wandb or not accelerator.is_main_process:
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    out = RunFolder(job.output_dir)
    run.summary.update(_summary(read_json(out.metrics)))  # as written: rounded
    media: dict[str, Any] = {}
    files = [METRICS, CONFIG, META]
    for o in outputs:
        path = out.root / o.file if o.file is not None else None
        if isinstance(o, Figure) and path.is_file():
            media[f"plots/{o.metric}"] = wandb.Image(str(path))
        elif isinstance(o, Records) and path.is_file():
            media[o.table] = records_table(read_json(path))
            files.append(o.file)
        elif isinstance(o, Matrix) and o.key in metrics:
            media[o.table] = confusion_table(metrics[o.key], metrics[o.labels])
        elif path is not None:
            files.append(o.file)
    if media:
        run.log(media, step=metrics["steps"])
    for name in (*files, LOG):
        if (out.root / name).is_file():
            run.save(str(out.root / name), base_path=str(out.root), policy="now")
    if job.tracking.log_model:
        run.log_artifact(model_artifact(job), aliases=["final"])


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Final metrics for the W&B summary: numbers and names, ``time`` as ``time/<phase>``."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    out.update({f"time/{k}": v for k, v in metrics.get("time", {}).items()})
    return out


def confusion_table(matrix: list[list[int]], labels: list[str]):
    """A W&B table of a matrix (the confusion matrix): a row per true label, a column per
    predicted one."""
    import wandb

    return wandb.Table(columns=["true \\ predicted", *labels],
                       data=[[label, *row] for label, row in zip(labels, matrix)])


def records_table(records: list[dict[str, Any]]):
    """A W&B table of JSON records (``responses.json``): a column per key, in first-seen order."""
    import wandb

    columns = list(dict.fromkeys(k for r in records for k in r))
    return wandb.Table(columns=columns, data=[[_cell(r.get(k)) for k in columns] for r in records])


def _cell(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float)) else str(value)


def model_artifact(job: Job):
    """The final model as a W&B Artifact of type ``model``."""
    import wandb

    out = RunFolder(job.output_dir)
    artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", f"{run_name(job)}-model"), type="model",
                              metadata={"task": job.task})
    for path in (out.weights, out.meta, out.config, out.metrics):
        if path.is_file():
            artifact.add_file(str(path))
    if out.adapter.is_dir():
        artifact.add_dir(str(out.adapter), name=out.adapter.name)
    return artifact
