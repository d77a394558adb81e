"""File helpers: atomic writes (temporary name, then rename) and checked safetensors reads."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptft.errors import GPTFTError

if TYPE_CHECKING:  # torch and safetensors are imported where weights are read or written
    import torch


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the body succeeds.

    A crash or kill while writing leaves the previous file (if any) untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, usual_mode())  # mkstemp (and safetensors) make it owner-only: open()'s mode
        os.replace(tmp, path)
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
    if not path.is_file():
        raise GPTFTError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise GPTFTError(
            f"{path}: not a readable safetensors file (truncated or corrupted?): {e}"
        ) from None


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file with an error that names the file and the line on failure."""
    path = Path(path)
    if not path.is_file():
        raise GPTFTError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise GPTFTError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise GPTFTError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


RECORD_SUFFIXES = (".json", ".jsonl", ".csv")


def check_output(path: str | os.PathLike, overwrite: bool = False,
                 suffixes: tuple[str, ...] = RECORD_SUFFIXES) -> Path:
    """An output file a command may write: a known suffix, and not an existing file unless
    `overwrite` (a file gptft did not write is never replaced silently)."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise GPTFTError(f"--output {path}: name a {', '.join(suffixes)} file")
    if path.is_dir():
        raise GPTFTError(f"--output {path}: is a folder")
    if path.exists() and not overwrite:
        raise GPTFTError(f"--output {path}: exists (add --overwrite to replace it)")
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
