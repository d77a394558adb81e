"""Resumable checkpoints in ``output_dir/checkpoints/step-N``: save, find, prune, validate, load.

A checkpoint is Accelerate's ``save_state`` (model, optimizer, RNG and data-loader state of every
process) plus ``trainer_state.json`` (the trainer's progress and LR schedule, as JSON: nothing to
unpickle), each process's best-so-far weights (``best_N.safetensors``) and the run's
``config.yaml``, written last: a folder with it is complete. It is written under
``.tmp-step-N`` and renamed, so a kill during a save leaves the previous checkpoints intact.

``resume_point(job, num_processes)`` finds and checks the checkpoint a resumption starts from
before anything in the run folder changes (``validate_checkpoint``: every file there and readable;
``train.resume=true`` falls back to the newest valid one); the trainer gets that ``ResumePoint``.
A checkpoint resumes on another number of processes, or with another batch_size and
grad_accum_steps, when the global batch a step takes stays the same (``keep_global_batch``); the
trainer then re-derives each process's data position and RNG instead of loading them.
Checkpoints later than the one resumed from are moved aside (``abandoned-step-N``) only once it
has loaded. Symbolic links under ``checkpoints/`` are never taken for checkpoints nor followed.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gptft.config import Job, job_to_dict, job_to_yaml
from gptft.errors import GPTFTError
from gptft.io import link_error, read_json_object, write_json, write_text, writing
from gptft.runfolder import CHECKPOINTS, CONFIG

TRAINER_STATE = "trainer_state.json"
# Keys that may change between a run and its resumption (prefixes): what to resume, where the run
# folder is, how long to train (a cosine schedule then follows the new length), how often to
# evaluate, log and checkpoint, whether to skip non-finite steps from now on, activation
# checkpointing and auto_batch (the same gradients), tracking and the sample generations; and the
# split of a step (LAYOUT) with the same global batch. Every other change (lr, model shape, data,
# seed...) would not continue the same run, so it stops the resumption.
RESUMABLE_CHANGES = ("train.resume", "output_dir", "train.epochs", "train.max_steps",
                     "train.eval_every", "train.eval_batches", "train.eval_batch_size",
                     "train.final_eval_batches",
                     "train.log_every", "train.checkpoint_every", "train.checkpoint_minutes",
                     "train.checkpoint_epochs", "train.keep_last", "train.skip_nonfinite",
                     "train.overwrite", "train.timeout_minutes", "train.activation_checkpointing",
                     "train.auto_batch", "tracking.", "generate.")

LAYOUT = ("train.batch_size", "train.grad_accum_steps")
"""How a step is split: they may change on resuming if the global batch stays the same."""


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
    saved_layout: tuple[int, int, int] = (0, 1, 1)
    """The saving run's (batch_size, processes, grad_accum_steps)."""
    layout: tuple[int, int, int] = (0, 1, 1)
    """This run's (batch_size, processes, grad_accum_steps): the same global batch."""

    @property
    def step(self) -> int:
        return step_of(self.path)

    @property
    def relaid(self) -> bool:
        """Whether the steps are split otherwise than when saved (processes or micro-batches)."""
        return self.layout != self.saved_layout


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
    """The checkpoint ``train.resume`` names (None when not resuming), checked against `job`, and
    how this run splits its steps (``keep_global_batch``): on `num_processes` processes, with the
    checkpoint's global batch.

    ``train.resume=true`` takes the newest valid checkpoint (``validate_checkpoint``), calling
    `warn` about each newer one it skips; a named checkpoint that is damaged is an error.
    ``finetune`` calls it before touching the run folder, so a bad resumption changes nothing.
    """
    resume = job.train.resume
    if resume is False:
        return None
    path = _checked_path(resume, Path(job.output_dir) / CHECKPOINTS, warn)
    saved_config = check_resumable(path / CONFIG, job)
    saved = read_json_object(path / TRAINER_STATE)
    problems = _state_problems(saved)
    if problems:
        raise GPTFTError(f"{path / TRAINER_STATE}: damaged ({'; '.join(problems)}); resume from "
                         "another checkpoint (train.resume=PATH) or start afresh")
    _check_same_data(path, saved.get("data_sha256"), job)
    train = saved_config.get("train", {})
    saved_layout = (train.get("batch_size"), saved.get("num_processes"), train.get("grad_accum_steps"))
    layout = (job.train.batch_size, num_processes, job.train.grad_accum_steps)
    if saved_layout != layout:
        layout = keep_global_batch(path, saved_layout, layout)
    return ResumePoint(path, saved, saved_layout, layout)


def keep_global_batch(path: Path, saved: tuple, wanted: tuple[int, int, int]) -> tuple[int, int, int]:
    """The (batch_size, processes, grad_accum_steps) to resume checkpoint `path` (saved with
    `saved`) with on `wanted`'s number of processes, keeping the checkpoint's global batch
    ``batch_size x processes x grad_accum_steps`` (the same trajectory).

    The user's batch_size and grad_accum_steps when they give that global batch; when they are
    the checkpoint's own (the process count alone changed), the accumulation (else the batch
    size) that keeps it; otherwise an error naming both global batches.
    """
    b0, n0, a0 = saved
    b, n, a = wanted
    if not all(isinstance(v, int) and v > 0 for v in saved):
        raise GPTFTError(f"cannot resume from {path}: its trainer_state.json / config.yaml do not "
                         "say how its steps were split (batch_size, processes, grad_accum_steps)")
    total = b0 * n0 * a0
    if b * n * a == total:
        return wanted
    if (b, a) != (b0, a0):
        raise GPTFTError(
            f"cannot resume from {path}: its global batch is {total} examples a step (train.batch_size "
            f"{b0} x {n0} process(es) x train.grad_accum_steps {a0}), this run's would be {b * n * a} "
            f"({b} x {n} x {a}); set train.batch_size and train.grad_accum_steps so that their "
            f"product with {n} process(es) is {total}")
    if total % (b * n) == 0:
        return b, n, total // (b * n)
    if total % (a * n) == 0:
        return total // (a * n), n, a
    raise GPTFTError(f"cannot resume from {path} on {n} process(es): its global batch of {total} "
                     f"examples ({b0} x {n0} process(es) x {a0}) does not divide among them; "
                     f"launch a number of processes that divides {total}")


def _checked_path(resume: bool | str, root: Path, warn: Callable[[str], None]) -> Path:
    """The checkpoint ``train.resume`` names, checked by ``validate_checkpoint``."""
    if resume is True:
        found = complete_checkpoints(root)
        if not found:
            raise GPTFTError(f"train.resume: no complete checkpoint in {root}")
        skipped = []
        for path in reversed(found):
            problems = validate_checkpoint(path)
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
        problems = validate_checkpoint(path)
        if problems:
            raise GPTFTError(f"train.resume: {path} is damaged: {'; '.join(problems)}")
    return path


def saved_processes(path: Path) -> int:
    """The number of processes that saved checkpoint `path` (1 when unreadable: the file check
    reports that)."""
    try:
        n = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))["num_processes"]
    except (OSError, ValueError, KeyError, TypeError):
        return 1
    return n if isinstance(n, int) and n > 0 else 1


def data_hashes(job: Job) -> dict[str, str]:
    """The sha256 of each data file the job names (``data.path``, ``data.train_path``, ...), kept
    in every checkpoint: a resumption on a file whose content changed is refused."""
    import dataclasses
    import hashlib

    data, out = getattr(job, "data", None), {}
    if not dataclasses.is_dataclass(data):
        return out
    for f in dataclasses.fields(data):
        value = getattr(data, f.name)
        if f.name.endswith("path") and isinstance(value, str) and Path(value).is_file():
            digest = hashlib.sha256()
            with open(value, "rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):  # noqa: B023 (used at once)
                    digest.update(chunk)
            out[f"data.{f.name}"] = digest.hexdigest()
    return out


def _check_same_data(checkpoint: Path, saved: Any, job: Job) -> None:
    if not isinstance(saved, dict):
        return  # a checkpoint of an earlier gptft: no hashes kept
    now = data_hashes(job)
    changed = [k for k, v in saved.items() if k in now and now[k] != v]
    if changed:
        key = changed[0]
        raise GPTFTError(f"{getattr(job.data, key.split('.', 1)[1])}: the data file ({key}) changed "
                         f"since checkpoint {checkpoint} was saved (its sha256 differs); a "
                         "resumption needs the same data: restore the file, or start afresh")


def validate_checkpoint(path: Path) -> list[str]:
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
    num_processes = saved_processes(path)
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


def check_resumable(saved_config: Path, job: Job) -> dict:
    """Raise one error, on one line, naming every setting that differs from the checkpoint's
    (old → new), bar the ``RESUMABLE_CHANGES`` and the split of a step (``LAYOUT``: checked by
    ``keep_global_batch``); return the saved configuration."""
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
             if saved.get(k, missing) != now.get(k, missing) and not k.startswith(RESUMABLE_CHANGES)
             and k not in LAYOUT]
    if diffs:
        raise GPTFTError(f"cannot resume from {saved_config.parent}: the configuration differs from "
                         f"the checkpoint's: {'; '.join(diffs)} (only "
                         f"{', '.join(k + '*' if k.endswith('.') else k for k in RESUMABLE_CHANGES)} "
                         "may change, and train.batch_size and train.grad_accum_steps with the "
                         "same global batch)")
    return data


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
    for path in (root, tmp, final):  # never save through a link out of the run folder
        if path.is_symlink():
            raise link_error(path)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:  # disk full, read-only: one line naming the file; the previous checkpoints are kept
        with writing(tmp, "checkpoint"), _quiet_tied_weights():
            accelerator.save_state(str(tmp))
        if best is not None:
            save_safetensors(best, tmp / f"best_{accelerator.process_index}.safetensors")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(tmp / TRAINER_STATE, {**trainer_state, "num_processes": accelerator.num_processes})
            write_text(tmp / CONFIG, job_to_yaml(job))  # last: marks it complete
            shutil.rmtree(final, ignore_errors=True)
            with writing(final, "checkpoint"):
                tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written .tmp-step-N left behind
        raise
    if accelerator.is_main_process:
        prune_checkpoints(root, job.train.keep_last, keep=final)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def _rng_failure():
    """Yield a list that gets an entry when Accelerate's ``load_state`` could not restore the
    random states (it says so only at INFO, on the main process, and goes on); its INFO lines
    are not shown."""
    import logging

    logger, failed = logging.getLogger("accelerate.checkpointing"), []

    def watch(record: logging.LogRecord) -> bool:
        if "Could not load random states" in str(record.msg):
            failed.append(record)
        return record.levelno >= logging.WARNING

    level = logger.level
    logger.setLevel(min(level or logging.INFO, logging.INFO))
    logger.addFilter(watch)
    try:
        yield failed
    finally:
        logger.removeFilter(watch)
        logger.setLevel(level)


@contextmanager
def _quiet_tied_weights():
    """Without Accelerate's "Removed shared tensor {'lm_head.weight'} while saving" warning at each
    checkpoint: GPT-2's head is tied to its embedding (saved once, re-tied on loading), as meant."""
    import logging

    logger = logging.getLogger("accelerate.utils.other")

    def keep(record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in str(record.msg)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def load_checkpoint(accelerator, point: ResumePoint, output_dir: Path) -> dict | None:
    """Load `point` into the prepared objects (model, optimizer, RNG, loaders); then, once it has
    loaded, move the abandoned run's checkpoints later than it in `output_dir` (the run folder
    being resumed into; `point` may lie in another) aside as ``abandoned-step-N``, so that
    ``train.resume=true`` never picks them; return this process's best-so-far weights, if saved."""
    from safetensors import SafetensorError

    from gptft.io import load_safetensors

    try:
        with warnings.catch_warnings(), _rng_failure() as rng_failed:
            # torch's notes on a foreign pickle protocol: ours is below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            accelerator.load_state(str(point.path))
        # Every process of a data-parallel run kept the same best weights: on more processes
        # than saved, the new ones take the first one's.
        best = point.path / f"best_{accelerator.process_index}.safetensors"
        if point.relaid and not best.is_file():
            best = point.path / "best_0.safetensors"
        best = load_safetensors(best) if best.is_file() else None
    except Exception as e:  # torch's own text would recommend weights_only=False (running the file)
        failed = (EOFError, RuntimeError, ValueError, KeyError, OSError, SafetensorError)
        if not isinstance(e, failed) and type(e).__name__ != "UnpicklingError":
            raise
        raise GPTFTError(f"{point.path}: the checkpoint cannot be loaded ({type(e).__name__}: a "
                         "damaged or foreign file); resume from another checkpoint "
                         "(train.resume=PATH) or start afresh") from None
    failed_here = float(bool(rng_failed))  # (Accelerate says so on the main process only)
    if accelerator.num_processes > 1:  # every process stops alike, none waits for the others
        import torch

        failed_here = accelerator.reduce(torch.tensor(failed_here, device=accelerator.device),
                                         reduction="sum").item()
    if failed_here:  # Accelerate goes on with this process's RNG as it is: not the same run
        raise GPTFTError(f"{point.path / f'random_states_{accelerator.process_index}.pkl'}: the "
                         "random-number state cannot be restored (damaged or foreign), so the "
                         "resumed run would not continue the same one; resume from another "
                         "checkpoint (train.resume=PATH) or start afresh")
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
    scheduler = saved.get("scheduler")
    if not isinstance(scheduler, dict):
        problems.append("scheduler: missing or not an object")
    elif not (_is_int(scheduler.get("last_epoch")) and isinstance(scheduler.get("base_lrs"), list)
              and all(isinstance(x, int | float) for x in scheduler["base_lrs"])):
        problems.append("scheduler: not a learning-rate schedule's state (last_epoch, base_lrs)")
    window = saved.get("loss_window", [0.0, 0.0])
    if not (isinstance(window, list) and len(window) == 2
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in window)):
        problems.append("loss_window: not two numbers")
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
