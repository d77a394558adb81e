"""The model families the ``Decoder`` covers: one table entry each.

An entry says which Hugging Face ``model_type`` values it reads, the features of the decoder it
fixes, the defaults of the Hugging Face config class for keys a ``config.json`` may leave out,
how its layers are split between full and sliding-window attention, its key map and its
``architectures`` names. ``config_from_hf`` reads a ``config.json`` through the entry,
``to_hf_config`` writes one back. Adding a family = one entry here + its parity test in
``tests/test_models_families.py`` (a tiny checkpoint written by transformers' own class).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gptft.errors import GPTFTError

if TYPE_CHECKING:  # the decoder imports this table, not the other way round
    from gptft.models.decoder import DecoderConfig

FULL, SLIDING = "full_attention", "sliding_attention"
"""Hugging Face's names of the two kinds of attention layer (``layer_types``)."""


def _no_sliding(hf: dict, n_layers: int) -> None:
    return None


def _qwen_layers(hf: dict, n_layers: int) -> list[str] | None:
    """Qwen2/Qwen3: sliding windows (if ``use_sliding_window``) from layer ``max_window_layers`` on."""
    if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return None
    first = hf.get("max_window_layers", 28)
    return [SLIDING if i >= first else FULL for i in range(n_layers)]


def _mistral_layers(hf: dict, n_layers: int) -> list[str] | None:
    """Mistral: every layer slides if ``sliding_window`` is set (it is null from v0.2 on)."""
    return [SLIDING] * n_layers if hf.get("sliding_window", 4096) is not None else None


def _gemma_layers(hf: dict, n_layers: int) -> list[str]:
    """Gemma 3: every ``sliding_window_pattern``-th layer is global, the others slide."""
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    return [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model family maps onto ``DecoderConfig``."""

    name: str
    """``DecoderConfig.architecture``, recorded in ``gptft.json``."""
    model_types: tuple[str, ...]
    """The ``config.json`` ``model_type`` values read as this family."""
    causal_lm: str
    """``architectures`` of an exported language model."""
    sequence_classification: str
    """``architectures`` of an exported sequence classifier."""
    features: dict
    """``DecoderConfig`` fields the family fixes (q/k norm, biases, norm variant ...)."""
    defaults: dict
    """The Hugging Face config class's defaults for keys a ``config.json`` may omit."""
    layer_types: Callable[[dict, int], list[str] | None] = _no_sliding
    """Full / sliding layers when ``config.json`` has no ``layer_types`` list."""
    writes_layer_types: bool = False
    """``to_hf_config`` writes ``layer_types`` (the config class reads it)."""
    activation_key: str = "hidden_act"
    """The ``config.json`` key of the MLP activation."""
    key_map: dict = field(default_factory=lambda: {"model.": "", "lm_head.": "lm_head."})
    """Hugging Face name prefix → gptft's: the names below the prefixes are the same."""

    def from_hf_key(self, key: str) -> str:
        """gptft's name of a Hugging Face tensor name (as it is if no prefix of the map matches)."""
        for hf, ours in self.key_map.items():
            if key.startswith(hf):
                return ours + key[len(hf) :]
        return key

    def to_hf_key(self, key: str) -> str:
        """The Hugging Face name of a gptft tensor name (the longest matching prefix wins)."""
        hf, ours = max(((h, o) for h, o in self.key_map.items() if key.startswith(o)),
                       key=lambda pair: len(pair[1]))
        return hf + key[len(ours) :]


_COMMON_DEFAULTS = dict(rms_norm_eps=1e-6, initializer_range=0.02, attention_dropout=0.0,
                        tie_word_embeddings=False, rope_theta=10000.0, head_dim=None,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("llama",), "LlamaForCausalLM", "LlamaForSequenceClassification",
               features={},
               defaults=dict(_COMMON_DEFAULTS, max_position_embeddings=2048, bos_token_id=1,
                             eos_token_id=2)),
        Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", "Qwen2ForSequenceClassification",
               features=dict(qkv_bias=True, o_bias=False),
               defaults=dict(_COMMON_DEFAULTS, max_position_embeddings=32768),
               layer_types=_qwen_layers, writes_layer_types=True),
        Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", "Qwen3ForSequenceClassification",
               features=dict(qk_norm=True),
               defaults=dict(_COMMON_DEFAULTS, max_position_embeddings=32768, head_dim=128),
               layer_types=_qwen_layers, writes_layer_types=True),
        Family("mistral", ("mistral",), "MistralForCausalLM", "MistralForSequenceClassification",
               features={},
               defaults=dict(_COMMON_DEFAULTS, max_position_embeddings=131072, bos_token_id=1,
                             eos_token_id=2, sliding_window=4096),
               layer_types=_mistral_layers),
        Family("gemma3_text", ("gemma3_text",), "Gemma3ForCausalLM",
               "Gemma3TextForSequenceClassification",
               features=dict(qk_norm=True, norm_unit_offset=True, sandwich_norms=True,
                             embedding_scale=True),
               defaults=dict(_COMMON_DEFAULTS, max_position_embeddings=131072, head_dim=256,
                             rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                             tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                             pad_token_id=0, query_pre_attn_scalar=256, sliding_window=4096,
                             final_logit_softcapping=None),
               layer_types=_gemma_layers, writes_layer_types=True,
               activation_key="hidden_activation"),
    )
}
"""The families, by name."""

BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
"""``config.json`` activation names → ``DecoderConfig.mlp_activation``."""
_HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


def family_of(model_type: object, source: str) -> Family:
    """The family reading this ``model_type``, or one GPTFTError naming the supported ones."""
    if model_type not in BY_MODEL_TYPE:
        supported = ", ".join(["gpt2", *BY_MODEL_TYPE])
        raise GPTFTError(f"{source}: model_type {model_type!r} is not supported; supported: {supported}")
    return BY_MODEL_TYPE[model_type]


def _rope(hf: dict, family: Family, problems: list[str]) -> dict:
    """RoPE fields from either ``rope_parameters`` (transformers 5) or ``rope_theta`` /
    ``rope_scaling`` / ``rope_local_base_freq`` (older ``config.json`` files)."""
    params = hf.get("rope_parameters") or {}
    per_type = isinstance(params, dict) and bool({FULL, SLIDING} & set(params))
    full = (params.get(FULL) or {}) if per_type else params
    local = (params.get(SLIDING) or {}) if per_type else {}
    legacy = hf.get("rope_scaling") or {}
    if not isinstance(full, dict) or not isinstance(legacy, dict):
        problems.append("rope_parameters / rope_scaling must be objects")
        return {}
    kind = full.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if kind not in ("default", "llama3"):
        problems.append(f"rope type {kind!r} is not supported (only default and llama3)")
    if local.get("rope_type", "default") != "default":
        problems.append(f"sliding-layer rope type {local['rope_type']!r} is not supported")
    for p in (full, legacy):
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append("partial_rotary_factor other than 1 is not supported")
    out = dict(rope_theta=full.get("rope_theta", hf.get("rope_theta", family.defaults["rope_theta"])))
    if kind == "llama3":
        source = full if "factor" in full else legacy
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in source]
        if missing:
            problems.append(f"llama3 rope scaling lacks {', '.join(missing)}")
        else:
            out["rope_scaling"] = {k: source[k] for k in keys}
    if "rope_local_base_freq" in family.defaults:
        out["rope_local_theta"] = local.get(
            "rope_theta", hf.get("rope_local_base_freq", family.defaults["rope_local_base_freq"]))
    return out


def decoder_fields(hf: dict, source: str = "config.json") -> dict:
    """The ``DecoderConfig`` fields of a Hugging Face ``config.json`` dict of a supported family
    (``gptft.models.config_from_hf`` builds the config); everything unsupported (mixture of
    experts, other RoPE scalings, attention soft-capping ...) is named in one GPTFTError."""
    family = family_of(hf.get("model_type"), source)
    d = {**family.defaults, **hf}
    problems = []
    if any(d.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        problems.append("mixture-of-experts models are not supported")
    if d.get("attn_logit_softcapping") is not None:
        problems.append("attn_logit_softcapping is not supported")
    if d.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention is not supported")
    act = d.get(family.activation_key, d.get("hidden_act", "silu"))
    if not isinstance(act, str) or act not in ACTIVATIONS:
        problems.append(f"activation {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size")
    problems += [f"missing key {k!r}" for k in required if k not in d]
    integers = (*required, "max_position_embeddings", "num_key_value_heads", "head_dim",
                "sliding_window", "sliding_window_pattern")
    numbers = ("rms_norm_eps", "initializer_range", "attention_dropout", "rope_theta",
               "query_pre_attn_scalar", "final_logit_softcapping", "max_window_layers")
    for keys, kinds, what in ((integers, int, "a positive integer"), (numbers, (int, float), "a number")):
        problems += [f"{k} must be {what} (got {d[k]!r})" for k in keys
                     if d.get(k) is not None and (not isinstance(d[k], kinds) or isinstance(d[k], bool)
                                                  or (kinds is int and d[k] <= 0))]
    rope = _rope(d, family, problems)
    if problems:
        raise GPTFTError(f"{source}: unsupported {family.name} config: " + "; ".join(problems))
    n_layers, n_heads = d["num_hidden_layers"], d["num_attention_heads"]
    layer_types = d.get("layer_types") or family.layer_types(d, n_layers)
    if layer_types is not None and SLIDING not in layer_types:
        layer_types = None
    bias = bool(d.get("attention_bias", False))
    config = dict(
        architecture=family.name, vocab_size=d["vocab_size"],
        context_length=d["max_position_embeddings"], emb_dim=d["hidden_size"], n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=d.get("num_key_value_heads") or n_heads,
        head_dim=d.get("head_dim") or (d["hidden_size"] // n_heads if n_heads > 0 else 0),
        intermediate_size=d["intermediate_size"], norm_eps=d["rms_norm_eps"],
        mlp_activation=ACTIVATIONS[act], qkv_bias=bias, o_bias=bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar"),
        sliding_window=d.get("sliding_window") if layer_types else None,
        layer_types=layer_types, final_logit_softcapping=d.get("final_logit_softcapping"),
        tie_embeddings=bool(d["tie_word_embeddings"]), initializer_range=d["initializer_range"],
        drop_rate=float(d["attention_dropout"] or 0.0), bos_token_id=d["bos_token_id"],
        eos_token_id=d["eos_token_id"], pad_token_id=d["pad_token_id"],
        **rope,
    )
    config.update(family.features)
    return config


def to_hf_config(config: DecoderConfig, classifier: bool = False) -> dict:
    """The ``config.json`` dict of `config` for transformers' class of its family."""
    family = FAMILIES[config.architecture]
    c = config
    hf = {
        "architectures": [family.sequence_classification if classifier else family.causal_lm],
        "model_type": family.model_types[0], "vocab_size": c.vocab_size,
        "max_position_embeddings": c.context_length, "hidden_size": c.emb_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size, "rms_norm_eps": c.norm_eps,
        family.activation_key: _HF_ACTIVATIONS[c.mlp_activation],
        "tie_word_embeddings": c.tie_embeddings, "initializer_range": c.initializer_range,
        "attention_dropout": c.drop_rate, "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
        "rope_theta": c.rope_theta, "torch_dtype": "float32",
    }
    if c.rope_scaling is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", **c.rope_scaling}
    if c.rope_local_theta is not None:
        hf["rope_local_base_freq"] = c.rope_local_theta
    if family.name != "qwen2":  # Qwen2's biases are fixed (q, k, v), not a config key
        hf["attention_bias"] = c.qkv_bias
    if family.name == "llama":
        hf["mlp_bias"] = c.mlp_bias
    if c.query_pre_attn_scalar is not None:
        hf["query_pre_attn_scalar"] = c.query_pre_attn_scalar
    if "final_logit_softcapping" in family.defaults or c.final_logit_softcapping is not None:
        hf["final_logit_softcapping"] = c.final_logit_softcapping
    types = c.layer_types or [FULL] * c.n_layers
    if family.writes_layer_types:
        hf["layer_types"] = types
        hf["sliding_window"] = c.sliding_window
        if family.name in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = SLIDING in types
    elif len(set(types)) > 1:
        raise GPTFTError(f"{family.name} configs cannot mix full and sliding-window layers")
    else:
        hf["sliding_window"] = c.sliding_window if SLIDING in types else None
    return hf
