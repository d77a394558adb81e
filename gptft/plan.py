"""The memory plan of a fine-tuning job: what each device holds, what fits, what makes it fit.

``plan_job(job, gpus=8, gpu_memory=80e9)`` estimates, per device, from the model's shape only
(``Shape``: width, blocks, heads, key/value heads, head size, MLP width, vocabulary; from a gptft
``GPTConfig`` or a Hugging Face ``config.json``):

- weights (fp32 masters; sharded over the GPUs with FSDP, on the host with CPU offload);
- gradients and AdamW's two moments, of the trainable parameters only (full, LoRA, last block...);
- the trainer's copy of the best trainable weights so far;
- activations: what each block keeps for the backward pass per token (the GPT-2 block keeps
  16 x width values: its input, two norms' outputs, q/k/v, the attention output, the MLP's two
  4x-wide tensors; a gated MLP keeps 4 x its width), only for the blocks gradients flow through;
  a checkpointed block keeps its input only, and one block is recomputed at a time;
- the loss: the logits of the labelled positions (chunks of 4096 rows) and their gradient for
  language-model tasks, a pair of sequences per example and the frozen reference model for DPO
  (none when ``dpo.precompute_reference``).

The peak: the weights, optimizer state and best copy always; then, in a step of one micro-batch,
the larger of the activations with the loss (the start of the backward pass) and the gradients (its
end: the activations are freed as the gradients appear); with accumulation, both (the first
micro-batch's gradients are alive during the next one's forward pass). The estimate was checked
against the measured CPU peak (``tests/test_plan.py``, ``docs/distributed.md``); on CUDA,
``benchmarks/gpu_check.sh`` compares it with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptft.errors import GPTFTError

LOSS_CHUNK = 4096  # rows of logits at a time (GPT.selective_cross_entropy)
CPU_RUNTIME = 10 * 2**20
"""What a CPU run allocates beyond the tensors counted (kernel workspaces, the allocator, autograd):
fitted to the CPU checks (benchmarks/plan_check.py, docs/distributed.md), where the measured peak
less the counted tensors ranges from -18 to +22 MiB; a one-sequence, 16-token step of the GPT-2
classifier leaves 17 MiB."""
GB = 1e9


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a decoder's shape."""

    vocab_size: int
    emb_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    context_length: int
    gated_mlp: bool = False  # SwiGLU / GeGLU (Llama, Qwen, Mistral, Gemma) vs GPT-2's GELU MLP
    tied_embeddings: bool = True
    learned_positions: bool = False  # GPT-2's position table
    bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: queries and keys normalised per head
    sandwich_norms: bool = False  # Gemma 3: four norms a block

    @classmethod
    def from_gpt_config(cls, cfg) -> Shape:
        """From a ``gptft.model.GPTConfig`` (or any object with its fields)."""
        return cls(vocab_size=getattr(cfg, "padded_vocab_size", cfg.vocab_size), emb_dim=cfg.emb_dim,
                   n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                   n_kv_heads=getattr(cfg, "n_kv_heads", None) or cfg.n_heads,
                   head_dim=getattr(cfg, "head_dim", None) or cfg.emb_dim // cfg.n_heads,
                   intermediate_size=getattr(cfg, "intermediate_size", None) or 4 * cfg.emb_dim,
                   context_length=cfg.context_length, learned_positions=True, bias=True)

    @classmethod
    def from_config(cls, cfg, architecture: str = "gpt2") -> Shape:
        """From a model's config: ``GPTConfig`` (``gpt2``) or a family's ``DecoderConfig``."""
        if architecture == "gpt2":
            return cls.from_gpt_config(cfg)
        return dataclasses.replace(
            cls.from_gpt_config(cfg), gated_mlp=True, learned_positions=False,
            tied_embeddings=bool(getattr(cfg, "tie_embeddings", False)),
            bias=bool(getattr(cfg, "qkv_bias", False)), qk_norm=bool(getattr(cfg, "qk_norm", False)),
            sandwich_norms=bool(getattr(cfg, "sandwich_norms", False)))

    @classmethod
    def from_model(cls, model) -> Shape:
        """From a model offering the model interface (its ``config`` and ``architecture``)."""
        return cls.from_config(model.config, getattr(model, "architecture", "gpt2"))

    @classmethod
    def from_hf_config(cls, hf: dict, source: str = "config.json") -> Shape:
        """From a Hugging Face ``config.json`` of GPT-2 or a supported family."""
        from gptft.models import config_from_hf

        config = config_from_hf(hf, source)
        return cls.from_config(config, getattr(config, "architecture", "gpt2"))

    # ---- parameters ----------------------------------------------------------------------------

    def linears(self) -> dict[str, tuple[int, int]]:
        """A block's linear layers: name -> (in, out)."""
        C, q, kv, m = self.emb_dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, \
            self.intermediate_size
        if not self.gated_mlp:  # GPT-2: one fused q/k/v layer (LoRA adapts it as one)
            return {"qkv": (C, q + 2 * kv), "o": (q, C), "fc": (C, m), "proj": (m, C)}
        return {"q": (C, q), "k": (C, kv), "v": (C, kv), "o": (q, C),
                "gate": (C, m), "up": (C, m), "down": (m, C)}

    def block_params(self) -> int:
        weights = sum(i * o for i, o in self.linears().values())
        biases = sum(o for _, o in self.linears().values()) if self.bias else 0
        if self.bias and self.gated_mlp:  # Qwen2: biases on q, k and v only
            biases = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        if not self.gated_mlp:
            return weights + biases + 4 * self.emb_dim  # two LayerNorms, weight and bias
        norms = (4 if self.sandwich_norms else 2) * self.emb_dim + (2 * self.head_dim if self.qk_norm else 0)
        return weights + biases + norms

    def embedding_params(self) -> int:
        """Token embedding, untied output head, position table and final norm."""
        n = self.vocab_size * self.emb_dim * (1 if self.tied_embeddings else 2)
        n += self.context_length * self.emb_dim if self.learned_positions else 0
        return n + self.emb_dim * (1 if self.gated_mlp else 2)

    def params(self) -> int:
        return self.n_layers * self.block_params() + self.embedding_params()

    def lora_params(self, rank: int) -> int:
        """LoRA's A and B on every linear layer of every block."""
        return self.n_layers * sum(rank * (i + o) for i, o in self.linears().values())

    # ---- activations ---------------------------------------------------------------------------

    def block_activations(self) -> tuple[int, int]:
        """Values a block keeps per token for its backward pass: (residual-stream values, kept
        in fp32 under autocast; the rest, in the compute dtype). Measured on the CPU in fp32
        (benchmarks/activation_memory.py, 12 blocks of width 256 at T=1024): GPT-2's block keeps
        16.5 x width values a token (counted here: 16), Qwen3's (RMSNorm, q/k norm, RoPE, SwiGLU,
        intermediate 3 x width) 24.7 x width (counted: 25.5)."""
        C, q, kv, m = self.emb_dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, \
            self.intermediate_size
        if not self.gated_mlp:  # GPT-2: input, mid residual, two LayerNorm outputs; q/k/v, attention
            return 4 * C, 2 * q + 2 * kv + 2 * m  # output; the MLP's fc and gelu outputs
        # RMSNorm keeps its input and the normalised values, in fp32, then its output; attention:
        # the projections, the (q/k-normed) rotated queries and keys, the output; SwiGLU: gate,
        # up, act(gate) and the product
        attention = (5 if self.qk_norm else 4) * (q + kv)
        return 6 * C, attention + 4 * m


@dataclass
class Setup:
    """How a job trains, as far as memory goes."""

    produces: str = "lm"  # what the task's model is (gptft.registry): lm | classifier
    pairs: bool = False  # preference tuning: two sequences a row (chosen, rejected)
    batch_size: int = 8
    seq_len: int = 1024
    grad_accum_steps: int = 1
    trainable: str = "all"
    lora_rank: int = 16
    activation_checkpointing: bool | int = False
    mixed_precision: str = "no"
    gpus: int = 1
    fsdp: bool = False
    cpu_offload: bool = False
    dpo_reference: str = "precomputed"  # precomputed | model | adapters
    device: str = "cuda"  # cuda | cpu (train.device=cpu)
    keep_best: bool = True


@dataclass
class Plan:
    """Bytes per device, each part and the peak."""

    shape: Shape
    setup: Setup
    parts: dict[str, float] = field(default_factory=dict)
    peak: float = 0.0
    trainable_params: int = 0
    total_params: int = 0

    @property
    def resident_before_training(self) -> float:
        """What is allocated before the first step: the weights and a DPO reference copy."""
        return self.parts["weights"] + self.parts["reference"]

    def to_dict(self) -> dict[str, Any]:
        return {"setup": dataclasses.asdict(self.setup), "shape": dataclasses.asdict(self.shape),
                "total_params": self.total_params, "trainable_params": self.trainable_params,
                "bytes": {k: round(v) for k, v in self.parts.items()}, "peak_bytes": round(self.peak)}


def trainable_params(shape: Shape, setup: Setup, num_classes: int = 2) -> int:
    head = shape.emb_dim * num_classes + num_classes if setup.produces == "classifier" else 0
    policy = setup.trainable
    if policy == "all":
        return shape.params() + head
    if policy == "lora":
        return shape.lora_params(setup.lora_rank) + head
    if policy == "head":
        return head
    blocks = 1 if policy == "last_block" else 2
    return blocks * shape.block_params() + shape.emb_dim * (1 if shape.gated_mlp else 2) + head


def grad_blocks(shape: Shape, setup: Setup) -> int:
    """Blocks that keep activations: those gradients flow through."""
    return {"head": 0, "last_block": 1, "last_two_blocks": 2}.get(setup.trainable, shape.n_layers)


def checkpointed_indices(n_blocks: int, setting: bool | int) -> list[int]:
    """As ``gptft.activations.checkpointed_blocks`` (this module imports no torch)."""
    if setting is False or setting is None:
        return []
    every = 1 if setting is True else int(setting)
    return [i for i in range(n_blocks) if (i + 1) % every == 0]


def plan(shape: Shape, setup: Setup) -> Plan:
    """The memory plan of one device (see the module's description)."""
    total = shape.params()
    train = trainable_params(shape, setup)
    shards = setup.gpus if setup.fsdp else 1
    act_bytes = 2 if setup.mixed_precision in ("bf16", "fp16") else 4
    on_device = 0.0 if setup.cpu_offload else 1.0
    weights = 4 * total / shards * on_device
    if setup.fsdp and setup.gpus > 1:  # a block's full weights gathered (and the next prefetched)
        weights += 2 * shape.block_params() * act_bytes
    grads = 4 * train / shards * on_device
    optimizer = 8 * train / shards * on_device
    best = 4 * train / shards * on_device if setup.keep_best else 0.0
    reference = 4 * total / shards if setup.pairs and setup.dpo_reference == "model" else 0.0
    rows = setup.batch_size * (2 if setup.pairs else 1)
    tokens = rows * setup.seq_len
    residual, rest = shape.block_activations()
    per_block = tokens * (4 * residual + act_bytes * rest)
    kept_input = tokens * shape.emb_dim * 4
    # a classifier's last block runs its query, projection and MLP at the pooled position only
    pooled = tokens * 4 * (2 * shape.emb_dim + (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim)
    chosen = set(checkpointed_indices(shape.n_layers, setup.activation_checkpointing))
    activations, recomputed = 0.0, 0.0
    for i in range(shape.n_layers - grad_blocks(shape, setup), shape.n_layers):
        full = pooled if setup.produces == "classifier" and i == shape.n_layers - 1 else per_block
        activations += kept_input if i in chosen else full
        recomputed = max(recomputed, full if i in chosen else 0.0)
    activations += recomputed  # one checkpointed block recomputed at a time in the backward pass
    loss = 0.0
    if setup.produces == "lm":
        # the last chunk's logits (compute dtype), their fp32 log-softmax and its gradient
        chunk = min(tokens, LOSS_CHUNK)
        loss = chunk * shape.vocab_size * (act_bytes + 4 + 4)
        if setup.trainable == "all" and shape.tied_embeddings:
            loss += 4 * shape.vocab_size * shape.emb_dim / shards  # the tied head's gradient, first
    # the backward pass of a block: the gradients of its widest intermediate tensors, transient
    C, q, kv, m = shape.emb_dim, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim, \
        shape.intermediate_size
    backward = tokens * act_bytes * ((3 if shape.gated_mlp else 2) * m + q + 2 * kv + 2 * C) \
        if grad_blocks(shape, setup) else 0.0
    step = activations + max(loss, backward)
    dynamic = step + grads if setup.grad_accum_steps > 1 else max(step, grads)
    runtime = CPU_RUNTIME if setup.device == "cpu" else 0.0
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "best_copy": best,
             "reference": reference, "activations": activations, "loss": loss, "backward": backward,
             "runtime": runtime}
    peak = weights + optimizer + best + reference + dynamic + runtime
    return Plan(shape, setup, parts, peak, train, total)


# ---- from a job ------------------------------------------------------------------------------------

def job_shape(job) -> Shape:
    """The model shape a job trains (no weights read): a finished gptft run's ``gptft.json``, a
    Hugging Face folder's ``config.json``, or the preset (``gptft.models``) with the job's shape
    keys and, for random weights, its tokenizer's vocabulary."""
    from gptft.models import preset_config

    cfg = job.model
    if cfg.weights == "pretrained" and cfg.checkpoint:
        folder = Path(cfg.checkpoint)
        if (folder / "gptft.json").is_file():
            from gptft.runs import load_meta, model_config

            meta = load_meta(folder)
            return Shape.from_config(model_config(meta, folder), meta.get("architecture", "gpt2"))
        path = folder / "config.json"
        if not path.is_file():
            raise GPTFTError(f"model.checkpoint: {folder} has no config.json or gptft.json")
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise GPTFTError(f"{path}: unreadable ({e})") from None
        return Shape.from_hf_config(hf, str(path))
    overrides = cfg.shape()
    if cfg.weights == "random":
        from gptft.runs import job_tokenizer

        overrides["vocab_size"] = job_tokenizer(cfg).vocab_size
    config = preset_config(cfg.name, pad_vocab_multiple=cfg.pad_vocab_multiple, **overrides)
    return Shape.from_config(config, getattr(config, "architecture", "gpt2"))


def job_setup(job, shape: Shape, gpus: int = 1, fsdp: bool | None = None,
              cpu_offload: bool = False) -> Setup:
    """The job's settings that memory depends on (sequences: ``data.max_length`` if set, else the
    context length, an upper bound)."""
    shape_len = shape.context_length
    max_length = getattr(getattr(job, "data", None), "max_length", None)
    dpo = getattr(job, "dpo", None)
    reference = "precomputed"
    if dpo is not None and not dpo.precompute_reference:
        reference = "adapters" if job.model.trainable == "lora" else "model"
    from gptft.registry import get_task

    return Setup(produces=get_task(job.task).produces, pairs=dpo is not None,
                 batch_size=job.train.batch_size,
                 seq_len=min(max_length or shape_len, shape_len),
                 grad_accum_steps=job.train.grad_accum_steps, trainable=job.model.trainable,
                 lora_rank=job.lora.rank, activation_checkpointing=job.train.activation_checkpointing,
                 mixed_precision=job.train.mixed_precision, gpus=gpus,
                 device="cpu" if job.train.device == "cpu" else "cuda",
                 fsdp=gpus > 1 if fsdp is None else fsdp, cpu_offload=cpu_offload,
                 dpo_reference=reference)


def plan_job(job, gpus: int = 1, fsdp: bool | None = None, cpu_offload: bool = False,
             shape: Shape | None = None) -> Plan:
    """The plan of `job` on `gpus` devices (`shape`: the model's, if built; else from the job)."""
    shape = shape or job_shape(job)
    return plan(shape, job_setup(job, shape, gpus, fsdp, cpu_offload))


def fixes(shape: Shape, setup: Setup, budget: float) -> list[tuple[dict[str, Any], Plan]]:
    """Settings that bring the peak under `budget` bytes with the same global batch, cheapest
    first: a smaller micro-batch (more accumulation), activation checkpointing, both, then
    FSDP / CPU offload (several GPUs), then LoRA."""
    global_rows = setup.batch_size * setup.grad_accum_steps
    options: list[dict[str, Any]] = []
    b = setup.batch_size
    while b >= 1:
        for ckpt in ([setup.activation_checkpointing] if setup.activation_checkpointing else [False, True]):
            options.append({"batch_size": b, "grad_accum_steps": global_rows // b,
                            "activation_checkpointing": ckpt})
        if b == 1 or global_rows % (b // 2 or 1):
            break
        b //= 2
    options = sorted(options, key=lambda o: (bool(o["activation_checkpointing"]), -o["batch_size"]))
    if setup.gpus > 1 and not setup.fsdp:
        options += [{**o, "fsdp": True} for o in options]
    if setup.gpus > 1:
        options += [{**o, "fsdp": True, "cpu_offload": True} for o in options if o.get("fsdp")]
    if setup.trainable != "lora":
        options += [{**o, "trainable": "lora"} for o in options]
    out, seen = [], set()
    for option in options:
        key = tuple(sorted(option.items()))
        if key in seen:
            continue
        seen.add(key)
        p = plan(shape, dataclasses.replace(setup, **option))
        if p.peak <= budget:
            out.append((option, p))
    return out


def parse_bytes(text: str) -> float:
    """``80GB`` / ``80 GB`` / ``80GiB`` / ``81920MiB`` / a number of bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise GPTFTError(f"--gpu-memory: expected a size like 80GB or 24GiB (got {text!r})")
    unit = " KMGT".index(m.group(2).upper() or " ")
    return float(m.group(1)) * (1024 if m.group(3) else 1000) ** unit


def human(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 2**20:.1f} MiB"


def summary_line(p: Plan) -> str:
    """One line: the peak and its biggest parts."""
    parts = ", ".join(f"{k.replace('_', ' ')} {human(v)}" for k, v in p.parts.items() if v)
    return f"memory plan: peak {human(p.peak)} per device ({parts})"


def step_bytes(p: Plan) -> float:
    """What a micro-batch adds at its peak: the activations and the larger of the loss's and a
    block's backward temporaries."""
    return p.parts["activations"] + max(p.parts["loss"], p.parts["backward"])


def report(p: Plan, budget: float | None = None) -> str:
    """The plan for people: the parts, the peak, activations by sequence length and micro-batch
    (with and without checkpointing), and, with a budget, what fits."""
    s = p.setup
    lines = [f"model: {p.total_params / 1e6:,.1f}M parameters, {p.trainable_params / 1e6:,.2f}M "
             f"trainable ({s.trainable}); {'pairs, ' if s.pairs else ''}{s.produces}, "
             f"micro-batch {s.batch_size} x {s.seq_len} tokens, "
             f"accumulation {s.grad_accum_steps}, {s.gpus} device(s)"
             + (", FSDP" if s.fsdp else "") + (", CPU offload" if s.cpu_offload else "")
             + (f", activation checkpointing {str(s.activation_checkpointing).lower()}"
                if s.activation_checkpointing else ""),
             "per device:"]
    lines += [f"  {k.replace('_', ' '):<12} {human(v):>12}" for k, v in p.parts.items() if v]
    lines.append(f"  {'peak':<12} {human(p.peak):>12}")
    lengths = sorted({n for n in (512, 1024, 2048, 4096, 8192, s.seq_len) if n <= p.shape.context_length})
    batches = sorted({1, 2, 4, 8, s.batch_size})
    lines.append("activations (+ loss or backward) by micro-batch x length, without / with checkpointing:")
    lines.append("  " + "batch".ljust(7) + "".join(f"{n:>24}" for n in lengths))
    for b in batches:
        cells = []
        for n in lengths:
            off, on = (plan(p.shape, dataclasses.replace(s, batch_size=b, seq_len=n,
                                                         activation_checkpointing=c))
                       for c in (False, True))
            cells.append(f"{human(step_bytes(off))} / {human(step_bytes(on))}")
        lines.append("  " + str(b).ljust(7) + "".join(f"{c:>24}" for c in cells))
    if budget is not None:
        if p.peak <= budget:
            lines.append(f"fits: peak {human(p.peak)} of {human(budget)}")
        else:
            found = fixes(p.shape, s, budget)
            lines.append(f"does not fit: peak {human(p.peak)} > {human(budget)}"
                         + ("; settings that fit (same global batch):" if found else
                            "; no setting tried fits (more GPUs with FSDP, a smaller model)"))
            lines += [f"  {fix_text(o)}: peak {human(q.peak)}" for o, q in found[:6]]
    return "\n".join(lines)


def fix_text(option: dict[str, Any]) -> str:
    names = {"batch_size": "train.batch_size", "grad_accum_steps": "train.grad_accum_steps",
             "activation_checkpointing": "train.activation_checkpointing", "trainable": "model.trainable",
             "fsdp": "FSDP (configs/accelerate/fsdp.yaml)", "cpu_offload": "fsdp_offload_params"}
    return " ".join(f"{names[k]}={str(v).lower() if isinstance(v, bool) else v}" for k, v in option.items())
