"""The run folder (``output_dir``) is the user's: gptft touches only folders it made, one run at a time.

- ``.gptft-run`` (JSON) marks a folder gptft made; its ``state`` is ``running`` from the moment a
  run starts changing the folder and ``finished`` once every final file (weights, ``gptft.json``,
  metrics, outputs) is written: readers (``gptft.runs``) refuse a run that is not finished, so a
  failed run never serves an earlier run's model beside its own config.
- A new run goes only into a missing or empty folder, or (``train.overwrite=true``) into an earlier
  gptft run, of which it removes only the files gptft writes (the files every run writes, those
  each task declares in its ``outputs``, ``adapter/``'s files, ``checkpoints/step-N``...): never a
  user's file, never through a symbolic link.
- ``RunFolder`` names every path of a run; a task declares the files it adds (``Figure``,
  ``Records``) and the tables of its metrics (``Matrix``): overwrite, the W&B upload
  (``gptft.tracking``) and the closing summary all read those declarations.
- ``.gptft-lock`` is held (``flock``) by the main process for the whole job and names its PID and
  host, so a second run on the same folder stops with one line; the kernel frees the lock of a
  process that died (a stale lock file is taken over).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gptft.errors import GPTFTError
from gptft.io import write_json

MARKER = ".gptft-run"
LOCK = ".gptft-lock"
CONFIG = "config.yaml"  # the resolved job (also the last file of a checkpoint)
META = "gptft.json"  # what rebuilds the model: task, what it produces, model config, tokenizer...
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"
LOG = "log.jsonl"
WANDB_RUN = "wandb_run.json"  # the W&B run id a resumed job continues (gptft.tracking)
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
TOKENIZER = "tokenizer"  # a Hugging Face tokenizer's files (gptft.runs.TOKENIZER_DIR)
# The files every run writes at the top of its folder (a task's own: its ``outputs``).
CORE_FILES = (CONFIG, LOG, WEIGHTS, META, METRICS, WANDB_RUN)
# A Hugging Face tokenizer's files, kept in tokenizer/ (gptft.tokenizer.HFTokenizer.save).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
# PEFT's two files and gptft's own (and the names of gptft before PEFT's layout).
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "gptft_adapter.json",
                 "adapter.safetensors")
# Folders under checkpoints/ that gptft makes: checkpoints, saves cut short, abandoned checkpoints.
CHECKPOINT_DIR = re.compile(r"(\.tmp-|abandoned-)?step-\d+")


# ---- what a run writes ----------------------------------------------------------------------------

Curve = tuple[str, str, str, str]  # (legend label, log.jsonl key, line style, marker)


@dataclass(frozen=True)
class Figure:
    """``<metric>.png``: `metric` measured while training, drawn from ``log.jsonl`` by
    ``gptft.plots``; uploaded to W&B as the image ``plots/<metric>``.

    Attributes:
        metric: the figure's name and y axis.
        curves: its curves; empty: the epoch-end training sample and the validation of `metric`
            (``train_sample/<metric>``, ``val/<metric>``).
    """

    metric: str
    curves: tuple[Curve, ...] = ()

    @property
    def file(self) -> str:
        return f"{self.metric}.png"


@dataclass(frozen=True)
class Records:
    """A JSON array of records the task writes (e.g. ``responses.json``); uploaded to W&B as the
    file and as the table ``<table>``."""

    file: str
    table: str


@dataclass(frozen=True)
class Matrix:
    """A matrix in ``metrics.json`` (e.g. the confusion matrix under `key`, its row and column
    names under `labels`); uploaded to W&B as the table ``<table>``. Not a file of its own."""

    key: str
    labels: str
    table: str

    file = None


Output = Figure | Records | Matrix

# The training loss and the validation loss: the first figure of every task.
LOSS = Figure("loss", (("train (mean since the previous point)", "train/loss_mean", "-", "."),
                       ("val", "val/loss", "-.", "o")))


def output_files(outputs: Iterable[Output]) -> tuple[str, ...]:
    """The file names among `outputs` (declared outputs that are files), in order, once each."""
    return tuple(dict.fromkeys(o.file for o in outputs if o.file is not None))


@dataclass(frozen=True)
class RunFolder:
    """Every path of a run folder (``output_dir``)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    config = property(lambda self: self.root / CONFIG)
    meta = property(lambda self: self.root / META)
    weights = property(lambda self: self.root / WEIGHTS)
    metrics = property(lambda self: self.root / METRICS)
    log = property(lambda self: self.root / LOG)
    wandb_run = property(lambda self: self.root / WANDB_RUN)
    checkpoints = property(lambda self: self.root / CHECKPOINTS)
    adapter = property(lambda self: self.root / ADAPTER)
    marker = property(lambda self: self.root / MARKER)
    lock = property(lambda self: self.root / LOCK)

    def files(self, outputs: Iterable[Output] = ()) -> list[str]:
        """The names of the files a run with `outputs` wrote here (those that exist), the files
        every run writes first; ``adapter/`` too when there is one."""
        names = [n for n in (*CORE_FILES, *output_files(outputs)) if (self.root / n).is_file()]
        return names + [f"{d}/" for d in (ADAPTER, TOKENIZER) if (self.root / d).is_dir()]


def is_gptft_run(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def run_state(folder: Path) -> str | None:
    """The ``state`` in `folder`'s marker (``running`` / ``finished``), or None without one."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")).get("state")
    except (OSError, ValueError, AttributeError):
        return None if not (folder / MARKER).exists() else "unreadable"


def check_new_run(folder: Path, overwrite: bool, resuming_here: bool) -> None:
    """Raise unless a run may start in `folder` (read-only: called before anything changes).

    A folder is fine when missing, empty (bar the lock), a gptft run being resumed
    (`resuming_here`), or any gptft run with `overwrite`.
    """
    if folder.exists() and not folder.is_dir():
        raise GPTFTError(f"output_dir {folder}: not a folder")
    if (folder / CHECKPOINTS).is_symlink():
        raise GPTFTError(f"{folder / CHECKPOINTS}: a symbolic link; gptft keeps (and prunes) "
                         "checkpoints inside the run folder only: remove the link")
    others = sorted(p.name for p in folder.iterdir() if p.name != LOCK) if folder.is_dir() else []
    if others and not resuming_here:
        if not is_gptft_run(folder):
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise GPTFTError(f"output_dir {folder}: not empty and not a gptft run folder (it holds "
                             f"{shown}; no {MARKER}); choose a new or empty output_dir")
        if not overwrite:
            state = run_state(folder)
            how = "" if state == "finished" else "; continue it with train.resume=true"
            raise GPTFTError(f"output_dir {folder}: holds a {state or 'earlier'} gptft run; set "
                             f"train.overwrite=true to replace it{how}, or choose another output_dir")
    if folder.is_dir():
        check_no_links(folder)


def check_no_links(folder: Path) -> None:
    """Raise if a name gptft writes in the run folder (its files, ``adapter/``, a checkpoint's
    temporary folder) is a symbolic link: gptft would write through it, or replace it."""
    from gptft.io import link_error

    names = [folder / n for n in (*written_files(), MARKER, ADAPTER, TOKENIZER)]
    if (folder / "adapter").is_dir() and not (folder / "adapter").is_symlink():
        names += [folder / "adapter" / n for n in ADAPTER_FILES]
    root = folder / "checkpoints"
    if root.is_dir() and not root.is_symlink():  # a save writes into .tmp-step-N (a link to a
        names += list(root.glob(".tmp-step-*"))  # step-N is the user's: never followed)
    for path in names:
        if path.is_symlink():
            raise link_error(path)


def reset_run_folder(folder: Path, outputs: Iterable[Output] = ()) -> None:
    """Remove what an earlier gptft run wrote in `folder` (a new run with ``train.overwrite``):
    the files every run writes, the files of `outputs` (what any task declares it writes) and
    checkpoint folders, never a symbolic link's target or anything else."""
    for name in (*CORE_FILES, *output_files(outputs)):
        _remove_file(folder / name)
    adapter = folder / ADAPTER
    if adapter.is_dir() and not adapter.is_symlink():
        for name in ADAPTER_FILES:
            _remove_file(adapter / name)
        _rmdir_if_empty(adapter)
    tokenizer = folder / TOKENIZER
    if tokenizer.is_dir() and not tokenizer.is_symlink():
        for name in TOKENIZER_FILES:
            _remove_file(tokenizer / name)
        _rmdir_if_empty(tokenizer)
    root = folder / CHECKPOINTS
    if root.is_dir() and not root.is_symlink():
        for p in root.iterdir():
            if CHECKPOINT_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
        _rmdir_if_empty(root)


def written_files() -> tuple[str, ...]:
    """The names of the files a run writes at the top of its folder: every run's and what any
    registered task declares (``gptft.registry``)."""
    from gptft.registry import declared_outputs

    return (*CORE_FILES, *output_files(declared_outputs()))


def stale_pattern() -> re.Pattern:
    """``gptft.io.atomic_path``'s temporary files of a run's own files: ``.NAME.XXXXXXXX.tmp``."""
    own = "|".join(re.escape(n) for n in (*written_files(), MARKER))
    return re.compile(rf"\.({own})\.[a-z0-9_]{{8}}\.tmp")


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files of gptft's own atomic writes that a killed run left in `folder`
    (``.gptft-run.ab12cd34.tmp``...): gptft's to remove, and in the way of the next command. Call
    with the folder's lock held (no other gptft writes them then)."""
    stale = stale_pattern()
    for p in folder.iterdir():
        if stale.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()


def mark(folder: Path, state: str) -> None:
    """Write the marker: ``running`` (before the folder changes) or ``finished`` (last of all)."""
    from gptft import __version__

    write_json(folder / MARKER, {"gptft": __version__, "state": state,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def check_finished(folder: Path) -> None:
    """Raise unless `folder`'s run finished (a folder without a marker is taken as written by
    hand or by an earlier gptft, and accepted)."""
    state = run_state(folder)
    if state not in (None, "finished"):
        raise GPTFTError(f"{folder}: this run has not finished ({MARKER} says {state}); its files "
                         "may mix two runs: resume it with train.resume=true or run it again")


def _remove_file(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# ---- the lock ------------------------------------------------------------------------------------

class RunLock:
    """An exclusive lock on a run folder, held by this process until ``release``.

    ``acquire`` creates ``.gptft-lock`` and takes ``flock`` on it (freed by the kernel if this
    process dies), writing this process's PID, host and start time for the message another run
    gets. On a file system without ``flock`` the file's PID is checked instead: a lock of a PID
    that no longer runs on this host is stale and taken over.
    """

    def __init__(self, path: Path, fd: int, made_folder: bool):
        self.path, self.fd, self.made_folder = path, fd, made_folder

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> RunLock:
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise GPTFTError(f"output_dir {folder}: not a folder")
        made = not folder.exists()
        path = folder / LOCK
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = cls._acquire(path, made)
            remove_stale_temporaries(folder)  # the folder is ours now: no gptft writes there
            return lock
        except OSError as e:
            raise GPTFTError(f"output_dir {folder}: cannot create {LOCK} there "
                             f"({e.strerror or e})") from None

    @classmethod
    def _acquire(cls, path: Path, made: bool) -> RunLock:
        folder = path.parent
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                from gptft.io import link_error

                raise link_error(path) from None
            try:
                _lock(fd, path)
                if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not a file another run unlinked
                    break
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                if made:
                    _rmdir_if_empty(folder)
                raise
            os.close(fd)
        previous = _holder(fd)
        if previous.get("pid") not in (None, os.getpid()):
            print(f"gptft: took over the stale lock {path} of pid {previous.get('pid')} on "
                  f"{previous.get('host')} (no longer running)", file=sys.stderr)
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
        return cls(path, fd, made)

    def release(self) -> None:
        """Remove the lock file (this process's) and free the lock."""
        if self.fd < 0:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:  # gone, or a folder turned read-only: the kernel frees the flock anyway,
            pass  # and the error that ended the run (naming its own file) is the one to show
        os.close(self.fd)
        self.fd = -1
        if self.made_folder:
            _rmdir_if_empty(self.path.parent)  # a run that failed before writing anything


def _lock(fd: int, path: Path) -> None:
    """flock `fd`, or raise naming the holder; without flock support, check the holder's PID."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        _in_use(path, _holder(fd))
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    holder = _holder(fd)  # no flock here: the PID in the file decides
    if holder.get("pid") is not None and holder.get("pid") != os.getpid() and (
            holder.get("host") != socket.gethostname() or _alive(holder["pid"])):
        _in_use(path, holder)


def _in_use(path: Path, holder: dict) -> None:
    raise GPTFTError(f"output_dir {path.parent} is in use by another gptft run (pid "
                     f"{holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                     f"{holder.get('started', '?')}); wait for it to end or choose another "
                     f"output_dir (if that run is gone, delete {path})")


def _holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def export_folder(run_dir: str | os.PathLike) -> str:
    """Where a run's closing summary suggests exporting it (``gptft export``): beside the run
    folder, named after it (``runs/instruct`` -> ``runs/instruct-hf``), so that each run's
    suggested export is its own folder, not one that an earlier run's export already holds."""
    return f"{Path(run_dir)}-hf"
