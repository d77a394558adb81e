"""GPT-2 in one file: attention → MLP → block → config → model → Hugging Face checkpoints.
(``LanguageModel``, before the model, is what every family's model shares.)

Parameter names follow OpenAI's / Hugging Face's GPT-2 (``wte``, ``h.0.attn.c_attn`` ...), so a
Hugging Face ``model.safetensors`` maps onto this model key for key; only GPT-2's ``Conv1D``
weights need a transpose (they are stored as (in, out), ``nn.Linear`` keeps (out, in)).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptft.errors import GPTFTError
from gptft.io import check_float_weights, load_safetensors, read_json, save_safetensors, write_json

IGNORE_INDEX = -100
"""A label that asks for no loss (PyTorch's and Hugging Face's convention)."""
GPT2_EOT_ID = 50256
"""GPT-2's end-of-text token: its BOS, EOS and (in gptft) padding."""


class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding.

    Storage for ``max_length`` positions is allocated on first use with the dtype and device of
    the first keys written. ``GPT.forward`` appends to it and advances ``length``.
    """

    def __init__(self, batch_size: int, max_length: int):
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store this step's (B, H, T, hd) keys/values of `layer`; return all of them so far."""
        if layer == len(self.k):  # first use of this layer: allocate
            B, H, _, hd = k.shape
            shape = (B, H, self.max_length, hd)
            self.k.append(k.new_zeros(shape))
            self.v.append(v.new_zeros(shape))
        end = self.length + k.size(2)
        if end > self.max_length:
            raise ValueError(f"KV cache full: {end} positions > max_length {self.max_length}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def share_prefix(self, prefix: KVCache, starts: list[int]) -> None:
        """Write the keys/values of `prefix` (one row, ``prefix.length`` positions) into every row,
        row ``i`` from position ``starts[i]`` on (after its left padding), and advance ``length``
        to the first position that not every row has: ``min(starts) + prefix.length``.

        A prompt prefix shared by a batch is thus computed once; the rest of each prompt is then
        fed from ``length`` on, with a padding mask (rows whose prefix ends later recompute a few
        of its positions, to the same values).
        """
        if self.length or len(starts) != self.batch_size or prefix.batch_size != 1:
            raise ValueError("share_prefix needs an empty cache and one start per row")
        p = prefix.length
        if max(starts) + p > self.max_length:
            raise ValueError(f"KV cache full: {max(starts) + p} positions > max_length {self.max_length}")
        by_start: dict[int, list[int]] = {}
        for row, start in enumerate(starts):
            by_start.setdefault(start, []).append(row)
        for source, own in ((prefix.k, self.k), (prefix.v, self.v)):
            for layer, t in enumerate(source):
                own.append(t.new_zeros((self.batch_size, t.size(1), self.max_length, t.size(3))))
                for start, rows in by_start.items():
                    index = torch.tensor(rows, device=t.device)
                    own[layer][index, :, start : start + p] = t[:, :, :p]
        self.length = min(starts) + p

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a (B',) index tensor), in this order: e.g. to drop rows that
        finished decoding. The positions written so far are copied into storage for B' rows."""
        for cached in (self.k, self.v):
            for layer, t in enumerate(cached):
                kept = t.new_empty((len(rows), *t.shape[1:]))
                kept[:, :, : self.length] = t[rows, :, : self.length]
                cached[layer] = kept
        self.batch_size = len(rows)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.emb_dim
        self.n_heads = config.n_heads
        self.drop_rate = config.drop_rate
        self.c_attn = nn.Linear(C, 3 * C, bias=config.qkv_bias)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(C, C)
        self.resid_dropout = nn.Dropout(config.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Attention output (B, T, C); with `last_only` (B, 1, C) at the last position only (the
        keys and values of every position still go to `kv_cache`)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:  # (B, H, past + T, hd)
            k, v = kv_cache.update(layer, k, v)
        if last_only and T > 1:  # the last query sees every key the mask allows
            q, T = q[:, :, -1:], 1
            mask, is_causal = (mask[..., -1:, :] if mask is not None else None), False
        if T == 1 and q.device.type == "cpu" and not self.training and (not is_causal or k.size(2) == 1):
            # One query per row (decoding) on the CPU: two batched products and a softmax cost
            # less than SDPA's kernel at this size.
            att = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(k.size(-1)))
            if mask is not None:
                att = att.masked_fill_(~mask, float("-inf"))
            y = torch.matmul(att.softmax(dim=-1), v)  # (B, H, 1, hd)
        else:
            # Flash / memory-efficient kernels when mask is None and is_causal=True.
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal,
                dropout_p=self.drop_rate if self.training else 0.0,
            )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


    def forward_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Attention output (B, C) at one position per row: keys/values from all positions up to it,
        the query only there (right-padded rows: later positions are padding)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q[torch.arange(B, device=x.device), positions].view(B, 1, self.n_heads, C // self.n_heads)
        q, k, v = (t.view(B, -1, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        mask = (torch.arange(T, device=x.device) <= positions[:, None])[:, None, None, :]  # (B,1,1,T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.drop_rate if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.reshape(B, C)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.emb_dim, 4 * config.emb_dim)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.emb_dim, config.emb_dim)
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.emb_dim, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, mask, is_causal, kv_cache=None, layer=0, last_only=False):
        """(B, T, C) → (B, T, C); with `last_only`, (B, 1, C): the last position's output only."""
        attn = self.attn(self.ln_1(x), mask, is_causal, kv_cache, layer, last_only)
        x = (x[:, -1:] if last_only else x) + attn
        return x + self.mlp(self.ln_2(x))

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The block's output (B, C) at one position per row only (see ``GPT.pooled_hidden_states``)."""
        attn = self.attn.forward_at(self.ln_1(x), positions)
        x = x[torch.arange(len(x), device=x.device), positions] + attn
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTConfig:
    """Shape of a GPT-2 model. Presets: ``GPTConfig.from_name("gpt2-small", drop_rate=0.1)``."""

    vocab_size: int = 50257
    """Tokenizer vocabulary size (GPT-2 BPE: 50,257)."""
    context_length: int = 1024
    """Maximum number of positions (GPT-2: 1,024)."""
    emb_dim: int = 768
    """Width of the residual stream."""
    n_layers: int = 12
    """Number of transformer blocks."""
    n_heads: int = 12
    """Attention heads per block; must divide ``emb_dim``."""
    drop_rate: float = 0.0
    """Dropout on embeddings, attention weights and residual branches."""
    qkv_bias: bool = True
    """Bias on the query/key/value projection (GPT-2 checkpoints have one)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (GPT-2: 1e-5)."""
    pad_vocab_multiple: int = 1
    """Round the embedding table up to a multiple of this (64 gives 50,304 rows: faster matmuls
    on GPUs). Logits are always sliced back to ``vocab_size``."""

    def __post_init__(self) -> None:
        errors = [
            f"{f.name} must be a positive integer (got {getattr(self, f.name)!r})"
            for f in fields(self)
            if f.type == "int" and not (isinstance(getattr(self, f.name), int)
                                        and getattr(self, f.name) > 0)
        ]
        if not errors and self.emb_dim % self.n_heads:
            errors.append(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.drop_rate < 1.0:
            errors.append(f"drop_rate must be in [0, 1) (got {self.drop_rate})")
        if errors:
            raise GPTFTError("invalid model config: " + "; ".join(errors))

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """A preset (``gpt2-small``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``) with overrides."""
        if name not in PRESETS:
            raise GPTFTError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise GPTFTError(f"unknown GPTConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf_config(cls, hf: dict, source: str = "config.json", **overrides) -> GPTConfig:
        """Read a Hugging Face ``GPT2Config`` dict (``config.json``)."""
        if not isinstance(hf, dict):
            raise GPTFTError(f"{source}: expected a JSON object of GPT-2 settings, found a "
                             f"{type(hf).__name__}")
        problems = []
        if hf.get("model_type", "gpt2") != "gpt2":
            problems.append(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            problems.append(f"activation_function {hf['activation_function']!r} is not supported")
        if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 768)):
            problems.append("n_inner must be 4 * n_embd")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                problems.append(f"{flag}=true is not supported")
        if problems:
            raise GPTFTError(f"{source}: unsupported GPT-2 config: " + "; ".join(problems))
        try:
            base = dict(
                vocab_size=hf["vocab_size"], context_length=hf["n_positions"],
                emb_dim=hf["n_embd"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
                layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), qkv_bias=True,
            )
        except KeyError as e:
            raise GPTFTError(f"{source}: missing key {e.args[0]!r}") from None
        try:
            return cls(**{**base, **overrides})
        except GPTFTError as e:
            raise GPTFTError(f"{source}: {e}") from None

    def to_hf_config(self) -> dict:
        """The equivalent Hugging Face ``GPT2Config`` dict, for ``save_pretrained``."""
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": self.vocab_size, "n_positions": self.context_length,
            "n_ctx": self.context_length, "n_embd": self.emb_dim, "n_layer": self.n_layers,
            "n_head": self.n_heads, "n_inner": None, "activation_function": "gelu_new",
            "resid_pdrop": self.drop_rate, "embd_pdrop": self.drop_rate,
            "attn_pdrop": self.drop_rate, "layer_norm_epsilon": self.layer_norm_eps,
            "initializer_range": 0.02, "bos_token_id": GPT2_EOT_ID, "eos_token_id": GPT2_EOT_ID,
            "tie_word_embeddings": True,
        }

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
}


class LanguageModel:
    """What every family's language model offers on top of its own ``hidden_states`` (``GPT``
    here, ``gptft.models.decoder.Decoder``): logits, ``forward`` (logits, or the loss of each row),
    the last position's hidden state for decoding, the loss at labelled positions only, the
    parameter count. A family supplies ``hidden_states``, ``lm_head`` and ``config``."""

    def last_hidden_state(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """``hidden_states(...)[:, -1]`` (B, emb_dim), as decoding needs it, computed with
        ``last_only`` (arguments as ``hidden_states``)."""
        return self.hidden_states(input_ids, **kwargs, last_only=True)[:, -1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states (..., emb_dim) to vocabulary logits (..., vocab_size)."""
        logits = self.lm_head(hidden)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size); arguments as in ``hidden_states``.

        With ``labels`` (B, T) (target ids, ``IGNORE_INDEX`` where no loss is wanted) it returns instead the
        summed cross-entropy of each row (B,), computing the vocabulary projection only at the
        labelled positions and in chunks (see ``selective_cross_entropy``).
        """
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, kv_cache)
        if labels is None:
            return self.logits(hidden)
        return self.selective_cross_entropy(hidden, labels)

    def selective_cross_entropy(
        self, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096
    ) -> torch.Tensor:
        """Summed cross-entropy per row (B,) over the positions whose label is not ``IGNORE_INDEX``.

        Logits exist only for labelled positions, ``chunk_size`` rows at a time; in training each
        chunk's logits are recomputed in the backward pass instead of being stored, so memory
        stays at one chunk of (chunk_size, vocab) whatever the batch. The last chunk is the
        exception: the backward pass starts with it, so keeping it costs no more memory at the
        peak than recomputing it would, and a batch of one chunk (the usual case) is never
        recomputed.
        """
        return selective_cross_entropy(self.logits, hidden, labels, chunk_size)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; tied embeddings are counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class GPT(LanguageModel, nn.Module):
    """GPT-2 language model.

    ``model(input_ids)`` returns logits (B, T, vocab_size). ``model.hidden_states(input_ids)``
    returns the final LayerNorm's output (B, T, emb_dim) without the vocabulary projection, for
    classification heads and for losses that need logits at a few positions only
    (``model.logits(hidden[mask])``).
    """

    architecture = "gpt2"
    """The family name recorded in ``gptft.json`` (see ``gptft.models``)."""
    peft_layers = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    """The linear layers of a block that LoRA may adapt, under PEFT's names for this family."""
    hf_prefix = "transformer."
    """Where the body sits in the Hugging Face model (``GPT2LMHeadModel.transformer``)."""
    _no_split_modules = ["Block"]
    """The block class, as transformers declares it: Accelerate's FSDP wraps each one (its
    TRANSFORMER_BASED_WRAP policy reads this when the config names no class)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C = config.emb_dim
        self.wte = nn.Embedding(config.padded_vocab_size, C)
        self.wpe = nn.Embedding(config.context_length, C)
        self.drop = nn.Dropout(config.drop_rate)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(C, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    # ---- the model interface every family offers (see gptft.models) ----------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        """The repeated layers: FSDP's and activation checkpointing's unit, trainable policies'."""
        return self.h

    @property
    def final_norm(self) -> nn.Module:
        return self.ln_f

    @property
    def embedding(self) -> nn.Embedding:
        return self.wte

    @property
    def block_class(self) -> type[nn.Module]:
        return Block

    def tie_weights(self) -> None:
        """Share the embedding with the output projection (GPT-2 always does)."""
        self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _mask(
        self, attention_mask: torch.Tensor | None, T: int, past: int
    ) -> tuple[torch.Tensor | None, bool]:
        """The (attn_mask, is_causal) pair for SDPA (see ``sdpa_mask``)."""
        return sdpa_mask(attention_mask, T, past, self.wpe.weight.device)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Final hidden states (B, T, emb_dim), after ``ln_f``.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: optional (B, past + T) with 1 for real tokens and 0 for padding
                (left or right), or a 4-D boolean (B, 1, T, past + T) mask used as given.
            position_ids: optional (B, T) positions; by default counted over the real tokens of
                a 2-D ``attention_mask`` (so left padding does not shift positions), else
                ``past, past + 1, ...``. Pass them to restart positions in packed rows.
            kv_cache: a ``KVCache`` to read past keys/values from and append this step's to.
            last_only: (B, 1, emb_dim) at the last position only: the last block computes its
                attention output and MLP there (the keys and values of every position still go
                to `kv_cache`).
        """
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, T, past, input_ids.device)
        mask, is_causal = self._mask(attention_mask, T, past)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for i, block in enumerate(self.h):
            if last_only and i == len(self.h) - 1:
                x = block(x, mask, is_causal, kv_cache, i, last_only=True)
            else:
                x = block(x, mask, is_causal, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        return self.ln_f(x)

    def pooled_hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, emb_dim) at one position per row of right-padded `input_ids`.

        Equal to ``hidden_states(input_ids)[arange(B), positions]``, but the last block computes its
        query, projection and MLP at those positions only (classification reads nothing else).
        """
        T = input_ids.size(1)
        x = self.drop(self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device)))
        for block in self.h[:-1]:
            x = block(x, None, True)
        return self.ln_f(self.h[-1].forward_at(x, positions))

    # ---- Hugging Face GPT-2 checkpoints --------------------------------------------------------

    # GPT-2's Conv1D layers store (in, out); nn.Linear stores (out, in).
    _TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                        **overrides) -> GPT:
        """Load GPT-2 weights from a local Hugging Face folder or a hub name.

        Args:
            name_or_path: a folder with ``config.json`` and ``model.safetensors`` (as written by
                ``transformers`` or ``save_pretrained``), or ``gpt2-small`` / ``gpt2-medium`` /
                ``gpt2-large`` / ``gpt2-xl`` / ``openai-community/gpt2*``, downloaded with
                ``huggingface_hub`` into its cache (``HF_HUB_OFFLINE=1`` is respected).
            device: where to build it (default: the CPU). The model is laid out on the ``meta``
                device first and its storage allocated there, so no time goes into a random
                initialisation that the weights then overwrite.
            **overrides: ``GPTConfig`` fields that do not change weight shapes
                (``drop_rate``, ``pad_vocab_multiple``).
        """
        from gptft.hub import resolve_pretrained, weight_files

        folder = resolve_pretrained(name_or_path)
        config = GPTConfig.from_hf_config(
            read_json(folder / "config.json"), str(folder / "config.json"), **overrides
        )
        state = {}
        for file in weight_files(folder):
            state.update(load_safetensors(file))
        model = empty_model(lambda: cls(config), device or "cpu")
        model.load_hf_state_dict(state, source=str(folder))  # every tensor: none left uninitialised
        return model

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Copy a Hugging Face GPT-2 state dict (with or without ``transformer.``) into this model.

        Every missing, unexpected or wrongly shaped tensor is reported in one ``GPTFTError``.
        """
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        # Older checkpoints carry the causal-mask buffers h.N.attn.bias / masked_bias.
        state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".masked_bias"))}
        state.pop("lm_head.weight", None)  # tied to wte
        own = {k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}
        check_float_weights(state, own, source)
        problems = [f"missing {k}" for k in own if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in own]
        for k in own.keys() & state.keys():
            t = state[k].t() if k.endswith(self._TRANSPOSED) else state[k]
            want = own[k].shape
            if k == "wte.weight":
                want = (self.config.vocab_size, want[1])
            if tuple(t.shape) != tuple(want):
                problems.append(f"{k} has shape {tuple(t.shape)}, the config needs {tuple(want)}")
            else:
                state[k] = t
        if problems:  # embeddings and final norm first (they show the width), then the blocks
            problems.sort(key=lambda p: (p.startswith("h.") or " h." in p, p))
            more = f"; and {len(problems) - 4} more" if len(problems) > 4 else ""
            raise GPTFTError(f"{source}: weights do not match the model config: "
                             + "; ".join(problems[:4]) + more)
        with torch.no_grad():
            for k, v in own.items():
                v[: state[k].shape[0]].copy_(state[k])
                if k == "wte.weight":
                    v[self.config.vocab_size :].zero_()  # padding rows: never a target

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under Hugging Face ``GPT2LMHeadModel`` names and layouts."""
        out = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue  # tied: safetensors refuses shared tensors, transformers re-ties it
            if k == "wte.weight":
                v = v[: self.config.vocab_size]
            if k.endswith(self._TRANSPOSED):
                v = v.t()
            out["transformer." + k] = v
        if not self.config.qkv_bias:  # GPT-2 always has the bias; zeros are equivalent
            for i in range(self.config.n_layers):
                out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * self.config.emb_dim)
        return out

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads as GPT-2."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.hf_state_dict(), folder / "model.safetensors")
        write_json(folder / "config.json", self.config.to_hf_config())


def empty_model(build: Callable[[], nn.Module], device: str | torch.device) -> nn.Module:
    """``build()`` (a language model of any family, or a model holding one) with uninitialised
    storage on `device`, for weights to be loaded into: laid out on ``meta`` first, so no random
    initialisation is computed only to be overwritten (nor drawn from the global RNG). Tied
    weights are tied again (``to_empty`` gives every parameter its own storage): each module's
    ``tie_weights()``, as transformers does."""
    with torch.device("meta"):
        model = build()
    model.to_empty(device=device)
    for module in model.modules():
        if hasattr(module, "tie_weights"):  # a no-op for a family with an untied head
            module.tie_weights()
    return model


def tied_names(model: nn.Module) -> set[str]:
    """The parameter names that are another parameter again (a tied ``lm_head.weight``): a
    state dict stores each tensor once, under its first name."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


def default_position_ids(attention_mask: torch.Tensor | None, T: int, past: int,
                         device: torch.device) -> torch.Tensor:
    """Positions (B or 1, T) of `T` new tokens after `past` cached ones: counted over the real
    tokens of a 2-D ``attention_mask`` (so left padding does not shift them), else ``past, past +
    1, ...``."""
    if attention_mask is not None and attention_mask.dim() == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    return torch.arange(past, past + T, device=device)[None]


def sdpa_mask(
    attention_mask: torch.Tensor | None, T: int, past: int, device: torch.device,
    window: int | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """The (attn_mask, is_causal) pair for SDPA, for `T` new queries after `past` cached positions.

    No mask → plain causal attention (fast kernels). A 2-D (B, past + T) padding mask →
    causal & not-padding, where every query may still see itself so that padding rows are
    never empty (their outputs are meaningless and ignored). A 4-D boolean mask
    (B, 1, T, past + T) is used as given (e.g. block-diagonal masks for packed rows). With a
    sliding `window`, a query at index i also sees only keys at indices > i - window (indices in
    the row, as Hugging Face counts them; left padding sits before every real token).
    """
    if window is not None and past + T <= window:
        window = None  # the window covers every key
    outside = None  # (T, past + T) True where a key is outside the window
    if window is not None:
        outside = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past - window)
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask.bool()
        return (mask if outside is None else mask & ~outside), False
    if attention_mask is None and outside is None:
        if past == 0:
            return None, True
        if T == 1:
            return None, False  # one new token sees every cached position
    causal = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)
    if outside is not None:
        causal &= ~outside
    if attention_mask is None:
        return causal, False
    itself = causal & ~torch.ones_like(causal).tril(diagonal=past - 1)
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, past + T)
    return (causal & keys) | itself, False


def selective_cross_entropy(
    logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Summed cross-entropy per row (B,) of ``logits(hidden)`` over the positions whose label is
    not ``IGNORE_INDEX`` (see ``GPT.selective_cross_entropy``)."""
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    if len(rows) == 0:  # nothing to predict: zero, still connected to the graph
        return hidden[:, 0, 0] * 0.0
    h, y = hidden[rows, cols], labels[rows, cols]

    def chunk_loss(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits(hc).float(), yc, reduction="none")

    losses = []
    for start in range(0, len(y), chunk_size):
        hc, yc = h[start : start + chunk_size], y[start : start + chunk_size]
        last = start + chunk_size >= len(y)
        if torch.is_grad_enabled() and hc.requires_grad and not last:
            losses.append(checkpoint(chunk_loss, hc, yc, use_reentrant=False))
        else:
            losses.append(chunk_loss(hc, yc))
    per_token = torch.cat(losses) if losses else hidden.new_zeros(0)
    return hidden.new_zeros(labels.size(0), dtype=per_token.dtype).index_add(0, rows, per_token)
