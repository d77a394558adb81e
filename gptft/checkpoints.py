"""Resumable checkpoints in ``output_dir/checkpoints/step-N``: save, find, prune, validate, load.

A checkpoint is Accelerate's ``save_state`` (model, optimizer, RNG and data-loader state of every
process) plus ``trainer_state.json`` (the trainer's progress and LR schedule, as JSON: nothing to
unpickle), each process's best-so-far weights (``best_N.safetensors``) and the run's
``config.yaml``, written last: a folder with it is complete. It is written under
``.tmp-step-N`` and renamed, so a kill during a save leaves the previous checkpoints intact.

``resume_point(job, num_processes)`` finds and checks the checkpoint a resumption starts from
before anything in the run folder changes; the trainer gets that ``ResumePoint``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptft.config import Job, job_to_dict, job_to_yaml
from gptft.errors import GPTFTError
from gptft.io import read_json, write_json, write_text

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
# Keys that may change between a run and its resumption (prefixes): what to resume, where the run
# folder is, how long to train (a cosine schedule then follows the new length), how often to
# evaluate, log and checkpoint, whether to skip non-finite steps from now on, tracking and the
# sample generations. Every other change (lr, model shape, data, seed...) would not continue the
# same run, so it stops the resumption.
RESUMABLE_CHANGES = ("train.resume", "output_dir", "train.epochs", "train.max_steps",
                     "train.eval_every", "train.eval_batches", "train.eval_batch_size",
                     "train.final_eval_batches",
                     "train.log_every", "train.checkpoint_every", "train.checkpoint_minutes",
                     "train.checkpoint_epochs", "train.keep_last", "train.skip_nonfinite",
                     "tracking.", "generate.")


@dataclass
class ResumePoint:
    """A checked checkpoint to resume from and its ``trainer_state.json``."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return step_of(self.path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint folders (``step-N`` with their config written last), oldest first.

    A ``.tmp-step-N`` folder (a save cut short) or a ``step-N`` without ``config.yaml`` is not one.
    """
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if re.fullmatch(r"step-\d+", p.name) and (p / CONFIG).is_file())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    done = complete_checkpoints(Path(output_dir) / CHECKPOINTS)
    return done[-1] if done else None


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


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


def resume_point(job: Job, num_processes: int) -> ResumePoint | None:
    """The checkpoint ``train.resume`` names (None when not resuming), checked against `job` and
    the number of processes (each one's data position and RNG are in it).

    ``finetune`` calls it before touching the run folder, so a bad resumption changes nothing.
    """
    resume = job.train.resume
    if resume is False:
        return None
    path = latest_checkpoint(job.output_dir) if resume is True else Path(resume)
    if path is None:
        raise GPTFTError(f"train.resume: no complete checkpoint in {Path(job.output_dir) / CHECKPOINTS}")
    if not (path / CONFIG).is_file():
        raise GPTFTError(f"train.resume: {path} is not a complete gptft checkpoint (no config.yaml)")
    check_resumable(path / CONFIG, job)
    saved = read_json(path / TRAINER_STATE)
    if saved.get("num_processes") != num_processes:
        raise GPTFTError(f"cannot resume from {path}: it was saved by {saved.get('num_processes')} "
                         f"process(es), this run has {num_processes}; launch with the same "
                         "--num_processes")
    return ResumePoint(path, saved)


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


def save_checkpoint(accelerator, job: Job, step: int, trainer_state: dict[str, Any],
                    best: dict | None) -> Path:
    """Save a checkpoint of step `step` atomically (every process takes part); prune old ones.

    Args:
        accelerator: the run's Accelerator (its ``save_state`` writes model, optimizer, RNG).
        job: the job (its config is written last, marking the checkpoint complete).
        step: the optimizer step reached.
        trainer_state: JSON-able progress and schedule (``trainer_state.json``).
        best: this process's best-so-far trainable weights (``best_N.safetensors``), if any.
    """
    from gptft.io import save_safetensors

    root = Path(job.output_dir) / CHECKPOINTS
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if best is not None:
        save_safetensors(best, tmp / f"best_{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / TRAINER_STATE, {**trainer_state, "num_processes": accelerator.num_processes})
        write_text(tmp / CONFIG, job_to_yaml(job))  # last: marks it complete
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(root, job.train.keep_last, keep=final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, point: ResumePoint, output_dir: Path) -> dict | None:
    """Load `point` into the prepared objects (model, optimizer, RNG, loaders) after removing the
    abandoned run's checkpoints later than it in `output_dir` (the run folder being resumed
    into; `point` may lie in another); return this process's best-so-far weights, if saved."""
    from gptft.io import load_safetensors

    if accelerator.is_main_process:  # later checkpoints here belong to the abandoned run
        for later in complete_checkpoints(output_dir / CHECKPOINTS):
            if step_of(later) > point.step:
                shutil.rmtree(later, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.load_state(str(point.path))
    best = point.path / f"best_{accelerator.process_index}.safetensors"
    return load_safetensors(best) if best.is_file() else None


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, int, float, bool, list, type(None))) else "(unset)"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
