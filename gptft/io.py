"""File helpers: atomic writes (temporary name, then rename) and checked safetensors reads."""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptft.errors import GPTFTError

if TYPE_CHECKING:  # torch and safetensors are imported where weights are read or written
    import torch


def check_file(path: str | os.PathLike, what: str = "file") -> None:
    """Raise one clear error unless `path` is a regular file (following symlinks), saying what it
    is instead: missing, a folder, or a FIFO / socket / device (which would block or mislead)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise GPTFTError(f"{path}: {what} not found") from None
    except OSError as e:
        raise GPTFTError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if stat.S_ISREG(mode):
        return
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or
            stat.S_ISBLK(mode) else "a special file")
    raise GPTFTError(f"{path}: is {kind}, not a {what}")


WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                          errno.EPERM, errno.EIO, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})
"""Errors of a failed write that are the user's to fix (space, quota, permissions, paths)."""


def write_error(path: str | os.PathLike, error: Exception, what: str = "") -> GPTFTError:
    """The one-line error for a failed write of `path` (disk full, permission denied, a path
    under a file, ...): the file, what failed, and that nothing was replaced."""
    reason = getattr(error, "strerror", None) or str(error).strip()
    if getattr(error, "errno", None) == errno.ENOSPC or "os error 28" in reason:
        reason = "No space left on device (free some space or choose another folder)"
    where = f" the {what}" if what else ""
    error = GPTFTError(f"{path}: cannot write{where}: {reason}; nothing was replaced")
    error.reason = reason  # for a caller that names a larger whole (an export folder)
    return error


def is_write_failure(error: Exception) -> bool:
    """Whether `error`, raised while writing a file, is the disk's or the user's to fix (full,
    read-only, no permission) rather than a bug: an ``OSError`` with such an errno, or the same
    reported by safetensors' (``os error N``) or torch's writers (``file write failed``)."""
    if isinstance(error, OSError):
        return error.errno in WRITE_ERRNOS
    text = str(error)
    return (type(error).__name__ == "SafetensorError" and "os error" in text) or (
        isinstance(error, RuntimeError) and ("file write failed" in text or "unexpected pos" in text))


@contextmanager
def writing(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Turn a failed write under `path` (disk full, no permission, ...) into one ``GPTFTError``."""
    try:
        yield
    except Exception as e:
        if is_write_failure(e):
            raise write_error(path, e, what) from None
        raise


def link_error(path: str | os.PathLike) -> GPTFTError:
    """The one-line refusal to write through a symbolic link where gptft writes its own file."""
    return GPTFTError(f"{path}: is a symbolic link; gptft writes only its own files here, never "
                      "through a link (it could point outside the folder): remove the link")


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` (UTF-8) to `path`, created if missing, never through a symbolic link
    (``O_NOFOLLOW``); a failed write (disk full, read-only) is one line and cuts the file back to
    its length before, so no partial line stays."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, usual_mode())
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_error(path) from None
        raise write_error(path, e) from None
    try:
        size = os.fstat(fd).st_size
        data = text.encode("utf-8")
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise write_error(path, e) from None
    finally:
        os.close(fd)


def make_folder(folder: str | os.PathLike) -> None:
    """``mkdir -p`` with one clear error when a file stands where a folder must be, or the folder
    cannot be made (no permission, read-only disk)."""
    folder = Path(folder)
    for existing in (p for p in (folder, *folder.parents) if p.exists()):
        if not existing.is_dir():
            raise GPTFTError(f"{existing}: is a file, not a folder, so {folder} cannot be created")
        break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(folder, e) from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the body succeeds.

    A crash or kill while writing leaves the previous file (if any) untouched.
    """
    path = Path(path)
    make_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    os.close(fd)
    try:
        with writing(path):  # disk full, quota, permission: one line, the old file kept
            yield Path(tmp)
        try:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, usual_mode())  # mkstemp (and safetensors) make it owner-only: open()'s mode
            os.replace(tmp, path)
        except OSError as e:
            raise write_error(path, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _umask() -> int:
    """The process umask, read once (the first time a file is written), without changing it
    for good: a probe file created with mode 0o777 gets exactly the permissions it allows."""
    fd, probe = tempfile.mkstemp(prefix=".gptft-umask-")
    try:
        os.close(fd)
        os.unlink(probe)
        os.mkdir(probe, 0o777)
        return 0o777 & ~os.stat(probe).st_mode
    finally:
        if os.path.isdir(probe):
            os.rmdir(probe)


def usual_mode(folder: bool = False) -> int:
    """The permissions ``open()`` / ``mkdir()`` would give a new file / folder (0666 / 0777 less the
    umask), for temporary files and folders that ``tempfile`` creates owner-only."""
    return (0o777 if folder else 0o666) & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp_path)` and atomically move the result to `path`."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically (UTF-8)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, indented, UTF-8 (non-ASCII kept readable)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """Save contiguous, unshared CPU copies of `tensors` atomically as safetensors."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=meta))


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU, turning missing or broken files into one clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    check_file(path, "weights file")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise GPTFTError(
            f"{path}: not a readable safetensors file (truncated or corrupted?): {e}"
        ) from None
    check_finite(state, path)
    return state


def check_finite(state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuse weights holding NaN or infinite values, naming the tensors (damaged weights would
    otherwise surface later as a non-finite loss blamed on the learning rate)."""
    import torch

    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise GPTFTError(f"{source}: tensor {', '.join(bad[:3])}{more} holds NaN or infinite values; "
                         "the weights are damaged")


def check_float_weights(state: dict[str, torch.Tensor], names, source: str | os.PathLike) -> None:
    """Refuse integer (or boolean) tensors in `state` under `names` (those that become a model's
    floating-point weights): a file written by hand with int8 / int32 tensors would otherwise be
    converted silently, its values taken as weights (quantized weights need their scales)."""
    bad = [f"{k} ({str(state[k].dtype).removeprefix('torch.')})" for k in names
           if k in state and not (state[k].is_floating_point() or state[k].is_complex())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise GPTFTError(f"{source}: tensor {', '.join(bad[:3])}{more} is not floating point; "
                         "weights must be float32, bfloat16 or float16")


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """``read_json`` of a file that must hold one JSON object (a config, an index, a state)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise GPTFTError(f"{path}: expected a JSON object {{...}}, found a {type(data).__name__}")
    return data


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file with an error that names the file and the line on failure."""
    path = Path(path)
    check_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise GPTFTError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise GPTFTError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise GPTFTError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise GPTFTError(f"{path}: unreadable JSON: nested too deeply") from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise GPTFTError(f"{path}: unreadable JSON: {str(e).split(';')[0]}") from None


RECORD_SUFFIXES = (".json", ".jsonl", ".csv")


def check_output(path: str | os.PathLike, overwrite: bool = False,
                 suffixes: tuple[str, ...] = RECORD_SUFFIXES) -> Path:
    """An output file a command may write: a known suffix, and not an existing file unless
    `overwrite` (a file gptft did not write is never replaced silently)."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise GPTFTError(f"--output {path}: name a {', '.join(suffixes)} file")
    if path.is_symlink():  # replaced by a regular file, or written through: neither is asked for
        raise GPTFTError(f"--output {path}: is a symbolic link; name the file itself")
    if path.is_dir():
        raise GPTFTError(f"--output {path}: is a folder")
    if path.exists() and not overwrite:
        raise GPTFTError(f"--output {path}: exists (add --overwrite to replace it)")
    for parent in (p for p in path.parents if p.exists()):
        if not parent.is_dir():
            raise GPTFTError(f"--output {path}: {parent}: is a file, not a folder")
        break
    if not path.parent.is_dir():
        raise GPTFTError(f"--output {path}: folder {path.parent} does not exist")
    return path


def write_records(path: str | os.PathLike, records: list[dict]) -> None:
    """Records as a JSON array (``.json``), JSON Lines (``.jsonl``) or CSV (``.csv``; a nested
    dict becomes ``key.subkey`` columns), atomically."""
    import csv
    import io

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return write_json(path, records)
    if suffix == ".jsonl":
        return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    rows = [{f"{k}.{sub}" if isinstance(v, dict) else k: x
             for k, v in r.items() for sub, x in (v.items() if isinstance(v, dict) else [(None, v)])}
            for r in records]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for r in rows for k in r)),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, out.getvalue())
