"""Run folders: the files that let a fine-tuned model be rebuilt without the training config.

A run folder (``output_dir``) holds ``model.safetensors`` (the task model's weights under their
module names; the tied ``lm_head.weight`` is stored once as ``wte.weight``) and ``gptft.json``
(the task, what its weights are — ``produces``: ``lm`` or ``classifier`` —, the GPT config, the
tokenizer name, and the task's extras: label names, prompt style). Readers go by ``produces``, not
by the task's name, so a run of any task, registered here or not, is read the same way.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptft.errors import GPTFTError
from gptft.io import load_safetensors, read_json_object, save_safetensors, write_json
from gptft.model import GPT, GPTConfig, empty_model
from gptft.registry import TASKS
from gptft.runfolder import META, WEIGHTS, check_finished

META_FILE, WEIGHTS_FILE = META, WEIGHTS  # the names of earlier versions


def save_model(run_dir: str | os.PathLike, model: nn.Module | dict[str, torch.Tensor],
               meta: dict[str, Any]) -> None:
    """Write ``model.safetensors`` (from a module or its state dict) and ``gptft.json``, atomically."""
    run_dir = Path(run_dir)
    state = model if isinstance(model, dict) else model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    save_safetensors(state, run_dir / WEIGHTS_FILE, {"task": meta["task"]})
    write_json(run_dir / META_FILE, meta)


def load_meta(run_dir: str | os.PathLike, produces: str | None = None,
              require_finished: bool = True) -> dict[str, Any]:
    """Read ``gptft.json``; when `produces` is given (``lm`` or ``classifier``, see
    ``run_produces``), check the run made such a model. A run that has not
    finished (``gptft.runfolder``) is refused unless `require_finished` is false (a run reading
    its own final weights to write its outputs)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GPTFTError(f"{run_dir}: " + ("is a file, not a run folder" if run_dir.exists()
                                           else "run folder not found"))
    if not (run_dir / META_FILE).is_file():
        raise GPTFTError(f"{run_dir}: not a finished gptft run (no {META_FILE}; did training end?)")
    if require_finished:
        check_finished(run_dir)  # a run that failed or still runs may mix two runs' files
    meta = read_json_object(run_dir / META_FILE)
    if produces is not None:
        _check_produces(run_dir, meta, produces)
    return meta


def run_produces(meta: dict[str, Any]) -> str | None:
    """What a run's weights are, ``lm`` or ``classifier``, as its ``gptft.json`` says; for a run
    of an earlier gptft (no ``produces``), what its task produces (``gptft.registry``)."""
    if "produces" in meta:
        return meta["produces"]
    spec = TASKS.get(meta.get("task"))
    return spec.produces if spec is not None else None


def model_config(meta: dict[str, Any], run_dir: str | os.PathLike, **overrides) -> GPTConfig:
    """The ``GPTConfig`` of a run's ``gptft.json`` (plus `overrides`), every field checked, and its
    vocabulary checked against the run's tokenizer; one error names the file and the field."""
    from gptft.tokenizer import Tokenizer

    path = Path(run_dir) / META_FILE
    model, known = meta.get("model"), {f.name for f in dataclasses.fields(GPTConfig)}
    if not isinstance(model, dict):
        raise GPTFTError(f"{path}: 'model' must be an object of model settings (got {model!r})")
    if set(model) - known:
        raise GPTFTError(f"{path}: model: unknown key(s) {', '.join(sorted(set(model) - known))}")
    if not isinstance(meta.get("tokenizer", "gpt2"), str):
        raise GPTFTError(f"{path}: 'tokenizer' must be a tokenizer name (got {meta['tokenizer']!r})")
    try:
        config = GPTConfig(**{**model, **overrides})
    except GPTFTError as e:
        raise GPTFTError(f"{path}: {e}") from None
    check_vocab(config.vocab_size, Tokenizer(meta.get("tokenizer", "gpt2")).vocab_size, path)
    return config


def check_vocab(model_vocab: int, tokenizer_vocab: int, source: str | os.PathLike) -> None:
    """A model whose vocabulary is smaller than the tokenizer's would fail mid-training (an index
    out of range); one that differs at all was not trained with this tokenizer."""
    if model_vocab != tokenizer_vocab:
        raise GPTFTError(f"{source}: vocab_size is {model_vocab:,}, but the tokenizer has "
                         f"{tokenizer_vocab:,} tokens (gptft uses GPT-2's BPE: 50,257)")


def _check_produces(run_dir: Path, meta: dict[str, Any], produces: str) -> None:
    if run_produces(meta) == produces:
        return
    task = meta.get("task")
    wanted = " or ".join(spec.name for spec in TASKS.values() if spec.produces == produces)
    raise GPTFTError(f"{run_dir}: this is {_a(task)} {task} run, not {_a(wanted)} {wanted} run")


def load_state_into(model: nn.Module, run_dir: str | os.PathLike) -> None:
    """Load ``model.safetensors`` of `run_dir` into `model`, reporting mismatches clearly."""
    path = Path(run_dir) / WEIGHTS_FILE
    _load_state(model, load_safetensors(path), path)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    missing, unexpected = [], list(state.keys() - model.state_dict().keys())
    own = model.state_dict()
    for k, v in own.items():
        if k.endswith("lm_head.weight"):
            continue
        if k not in state:
            missing.append(k)
        elif state[k].shape != v.shape:
            missing.append(f"{k} (shape {tuple(state[k].shape)}, expected {tuple(v.shape)})")
    if missing or unexpected:
        raise GPTFTError(f"{path}: weights do not match {META_FILE}: "
                         f"missing/mismatched {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a gptft run folder (it holds ``gptft.json``), not a Hugging Face one."""
    return (Path(path) / META_FILE).is_file()


def load_gpt(run_dir: str | os.PathLike, device: str | torch.device | None = None,
             require_finished: bool = True, **overrides) -> tuple[GPT, dict[str, Any]]:
    """The GPT language model of a run (e.g. instruction tuning), in eval mode, with its metadata.

    Args:
        run_dir: a finished run of a task that produces a language model.
        device: where to build it (default: the CPU); the weights are loaded without a random
            initialisation first.
        require_finished: refuse a run that has not finished (see ``load_meta``).
        **overrides: ``GPTConfig`` fields that do not change the weights (``drop_rate``,
            ``pad_vocab_multiple``: the embedding table's padding rows are zeros).
    """
    meta = load_meta(run_dir, produces="lm", require_finished=require_finished)
    config = model_config(meta, run_dir, **overrides)
    path = Path(run_dir) / WEIGHTS_FILE
    state = load_safetensors(path)
    if len(state.get("wte.weight", ())) >= config.vocab_size:  # re-pad to this config's multiple
        wte = state["wte.weight"][: config.vocab_size]
        pad = wte.new_zeros(config.padded_vocab_size - len(wte), wte.size(1))
        state["wte.weight"] = torch.cat([wte, pad])
    model = empty_model(lambda: GPT(config), device or "cpu")
    _load_state(model, state, path)  # every tensor: none left uninitialised
    return model.eval(), meta


def _a(word: object) -> str:
    return "an" if str(word)[:1] in tuple("aeiou") else "a"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else as torch names it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise GPTFTError(f"device {str(device)!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GPTFTError(f"device {str(device)!r}: no CUDA GPU is available here (use cpu or auto)")
    return device


def load_lm_run(run_dir: str | os.PathLike, device: str | torch.device = "auto"):
    """The model of a finished language-model run (instruction, preference) on `device`, its
    tokenizer and its prompt style: what ``gptft generate`` and ``gptft chat`` need."""
    from gptft.tokenizer import Tokenizer

    model, meta = load_gpt(run_dir, resolve_device(device))
    missing = [k for k in ("tokenizer", "prompt_style") if k not in meta]
    if missing:
        raise GPTFTError(f"{run_dir}: gptft.json lacks {', '.join(missing)}")
    return model, Tokenizer(meta["tokenizer"]), meta["prompt_style"]
