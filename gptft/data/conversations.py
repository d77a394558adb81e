"""Conversations: the record formats of instruction and preference data, read into one shape.

Every training example becomes a list of messages ``{"role": "system" | "user" | "assistant",
"content": str}``:

* OpenAI's fine-tuning format: ``{"messages": [{"role": "user", "content": "Hi"}, ...]}``;
* ShareGPT: ``{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", ...}]}``
  (``human`` → user, ``gpt`` → assistant, ``system`` → system);
* Alpaca: ``{"instruction", "input"?, "output"}``, one user turn (the instruction, then the input
  after a blank line) and one assistant turn.

Preference pairs: ``{"instruction", "input"?, "chosen": str, "rejected": str}``, ``{"prompt":
str, "chosen": str, "rejected": str}``, ``{"prompt": [messages], "chosen": [one assistant
message], "rejected": [...]}`` (TRL's explicit prompt), or ``{"chosen": [messages], "rejected":
[messages]}`` sharing every message but the last assistant one (TRL's implicit prompt).

Rows come from JSON / JSON Lines (``gptft.data.readers``), Parquet or a Hugging Face dataset
(``datasets.load_from_disk`` for a saved folder, ``datasets.load_dataset`` for a hub name), with
``data.columns`` renaming the source's columns to the keys above. Each bad record is reported
with the file and its line (JSON Lines) or record number, all in one ``GPTFTError``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptft.data.readers import MAX_REPORTED, JsonRecord, parse_json_records, read_text
from gptft.errors import GPTFTError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # save_to_disk's folders
TEMPLATE_STYLES = ("template", "chatml", "llama3")  # prompt styles rendered by a chat template
TEXT_STYLES = ("alpaca", "phi3")  # gptft.prompts' one-turn formats


class Record(dict):
    """A record (a dict, written as it is to ``responses.json``) that remembers where it was read
    (``where``: ``file:line`` or ``file record N``) for the inspector's and the checks' reports."""

    where: str = ""  # "data.jsonl: record 3 (line 4)"

    @classmethod
    def at(cls, value: dict, where: str) -> Record:
        record = cls(value)
        record.where = where
        return record


def locate(row: JsonRecord) -> str:
    """``record 3 (line 4)`` for a JSON Lines record, ``record 3`` otherwise (counting from 0)."""
    return f"record {row.index}" + (f" (line {row.line})" if row.line is not None else "")


# ---- rows: JSON / JSON Lines, Parquet, Hugging Face datasets -------------------------------------

def source_kind(path: str, fmt: str) -> str:
    """``json``, ``jsonl``, ``parquet``, ``disk`` (a ``save_to_disk`` folder) or ``hub``."""
    p = Path(path)
    saved = p.is_dir() and any((p / f).is_file() for f in SAVED_MARKERS)
    if fmt == "hf":  # a saved folder, else what load_dataset reads: a hub name or a data folder
        return "disk" if saved else "hub"
    if fmt != "auto":
        return fmt
    if p.is_dir():
        if saved:
            return "disk"
        raise GPTFTError(f"{path}: is a folder, not a data file (nor one saved by datasets' "
                         "save_to_disk: no dataset_info.json / state.json / dataset_dict.json)")
    if p.suffix.lower() == ".parquet":
        return "parquet"
    return "auto"


def read_rows(path: str, fmt: str = "auto", split: str = "train",
              columns: dict[str, str] | None = None) -> list[JsonRecord]:
    """The rows of a data source as ``JsonRecord`` s (``line`` set for JSON Lines only), with
    `columns` (``{gptft key: source column}``) renamed to gptft's keys.

    Args:
        path: a JSON / JSON Lines / Parquet file, a ``save_to_disk`` folder, or (``fmt="hf"``) a
            Hugging Face hub dataset name.
        fmt: ``auto`` (by content and suffix), ``json``, ``jsonl``, ``parquet`` or ``hf``.
        split: the split of a Hugging Face dataset (or of a saved ``DatasetDict``).
    """
    kind = source_kind(path, fmt)
    if kind in ("auto", "json", "jsonl"):
        text = read_text(path)
        if kind == "auto" and text.lstrip()[0] not in "[{":
            raise GPTFTError(f"{path}: not a list of records (expected a JSON array of objects, "
                             "JSON Lines, a .parquet file or a saved Hugging Face dataset)")
        rows = parse_json_records(text, str(path), kind)
    elif kind == "parquet":
        rows = _parquet_rows(path)
    else:
        rows = _dataset_rows(path, kind, split)
    if not rows:
        raise GPTFTError(f"{path}: no records")
    if columns:
        rows = [JsonRecord(_renamed(r.value, columns), r.index, r.line) for r in rows]
    return rows


def _renamed(value: Any, columns: dict[str, str]) -> Any:
    if not isinstance(value, dict):
        return value
    out = {k: v for k, v in value.items() if k not in columns.values()}
    out.update({key: value[column] for key, column in columns.items() if column in value})
    return out


def _parquet_rows(path: str) -> list[JsonRecord]:
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise GPTFTError(f"{path}: data file not found")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's ArrowInvalid and OSError: a damaged or non-Parquet file
        raise GPTFTError(f"{path}: cannot read as Parquet: {e}") from None
    return [JsonRecord(v, i) for i, v in enumerate(table.to_pylist())]


def _dataset_rows(path: str, kind: str, split: str) -> list[JsonRecord]:
    import datasets

    try:
        if kind == "disk":
            data = datasets.load_from_disk(path)
        else:
            data = datasets.load_dataset(path, split=split)
    except Exception as e:  # no network, unknown name, a damaged folder: say which and why
        where = "saved dataset folder" if kind == "disk" else "Hugging Face dataset"
        raise GPTFTError(f"{path}: cannot load the {where} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise GPTFTError(f"{path}: no split {split!r} (data.dataset_split; it has "
                             f"{', '.join(data)})")
        data = data[split]
    return [JsonRecord(v, i) for i, v in enumerate(data.to_list())]


# ---- one record → messages ------------------------------------------------------------------------

def _text_problem(value: Any, key: str) -> str | None:
    if not isinstance(value, str):
        return f"{key} must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"{key} is empty"
    return None


def parse_messages(value: Any, key: str = "messages") -> tuple[list[dict] | None, str | None]:
    """The messages of an OpenAI-style list (``role`` / ``content``) or a ShareGPT one (``from`` /
    ``value``), checked; or ``(None, problem)``. The conversation itself (an assistant turn...)
    is checked by ``conversation_problem``."""
    if not isinstance(value, list):
        return None, f"{key!r} must be a list of messages, got {type(value).__name__}"
    if not value:
        return None, f"{key!r} is empty"
    sharegpt = key == "conversations"
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            return None, (f"{where} must be an object with {role_key!r} and {text_key!r}, "
                          f"got {type(m).__name__}")
        for k in (role_key, text_key):
            if k not in m:
                return None, f"{where}: missing key {k!r}"
        role = m[role_key]
        known = SHAREGPT_ROLES if sharegpt else ROLES
        if role not in known:
            return None, f"{where}: unknown role {role!r} (known: {', '.join(known)})"
        if (problem := _text_problem(m[text_key], f"{where}.{text_key}")) is not None:
            return None, problem
        message = {"role": SHAREGPT_ROLES[role] if sharegpt else role, "content": m[text_key]}
        if "weight" in m and not sharegpt:  # OpenAI's: 0 leaves an assistant turn out of the loss
            if role != "assistant" or m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                return None, f"{where}.weight: 0 or 1, on an assistant message only (got {m['weight']!r})"
            message["weight"] = m["weight"]
        out.append(message)
    return out, None


def conversation_problem(messages: list[dict]) -> str | None:
    """What makes `messages` unusable for training: a system message after the start, no user or
    no assistant turn, or a conversation that ends with a turn that is not the assistant's."""
    for i, m in enumerate(messages[1:], 1):
        if m["role"] == "system":
            return f"message {i}: a system message only opens a conversation"
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return "no assistant turn: nothing to learn"
    if "user" not in roles:
        return "no user turn"
    if roles[-1] != "assistant":
        return f"ends with a {roles[-1]} turn after the last assistant one (nothing to learn from it)"
    return None


def instruction_messages(record: dict) -> list[dict]:
    """An Alpaca record as one user turn (the instruction, then its input after a blank line) and
    one assistant turn (its output)."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _alpaca_problem(record: dict, outputs: tuple[str, ...] = ("output",)) -> str | None:
    for key in ("instruction", *outputs):
        if key not in record:
            return f"missing key {key!r}"
    for key in ("instruction", "input", *outputs):
        value = record.get(key)
        if not isinstance(value, str) and not (key == "input" and value is None):
            return f"{key!r} must be a string, got {type(value).__name__}"
    return None


def conversation_record(value: Any) -> tuple[dict | None, str | None]:
    """An instruction-data record as ``{"messages", "instruction", "input", "output"}`` (the last
    three for ``responses.json`` and the judge: the last user turn and the last answer), or
    ``(None, problem)``."""
    if not isinstance(value, dict):
        return None, ("expected an object (messages, conversations or instruction/output), "
                      f"got {type(value).__name__}")
    if "messages" in value or "conversations" in value:
        key = "messages" if "messages" in value else "conversations"
        messages, problem = parse_messages(value[key], key)
        if messages is None:
            return None, problem
        if (problem := conversation_problem(messages)) is not None:
            return None, problem
        last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        extra = {k: v for k, v in value.items() if k != key}
        return {**extra, "messages": messages, "instruction": last_user, "input": "",
                "output": messages[-1]["content"]}, None
    if "instruction" in value:
        if (problem := _alpaca_problem(value)) is not None:
            return None, problem
        record = {**value, "input": value.get("input") or ""}
        if not record["output"].strip():
            return None, "'output' is empty: nothing to learn"
        return {**record, "messages": instruction_messages(record)}, None
    return None, ("no 'messages', 'conversations' or 'instruction' key (found "
                  f"{', '.join(map(repr, value)) or 'none'}); data.columns maps other names")


def preference_record(value: Any) -> tuple[dict | None, str | None]:
    """A preference pair as ``{"messages": the shared prompt, "chosen": str, "rejected": str,
    "instruction", "input", "output"}``, or ``(None, problem)``. Identical responses are checked
    by the caller (``data.drop_identical``)."""
    if not isinstance(value, dict):
        return None, f"expected an object with chosen and rejected, got {type(value).__name__}"
    for key in ("chosen", "rejected"):
        if key not in value:
            return None, f"missing key {key!r}"
    chosen, rejected = value["chosen"], value["rejected"]
    if isinstance(chosen, list) or isinstance(rejected, list):
        return _message_pair(value)
    if "instruction" in value:
        problem = _alpaca_problem(value, ("chosen", "rejected"))
        if problem is None and value.get("output") is not None and not isinstance(value["output"], str):
            problem = f"'output' must be a string, got {type(value['output']).__name__}"
        if problem is not None:
            return None, problem
        record = {**value, "input": value.get("input") or ""}
        prompt = instruction_messages({**record, "output": ""})[:1]
    elif "prompt" in value:
        if (problem := _text_problem(value["prompt"], "'prompt'")) is not None:
            return None, problem
        record = {**value, "instruction": value["prompt"], "input": ""}
        prompt = [{"role": "user", "content": value["prompt"]}]
    else:
        return None, "no 'instruction' or 'prompt' key with string chosen / rejected responses"
    for key in ("chosen", "rejected"):
        if (problem := _text_problem(record[key], repr(key))) is not None:
            return None, problem
    return {**record, "messages": prompt, "output": record.get("output") or record["chosen"]}, None


def _message_pair(value: dict) -> tuple[dict | None, str | None]:
    """TRL's conversational pairs: an explicit ``prompt`` list with one assistant message each in
    ``chosen`` / ``rejected``, or whole conversations sharing all but their last message."""
    parsed = {}
    for key in ("chosen", "rejected") + (("prompt",) if "prompt" in value else ()):
        messages, problem = parse_messages(value[key], key)
        if messages is None:
            return None, problem
        parsed[key] = messages
    if "prompt" in parsed:
        prompt = parsed["prompt"]
        for key in ("chosen", "rejected"):
            if len(parsed[key]) != 1 or parsed[key][0]["role"] != "assistant":
                return None, f"{key!r} must be one assistant message (the prompt is in 'prompt')"
    else:
        prompt = parsed["chosen"][:-1]
        if prompt != parsed["rejected"][:-1]:
            return None, "'chosen' and 'rejected' must share every message but the last"
        for key in ("chosen", "rejected"):
            if parsed[key][-1]["role"] != "assistant":
                return None, f"{key!r} must end with an assistant message"
    if not any(m["role"] == "user" for m in prompt):
        return None, "no user turn before the responses"
    if (problem := conversation_problem(prompt + parsed["chosen"][-1:])) is not None:
        return None, problem
    last_user = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    extra = {k: v for k, v in value.items() if k not in ("chosen", "rejected", "prompt")}
    chosen = parsed["chosen"][-1]["content"]
    out = {**extra, "messages": prompt, "chosen": chosen, "rejected": parsed["rejected"][-1]["content"],
           "instruction": last_user, "input": ""}
    return {**out, "output": value.get("output") if isinstance(value.get("output"), str) else chosen}, None


def read_examples(name: str, rows: list[JsonRecord],
                  convert: Callable[[Any], tuple[dict | None, str | None]]) -> list[Record]:
    """Convert every row with `convert`; one ``GPTFTError`` lists the bad ones (file and line or
    record number), the first ``MAX_REPORTED`` and a count of the rest."""
    records, problems = [], []
    for row in rows:
        record, problem = convert(row.value)
        if record is None:
            problems.append(f"{locate(row)}: {problem}")
        else:
            records.append(Record.at(record, f"{name}: {locate(row)}"))
    if problems:
        more = len(problems) - MAX_REPORTED
        shown = problems[:MAX_REPORTED] + ([f"... and {more} more"] if more > 0 else [])
        raise GPTFTError(f"{name}: {len(problems)} invalid record(s) (records count from 0): "
                         + "; ".join(shown))
    return records
