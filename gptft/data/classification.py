"""Text classification data: labelled files in, balanced seeded splits and padded batches out.

Files are read as UTF-8 (a leading byte-order mark is ignored). Every problem in a file is one
``GPTFTError`` naming the file and the 1-based line (a header row is line 1), e.g.
``data.csv:12: unknown label 'sapm'``; records of a JSON array are named by number instead.
"""

from __future__ import annotations

import difflib
import io
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from gptft.data.config import ClassificationData
from gptft.data.readers import JSON_SUFFIXES, decode, parse_json_records, parse_table, read_text
from gptft.download import seed_file
from gptft.errors import GPTFTError
from gptft.tokenizer import Tokenizer

if TYPE_CHECKING:
    import pandas as pd

SMS_URLS: list[str] = [
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
]
"""The UCI SMS Spam Collection zip, then the book's mirror of the same zip."""
SMS_FILENAME = "sms_spam_collection.zip"
SMS_EMBEDDED = "SMSSpamCollection.tsv"  # the member, as gptft carries it (gptft/assets/data)
SMS_MEMBER = "SMSSpamCollection"

_TSV_SUFFIXES = (".tsv", ".txt", "")


@dataclass
class TextExamples:
    """Texts and their class indices, in the same order."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class ClassificationSplits:
    """The train / validation / test examples and the class names (index -> name)."""

    train: TextExamples
    val: TextExamples
    test: TextExamples
    label_names: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    """Rows of each class as read (before balancing; ready-made splits: the training file's)."""
    notes: list[str] = field(default_factory=list)
    """What a user should see before training: the class counts, balancing, a suspect class."""


@dataclass
class _Rows:
    """Labelled rows of one file, with where each came from (for error messages)."""

    name: str
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)

    def add(self, text: str, label: str, where: str) -> None:
        if not text.strip():
            raise GPTFTError(f"{where}: empty text")
        if not label:
            raise GPTFTError(f"{where}: empty label")
        self.texts.append(text)
        self.labels.append(label)
        self.where.append(where)


# ---- public API ----------------------------------------------------------------------------------


def load_classification_data(cfg: ClassificationData) -> ClassificationSplits:
    """Read the labelled data that ``cfg`` describes and return its three splits.

    With ``train_path`` (and then ``val_path`` and ``test_path`` too) the three files are used as
    given: no balancing, no shuffling. Otherwise the single file ``path`` (unset: the SMS Spam
    Collection gptft carries, else downloaded once into the cache) is balanced if ``balance``
    (every class undersampled to the smallest class's size), shuffled with ``seed`` and cut by the
    ``split`` fractions as the book does: ``train = int(n * f_train)``, ``val = int(n * f_val)``,
    test = the rest (a split whose fraction is 0 stays empty; one with a positive fraction must
    not come out empty).

    Labels are indexed in the order of ``cfg.labels``; unset, in sorted order of the names found in
    the (training) data, numerically when all are integers (SMS: ham -> 0, spam -> 1).

    Raises:
        GPTFTError: a missing, unreadable or malformed file, an unknown label, fewer than two
            classes, or a split that comes out empty; the message names the file and line.
    """
    if cfg.train_path or cfg.val_path or cfg.test_path:
        return _ready_made_splits(cfg)
    rows = _read_labelled(Path(cfg.path), cfg) if cfg.path else _read_sms_default(cfg)
    names = _label_names(cfg, rows)
    import pandas as pd  # imported where used: a second of start-up otherwise

    frame = pd.DataFrame({"text": rows.texts, "label": _label_indices(rows, names, cfg)})
    _check_classes(frame["label"].nunique(), rows.name)
    counts = _counts(names, frame["label"].tolist())
    notes = [f"{rows.name}: {len(frame):,} rows; " + _show_counts(counts)]
    notes += _suspect_classes(counts, rows, cfg)
    if cfg.balance:
        frame = _balance(frame, cfg.seed)
        notes.append(_check_balance(counts, len(frame), rows.name, cfg))
    train, val, test = _split(frame, cfg.split, cfg.seed, rows.name)
    return ClassificationSplits(_examples(train), _examples(val), _examples(test), names, counts, notes)


class ClassificationDataset(Dataset):
    """Tokenized texts (first ``max_length`` tokens kept) with their labels.

    Items are ``{"input_ids": list[int], "label": int}``; ``lengths`` holds each item's token count
    for length-grouped batching.
    """

    def __init__(self, examples: TextExamples, tokenizer: Tokenizer, max_length: int):
        if max_length < 1:
            raise GPTFTError(f"data.max_length: must be > 0 (got {max_length})")
        # With the tokenizer's own special tokens (Llama 3's BOS), as transformers encodes a text
        # for its sequence classifiers; GPT-2 and Qwen add none.
        self.input_ids = [ids[:max_length] for ids in
                          tokenizer.encode_batch(list(examples.texts), add_special_tokens=True)]
        self.labels = list(examples.labels)
        self.lengths = [len(ids) for ids in self.input_ids]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[index], "label": self.labels[index]}


def longest_length(examples: TextExamples, tokenizer: Tokenizer) -> int:
    """Token count of the longest text (0 for no texts)."""
    return max((len(ids) for ids in tokenizer.encode_batch(list(examples.texts), add_special_tokens=True)),
               default=0)


def read_texts_file(path: str | Path, column: str = "text") -> list[str]:
    """Texts to classify from a file, in file order (see ``read_texts``)."""
    return read_texts(path, column)[0]


def read_texts(path: str | Path, column: str = "text") -> tuple[list[str], int]:
    """Texts to classify from a file, in file order, and the number of blank lines skipped.

    ``.csv`` / ``.tsv`` (with a header) and ``.jsonl`` / ``.json``: the `column` column or key, or
    the only one there is (a JSON line may also be a plain string); any other file: one text per
    line, blank lines skipped.

    Raises:
        GPTFTError: a missing, empty, non-UTF-8 or malformed file, or no such column.
    """
    path = Path(path)
    text, name, suffix = read_text(path), str(path), path.suffix.lower()
    skipped = 0
    if suffix in (".csv", ".tsv"):
        texts = _table_texts(text, name, "," if suffix == ".csv" else "\t", column)
    elif suffix in JSON_SUFFIXES:
        texts = [_json_text(obj, where, column) for where, obj in _json_records(text, name)]
    else:
        lines = [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")]
        texts = [line for line in lines if line.strip()]
        skipped = len(lines) - len(texts)
    if not texts:
        raise GPTFTError(f"{name}: no texts (only a header)")
    return texts, skipped


def read_labelled_file(path: str | Path, labels: list[str], text_column: str = "text",
                       label_column: str = "label", fmt: str = "auto",
                       settings: dict[str, str] | None = None) -> TextExamples:
    """A labelled file read as ``data.path`` is (CSV, TSV, JSONL or SMS), its labels indexed
    by `labels` (a finished run's label names); every record kept, in file order. `settings`
    names what sets the ``text``, ``label`` column and the ``format`` in errors (a command's
    flags; default: ``data.text_column``, ...)."""
    cfg = ClassificationData(path=str(path), format=fmt, text_column=text_column,
                             label_column=label_column, labels=list(labels))
    rows = _read_labelled(Path(path), cfg, settings)
    return TextExamples(rows.texts, _label_indices(rows, list(labels), cfg))


# ---- reading files -------------------------------------------------------------------------------


SETTINGS = {"text": "data.text_column", "label": "data.label_column", "format": "data.format"}


def _read_labelled(path: Path, cfg: ClassificationData, settings: dict[str, str] | None = None) -> _Rows:
    text = read_text(path)
    return _parse_labelled(text, str(path), _file_format(path, text, cfg), cfg, settings)


def _file_format(path: Path, text: str, cfg: ClassificationData) -> str:
    """csv, tsv (with a header), sms (``label<TAB>text``, no header) or jsonl."""
    if cfg.format != "auto":
        return cfg.format
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in JSON_SUFFIXES:
        return "jsonl"
    if suffix in _TSV_SUFFIXES:
        first = next((line for line in text.split("\n") if line.strip()), "")
        fields = {f.strip().strip('"') for f in first.split("\t")}
        return "tsv" if fields & {cfg.text_column, cfg.label_column} else "sms"
    raise GPTFTError(f"{path}: cannot tell the format from the extension {suffix!r}; "
                     "set data.format to csv, tsv, jsonl or sms")


def _parse_labelled(text: str, name: str, fmt: str, cfg: ClassificationData,
                    settings: dict[str, str] | None = None) -> _Rows:
    settings = settings or SETTINGS
    if fmt == "sms":
        rows = _sms_rows(text, name, settings)
    elif fmt == "jsonl":
        rows = _json_rows(text, name, cfg.text_column, cfg.label_column, settings)
    else:
        rows = _table_rows(text, name, "," if fmt == "csv" else "\t", cfg.text_column, cfg.label_column,
                           settings)
    if not rows.texts:
        raise GPTFTError(f"{name}: no data rows")
    return rows


def _sms_rows(text: str, name: str, settings: dict[str, str] = SETTINGS) -> _Rows:
    """The SMS Spam Collection layout: ``label<TAB>text`` lines, no header, no quoting."""
    rows = _Rows(name)
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        label, tab, body = line.partition("\t")
        if not tab:
            raise GPTFTError(f"{name}:{number}: expected 'label<TAB>text' (headerless SMS layout), found "
                             f"no tab; for a file with a header set {settings['format']} and "
                             f"{settings['text']} / {settings['label']}")
        rows.add(body, label.strip(), f"{name}:{number}")
    return rows


def quoted(names, limit: int = 80) -> str:
    """Names found in a file, quoted for an error line: each cut to `limit` characters, at most
    ten of them (a binary or garbled file's "header" can be megabytes)."""
    names = list(names)
    shown = [repr(n if len(n) <= limit else n[:limit] + "...") for n in names[:10]]
    return ", ".join(shown) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _missing(found, wanted: dict[str, str], where: str, kind: str, settings: dict[str, str]) -> None:
    """One error naming every column (`kind`: column or key) of `wanted` (``{"text": name, "label":
    name}``) that `found` lacks, and the setting of each."""
    missing = [(role, name) for role, name in wanted.items() if name not in found]
    if missing:
        names = " and ".join(f"no {kind} {name!r} (set {settings[role]})" for role, name in missing)
        raise GPTFTError(f"{where}: {names}; {kind}s found: {quoted(found) or 'none'}")


def _table_rows(text: str, name: str, delimiter: str, text_column: str, label_column: str,
                settings: dict[str, str] = SETTINGS) -> _Rows:
    header, records = parse_table(text, name, delimiter)
    _missing(header, {"text": text_column, "label": label_column}, f"{name}:1", "column", settings)
    t, la = header.index(text_column), header.index(label_column)
    rows = _Rows(name)
    for line, fields in records:
        rows.add(fields[t], fields[la].strip(), f"{name}:{line}")
    return rows


def _table_texts(text: str, name: str, delimiter: str, column: str = "text") -> list[str]:
    header, records = parse_table(text, name, delimiter)
    if column not in header and len(header) != 1:
        raise GPTFTError(f"{name}:1: no {column!r} column (columns found: "
                         f"{', '.join(map(repr, header))})")
    t = header.index(column) if column in header else 0
    for line, fields in records:
        if not fields[t].strip():
            raise GPTFTError(f"{name}:{line}: empty text")
    return [fields[t] for _, fields in records]


def _json_records(text: str, name: str) -> list[tuple[str, Any]]:
    """``(where, value)`` of each JSON line, or of each element (counted from 1) of a JSON array."""
    return [(f"{name}:{r.line}" if r.line is not None else f"{name}: record {r.index + 1}", r.value)
            for r in parse_json_records(text, name)]


def _json_rows(text: str, name: str, text_column: str, label_column: str,
               settings: dict[str, str] = SETTINGS) -> _Rows:
    rows = _Rows(name)
    for where, obj in _json_records(text, name):
        if not isinstance(obj, dict):
            raise GPTFTError(f"{where}: expected a JSON object with keys {text_column!r} and "
                             f"{label_column!r}, found {type(obj).__name__}")
        _missing(obj, {"text": text_column, "label": label_column}, where, "key", settings)
        text_value, label = obj[text_column], obj[label_column]
        if not isinstance(text_value, str):
            raise GPTFTError(f"{where}: {text_column!r} must be a string, found {type(text_value).__name__}")
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise GPTFTError(f"{where}: {label_column!r} must be a string or an integer, found {label!r}")
        rows.add(text_value, str(label).strip(), where)
    return rows


def _json_text(obj: Any, where: str, column: str = "text") -> str:
    if isinstance(obj, dict):
        if column not in obj and len(obj) != 1:
            raise GPTFTError(f"{where}: no key {column!r} (keys found: {', '.join(map(repr, obj))})")
        obj = obj[column] if column in obj else next(iter(obj.values()))
    if not isinstance(obj, str):
        raise GPTFTError(f"{where}: expected a text string, found {type(obj).__name__}")
    if not obj.strip():
        raise GPTFTError(f"{where}: empty text")
    return obj


def _read_sms_default(cfg: ClassificationData) -> _Rows:
    """The SMS Spam Collection gptft carries; without it, from the cache, downloading the zip (or
    raw file) on first use."""
    path = seed_file(SMS_EMBEDDED, SMS_URLS, SMS_FILENAME)
    try:
        name, text = _sms_source(path)
        return _parse_labelled(text, name, "sms", cfg)
    except GPTFTError as e:
        if path.name == SMS_EMBEDDED:
            raise
        raise GPTFTError(f"{e} (downloaded file: delete {path} to download it again, "
                         "or set data.path to a local copy)") from None


def _sms_source(path: Path) -> tuple[str, str]:
    """``(name, text)`` of the ``SMSSpamCollection`` member of a zip, or of the file if not a zip."""
    data = path.read_bytes()
    if not zipfile.is_zipfile(io.BytesIO(data)):
        if data.startswith(b"PK"):
            raise GPTFTError(f"{path}: damaged zip archive")
        return str(path), decode(data, str(path))
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.namelist()
            member = next((m for m in members if PurePosixPath(m).name == SMS_MEMBER), None)
            if member is None:
                raise GPTFTError(f"{path}: no {SMS_MEMBER} in the zip archive (found: {', '.join(members)})")
            content = archive.read(member)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise GPTFTError(f"{path}: damaged zip archive ({e})") from None
    return f"{path}/{member}", decode(content, f"{path}/{member}")


# ---- labels, balancing, splitting ----------------------------------------------------------------


def _label_names(cfg: ClassificationData, rows: _Rows) -> list[str]:
    """``cfg.labels``, or the sorted names in ``rows`` (numerically when all are integers)."""
    if cfg.labels is not None:
        duplicates = sorted({n for n in cfg.labels if cfg.labels.count(n) > 1})
        if duplicates:
            raise GPTFTError(f"data.labels: duplicate names {', '.join(duplicates)}")
        return list(cfg.labels)
    found = set(rows.labels)
    if all(_is_int(n) for n in found):
        return sorted(found, key=int)
    return sorted(found)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _label_indices(rows: _Rows, names: list[str], cfg: ClassificationData) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    known = f"data.labels: {', '.join(names)}" if cfg.labels is not None else (
        f"labels of the training data: {', '.join(names)}")
    out = []
    for label, where in zip(rows.labels, rows.where, strict=True):
        if label not in index:
            raise GPTFTError(f"{where}: unknown label {label!r} ({known})")
        out.append(index[label])
    return out


def _check_classes(count: int, name: str) -> None:
    if count < 2:
        raise GPTFTError(f"{name}: {count} class found; classification needs at least 2 "
                         "(check data.label_column)")


def _counts(names: list[str], labels: list[int]) -> dict[str, int]:
    return {name: labels.count(i) for i, name in enumerate(names)}


def _show_counts(counts: dict[str, int]) -> str:
    return "classes: " + ", ".join(f"{name} {n:,}" for name, n in counts.items())


SUSPECT_RATIO = 0.05
"""A class with fewer rows than this fraction of the next smallest one is suspect: a typo?"""


def _suspect_classes(counts: dict[str, int], rows: _Rows, cfg: ClassificationData) -> list[str]:
    """A class far smaller than the others whose name is close to another class's is an error
    (``Spam`` beside ``spam``: a typo) unless ``data.labels`` lists it; one that is merely far
    smaller is a warning note. A class of ``data.labels`` absent from the data is a note too."""
    notes = [f"warning: class {name!r} of data.labels has no rows in {rows.name}"
             for name, n in counts.items() if n == 0]
    for name, n in counts.items():
        others = [m for other, m in counts.items() if other != name and m > 0]
        if n == 0 or not others or n >= SUSPECT_RATIO * min(others):
            continue
        spots = [w.removeprefix(rows.name + ":").strip()
                 for w, label in zip(rows.where, rows.labels, strict=True) if label == name]
        where = ("line" + "s" * (len(spots) > 1) + " " if all(p.isdigit() for p in spots) else ""
                 ) + ", ".join(spots[:5]) + (f" and {len(spots) - 5} more" if len(spots) > 5 else "")
        bigger = [o for o, m in counts.items() if m >= n / SUSPECT_RATIO]
        close = difflib.get_close_matches(name.lower(), [o.lower() for o in bigger], n=1, cutoff=0.75)
        if close and cfg.labels is None:
            twin = next(o for o in bigger if o.lower() == close[0])
            raise GPTFTError(f"{rows.name}: class {name!r} has {n} row(s) ({where}) against "
                             f"{counts[twin]:,} of {twin!r}: a typo of {twin!r}? Fix the label, or "
                             "list every class in data.labels to keep it")
        notes.append(f"warning: class {name!r} has only {n} row(s) ({where}), far fewer than the "
                     "others: a mistyped label?")
    return notes


def _check_balance(counts: dict[str, int], kept: int, name: str, cfg: ClassificationData) -> str:
    """Refuse a balancing that keeps less than ``cfg.balance_min_kept`` of the rows."""
    total = sum(counts.values())
    smallest = min((n, c) for c, n in counts.items() if n > 0)
    line = (f"balanced to {smallest[0]:,} rows per class (the size of {smallest[1]!r}): "
            f"{kept:,} of {total:,} rows kept ({kept / total:.0%})")
    if kept < cfg.balance_min_kept * total:
        raise GPTFTError(f"{name}: data.balance would keep only {kept:,} of {total:,} rows "
                         f"({kept / total:.1%}; {_show_counts(counts)}), less than "
                         f"data.balance_min_kept={cfg.balance_min_kept:g}; fix a mistyped label, "
                         "set data.balance=false, or lower data.balance_min_kept")
    return line


def _balance(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    import pandas as pd

    """Undersample every class to the smallest class's size, as the book (classes in index order)."""
    smallest = int(frame["label"].value_counts().min())
    parts = [group if len(group) == smallest else group.sample(smallest, random_state=seed)
             for _, group in frame.groupby("label", sort=True)]
    return pd.concat(parts)


def _split(frame: pd.DataFrame, fractions: list[float], seed: int,
           name: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Shuffle with ``seed`` and cut as the book: int(n * train), int(n * val), the rest."""
    frame = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    n = len(frame)
    train_end = int(n * fractions[0])
    val_end = n if fractions[2] == 0 else train_end + int(n * fractions[1])
    parts = frame[:train_end], frame[train_end:val_end], frame[val_end:]
    for split, part, fraction in zip(("train", "val", "test"), parts, fractions, strict=True):
        if part.empty and fraction > 0:
            raise GPTFTError(f"{name}: data.split {fractions} of {n} rows leaves the {split} split empty; "
                             "use more data or larger fractions")
    return parts


def _examples(frame: pd.DataFrame) -> TextExamples:
    return TextExamples([str(t) for t in frame["text"]], [int(y) for y in frame["label"]])


def _ready_made_splits(cfg: ClassificationData) -> ClassificationSplits:
    keys = ("train_path", "val_path", "test_path")
    missing = [f"data.{k}" for k in keys if not getattr(cfg, k)]
    if missing:
        raise GPTFTError(f"ready-made splits need data.train_path, data.val_path and data.test_path "
                         f"(missing: {', '.join(missing)})")
    train, val, test = (_read_labelled(Path(getattr(cfg, k)), cfg) for k in keys)
    names = _label_names(cfg, train)
    splits = [TextExamples(rows.texts, _label_indices(rows, names, cfg)) for rows in (train, val, test)]
    _check_classes(len(set(splits[0].labels)), train.name)
    counts = _counts(names, splits[0].labels)
    notes = [f"{train.name}: {len(train.texts):,} rows; " + _show_counts(counts)]
    notes += _suspect_classes(counts, train, cfg)
    return ClassificationSplits(*splits, label_names=names, counts=counts, notes=notes)
