"""Reading users' files: text, CSV/TSV tables and JSON / JSON Lines records, shared by every task
and the judge. Each problem is one ``GPTFTError`` naming the file (and line or record)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gptft.errors import GPTFTError
from gptft.io import check_file

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
MAX_REPORTED = 10  # invalid records listed in one error
QUOTING_HINT = ("quote a field that holds the delimiter, a quote or a line break, "
                "and double the quotes inside it")


def read_text(path: str | Path) -> str:
    """The UTF-8 text of `path` (a leading byte-order mark dropped).

    Raises:
        GPTFTError: the file is missing, not UTF-8 (naming the line and byte), or empty.
    """
    path = Path(path)
    if not path.exists() and not path.is_absolute():
        raise GPTFTError(f"{path}: data file not found (a relative path is read from the working "
                         f"directory {Path.cwd()}, not from the config file's folder)")
    check_file(path, "data file")
    try:
        with open(path, "rb") as f:
            head = f.read(PREFIX)
            check_not_binary(head, str(path))  # before reading (and decoding) it all
            data = head + f.read()
    except OSError as e:
        raise GPTFTError(f"{path}: cannot read the data file: {e.strerror or e}") from None
    return decode(data, str(path))


PREFIX = 1 << 16  # bytes read first to tell text from binary data


def check_not_binary(data: bytes, name: str) -> None:
    """Refuse bytes holding a NUL: no text format has one (a binary file, a disk image, UTF-16).
    Checked on the first bytes of a file before the rest is read, so that a large binary file
    costs neither its size in memory nor a megabyte error line."""
    at = data.find(b"\0")
    if at >= 0:
        line = data.count(b"\n", 0, at) + 1
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff") or 0 < data.count(0) <= len(data) // 2 - 1
        hint = "UTF-16 text? save the file as UTF-8" if utf16 else "not a text file"
        raise GPTFTError(f"{name}:{line}: binary data, a NUL byte at byte offset {at} ({hint})")


def decode(data: bytes, name: str) -> str:
    """Decode UTF-8 bytes read from `name` (a file, or a member of an archive); refuse binary data."""
    check_not_binary(data, name)
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


# ---- CSV / TSV ---------------------------------------------------------------------------------------

def parse_table(text: str, name: str, delimiter: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the ``(line, fields)`` of each data row of a CSV/TSV text; blank lines skipped."""
    kind = "CSV" if delimiter == "," else "TSV"
    # A field may be as long as the whole text (csv's default cap, 128 KiB, refuses a long document
    # that JSON Lines would take); the cap is process-wide, so it is only ever raised.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for fields in reader:
            if fields and not (len(fields) == 1 and not fields[0].strip()):
                if header is None:
                    header = [f.strip() for f in fields]
                elif len(fields) != len(header):
                    raise GPTFTError(f"{name}:{start}: {len(fields)} fields, but the header has "
                                     f"{len(header)}; {QUOTING_HINT}")
                else:
                    records.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise GPTFTError(f"{name}:{start}: malformed {kind} row ({e}); {QUOTING_HINT}") from None
    return header or [], records


# ---- JSON array / JSON Lines ---------------------------------------------------------------------------

@dataclass
class JsonRecord:
    """One record of a JSON array (``line`` None) or of a JSON Lines file (``line`` 1-based)."""

    value: Any
    index: int  # 0-based position among the records
    line: int | None = None


def parse_json_records(text: str, name: str,
                       fmt: Literal["auto", "json", "jsonl"] = "auto") -> list[JsonRecord]:
    """The records of a JSON array (``json``) or of JSON Lines (``jsonl``, blank lines skipped);
    ``auto``: an array when the text starts with ``[``, else JSON Lines."""
    if fmt == "json" or (fmt == "auto" and text.lstrip().startswith("[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GPTFTError(f"{name}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        except (RecursionError, ValueError) as e:
            raise GPTFTError(f"{name}: unreadable JSON: {json_limit(e)}") from None
        if not isinstance(data, list):
            raise _not_a_list(name, data)
        records = [JsonRecord(value, i) for i, value in enumerate(data)]
        check_surrogates(text, name, records)
        return records
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(JsonRecord(json.loads(line), len(records), number))
        except json.JSONDecodeError as e:
            _raise_for_single_document(text, name)
            raise GPTFTError(f"{name}:{number}:{e.colno}: invalid JSON Lines record: {e.msg}; "
                             "expected one JSON value per line") from None
        except (RecursionError, ValueError) as e:
            raise GPTFTError(f"{name}:{number}: unreadable JSON Lines record: {json_limit(e)}") from None
    check_surrogates(text, name, records)
    return records


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_surrogates(text: str, name: str, records: list[JsonRecord]) -> None:
    """Refuse a ``\\udXXX`` escape that is half of a pair without its other half (a lone
    surrogate: no character, and no UTF-8 writer accepts it), naming the record."""
    if not _SURROGATE_ESCAPE.search(text):  # the common case: one scan of the text
        return
    for record in records:
        if _holds_surrogate(record.value):
            where = f":{record.line}" if record.line else ""
            raise GPTFTError(f"{name}{where}: record {record.index} holds a lone surrogate (a "
                             "\\udXXX escape without its pair): not a character; fix the text")


def _holds_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_SURROGATE.search(value))
    if isinstance(value, dict):
        return any(_holds_surrogate(k) or _holds_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_surrogate(v) for v in value)
    return False


def json_limit(error: Exception) -> str:
    """Why Python's JSON reader refused a valid-looking text: nesting past its recursion limit,
    or an integer of more than 4,300 digits."""
    if isinstance(error, RecursionError):
        return "nested too deeply (arrays or objects inside each other thousands of times)"
    return f"{str(error).split(';')[0]}"


def _not_a_list(name: str, data: Any) -> GPTFTError:
    return GPTFTError(f"{name}: not a list of records (found a single JSON {type(data).__name__}; "
                      "expected a JSON array of records or JSON Lines)")


def _raise_for_single_document(text: str, name: str) -> None:
    """A pretty-printed JSON object is not JSON Lines: say so rather than blame a line."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # (JSONDecodeError is a ValueError)
        return
    raise _not_a_list(name, data)


def read_json_records(path: str | Path, fmt: Literal["auto", "json", "jsonl"] = "auto") -> list[JsonRecord]:
    """``parse_json_records`` of a file (``auto``: by content)."""
    return parse_json_records(read_text(path), str(path), fmt)


def check_records(name: str, records: list[JsonRecord], problem: Callable[[Any], str | None]) -> None:
    """Raise one ``GPTFTError`` naming `name` and each record (0-based index, and line in JSON
    Lines) for which `problem` returns a message; the first ``MAX_REPORTED`` and a count of the rest."""
    problems = []
    for r in records:
        if (message := problem(r.value)) is not None:
            where = f"record {r.index}" + (f" (line {r.line})" if r.line is not None else "")
            problems.append(f"{where}: {message}")
    if problems:
        more = len(problems) - MAX_REPORTED
        shown = problems[:MAX_REPORTED] + ([f"... and {more} more"] if more > 0 else [])
        raise GPTFTError(f"{name}: {len(problems)} invalid record(s) (records count from 0): "
                         + "; ".join(shown))
