"""One validation engine for every config-like input: job YAML, adapter configs, command options.

``build(cls, data)`` turns plain data (parsed YAML or JSON, or a dict of options) into the typed
dataclass `cls`, converting what YAML reads loosely (``5e-5`` as a string, ``no`` as false) and
collecting every problem, unknown key (with a "did you mean" suggestion), wrong type and value out
of range (a dataclass's ``problems()``), each as ``"dotted.key: what is wrong"``. ``check`` raises
them as one ``GPTFTError``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

from gptft.errors import GPTFTError

# YAML 1.1 reads these words as booleans; where a choice of strings expects one, take the word back.
_YAML_WORDS = {False: ("no", "false", "off"), True: ("yes", "true", "on")}


def build(cls: type, data: Any, prefix: str = "") -> tuple[Any, list[str]]:
    """An instance of the dataclass `cls` from `data` (a mapping), and the problems found.

    A field whose value is wrong keeps its default, so the instance is always usable for
    reporting; callers raise when the list is not empty.
    """
    errors: list[str] = []
    return _build(cls, data, prefix, errors), errors


def check(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    """``build``, raising one ``GPTFTError`` (naming `source`) when anything is wrong."""
    obj, errors = build(cls, data, prefix)
    if errors:
        raise GPTFTError(f"{source}: " + "; ".join(errors))
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in sorted(data.keys() - set(names), key=str):
        errors.append(f"{_join(prefix, str(key))}: {unknown_key(str(key), names, prefix)}")
    values = {}
    for name in (n for n in names if n in data):
        before = len(errors)
        value = _check_value(data[name], hints[name], _join(prefix, name), errors)
        if len(errors) == before:  # keep the default where the value is wrong
            values[name] = value
    obj = cls(**values)
    if hasattr(obj, "problems"):
        errors += [_join(prefix, p) for p in obj.problems()]
    return obj


def unknown_key(key: str, known: list[str], prefix: str = "") -> str:
    """``unknown key; did you mean train.epochs? (known: ...)``."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {_join(prefix, close[0])}?" if close else ""
    return f"unknown key{hint} (known: {', '.join(sorted(known))})"


def _check_value(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """`value` converted to type `tp`, or a problem recorded for `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, tp, key, errors)
    if origin is Literal:
        return _check_literal(value, typing.get_args(tp), key, errors)
    if origin is list:
        return _check_list(value, typing.get_args(tp)[0], key, errors)
    if origin is dict:
        return _check_dict(value, typing.get_args(tp), key, errors)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    return _check_scalar(value, tp, key, errors)


def _check_union(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in (a for a in args if a is not type(None)):
        sub: list[str] = []
        out = _check_value(value, arg, key, sub)
        if not sub:
            return out
    errors.append(f"{key}: expected {type_name(tp)}, got {value!r}")
    return value


def _check_literal(value: Any, choices: tuple, key: str, errors: list[str]) -> Any:
    if isinstance(value, bool) and value not in choices:
        value = next((w for w in _YAML_WORDS[value] if w in choices), value)
    if value not in choices:
        errors.append(f"{key}: must be one of {', '.join(map(str, choices))} (got {value!r})")
    return value


def _check_list(value: Any, item: Any, key: str, errors: list[str]) -> Any:
    if not isinstance(value, list):
        errors.append(f"{key}: expected a list of {type_name(item)}, got {value!r}")
        return value
    return [_check_value(v, item, f"{key}[{i}]", errors) for i, v in enumerate(value)]


def _check_dict(value: Any, types_: tuple, key: str, errors: list[str]) -> Any:
    if not isinstance(value, dict):
        errors.append(f"{key}: expected a mapping of {type_name(types_[0])} to {type_name(types_[1])}, "
                      f"got {value!r}")
        return value
    return {_check_value(k, types_[0], f"{key} (key {k!r})", errors):
            _check_value(v, types_[1], f"{key}.{k}", errors) for k, v in value.items()}


def _check_scalar(value: Any, tp: type, key: str, errors: list[str]) -> Any:
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "5e-5" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}[tp]
    if not ok:
        errors.append(f"{key}: expected {type_name(tp)}, got {value!r}")
        return value
    if tp is float and not math.isfinite(value):
        errors.append(f"{key}: must be a finite number (got {value!r})")
    return float(value) if tp is float else value


def type_name(tp: Any) -> str:
    """How a type reads in an error message: ``an integer``, ``a number or null``..."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        key, value = typing.get_args(tp)
        return f"mapping of {type_name(key)} to {type_name(value)}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


# ---- range checks for ``problems()`` ---------------------------------------------------------------

def positive(obj: Any, *names: str) -> list[str]:
    """Problems for the fields of `obj` among `names` that are set and not > 0."""
    return [f"{n}: must be > 0 (got {getattr(obj, n)})" for n in names
            if getattr(obj, n) is not None and getattr(obj, n) <= 0]


def non_negative(obj: Any, *names: str) -> list[str]:
    """Problems for the fields of `obj` among `names` that are set and negative."""
    return [f"{n}: must be >= 0 (got {getattr(obj, n)})" for n in names
            if getattr(obj, n) is not None and getattr(obj, n) < 0]


def in_range(obj: Any, name: str, low: float, high: float, *, high_open: bool = False) -> list[str]:
    """A problem when the field `name` of `obj` is set and outside [low, high] (or [low, high))."""
    value = getattr(obj, name)
    if value is None or (low <= value < high if high_open else low <= value <= high):
        return []
    return [f"{name}: must be in [{low}, {high}{')' if high_open else ']'} (got {value})"]


def seed_problems(obj: Any, *names: str) -> list[str]:
    """Problems for seeds outside what NumPy and PyTorch take alike: 0 to 2**32 - 1."""
    return [f"{n}: must be in [0, 2**32 - 1] (got {getattr(obj, n)})" for n in names
            if getattr(obj, n) is not None and not 0 <= getattr(obj, n) < 2**32]


def split_problems(split: list[float]) -> list[str]:
    """Problems of a (train, val, test) fractions list: each split is needed (the validation one
    picks the best weights, the test one gives the final metrics), so none may be 0."""
    if len(split) != 3 or any(f < 0 for f in split) or abs(sum(split) - 1) > 1e-6:
        return [f"split: three fractions (train, val, test) > 0 summing to 1 (got {split})"]
    empty = [name for name, f in zip(("train", "validation", "test"), split, strict=True) if f == 0]
    if empty:
        return [f"split: the {' and '.join(empty)} fraction must be > 0 (got {split}): validation "
                "picks the best weights and the test split gives the final metrics"]
    return []
