"""Resumable checkpoints in ``output_dir/checkpoints/step-N``: save, find, prune, validate, load.

A checkpoint is Accelerate's ``save_state`` (model, optimizer, RNG and data-loader state of every
process) plus ``trainer_state.json`` (the trainer's progress and LR schedule, as JSON: nothing to
unpickle), each process's best-so-far weights (``best_N.safetensors``) and the run's
``config.yaml``, written last: a folder with it is complete. It is written under
``.tmp-step-N`` and renamed, so a kill during a save leaves the previous checkpoints intact.

``resume_point(job, num_processes)`` finds and checks the checkpoint a resumption starts from
before anything in the run folder changes (``validate_checkpoint``: every file there and readable;
``train.resume=true`` falls back to the newest valid one); the trainer gets that ``ResumePoint``.
Checkpoints later than the one resumed from are moved aside (``abandoned-step-N``) only once it
has loaded. Symbolic links under ``checkpoints/`` are never taken for checkpoints nor followed.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gptft.config import Job, job_to_dict, job_to_yaml
from gptft.errors import GPTFTError
from gptft.io import read_json_object, write_json, write_text, writing
from gptft.runfolder import CHECKPOINTS, CONFIG

TRAINER_STATE = "trainer_state.json"
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
                     "train.overwrite", "train.timeout_minutes", "tracking.", "generate.")


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
    return sorted(p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name)
                  and not p.is_symlink() and (p / CONFIG).is_file())


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    done = complete_checkpoints(Path(output_dir) / CHECKPOINTS)
    return done[-1] if done else None


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def prune_checkpoints(root: Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest `keep_last` (≥ 1) complete checkpoints, never `keep` (the one
    just saved), and leftover temporary folders of saves cut short. Called right after a save
    completes, so the checkpoint a run resumed from goes only once a newer one is complete."""
    if root.is_symlink():  # never delete through a link out of the run folder
        return
    done = complete_checkpoints(root)
    for old in done[: max(0, len(done) - max(1, keep_last))]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):
        if not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)


def resume_point(job: Job, num_processes: int,
                 warn: Callable[[str], None] = print) -> ResumePoint | None:
    """The checkpoint ``train.resume`` names (None when not resuming), checked against `job` and
    the number of processes (each one's data position and RNG are in it).

    ``train.resume=true`` takes the newest valid checkpoint (``validate_checkpoint``), calling
    `warn` about each newer one it skips; a named checkpoint that is damaged is an error.
    ``finetune`` calls it before touching the run folder, so a bad resumption changes nothing.
    """
    resume = job.train.resume
    if resume is False:
        return None
    if resume is True:
        root = Path(job.output_dir) / CHECKPOINTS
        found = complete_checkpoints(root)
        if not found:
            raise GPTFTError(f"train.resume: no complete checkpoint in {root}")
        skipped = []
        for path in reversed(found):
            problems = validate_checkpoint(path, num_processes)
            if not problems:
                break
            skipped.append(f"{path.name}: {problems[0]}")
            warn(f"warning: skipping the damaged checkpoint {path}: {'; '.join(problems)}")
        else:
            raise GPTFTError(f"train.resume: no valid checkpoint in {root} ({'; '.join(skipped)})")
    else:
        path = Path(resume)
        if not (path / CONFIG).is_file():
            raise GPTFTError(f"train.resume: {path} is not a complete gptft checkpoint (no config.yaml)")
        problems = validate_checkpoint(path, num_processes)
        if problems:
            raise GPTFTError(f"train.resume: {path} is damaged: {'; '.join(problems)}")
    check_resumable(path / CONFIG, job)
    saved = read_json_object(path / TRAINER_STATE)
    problems = _state_problems(saved)
    if problems:
        raise GPTFTError(f"{path / TRAINER_STATE}: damaged ({'; '.join(problems)}); resume from "
                         "another checkpoint (train.resume=PATH) or start afresh")
    if saved.get("num_processes") != num_processes:
        raise GPTFTError(f"cannot resume from {path}: it was saved by {saved.get('num_processes')} "
                         f"process(es), this run has {num_processes}; launch with the same "
                         "--num_processes")
    return ResumePoint(path, saved)


def validate_checkpoint(path: Path, num_processes: int) -> list[str]:
    """What is wrong with checkpoint `path` (empty: nothing), read without loading any tensor:
    every file there (weights, optimizer, each process's RNG state, the trainer state, each
    process's best weights if any were kept), safetensors headers that parse and match the
    file's size, torch files whose zip directory reads."""
    problems = []
    for name in (CONFIG, TRAINER_STATE):
        problem = _json_or_yaml_problem(path / name)
        if problem:
            problems.append(problem)
    # Accelerate's names: model.safetensors and optimizer.bin; under FSDP pytorch_model_fsdp*
    # and optimizer* (files or sharded folders).
    if not list(path.glob("model*.safetensors")) and not list(path.glob("pytorch_model*")):
        problems.append("no model weights (model.safetensors)")
    if not list(path.glob("optimizer*")):
        problems.append("no optimizer state (optimizer.bin)")
    needed = [f"random_states_{i}.pkl" for i in range(num_processes)]
    if list(path.glob("best_*.safetensors")) or _kept_best(path / TRAINER_STATE):
        needed += [f"best_{i}.safetensors" for i in range(num_processes)]
    problems += [f"{name} missing" for name in needed if not (path / name).is_file()]
    for f in sorted(path.iterdir()):
        if f.is_file() and f.suffix == ".safetensors":
            problem = _safetensors_problem(f)
        elif f.is_file() and f.suffix in (".bin", ".pkl", ".pt"):
            problem = _torch_file_problem(f)
        else:
            continue
        if problem:
            problems.append(f"{f.name}: {problem}")
    return problems


def _kept_best(trainer_state: Path) -> bool:
    """Whether the run had best weights to keep when it saved (then each process saved its own)."""
    try:
        return json.loads(trainer_state.read_text(encoding="utf-8"))["progress"]["best_value"] is not None
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _json_or_yaml_problem(path: Path) -> str | None:
    import yaml

    if not path.is_file():
        return f"{path.name} missing"
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        return f"{path.name}: unreadable ({str(e).splitlines()[0]})"
    if data is None:
        return f"{path.name}: empty"
    if not isinstance(data, dict):
        return f"{path.name}: not a mapping"
    if path.name == TRAINER_STATE and not {"progress", "scheduler", "num_processes"} <= data.keys():
        return f"{path.name}: incomplete"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file's header parses and its tensors end exactly at the file's end."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n:
                return f"truncated ({size} bytes, header alone {8 + n})"
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return "not a safetensors file"
    return None if size == 8 + n + end else f"truncated or padded ({size} bytes, expected {8 + n + end})"


def _torch_file_problem(path: Path) -> str | None:
    """A ``torch.save`` file (a zip archive) whose directory reads and whose members fit in it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            end = max((i.header_offset + i.compress_size for i in z.infolist()), default=0)
    except (OSError, zipfile.BadZipFile, ValueError):
        return "truncated or not a torch file"
    return None if end <= path.stat().st_size else "truncated"


def check_resumable(saved_config: Path, job: Job) -> None:
    """Raise one error, on one line, naming every setting that differs from the checkpoint's
    (old → new), bar the ``RESUMABLE_CHANGES``."""
    import yaml

    try:
        data = yaml.safe_load(saved_config.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        data = e
    if not isinstance(data, dict):
        raise GPTFTError(f"{saved_config}: not a saved configuration ("
                         f"{'empty' if data is None else 'unreadable'}); the checkpoint is damaged: "
                         "resume from another one (train.resume=PATH) or start afresh")
    saved = _flatten(data)
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

    final = checkpoint_path(job.output_dir, step)
    root, tmp = final.parent, final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with writing(tmp, "checkpoint"):  # disk full: one line; the previous checkpoint is kept
            accelerator.save_state(str(tmp))
    except GPTFTError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    """Load `point` into the prepared objects (model, optimizer, RNG, loaders); then, once it has
    loaded, move the abandoned run's checkpoints later than it in `output_dir` (the run folder
    being resumed into; `point` may lie in another) aside as ``abandoned-step-N``, so that
    ``train.resume=true`` never picks them; return this process's best-so-far weights, if saved."""
    from safetensors import SafetensorError

    from gptft.io import load_safetensors

    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle protocol: ours is below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            accelerator.load_state(str(point.path))
        best = point.path / f"best_{accelerator.process_index}.safetensors"
        best = load_safetensors(best) if best.is_file() else None
    except Exception as e:  # torch's own text would recommend weights_only=False (running the file)
        failed = (EOFError, RuntimeError, ValueError, KeyError, OSError, SafetensorError)
        if not isinstance(e, failed) and type(e).__name__ != "UnpicklingError":
            raise
        raise GPTFTError(f"{point.path}: the checkpoint cannot be loaded ({type(e).__name__}: a "
                         "damaged or foreign file); resume from another checkpoint "
                         "(train.resume=PATH) or start afresh") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for later in complete_checkpoints(output_dir / CHECKPOINTS):
            if step_of(later) > point.step:
                aside = later.with_name(f"abandoned-{later.name}")
                shutil.rmtree(aside, ignore_errors=True)  # an older abandonment of the same step
                later.rename(aside)
                accelerator.print(f"moved the later checkpoint {later.name} of the abandoned run "
                                  f"aside to {aside} (delete it when no longer needed)")
    accelerator.wait_for_everyone()
    return best


def _state_problems(saved: dict) -> list[str]:
    """What is wrong with a ``trainer_state.json``'s progress counters and schedule state."""
    from gptft.validation import build

    if not isinstance(saved.get("progress"), dict):
        return ["progress: missing or not an object"]
    _, problems = build(TrainState, saved["progress"], "progress")
    if not problems:
        problems = [f"progress.{k}: must be >= 0 (got {v})" for k, v in saved["progress"].items()
                    if k != "best_step" and isinstance(v, int | float) and v < 0]
    if not isinstance(saved.get("scheduler"), dict):
        problems.append("scheduler: missing or not an object")
    return problems


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
