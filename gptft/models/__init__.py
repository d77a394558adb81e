"""The model registry: from a Hugging Face ``config.json``, a run's ``gptft.json`` or a preset name
to GPT-2 (``gptft.model.GPT``) or one of the decoder families (``gptft.models.decoder.Decoder``).

Both offer the same interface (``hidden_states``, ``logits``, ``pooled_hidden_states``,
``selective_cross_entropy``, ``blocks``, ``final_norm``, ``embedding``, ``lm_head``,
``peft_layers``, ``architecture``, ``hf_state_dict`` / ``save_pretrained``), so nothing above
this package names a family's modules.
"""

from __future__ import annotations

import os
from dataclasses import fields

import torch
import torch.nn as nn

from gptft.errors import GPTFTError
from gptft.io import load_safetensors, read_json
from gptft.model import GPT, GPTConfig, empty_model
from gptft.model import PRESETS as GPT2_PRESETS
from gptft.models.decoder import Decoder, DecoderConfig
from gptft.models.families import BY_MODEL_TYPE, FAMILIES, decoder_fields

__all__ = ["ARCHITECTURES", "PRESETS", "Decoder", "DecoderConfig", "build_model", "config_from_dict",
           "hub_repo", "is_gpt2_name", "config_from_hf", "from_pretrained", "preset_config"]

ARCHITECTURES = ("gpt2", *FAMILIES)
"""Every ``architecture`` a run's ``gptft.json`` may record."""

ModelConfig = GPTConfig | DecoderConfig


def config_from_hf(hf: dict, source: str = "config.json", **overrides) -> ModelConfig:
    """The gptft config of a Hugging Face ``config.json`` dict: ``GPTConfig`` for gpt2, a
    ``DecoderConfig`` for the families; one GPTFTError names an unsupported ``model_type`` (and
    the supported ones) or every unsupported feature."""
    if not isinstance(hf, dict):
        raise GPTFTError(f"{source}: expected a JSON object of model settings, found a "
                         f"{type(hf).__name__}")
    if hf.get("model_type", "gpt2") == "gpt2":
        return GPTConfig.from_hf_config(hf, source, **overrides)
    return decoder_config_from_hf(hf, source, **overrides)


def config_from_dict(architecture: str, d: dict, source: str = "gptft.json") -> ModelConfig:
    """The config a run recorded (its ``architecture`` and ``config.to_dict()``)."""
    if architecture not in ARCHITECTURES:
        raise GPTFTError(f"{source}: architecture {architecture!r} is not supported; supported: "
                         + ", ".join(ARCHITECTURES))
    if not isinstance(d, dict):
        raise GPTFTError(f"{source}: the model config must be an object, not {type(d).__name__}")
    cls = GPTConfig if architecture == "gpt2" else DecoderConfig
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise GPTFTError(f"{source}: model: unknown key(s) {', '.join(unknown)}")
    if cls is DecoderConfig and d.get("architecture", architecture) != architecture:
        raise GPTFTError(f"{source}: architecture {architecture!r} but the config says "
                         f"{d['architecture']!r}")
    try:
        return cls(**({**d, "architecture": architecture} if cls is DecoderConfig else d))
    except TypeError as e:  # a required field missing
        raise GPTFTError(f"{source}: {e}") from None
    except GPTFTError as e:
        raise GPTFTError(f"{source}: {e}") from None


def decoder_config_from_hf(hf: dict, source: str = "config.json", **overrides) -> DecoderConfig:
    """A ``DecoderConfig`` from a Hugging Face ``config.json`` dict of a supported family, with
    `overrides` of its fields; one GPTFTError names the file and what is wrong."""
    fields_ = decoder_fields(hf, source)
    try:
        return DecoderConfig(**{**fields_, **overrides})
    except TypeError as e:  # an unknown override
        raise GPTFTError(f"{source}: {e}") from None
    except GPTFTError as e:
        raise GPTFTError(f"{source}: {e}") from None


def build_model(config: ModelConfig) -> nn.Module:
    """A randomly initialised model of `config` (GPT-2 or a decoder family)."""
    return GPT(config) if isinstance(config, GPTConfig) else Decoder(config)


# ---- presets: real shapes, from each model's public config.json ------------------------------

_QWEN3 = dict(model_type="qwen3", vocab_size=151936, max_position_embeddings=40960, head_dim=128,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
              bos_token_id=151643, eos_token_id=151645)
_SMOLLM2 = dict(model_type="llama", vocab_size=49152, max_position_embeddings=8192,
                rope_theta=100_000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                eos_token_id=2)

PRESETS: dict[str, dict] = {
    "qwen3-0.6b": dict(repo="Qwen/Qwen3-0.6B", hf=dict(
        _QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8)),
    "qwen3-1.7b": dict(repo="Qwen/Qwen3-1.7B", hf=dict(
        _QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8)),
    "qwen2.5-0.5b": dict(repo="Qwen/Qwen2.5-0.5B", hf=dict(
        model_type="qwen2", vocab_size=151936, max_position_embeddings=32768, hidden_size=896,
        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)),
    "llama-3.2-1b": dict(repo="meta-llama/Llama-3.2-1B", hf=dict(
        model_type="llama", vocab_size=128256, max_position_embeddings=131072, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, rope_theta=500_000.0, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)),
    "smollm2-135m": dict(repo="HuggingFaceTB/SmolLM2-135M", hf=dict(
        _SMOLLM2, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3)),
    "smollm2-360m": dict(repo="HuggingFaceTB/SmolLM2-360M", hf=dict(
        _SMOLLM2, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
        num_attention_heads=15, num_key_value_heads=5)),
    "tinyllama-1.1b": dict(repo="TinyLlama/TinyLlama-1.1B-Chat-v1.0", hf=dict(
        model_type="llama", vocab_size=32000, max_position_embeddings=2048, hidden_size=2048,
        intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)),
    "mistral-7b-v0.3": dict(repo="mistralai/Mistral-7B-v0.3", hf=dict(
        model_type="mistral", vocab_size=32768, max_position_embeddings=32768, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rope_theta=1_000_000.0, rms_norm_eps=1e-5, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    "gemma-3-1b": dict(repo="google/gemma-3-1b-pt", hf=dict(
        model_type="gemma3_text", vocab_size=262144, max_position_embeddings=32768,
        hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
        sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
        pad_token_id=0)),
}
"""Real-size shapes of popular checkpoints (for random init or planning) and their hub repos.
``gpt2-small`` ... ``gpt2-xl`` are presets too (``gptft.model.PRESETS``)."""


def preset_config(name: str, **overrides) -> ModelConfig:
    """The config of a preset, with overrides of its fields (e.g. ``drop_rate``, ``n_layers``)."""
    if name in GPT2_PRESETS:
        return GPTConfig.from_name(name, **overrides)
    if name not in PRESETS:
        raise GPTFTError(f"unknown model preset {name!r}; presets: "
                         + ", ".join([*GPT2_PRESETS, *PRESETS]))
    hf = dict(PRESETS[name]["hf"])
    for key, hf_key in _HF_SHAPE.items():  # shape keys set the config.json's own, so that what
        if key in overrides:               # follows from them (Gemma's layer pattern) follows
            hf[hf_key] = overrides.pop(key)
    return decoder_config_from_hf(hf, f"preset {name}", **overrides)


_HF_SHAPE = {"n_layers": "num_hidden_layers", "emb_dim": "hidden_size", "n_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
             "intermediate_size": "intermediate_size", "context_length": "max_position_embeddings",
             "vocab_size": "vocab_size"}


# ---- loading checkpoints ----------------------------------------------------------------------


def from_pretrained(name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, **overrides) -> nn.Module:
    """Load a Hugging Face checkpoint, dispatching on its ``config.json`` ``model_type``.

    Args:
        name_or_path: a local folder (``config.json`` + ``model.safetensors``, or shards named
            by ``model.safetensors.index.json``), a preset name (its hub repo), or any hub repo id
            ``org/name``, downloaded with ``huggingface_hub`` (``HF_HUB_OFFLINE=1`` respected).
        device: where to build it (default: the CPU); laid out on ``meta`` first, so no random
            initialisation is computed only to be overwritten.
        dtype: the parameters' dtype; default float32, whatever the checkpoint stores (bf16 and
            fp16 weights are converted).
        **overrides: config fields that do not change weight shapes (``drop_rate``,
            ``pad_vocab_multiple``, ``context_length``).
    """
    from gptft.hub import resolve_pretrained, weight_files

    name = str(name_or_path)
    if name in PRESETS and not os.path.isdir(name):
        name = PRESETS[name]["repo"]
    folder = resolve_pretrained(name)
    source = str(folder / "config.json")
    config = config_from_hf(read_json(folder / "config.json"), source, **overrides)
    if isinstance(config, GPTConfig):
        model = GPT.from_pretrained(folder, device=device, **overrides)
    else:
        state = {}
        for file in weight_files(folder):
            state.update(load_safetensors(file))
        model = empty_model(lambda: Decoder(config), device or "cpu")
        model.load_hf_state_dict(state, source=str(folder))
    return model.to(dtype) if dtype is not None else model


def supported_model_types() -> list[str]:
    return ["gpt2", *BY_MODEL_TYPE]


def is_gpt2_name(name: str) -> bool:
    """Whether `name` is a GPT-2 preset or one of GPT-2's hub repos (its tokenizer: tiktoken's)."""
    from gptft.hub import HUB_REPOS

    return name in GPT2_PRESETS or name in HUB_REPOS or name in HUB_REPOS.values()


def hub_repo(name: str) -> str:
    """The hub repo id of a preset name (GPT-2's or a family's); a repo id or folder as it is."""
    from gptft.hub import HUB_REPOS

    if name in PRESETS:
        return PRESETS[name]["repo"]
    return HUB_REPOS.get(name, name)
