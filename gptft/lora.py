"""LoRA: low-rank adapters on the linear layers of a frozen model (Hu et al., 2021).

A wrapped layer computes ``y = x W^T + b + dropout(x) A^T B^T * scaling`` with ``A`` (rank, in) and
``B`` (out, rank). ``A`` starts Kaiming-uniform and ``B`` at zero, so a freshly wrapped model gives
exactly the base model's outputs.

Scaling convention: ``scaling = alpha / rank``, as in the LoRA paper and ``peft``. (The textbook's
appendix E multiplies by ``alpha`` directly; with its rank 16 and alpha 16, ``alpha / rank = 1``.)

Typical use::

    names = apply_lora(model, cfg)            # wrap targets, freeze everything else
    ...train...
    save_adapter(model, "run/adapter", cfg)   # LoRA tensors + other trainable params (the head)
    load_adapter(fresh_base, "run/adapter")   # rebuild the fine-tuned model
    merge_lora(model)                         # plain nn.Linear layers again, for export
    with adapters_disabled(model): ...        # the base model's outputs, without a copy of it
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptft.config import LoRAConfig
from gptft.errors import GPTFTError
from gptft.io import load_safetensors, read_json, save_safetensors, write_json
from gptft.validation import check

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_LORA_SUFFIXES = (".lora_A", ".lora_B")
_CONFIG_KEYS = ("rank", "alpha", "dropout", "targets")


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: y = x W^T + b + dropout(x) A^T B^T * (alpha / rank).

    A subclass of ``nn.Linear``, so the base parameters keep their names (``weight``, ``bias``)
    and the base model's state-dict keys do not change; the update adds ``lora_A`` (rank, in)
    and ``lora_B`` (out, rank).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int = 16,
        alpha: float = 16.0,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(rank, alpha, dropout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """Wrap `linear`, sharing its weight and bias (no copy); LoRA tensors match their device/dtype."""
        lora = cls.__new__(cls)
        nn.Module.__init__(lora)
        lora.in_features, lora.out_features = linear.in_features, linear.out_features
        lora.register_parameter("weight", linear.weight)
        lora.register_parameter("bias", linear.bias)
        lora.train(linear.training)
        lora._init_lora(rank, alpha, dropout)
        return lora

    def _init_lora(self, rank: int, alpha: float, dropout: float) -> None:
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.disabled = False  # see adapters_disabled
        like = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **like))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform (a=sqrt(5), like nn.Linear's weight); B: zeros (update starts at 0)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A, computed in float32 and returned in the weight's dtype."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return (self.weight.float() + delta).to(self.weight.dtype)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with weight W + scaling * B @ A (a copy of the bias; same device/dtype).

        The new parameters keep the base parameters' ``requires_grad``.
        """
        has_bias = self.bias is not None
        linear = nn.Linear(self.in_features, self.out_features, bias=has_bias, device="meta")
        linear.weight = nn.Parameter(self.merged_weight(), requires_grad=self.weight.requires_grad)
        if has_bias:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, targets: list[str]) -> bool:
    """Whether the qualified module `name` is one of `targets` ("attn.c_attn" matches "h.0.attn.c_attn")."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _is_lora_name(name: str) -> bool:
    return name.endswith(_LORA_SUFFIXES) or name in ("lora_A", "lora_B")


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRALinear modules of `model`, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, every LoRALinear of `model` computes its base layer only: the model is
    the base model it adapts (preference tuning's reference, without a second copy)."""
    layers = list(lora_modules(model).values())
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap every plain nn.Linear named by ``cfg.targets`` in a LoRALinear; freeze all other parameters.

    A target matches a module whose qualified name is the target or ends with ``"." + target``:
    ``"attn.c_attn"`` matches ``h.0.attn.c_attn``, ``"head"`` matches a module named ``head``
    (never ``lm_head``). Afterwards only ``lora_A`` / ``lora_B`` require gradients; in particular
    a freshly initialised classification head is frozen too, so when ``"head"`` is not a LoRA
    target the caller (the trainer) must set ``requires_grad=True`` on the head's parameters.

    Returns:
        The qualified names of the wrapped modules.

    Raises:
        GPTFTError: on an invalid config, if LoRA is already applied, or if no module matched.
    """
    if problems := cfg.problems():
        raise GPTFTError("invalid LoRA config: " + "; ".join(problems))
    if lora_modules(model):
        raise GPTFTError("LoRA is already applied to this model")
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and _matches(name, cfg.targets)]
    if not names:
        raise GPTFTError(f"LoRA targets {cfg.targets} match no nn.Linear layer of the model")
    for name in names:
        linear = model.get_submodule(name)
        _replace(model, name, LoRALinear.from_linear(linear, cfg.rank, cfg.alpha, cfg.dropout))
    for name, p in model.named_parameters():
        p.requires_grad = _is_lora_name(name)
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each LoRALinear by its merged nn.Linear, in place; return `model`.

    A `model` that is itself a LoRALinear cannot be replaced in place: its merged copy is returned.
    """
    if isinstance(model, LoRALinear):
        return model.merged()
    for name, module in lora_modules(model).items():
        _replace(model, name, module.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the lora_A / lora_B tensors of `model`, keyed by their full names."""
    return {k: v for k, v in model.state_dict().items() if _is_lora_name(k)}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter stores: the LoRA tensors plus every other parameter that requires grad."""
    tensors = lora_state_dict(model)
    tensors.update({name: p.detach() for name, p in model.named_parameters()
                    if p.requires_grad and not _is_lora_name(name)})
    return tensors


def save_adapter(
    model: nn.Module, folder: str | os.PathLike, cfg: LoRAConfig, extra: dict[str, Any] | None = None
) -> None:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` into `folder`.

    The safetensors file holds the LoRA tensors and every other trainable parameter (e.g. the
    classification head) under their names, so the folder plus the base model rebuild the
    fine-tuned model. The JSON holds rank, alpha, dropout and targets, plus the JSON-serialisable
    fields of `extra` (e.g. the base model's name). A frozen base weight is never saved: with
    ``"head"`` as a LoRA target the head's base weights must be rebuilt identically by the caller.
    """
    if not lora_modules(model):
        raise GPTFTError("the model has no LoRA layers: call apply_lora first")
    write_adapter(adapter_tensors(model), folder, cfg, extra)


def write_adapter(
    tensors: dict[str, torch.Tensor], folder: str | os.PathLike, cfg: LoRAConfig,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the adapter `tensors` (see ``adapter_tensors``) and the config, as ``save_adapter``."""
    clash = set(extra or {}) & set(_CONFIG_KEYS)
    if clash:
        raise GPTFTError(f"save_adapter: extra may not redefine {', '.join(sorted(clash))}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, folder / ADAPTER_WEIGHTS)
    config = {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "targets": list(cfg.targets)}
    write_json(folder / ADAPTER_CONFIG, {**config, **(extra or {})})


def split_state_dict(
    state: dict[str, torch.Tensor], trainable: set[str], cfg: LoRAConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """From the full state dict of a LoRA model: (adapter tensors, merged plain state dict).

    The adapter holds the LoRA tensors and the other `trainable` entries (e.g. the head); the
    merged state dict has each adapted weight replaced by W + (alpha / rank) * B @ A (in float32,
    back in W's dtype) and no LoRA tensors. Working on a state dict rather than on modules, it
    serves a sharded (FSDP) model too, whose full weights exist only as the gathered state dict.
    """
    adapter = {k: v for k, v in state.items() if _is_lora_name(k) or k in trainable}
    merged = {k: v for k, v in state.items() if not _is_lora_name(k)}
    scaling = cfg.alpha / cfg.rank
    for key in (k for k in state if k.endswith(".lora_A")):
        base = key[: -len(".lora_A")]
        w, a, b = state[f"{base}.weight"], state[key], state[f"{base}.lora_B"]
        merged[f"{base}.weight"] = (w.float() + (b.float() @ a.float()) * scaling).to(w.dtype)
    return adapter, merged


def read_adapter_config(folder: str | os.PathLike) -> tuple[LoRAConfig, dict[str, Any]]:
    """The LoRAConfig of an adapter folder and the `extra` fields saved with it."""
    path = Path(folder) / ADAPTER_CONFIG
    data = read_json(path)
    if not isinstance(data, dict):
        raise GPTFTError(f"{path}: expected a JSON object")
    missing = [k for k in _CONFIG_KEYS if k not in data]
    if missing:
        raise GPTFTError(f"{path}: missing key(s) {', '.join(missing)}")
    cfg = check(LoRAConfig, {k: data[k] for k in _CONFIG_KEYS}, str(path))
    return cfg, {k: v for k, v in data.items() if k not in _CONFIG_KEYS}


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """Apply LoRA with the saved config (unless already applied) and load the adapter's tensors.

    Saved non-LoRA tensors (e.g. the head) are loaded too and left trainable, as when saved.

    Raises:
        GPTFTError: naming the file, when it is missing or corrupt, or when its config or tensors
            (names, shapes) do not match the model.
    """
    cfg, _ = read_adapter_config(folder)
    path = Path(folder) / ADAPTER_WEIGHTS
    layers = lora_modules(model)
    if not layers:
        apply_lora(model, cfg)
    elif any(m.rank != cfg.rank or m.alpha != cfg.alpha for m in layers.values()):
        raise GPTFTError(f"{path}: the model's LoRA layers differ from rank {cfg.rank}, alpha {cfg.alpha}")
    tensors = load_safetensors(path)
    params = dict(model.named_parameters())
    _check_adapter(path, tensors, params, lora_state_dict(model).keys())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
            params[name].requires_grad = True


def _check_adapter(
    path: Path, tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter], lora_names
) -> None:
    problems = [f"missing {k}" for k in lora_names if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in params]
    problems += [f"{k} has shape {tuple(v.shape)}, the model needs {tuple(params[k].shape)}"
                 for k, v in tensors.items() if k in params and v.shape != params[k].shape]
    if problems:
        raise GPTFTError(f"{path}: adapter does not match the model: " + "; ".join(sorted(problems)))
