"""LoRA: low-rank adapters on the linear layers of a frozen model (Hu et al., 2021).

A wrapped layer computes ``y = x W^T + b + dropout(x) A^T B^T * scaling`` with ``A`` (rank, in) and
``B`` (out, rank). ``A`` starts Kaiming-uniform and ``B`` at zero, so a freshly wrapped model gives
exactly the base model's outputs.

Scaling convention: ``scaling = alpha / rank``, as in the LoRA paper and ``peft``. (The textbook's
appendix E multiplies by ``alpha`` directly; with its rank 16 and alpha 16, ``alpha / rank = 1``.)

Typical use::

    names = apply_lora(model, cfg)            # wrap targets, freeze everything else
    ...train...
    save_adapter(model, "run/adapter", cfg)   # a PEFT adapter: LoRA tensors (+ a classifier's head)
    load_adapter(fresh_base, "run/adapter")   # rebuild the fine-tuned model (or load peft's own)
    merge_lora(model)                         # plain nn.Linear layers again, for export
    with adapters_disabled(model): ...        # the base model's outputs, without a copy of it
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptft.config import Job, LoRAConfig, ModelConfig
from gptft.errors import GPTFTError
from gptft.io import load_safetensors, read_json, save_safetensors, write_json
from gptft.validation import check

_LORA_SUFFIXES = (".lora_A", ".lora_B")
# An adapter folder is a PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) plus
# gptft's own fields (gptft_adapter.json).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_META = "gptft_adapter.json"
_PEFT = "base_model.model."  # PEFT's prefix: PeftModel > LoraModel > the transformers model
_BLOCK_LORA = re.compile(r"^(?:.*\.)?((?:h|layers)\.\d+\..+)\.(lora_[AB])$")


@dataclasses.dataclass(frozen=True)
class PeftLayout:
    """Where a family's modules sit in its ``transformers`` model, as PEFT names them."""

    prefix: str  # the body: "transformer." (GPT-2), "model." (Llama, Qwen, Mistral, Gemma)
    final_norm: str  # "ln_f", "norm"
    fan_in_fan_out: bool  # GPT-2's Conv1D layers store (in, out)


LAYOUTS = {"gpt2": PeftLayout("transformer.", "ln_f", True)}
DECODER_LAYOUT = PeftLayout("model.", "norm", False)


def layout(architecture: str | None) -> PeftLayout:
    """The PEFT layout of a family (``gptft.json``'s ``architecture``; absent: GPT-2)."""
    return LAYOUTS.get(architecture or "gpt2", DECODER_LAYOUT)


def find_backbone(model: nn.Module) -> tuple[str, nn.Module]:
    """The language model inside `model` (a module of a gptft family: itself, its ``backbone``,
    or the first such submodule) and its qualified name ("" for `model` itself)."""
    found = next(((n, m) for n, m in model.named_modules() if hasattr(m, "peft_layers")), None)
    return found or ("", model)


def backbone_of(model: nn.Module) -> nn.Module:
    return find_backbone(model)[1]


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """``lora.targets`` checked against the model's family: each a layer of its blocks (a suffix
    such as ``q_proj`` names every layer ending so) or ``head``; unset: every layer of a block."""
    layers = getattr(backbone_of(model), "peft_layers", None)
    if layers is None:  # a module outside gptft's families: the targets as given
        return list(targets or ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
    if targets is None:
        return list(layers)
    unknown = [t for t in targets
               if t != "head" and not any(g == t or g.endswith("." + t) for g in layers)]
    if unknown:
        family = backbone_of(model).architecture
        raise GPTFTError(f"lora.targets: {', '.join(map(repr, unknown))} is not a layer of a "
                         f"{family} block (known: {', '.join(layers)}, head)")
    return list(targets)


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
    targets = resolve_targets(model, cfg.targets)
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and _matches(name, targets)]
    if not names:
        raise GPTFTError(f"LoRA targets {targets} match no nn.Linear layer of the model")
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


def save_adapter(
    model: nn.Module, folder: str | os.PathLike, cfg: LoRAConfig, extra: dict[str, Any] | None = None
) -> None:
    """Write the adapter of `model` into `folder` in PEFT's layout (see ``write_adapter``).

    It holds the LoRA tensors and, for a model with a classification ``head``, the head and the
    final LayerNorm it reads, so the folder plus the base model rebuild the fine-tuned model.
    """
    if not lora_modules(model):
        raise GPTFTError("the model has no LoRA layers: call apply_lora first")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter, _ = split_state_dict(model.state_dict(), trainable, cfg)
    extra = {"architecture": backbone_of(model).architecture, **(extra or {})}
    write_adapter(adapter, folder, cfg, extra)


def write_adapter(
    tensors: dict[str, torch.Tensor], folder: str | os.PathLike, cfg: LoRAConfig,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the adapter `tensors` (from ``split_state_dict``) as a PEFT LoRA adapter folder.

    ``adapter_model.safetensors`` and ``adapter_config.json`` are what
    ``peft.PeftModel.from_pretrained`` reads onto a ``transformers`` GPT-2 (``GPT2LMHeadModel``,
    or ``GPT2ForSequenceClassification`` for a classifier, whose head is saved whole as the
    module ``score``); ``gptft_adapter.json`` holds `extra` (the base model, the run's task,
    labels or prompt style). ``base_model`` in `extra` becomes ``base_model_name_or_path``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    where = layout((extra or {}).get("architecture"))
    peft_tensors = to_peft_names(tensors, where)
    classifier = f"{_PEFT}score.weight" in peft_tensors
    heads = ["score"] + ([where.final_norm] if any(where.final_norm in k for k in peft_tensors) else [])
    targets = sorted({_layer_name(k) for k in tensors if _BLOCK_LORA.match(k)})
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "base_model_name_or_path": (extra or {}).get("base_model"),
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "fan_in_fan_out": where.fan_in_fan_out,
        "bias": "none", "modules_to_save": heads if classifier else None,
        "init_lora_weights": True, "inference_mode": True,
    }
    save_safetensors(peft_tensors, folder / ADAPTER_WEIGHTS)
    write_json(folder / ADAPTER_CONFIG, config)
    write_json(folder / ADAPTER_META, extra or {})


def split_state_dict(
    state: dict[str, torch.Tensor], trainable: set[str], cfg: LoRAConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """From the full state dict of a LoRA model: (adapter tensors, merged plain state dict).

    The adapter holds the LoRA tensors and, for a classifier (a trainable ``head``), the head and
    the final LayerNorm (``ln_f``) it reads, merged, as whole modules; the merged state dict has
    each adapted weight replaced by W + (alpha / rank) * B @ A (in float32, back in W's dtype) and
    no LoRA tensors. Working on a state dict rather than on modules, it serves a sharded (FSDP)
    model too, whose full weights exist only as the gathered state dict.
    """
    merged = {k: v for k, v in state.items() if not _is_lora_name(k)}
    scaling = cfg.alpha / cfg.rank
    for key in (k for k in state if k.endswith(".lora_A")):
        base = key[: -len(".lora_A")]
        w, a, b = state[f"{base}.weight"], state[key], state[f"{base}.lora_B"]
        merged[f"{base}.weight"] = (w.float() + (b.float() @ a.float()) * scaling).to(w.dtype)
    adapter = {k: v for k, v in state.items() if _is_lora_name(k) and not k.startswith("head.")}
    if any(k.startswith("head.") for k in trainable):
        adapter.update({k: v for k, v in merged.items()
                        if k.startswith("head.") or k.endswith(("ln_f.weight", "ln_f.bias"))})
    return adapter, merged


def _layer_name(lora_key: str) -> str:
    """``h.0.attn.c_attn.lora_A`` -> ``attn.c_attn``: the block-relative layer (PEFT's target)."""
    inner = _BLOCK_LORA.match(lora_key)[1]  # h.0.attn.c_attn / layers.0.self_attn.q_proj
    return inner.split(".", 2)[2]


# ---- PEFT's names --------------------------------------------------------------------------------

def to_peft_names(tensors: dict[str, torch.Tensor],
                  where: PeftLayout = LAYOUTS["gpt2"]) -> dict[str, torch.Tensor]:
    """gptft's adapter tensors under the names PEFT gives them on the ``transformers`` model.

    A block's ``...h.N.attn.c_attn.lora_A`` becomes ``base_model.model.transformer.h.N.attn.c_attn
    .lora_A.weight`` (``...model.layers.N.self_attn.q_proj...`` for the other families; the same
    (rank, in) / (out, rank) layouts); a classifier's head becomes ``score`` (which has no bias in
    ``transformers``: GPT-2's head bias is folded into the final LayerNorm's, see
    ``fold_head_bias``, and the other families' heads have none) and GPT-2's ``ln_f`` goes with it.
    """
    out = {}
    norm = where.final_norm
    for name, t in tensors.items():
        if m := _BLOCK_LORA.match(name):
            out[f"{_PEFT}{where.prefix}{m[1]}.{m[2]}.weight"] = t
        elif name.endswith((f"{norm}.weight", f"{norm}.bias")):
            out[f"{_PEFT}{where.prefix}{norm}.{name.rpartition('.')[2]}"] = t
        elif name not in ("head.weight", "head.bias"):
            raise GPTFTError(f"adapter tensor {name}: has no place in a PEFT adapter")
    if "head.weight" in tensors:
        out[f"{_PEFT}score.weight"] = tensors["head.weight"]
        if "head.bias" in tensors:
            norm_bias = next(t for n, t in tensors.items() if n.endswith(f"{norm}.bias"))
            out[f"{_PEFT}{where.prefix}{norm}.bias"] = fold_head_bias(norm_bias, tensors["head.weight"],
                                                                     tensors["head.bias"])
    return out


def fold_head_bias(ln_f_bias: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The final LayerNorm bias that lets a head without bias give ``weight @ h + bias``.

    The head reads ``h = ln_f(x)``, so adding ``d`` with ``weight @ d = bias`` (the least-norm
    solution) to ln_f's bias adds ``bias`` to every logit; this exists when the head's rows are
    independent (``num_classes <= emb_dim``, as a trained head's are).
    """
    w, b = weight.double(), bias.double()
    d = torch.linalg.pinv(w) @ b
    if not torch.allclose(w @ d, b, atol=1e-6 * (1 + b.abs().max().item()), rtol=0):
        raise GPTFTError("the classification head's bias cannot be folded into ln_f "
                         "(its rows are not independent)")
    return (ln_f_bias.double() + d).to(ln_f_bias.dtype)


def from_peft_names(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A PEFT adapter's tensors under `model`'s parameter names (a GPT, or a model holding one and
    maybe a ``head``); names that do not map are kept, for the caller to report."""
    name, body = find_backbone(model)
    hf_prefix = getattr(body, "hf_prefix", "transformer.")
    prefix = f"{name}." if name else ""
    out = {}
    for name, t in tensors.items():
        inner = name.removeprefix(_PEFT)
        if inner == "score.weight":
            out["head.weight"] = t
            if isinstance(getattr(model, "head", None), nn.Linear) and model.head.bias is not None:
                out["head.bias"] = t.new_zeros(t.shape[0])  # a folded bias lives in ln_f
        elif name.startswith(_PEFT + hf_prefix):
            key = prefix + inner.removeprefix(hf_prefix)
            out[key.removesuffix(".weight") if ".lora_" in key else key] = t
        else:
            out[name] = t
    return out


def with_adapter_config(job: Job) -> Job:
    """`job` with its ``lora`` section replaced by the config of ``model.adapter`` (if set)."""
    if job.model.adapter is None:
        return job
    cfg, _ = read_adapter_config(job.model.adapter)
    return dataclasses.replace(job, lora=cfg)


def base_model_name(cfg: ModelConfig) -> str | None:
    """What an adapter of a run with model config `cfg` adapts: the checkpoint folder, the hub
    repo of ``model.name``, or None for a randomly initialised base."""
    from gptft.hub import HUB_REPOS

    if cfg.weights == "random":
        return None
    return cfg.checkpoint or HUB_REPOS.get(cfg.name, cfg.name)


def read_adapter_config(folder: str | os.PathLike) -> tuple[LoRAConfig, dict[str, Any]]:
    """The LoRAConfig of a PEFT LoRA adapter folder and gptft's fields saved with it (if any;
    ``base_model`` defaults to PEFT's ``base_model_name_or_path``).

    PEFT's ``target_modules`` are module-name suffixes (``c_attn``, ``attn.c_proj``); each is
    turned into the gptft layers it names (``c_proj``: both ``attn.c_proj`` and ``mlp.c_proj``).
    """
    path = Path(folder) / ADAPTER_CONFIG
    data = read_json(path)
    if not isinstance(data, dict):
        raise GPTFTError(f"{path}: expected a JSON object")
    if data.get("peft_type") != "LORA":
        raise GPTFTError(f"{path}: peft_type is {data.get('peft_type')!r}; gptft loads LoRA adapters "
                         "(peft_type LORA) only")
    problems = [f"missing key {k}" for k in ("r", "lora_alpha", "target_modules") if k not in data]
    problems += [f"{k}: not supported by gptft" for k in
                 ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform")
                 if data.get(k)]
    if data.get("bias", "none") != "none":
        problems.append(f"bias: {data['bias']!r} is not supported by gptft (only 'none')")
    targets = data.get("target_modules", [])
    if isinstance(targets, str):
        problems.append("target_modules: a regular expression is not supported (list the layers)")
    if problems:
        raise GPTFTError(f"{path}: " + "; ".join(problems))
    fields = {"rank": data["r"], "alpha": data["lora_alpha"], "dropout": data.get("lora_dropout", 0.0),
              "targets": list(dict.fromkeys(targets))}
    cfg = check(LoRAConfig, fields, str(path))
    meta = Path(folder) / ADAPTER_META
    extra = read_json(meta) if meta.is_file() else {}
    extra.setdefault("base_model", data.get("base_model_name_or_path"))
    return cfg, extra


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> None:
    """Apply LoRA with the saved config (unless already applied) and load a PEFT adapter's tensors
    (written by gptft or by ``peft`` on a ``transformers`` GPT-2).

    A classifier's saved ``score`` and ``ln_f`` are loaded into its head and final LayerNorm; the
    LoRA tensors and the head are left trainable, as when saved.

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
    tensors = from_peft_names(load_safetensors(path), model)
    params = dict(model.named_parameters())
    _check_adapter(path, tensors, params, lora_state_dict(model).keys())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
            if _is_lora_name(name) or name.startswith("head."):
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
