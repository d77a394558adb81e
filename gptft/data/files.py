"""Reading users' data files: one error naming the file (and line) for missing, empty or non-UTF-8 files."""

from __future__ import annotations

from pathlib import Path

from gptft.errors import GPTFTError


def read_text(path: str | Path) -> str:
    """The UTF-8 text of `path` (a leading byte-order mark dropped).

    Raises:
        GPTFTError: the file is missing, not UTF-8 (naming the line and byte), or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise GPTFTError(f"{path}: data file not found")
    return decode(path.read_bytes(), str(path))


def decode(data: bytes, name: str) -> str:
    """Decode UTF-8 bytes read from `name` (a file, or a member of an archive)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise GPTFTError(f"{name}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at byte offset "
                         f"{e.start}); save the file as UTF-8") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise GPTFTError(f"{name}: empty file")
    return text
