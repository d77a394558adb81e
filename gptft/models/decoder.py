"""One decoder for today's open families: RMSNorm → attention (GQA, RoPE, q/k norm, sliding window)
→ gated MLP, read top to bottom: config → norm → RoPE → attention → MLP → block → model.

Parameter names are Hugging Face's without the ``model.`` prefix (``embed_tokens``,
``layers.0.self_attn.q_proj``, ``layers.0.mlp.gate_proj``, ``norm``, ``lm_head``), so a
checkpoint maps key for key and LoRA targets are PEFT's names. What differs between families
(Llama 3, Qwen2, Qwen3, Mistral, Gemma 3) is a handful of ``DecoderConfig`` fields; the table
that reads them from a ``config.json`` is ``gptft.models.families``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptft.errors import GPTFTError
from gptft.io import check_float_weights, save_safetensors, write_json
from gptft.model import KVCache, LanguageModel, default_position_ids, sdpa_mask
from gptft.models.families import FULL, SLIDING

"""The two layer types (Hugging Face's ``layer_types`` values)."""


@dataclass
class DecoderConfig:
    """Shape and features of a decoder. Build one with ``gptft.models.config_from_hf`` (from a
    ``config.json``) or ``gptft.models.preset_config``; ``to_dict()`` round-trips."""

    architecture: str
    """The family (``llama``, ``qwen2``, ``qwen3``, ``mistral``, ``gemma3_text``)."""
    vocab_size: int
    """Rows of the embedding table that are tokens."""
    context_length: int
    """Maximum number of positions (Hugging Face's ``max_position_embeddings``)."""
    emb_dim: int
    """Width of the residual stream (``hidden_size``)."""
    n_layers: int
    """Number of blocks."""
    n_heads: int
    """Query heads per block."""
    n_kv_heads: int
    """Key/value heads per block (grouped-query attention); divides ``n_heads``."""
    head_dim: int
    """Width of one head (need not be ``emb_dim / n_heads``)."""
    intermediate_size: int
    """Width of the MLP's gate and up projections."""
    rope_theta: float = 10000.0
    """RoPE base of the full-attention layers (and of the sliding ones without ``rope_local_theta``)."""
    rope_scaling: dict | None = None
    """Llama 3's frequency scaling of ``rope_theta`` layers: ``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``; None for plain RoPE."""
    rope_local_theta: float | None = None
    """RoPE base of the sliding-window layers (Gemma 3: 10,000), unscaled; None: ``rope_theta``."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    norm_unit_offset: bool = False
    """Gemma's RMSNorm scales by ``1 + weight`` (weights initialised to 0)."""
    mlp_activation: str = "silu"
    """Gate activation: ``silu`` (SwiGLU) or ``gelu_tanh`` (GeGLU)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2)."""
    o_bias: bool = False
    """Bias on the attention output projection (Llama's ``attention_bias`` sets both)."""
    mlp_bias: bool = False
    """Biases on the MLP projections (Llama's ``mlp_bias``)."""
    qk_norm: bool = False
    """RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3)."""
    sandwich_norms: bool = False
    """Gemma's extra norms: on the attention output (``post_attention_layernorm``), before the MLP
    (``pre_feedforward_layernorm``) and on its output (``post_feedforward_layernorm``)."""
    embedding_scale: bool = False
    """Multiply embeddings by sqrt(emb_dim), in their dtype (Gemma)."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` (Gemma); None: head_dim."""
    sliding_window: int | None = None
    """Keys a sliding-window layer sees, itself included (Mistral, Gemma 3)."""
    layer_types: list[str] | None = None
    """``full_attention`` / ``sliding_attention`` per layer; None: all full."""
    final_logit_softcapping: float | None = None
    """``cap * tanh(logits / cap)`` on the output logits (Gemma, if configured)."""
    tie_embeddings: bool = False
    """The output head shares the embedding matrix."""
    initializer_range: float = 0.02
    """Standard deviation of the random initialisation."""
    drop_rate: float = 0.0
    """Dropout on the attention weights (Hugging Face's ``attention_dropout``)."""
    pad_vocab_multiple: int = 1
    """Round the embedding table up to a multiple of this; logits are sliced to ``vocab_size``."""
    bos_token_id: int | None = None
    """Kept for ``config.json`` on export."""
    eos_token_id: int | list[int] | None = None
    """Kept for ``config.json`` on export."""
    pad_token_id: int | None = None
    """Kept for ``config.json`` on export; its embedding row starts at zero, as in transformers."""

    def __post_init__(self) -> None:
        if isinstance(self.layer_types, tuple):
            self.layer_types = list(self.layer_types)
        errors = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and not (isinstance(value, int) and not isinstance(value, bool)
                                        and value > 0):
                errors.append(f"{f.name} must be a positive integer (got {value!r})")
            if f.type == "bool" and not isinstance(value, bool):
                errors.append(f"{f.name} must be true or false (got {value!r})")
        if errors:
            raise GPTFTError("invalid model config: " + "; ".join(errors))
        from gptft.models.families import FAMILIES

        if self.architecture not in FAMILIES:
            errors.append(f"architecture {self.architecture!r} is not one of {', '.join(FAMILIES)}")
        if self.n_heads % self.n_kv_heads:
            errors.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.mlp_activation not in ACTIVATIONS:
            errors.append(f"mlp_activation {self.mlp_activation!r} is not one of {', '.join(ACTIVATIONS)}")
        if not 0.0 <= self.drop_rate < 1.0:
            errors.append(f"drop_rate must be in [0, 1) (got {self.drop_rate})")
        for name in ("rope_theta", "norm_eps", "initializer_range"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                errors.append(f"{name} must be a positive number (got {getattr(self, name)!r})")
        if self.rope_scaling is not None:
            need = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            if not isinstance(self.rope_scaling, dict) or need - set(self.rope_scaling):
                errors.append(f"rope_scaling must be a dict with {', '.join(sorted(need))} "
                              f"(got {self.rope_scaling!r})")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - {FULL, SLIDING}:
                errors.append(f"layer_types must list {FULL!r} or {SLIDING!r} for each of the "
                              f"{self.n_layers} layers (got {self.layer_types!r})")
            elif SLIDING in self.layer_types and not (isinstance(self.sliding_window, int)
                                                       and self.sliding_window > 0):
                errors.append(f"sliding-window layers need a positive sliding_window "
                              f"(got {self.sliding_window!r})")
        if errors:
            raise GPTFTError("invalid model config: " + "; ".join(errors))

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types is not None else FULL

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the pieces -----------------------------------------------------------------------------

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as Hugging Face does; with `unit_offset` (Gemma)
    the scale is ``1 + weight`` and the product is taken in float32 too."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """RoPE's (head_dim / 2,) inverse frequencies; with `scaling`, Llama 3's: long wavelengths
    divided by ``factor``, short ones kept, those between interpolated smoothly."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin (B or 1, 1, T, head_dim) for (B or 1, T) positions, computed in float32."""
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, hd) by the angles of (·, 1, T, hd) cos/sin (the halves-paired layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer: int):
        super().__init__()
        C, H, KV, hd = config.emb_dim, config.n_heads, config.n_kv_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = H, KV, hd
        self.scale = (config.query_pre_attn_scalar or hd) ** -0.5
        self.drop_rate = config.drop_rate
        self.window = config.sliding_window if config.layer_type(layer) == SLIDING else None
        self.q_proj = nn.Linear(C, H * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, KV * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, KV * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * hd, C, bias=config.o_bias)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNorm(hd, config.norm_eps, config.norm_unit_offset)

    def _heads(self, proj: nn.Linear, x: torch.Tensor, norm: RMSNorm | None, rope) -> torch.Tensor:
        """(B, T, C) → (B, heads, T, hd), normed per head and rotated if asked."""
        t = proj(x).view(*x.shape[:2], -1, self.head_dim)
        if norm is not None:
            t = norm(t)
        t = t.transpose(1, 2)
        return apply_rope(t, *rope) if rope is not None else t

    def _attend(self, q, k, v, mask, is_causal) -> torch.Tensor:
        """(B, H, T, hd) queries over (B, KV, S, hd) keys/values → (B, H, T, hd)."""
        B, H, T, hd = q.shape
        if T == 1 and q.device.type == "cpu" and not self.training and (not is_causal or k.size(2) == 1):
            # Decoding on the CPU: the query heads of a group become the rows of one product
            # with their shared keys (no copy of k/v per head), cheaper than SDPA at this size.
            q = q.view(B, self.n_kv_heads, H // self.n_kv_heads, hd)
            att = torch.matmul(q, k.transpose(-2, -1)).mul_(self.scale)
            if mask is not None:
                att = att.masked_fill_(~mask, float("-inf"))
            return torch.matmul(att.softmax(dim=-1), v).view(B, H, 1, hd)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.drop_rate if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )

    def forward(self, x, rope, mask, is_causal, kv_cache=None, layer=0, last_only=False):
        """Attention output (B, T, C); with `last_only` (B, 1, C) at the last position only (the
        keys and values of every position still go to `kv_cache`)."""
        B, T, _ = x.shape
        q = self._heads(self.q_proj, x[:, -1:] if last_only else x,
                        self.q_norm, [r[..., -1:, :] for r in rope] if last_only else rope)
        k = self._heads(self.k_proj, x, self.k_norm, rope)
        v = self._heads(self.v_proj, x, None, None)
        if kv_cache is not None:  # (B, KV, past + T, hd)
            k, v = kv_cache.update(layer, k, v)
        if last_only and T > 1:  # the last query sees every key the mask allows
            T = 1
            mask, is_causal = (mask[..., -1:, :] if mask is not None else None), False
        y = self._attend(q, k, v, mask, is_causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward_at(self, x: torch.Tensor, rope, positions: torch.Tensor) -> torch.Tensor:
        """Attention output (B, C) at one position per row: keys/values from all positions up to
        it (within the window), the query only there (right-padded rows)."""
        B, T, _ = x.shape
        rows = torch.arange(B, device=x.device)
        cos, sin = (r.expand(B, -1, -1, -1)[rows, :, positions][:, :, None] for r in rope)
        q = self._heads(self.q_proj, x[rows, positions][:, None], self.q_norm, (cos, sin))
        k = self._heads(self.k_proj, x, self.k_norm, rope)
        v = self._heads(self.v_proj, x, None, None)
        keys = torch.arange(T, device=x.device)
        mask = keys <= positions[:, None]
        if self.window is not None:
            mask &= keys > positions[:, None] - self.window
        y = self._attend(q, k, v, mask[:, None, None, :], False)
        return self.o_proj(y.reshape(B, -1))


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu (tanh)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        C, inner, bias = config.emb_dim, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, inner, bias=bias)
        self.up_proj = nn.Linear(C, inner, bias=bias)
        self.down_proj = nn.Linear(inner, C, bias=bias)
        self.act = ACTIVATIONS[config.mlp_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); Gemma also norms each branch's
    output (its ``post_attention_layernorm`` is that output norm, and ``pre_feedforward_layernorm``
    the MLP's input norm; elsewhere ``post_attention_layernorm`` is the MLP's input norm)."""

    def __init__(self, config: DecoderConfig, layer: int):
        super().__init__()
        C, eps, offset = config.emb_dim, config.norm_eps, config.norm_unit_offset
        self.sandwich = config.sandwich_norms
        self.input_layernorm = RMSNorm(C, eps, offset)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(C, eps, offset)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(C, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(C, eps, offset)
        self.mlp = MLP(config)

    def _residuals(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        if not self.sandwich:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def forward(self, x, rope, mask, is_causal, kv_cache=None, layer=0, last_only=False):
        """(B, T, C) → (B, T, C); with `last_only`, (B, 1, C): the last position's output only."""
        attn = self.self_attn(self.input_layernorm(x), rope, mask, is_causal, kv_cache, layer, last_only)
        return self._residuals(x[:, -1:] if last_only else x, attn)

    def forward_at(self, x: torch.Tensor, rope, positions: torch.Tensor) -> torch.Tensor:
        """The block's output (B, C) at one position per row only."""
        attn = self.self_attn.forward_at(self.input_layernorm(x), rope, positions)
        return self._residuals(x[torch.arange(len(x), device=x.device), positions], attn)


# ---- the model ------------------------------------------------------------------------------


class Decoder(LanguageModel, nn.Module):
    """A decoder-only language model of one of the families in ``gptft.models.families``.

    Offers the same interface as ``gptft.model.GPT`` (``hidden_states``, ``pooled_hidden_states``,
    ``blocks`` ... here; ``logits``, ``forward`` with labels ... from ``gptft.model.LanguageModel``),
    so the rest of gptft never names a family's modules.
    """

    peft_layers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    """The linear layers of a block that LoRA may adapt, under PEFT's names."""
    hf_prefix = "model."
    """Where the body sits in the Hugging Face model (``XForCausalLM.model``)."""
    _no_split_modules = ["DecoderBlock"]
    """The block class, as transformers declares it: Accelerate's FSDP wraps each one."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.emb_dim)
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.emb_dim, config.norm_eps, config.norm_unit_offset)
        self.lm_head = nn.Linear(config.emb_dim, config.padded_vocab_size, bias=False)
        self.tie_weights()
        self._inv_freq: dict[tuple, torch.Tensor] = {}
        self.apply(self._init_weights)
        if config.pad_token_id is not None and 0 <= config.pad_token_id < config.vocab_size:
            with torch.no_grad():  # transformers' Embedding(padding_idx=pad) starts that row at 0
                self.embed_tokens.weight[config.pad_token_id].zero_()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the head if the config ties them."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def architecture(self) -> str:
        """The family name recorded in ``gptft.json``."""
        return self.config.architecture

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.norm

    @property
    def embedding(self) -> nn.Embedding:
        return self.embed_tokens

    @property
    def block_class(self) -> type[nn.Module]:
        return DecoderBlock

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.constant_(module.weight, 0.0 if module.unit_offset else 1.0)

    # ---- forward ------------------------------------------------------------------------------

    def _rope_of(self, layer: int) -> tuple[float, dict | None]:
        c = self.config
        if c.layer_type(layer) == SLIDING and c.rope_local_theta is not None:
            return c.rope_local_theta, None
        return c.rope_theta, c.rope_scaling

    def _ropes(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict:
        """cos/sin for each distinct RoPE of the layers. The inverse frequencies are kept per
        device outside the state dict (a float32 buffer would follow ``model.to(bfloat16)``)."""
        out = {}
        for layer in range(self.config.n_layers):
            theta, scaling = self._rope_of(layer)
            key = (theta, str(scaling))
            if key not in out:
                cached = (*key, position_ids.device)
                if cached not in self._inv_freq:
                    inv_freq = rope_inv_freq(self.config.head_dim, theta, scaling)
                    self._inv_freq[cached] = inv_freq.to(position_ids.device)
                out[key] = rope_cos_sin(self._inv_freq[cached], position_ids, dtype)
        return out

    def _layer_inputs(self, position_ids, dtype, attention_mask, T, past):
        """Per layer: its (cos, sin) and its (mask, is_causal) pair, each computed once per kind."""
        ropes = self._ropes(position_ids, dtype)
        device = self.embed_tokens.weight.device
        masks = {}
        out = []
        for i, block in enumerate(self.layers):
            window = block.self_attn.window
            if window not in masks:
                masks[window] = sdpa_mask(attention_mask, T, past, device, window)
            theta, scaling = self._rope_of(i)
            out.append((ropes[(theta, str(scaling))], masks[window]))
        return out

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.config.embedding_scale:
            x = x * torch.tensor(self.config.emb_dim**0.5, dtype=x.dtype)
        return x

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Final hidden states (B, T, emb_dim), after the final norm; arguments as
        ``GPT.hidden_states`` (masks, positions counted over real tokens, cache, `last_only`)."""
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, T, past, input_ids.device)
        x = self._embed(input_ids)
        inputs = self._layer_inputs(position_ids, x.dtype, attention_mask, T, past)
        last = len(self.layers) - 1
        for i, (block, (rope, (mask, is_causal))) in enumerate(zip(self.layers, inputs)):
            x = block(x, rope, mask, is_causal, kv_cache, i, last_only=last_only and i == last)
        if kv_cache is not None:
            kv_cache.length += T
        return self.norm(x)

    def pooled_hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, emb_dim) at one position per row of right-padded `input_ids`:
        ``hidden_states(input_ids)[arange(B), positions]``, the last block computing its query,
        projection and MLP at those positions only."""
        T = input_ids.size(1)
        x = self._embed(input_ids)
        position_ids = torch.arange(T, device=input_ids.device)[None]
        inputs = self._layer_inputs(position_ids, x.dtype, None, T, 0)
        for block, (rope, (mask, is_causal)) in zip(self.layers[:-1], inputs):
            x = block(x, rope, mask, is_causal)
        return self.norm(self.layers[-1].forward_at(x, inputs[-1][0], positions))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states (..., emb_dim) to vocabulary logits (..., vocab_size), soft-capped
        if the config says so."""
        logits = super().logits(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- Hugging Face checkpoints -------------------------------------------------------------

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy a Hugging Face ``XForCausalLM`` state dict (``model.`` prefix optional) into this
        model, converting dtypes. Every missing, unexpected or wrongly shaped tensor is reported
        in one ``GPTFTError``."""
        family = self._family()
        state = {family.from_hf_key(k): v for k, v in state.items()
                 if not k.endswith("rotary_emb.inv_freq")}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # some tied checkpoints store it too
        own = {k: v for k, v in self.state_dict().items()
               if not (self.config.tie_embeddings and k == "lm_head.weight")}
        check_float_weights(state, own, source)
        problems = [f"missing {k}" for k in own if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in own]
        for k in own.keys() & state.keys():
            want = own[k].shape
            if k in ("embed_tokens.weight", "lm_head.weight"):
                want = (self.config.vocab_size, want[1])
            if tuple(state[k].shape) != tuple(want):
                problems.append(f"{k} has shape {tuple(state[k].shape)}, the config needs {tuple(want)}")
        if problems:  # embeddings, head and final norm first (they show the width), then layers
            problems.sort(key=lambda p: ("layers." in p, p))
            more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
            raise GPTFTError(f"{source}: weights do not match the model config: "
                             + "; ".join(problems[:4]) + more)
        with torch.no_grad():
            for k, v in own.items():
                v[: state[k].shape[0]].copy_(state[k])
                if k in ("embed_tokens.weight", "lm_head.weight"):
                    v[self.config.vocab_size :].zero_()  # padding rows: never a target

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under Hugging Face ``XForCausalLM`` names (``lm_head`` omitted
        when tied: safetensors refuses shared tensors and transformers re-ties it)."""
        family, out = self._family(), {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight" and self.config.tie_embeddings:
                continue
            if k in ("embed_tokens.weight", "lm_head.weight"):
                v = v[: self.config.vocab_size]
            out[family.to_hf_key(k)] = v
        return out

    def _family(self):
        from gptft.models.families import FAMILIES

        return FAMILIES[self.config.architecture]

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` that ``transformers.AutoModelForCausalLM``
        loads."""
        from gptft.models.families import to_hf_config

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.contiguous() for k, v in self.hf_state_dict().items()},
                         folder / "model.safetensors")
        write_json(folder / "config.json", to_hf_config(self.config))
