"""Run folders: the files that let a fine-tuned model be rebuilt without the training config.

A run folder (``output_dir``) holds ``model.safetensors`` (the task model's weights under their
module names; a tied ``lm_head.weight`` is stored once, as the embedding), ``gptft.json`` (the
task, what its weights are — ``produces``: ``lm`` or ``classifier`` —, the model's ``architecture``
(family) and config, the tokenizer, and the task's extras: label names, prompt style) and, for a
Hugging Face tokenizer, its files in ``tokenizer/``. Readers go by ``produces``, not by the task's
name, so a run of any task, registered here or not, is read the same way. A ``gptft.json``
without ``architecture`` (runs before model families) is GPT-2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptft.errors import GPTFTError
from gptft.io import check_float_weights, load_safetensors, read_json_object, save_safetensors, write_json
from gptft.model import empty_model, tied_names
from gptft.registry import TASKS
from gptft.runfolder import META, WEIGHTS, check_finished

META_FILE, WEIGHTS_FILE = META, WEIGHTS  # the names of earlier versions
TOKENIZER_DIR = "tokenizer"


def save_model(run_dir: str | os.PathLike, model: nn.Module | dict[str, torch.Tensor],
               meta: dict[str, Any], tied: set[str] | None = None) -> None:
    """Write ``model.safetensors`` (from a module or its state dict) and ``gptft.json``, atomically.

    Tied parameters (`tied`, found from a module by ``tied_names``) are stored once, under their
    first name; a state dict without `tied` drops a GPT-2 ``lm_head.weight`` (always tied)."""
    run_dir = Path(run_dir)
    if isinstance(model, dict):
        state = model
        if tied is None:
            tied = {k for k in state if k.endswith("lm_head.weight")
                    and meta.get("architecture", "gpt2") == "gpt2"}
    else:
        state, tied = model.state_dict(), tied_names(model)
    state = {k: v for k, v in state.items() if k not in tied}
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


def model_config(meta: dict[str, Any], run_dir: str | os.PathLike, **overrides):
    """The model config of a run's ``gptft.json`` (its ``architecture`` and ``model``, plus
    `overrides`), every field checked, and its vocabulary checked against the run's tokenizer; one
    error names the file and the field."""
    from gptft.models import config_from_dict

    path = Path(run_dir) / META_FILE
    model, architecture = meta.get("model"), meta.get("architecture", "gpt2")
    if not isinstance(model, dict):
        raise GPTFTError(f"{path}: 'model' must be an object of model settings (got {model!r})")
    if not isinstance(architecture, str):
        raise GPTFTError(f"{path}: 'architecture' must be a model family name (got {architecture!r})")
    if not isinstance(meta.get("tokenizer", "gpt2"), str):
        raise GPTFTError(f"{path}: 'tokenizer' must be a tokenizer name (got {meta['tokenizer']!r})")
    config = config_from_dict(architecture, {**model, **overrides}, str(path))
    check_vocab(config.vocab_size, run_tokenizer(run_dir, meta).vocab_size, path,
                exact=architecture == "gpt2")
    return config


def run_tokenizer(run_dir: str | os.PathLike, meta: dict[str, Any]):
    """The tokenizer a run was trained with: its own ``tokenizer/`` files, else the name in
    ``gptft.json`` (``gpt2``)."""
    from gptft.tokenizer import load_tokenizer

    folder = Path(run_dir) / TOKENIZER_DIR
    return load_tokenizer(folder if folder.is_dir() else meta.get("tokenizer", "gpt2"))


def check_vocab(model_vocab: int, tokenizer_vocab: int, source: str | os.PathLike,
                exact: bool = True) -> None:
    """A model whose vocabulary is smaller than the tokenizer's would fail mid-training (an index
    out of range); a GPT-2 one (`exact`) that differs at all was not trained with this tokenizer.
    Other families often carry unused rows (Qwen3: 151,936 rows for 151,669 tokens)."""
    if model_vocab < tokenizer_vocab or exact and model_vocab != tokenizer_vocab:
        raise GPTFTError(f"{source}: vocab_size is {model_vocab:,}, but the tokenizer has "
                         f"{tokenizer_vocab:,} tokens" + (" (GPT-2's BPE: 50,257)" if exact else ""))


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
    own, tied = model.state_dict(), tied_names(model)
    check_float_weights(state, [k for k, v in own.items() if v.is_floating_point()], path)
    for k, v in own.items():
        if k in tied:
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
             require_finished: bool = True, **overrides) -> tuple[nn.Module, dict[str, Any]]:
    """The language model of a run (e.g. instruction tuning; any family), in eval mode, with its
    metadata.

    Args:
        run_dir: a finished run of a task that produces a language model.
        device: where to build it (default: the CPU); the weights are loaded without a random
            initialisation first.
        require_finished: refuse a run that has not finished (see ``load_meta``).
        **overrides: model config fields that do not change the weights (``drop_rate``,
            ``pad_vocab_multiple``: the embedding table's padding rows are zeros).
    """
    from gptft.models import build_model

    meta = load_meta(run_dir, produces="lm", require_finished=require_finished)
    config = model_config(meta, run_dir, **overrides)
    path = Path(run_dir) / WEIGHTS_FILE
    state = load_safetensors(path)
    model = empty_model(lambda: build_model(config), device or "cpu")
    repad_embeddings(model, state)
    _load_state(model, state, path)  # every tensor: none left uninitialised
    return model.eval(), meta


def repad_embeddings(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Pad (or cut) the saved embedding table and untied head of `state` to `model`'s rows: a run
    saved with one ``pad_vocab_multiple`` loads with another (the padding rows are zeros)."""
    params = dict(model.named_parameters())
    config = getattr(model, "config", None)
    for name, p in params.items():
        if config is None or not name.endswith(("wte.weight", "embed_tokens.weight", "lm_head.weight")):
            continue
        saved = state.get(name)
        if saved is None or saved.dim() != 2 or len(saved) < config.vocab_size or saved.shape == p.shape:
            continue
        rows = saved[: config.vocab_size]
        state[name] = torch.cat([rows, rows.new_zeros(len(p) - len(rows), rows.size(1))])


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
    model, meta = load_gpt(run_dir, resolve_device(device))
    missing = [k for k in ("tokenizer", "prompt_style") if k not in meta]
    if missing:
        raise GPTFTError(f"{run_dir}: gptft.json lacks {', '.join(missing)}")
    return model, run_tokenizer(run_dir, meta), meta["prompt_style"]


def load_chat_run(run_dir: str | os.PathLike, device: str | torch.device = "auto"):
    """``load_lm_run``'s model, and the run's ``gptft.data.chat.ChatFormat`` (its tokenizer and
    prompt style, and the chat template recorded in ``gptft.json``): what ``gptft chat`` and
    ``gptft generate`` need to prompt the model as it was trained."""
    from gptft.data.chat import ChatFormat

    model, tokenizer, style = load_lm_run(run_dir, device)
    template = load_meta(run_dir).get("chat_template")
    if template is not None and not isinstance(template, str):
        raise GPTFTError(f"{Path(run_dir) / META_FILE}: 'chat_template' must be the template's text")
    return model, ChatFormat(style, tokenizer, template)


def saved_generate_config(run_dir: str | os.PathLike):
    """The ``generate`` section of the run's ``config.yaml`` (a ``gptft.config.GenerateConfig``):
    gptft's defaults where the run has no ``config.yaml`` or no such section."""
    import yaml

    from gptft.config import GenerateConfig, safe_yaml
    from gptft.runfolder import CONFIG
    from gptft.validation import check

    path = Path(run_dir) / CONFIG
    try:  # safe_yaml: no alias bombs or recursive anchors from a hand-edited config.yaml
        saved = (safe_yaml(path.read_text(encoding="utf-8"), str(path)) or {}) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise GPTFTError(f"{path}: unreadable ({reason})") from None
    if not isinstance(saved, dict):
        raise GPTFTError(f"{path}: not a saved configuration (a {type(saved).__name__}, not a mapping)")
    return check(GenerateConfig, saved.get("generate") or {}, str(path), "generate")


def job_tokenizer(cfg):
    """The tokenizer of a job (``gptft.tokenizer``): ``model.tokenizer`` if set; else a gptft run's
    own, a Hugging Face folder's ``tokenizer.json``, the hub repo's, or GPT-2's for GPT-2."""
    from gptft.models import hub_repo, is_gpt2_name
    from gptft.tokenizer import load_tokenizer

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    if cfg.checkpoint and cfg.weights == "pretrained":
        folder = Path(cfg.checkpoint)
        if is_run_folder(folder):
            return run_tokenizer(folder, load_meta(folder))
        if (folder / "tokenizer.json").is_file():
            return load_tokenizer(folder)
        return load_tokenizer("gpt2")  # a GPT-2 folder (vocab.json + merges.txt is GPT-2's BPE)
    if is_gpt2_name(cfg.name):
        return load_tokenizer("gpt2")
    return load_tokenizer(hub_repo(cfg.name))
