"""Job configuration: typed dataclasses; a YAML file is only their serialized form.

This module holds the sections every task shares (``model``, ``train``, ``lora``, ``tracking``,
``generate``) and ``JobConfig``, the base of each task's job class (a task adds its ``data``
section, see ``gptft.registry``). ``load_job(path, overrides)`` reads a YAML file, applies dotted
``key=value`` overrides, finds the job class of its ``task`` in the task registry and checks every
key, type and range with ``gptft.validation``, reporting all problems at once in one
``GPTFTError`` that names the file, line and field of each.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gptft.errors import GPTFTError
from gptft.io import check_file
from gptft.registry import DEFAULT_TASK, get_task
from gptft.validation import build, non_negative, positive, seed_problems

SHAPE_KEYS = ("n_layers", "emb_dim", "n_heads", "n_kv_heads", "head_dim", "intermediate_size",
              "context_length")
"""The ``model`` keys that set a model's shape (random weights), or must match a checkpoint's."""


@dataclass
class ModelConfig:
    name: str = "gpt2-small"
    """What to fine-tune: a GPT-2 preset (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl), a family
    preset (qwen3-0.6b, llama-3.2-1b, smollm2-360m, qwen2.5-0.5b, mistral-7b-v0.3, gemma-3-1b, ...:
    ``gptft.models.PRESETS``) or a Hugging Face hub repo id (Qwen/Qwen3-0.6B), downloaded with
    huggingface_hub; its config.json's model_type picks the family."""
    weights: Literal["pretrained", "random"] = "pretrained"
    """pretrained: load the weights (``checkpoint`` or the hub); random: initialise afresh with the
    preset's architecture (offline tiny runs)."""
    checkpoint: str | None = None
    """Local folder to load instead of the hub: a Hugging Face folder of a supported family
    (config.json + model.safetensors, or a sharded model.safetensors.index.json; bf16/fp16 weights
    are loaded in float32) or a finished gptft run (gptft.json: its architecture and weights): of a
    language-model task (e.g. the instruction run that preference tuning starts from), or, for a
    classification job, a classification run with the same labels (its head too: training goes on)."""
    tokenizer: str | None = None
    """The tokenizer: gpt2 (tiktoken, GPT-2's BPE), tiny-chatml (a small BPE gptft ships, for
    offline tiny runs), a folder holding tokenizer.json (+ tokenizer_config.json), or a hub repo id.
    Unset: gpt2 for GPT-2; the checkpoint folder's or the hub repo's own tokenizer otherwise."""
    n_layers: int | None = None
    """Override the preset's number of blocks (random weights; with a checkpoint, must match it)."""
    emb_dim: int | None = None
    """Override the preset's width (random weights; with a checkpoint, must match it)."""
    n_heads: int | None = None
    """Override the preset's number of heads (random weights; with a checkpoint, must match it)."""
    n_kv_heads: int | None = None
    """Override the number of key/value heads (grouped-query attention; families other than GPT-2)."""
    head_dim: int | None = None
    """Override the width of each head (families other than GPT-2; unset: the preset's)."""
    intermediate_size: int | None = None
    """Override the MLP's hidden width (families other than GPT-2)."""
    context_length: int | None = None
    """Override the preset's context length (random weights; with a checkpoint, must match it)."""
    drop_rate: float = 0.0
    """Dropout rate during fine-tuning."""
    pad_vocab_multiple: int = 1
    """Pad the embedding table to a multiple of this (64: faster on GPUs)."""
    trainable: Literal["head", "last_block", "last_two_blocks", "all", "lora"] = "last_block"
    """Which parameters train: the head only; + last block and final norm; + the last two
    blocks; everything; or LoRA adapters (+ the classification head), see ``lora``."""
    adapter: str | None = None
    """A PEFT LoRA adapter folder to continue training (a run's adapter/, or one saved by peft on
    the transformers model of the base's family and shape): loaded onto the base model before
    training; needs trainable=lora, and its r, lora_alpha, lora_dropout and target_modules replace
    ``lora``."""

    def shape(self) -> dict[str, int]:
        """The shape keys this config sets."""
        return {k: getattr(self, k) for k in SHAPE_KEYS if getattr(self, k) is not None}

    def problems(self) -> list[str]:
        out = []
        if self.adapter is not None and self.trainable != "lora":
            out.append("adapter: needs trainable=lora (an adapter trains as LoRA)")
        if self.weights == "pretrained" and not self.checkpoint:
            shape = list(self.shape())
            if shape:
                out.append(f"{', '.join(shape)}: only with weights=random or a checkpoint "
                           "(pretrained weights fix the shape)")
        if not 0 <= self.drop_rate < 1:
            out.append(f"drop_rate: must be in [0, 1) (got {self.drop_rate})")
        return out + positive(self, *SHAPE_KEYS, "pad_vocab_multiple")


@dataclass
class TrainConfig:
    epochs: int = 5
    """Passes over the training split."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (unset: run all epochs); the last step is validated."""
    batch_size: int = 8
    """Examples per micro-batch on each process; a step takes batch_size x processes x grad_accum_steps."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; the loss is normalised over all of them."""
    activation_checkpointing: bool | int = False
    """Recompute blocks in the backward pass instead of keeping their activations: true (every
    block), an int N (every Nth block), false (none). Cuts activation memory (see ``gptft plan``)
    for about a third more compute; the gradients are the same."""
    auto_batch: bool = False
    """On a CUDA out-of-memory in a training step, halve batch_size and double grad_accum_steps
    (the same global batch, the same losses) and retry the step, down to batch_size 1."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to weights of 2 or more dimensions only."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    schedule: Literal["constant", "cosine"] = "constant"
    """constant (the book), or linear warm-up then cosine decay to ``min_lr_ratio * lr``."""
    warmup_steps: int = 0
    """Linear warm-up steps (both schedules)."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of ``lr``."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; unset: no clipping."""
    eval_every: int = 50
    """Evaluate on the validation split every this many steps (0: at epoch ends only), at epoch
    ends and at the last step (once per step)."""
    eval_batches: int | None = None
    """Evaluate on this many batches of the validation split during training (unset: the whole
    split); classification's epoch-end sample of the training split is this many training
    batches' worth of examples drawn at random (unset: 10, the book's)."""
    eval_batch_size: int | None = None
    """Examples per evaluation batch on each process (no gradients: larger is faster); unset:
    4 x batch_size."""
    final_eval_batches: int | None = None
    """Evaluate the kept model on this many batches of each split at the end (unset: the whole
    splits, the numbers to report; a bound gives a quick look after a short trial run)."""
    log_every: int = 10
    """Log the training loss every this many steps."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0: not by step count)."""
    checkpoint_minutes: float | None = 15.0
    """Save a resumable checkpoint once this many minutes have passed since the start or the last
    one (checked at logging steps); unset: not by time. A run shorter than this saves none unless
    ``checkpoint_every`` or ``checkpoint_epochs`` asks."""
    checkpoint_epochs: bool = False
    """Also save a resumable checkpoint at the end of every epoch."""
    keep_last: int = 1
    """Checkpoints to keep (older ones are pruned once a newer one is complete)."""
    resume: bool | str = False
    """true: resume from the latest valid checkpoint in output_dir (a damaged newer one is skipped
    with a warning); a path: from that checkpoint."""
    overwrite: bool = False
    """Let a new run replace an earlier gptft run in output_dir (only the files gptft wrote there
    go); false: a new run needs a new or empty folder."""
    timeout_minutes: float = 30.0
    """How long a process waits for the others in a collective operation (multi-process runs)
    before the run stops with an error: more than the longest checkpoint save or evaluation."""
    seed: int = 123
    """Seed of the model initialisation, dropout and the data order."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision (Accelerate)."""
    device: Literal["auto", "cpu"] = "auto"
    """auto: the accelerator Accelerate finds (GPU if any); cpu: force the CPU."""
    compile: Literal["auto", True, False] = "auto"
    """Compile the model with torch.compile; auto: on CUDA (batch shapes are bucketed, so few
    recompilations), off on the CPU (compiling costs more than it saves there)."""
    length_buckets: Literal["auto", True, False] = "auto"
    """Pad batches to at most 16 lengths chosen for the data (``gptft.data.collate.length_buckets``)
    instead of each batch's longest example; auto: on CUDA or when compiling, where every new
    sequence length costs kernel planning or a recompilation, off on the CPU, where a new length
    costs nothing and the extra padding (about 4% of the positions of the SMS data) costs compute."""
    skip_nonfinite: bool = False
    """Skip (and count) a step whose loss or gradients are not finite instead of stopping."""

    def problems(self) -> list[str]:
        out = positive(self, "epochs", "max_steps", "batch_size", "grad_accum_steps", "lr",
                        "log_every", "keep_last", "max_grad_norm", "eval_batches", "eval_batch_size",
                        "final_eval_batches", "checkpoint_minutes", "timeout_minutes")
        out += non_negative(self, "weight_decay", "warmup_steps", "eval_every", "checkpoint_every")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"betas: two numbers in [0, 1) (got {self.betas})")
        ac = self.activation_checkpointing
        if not isinstance(ac, bool) and ac < 1:
            out.append(f"activation_checkpointing: true, false or a block interval >= 1 (got {ac})")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"min_lr_ratio: must be in [0, 1] (got {self.min_lr_ratio})")
        return out + seed_problems(self, "seed")


LORA_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj",  # GPT-2
               "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # Llama, Qwen, Mistral, Gemma
"""The linear layers of a block that LoRA may adapt, in every family (PEFT's names); whether a
layer belongs to the model's family is checked when LoRA is applied."""


@dataclass
class LoRAConfig:
    rank: int = 16
    """Rank r of the update B @ A."""
    alpha: float = 16.0
    """Scale: the update is multiplied by alpha / rank (as in the LoRA paper and peft)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    targets: list[str] | None = None
    """Linear layers to adapt, under PEFT's names for the model's family, plus ``head`` (a
    classifier's head). Unset: every linear layer of a block (GPT-2: attn.c_attn, attn.c_proj,
    mlp.c_fc, mlp.c_proj; Llama, Qwen, Mistral, Gemma: self_attn.q_proj, self_attn.k_proj,
    self_attn.v_proj, self_attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj). A short suffix
    names every layer it ends ("q_proj", "c_proj"). Checked against the model when LoRA is applied."""

    def problems(self) -> list[str]:
        out = []
        if self.targets is not None and not self.targets:
            out.append("targets: an empty list adapts nothing (unset: every linear layer of a block)")
        out += [f"targets: unknown layer {t!r} (known: {', '.join(LORA_LAYERS)}, head)"
                for t in self.targets or () if t != "head"
                and not any(g == t or g.endswith("." + t) for g in LORA_LAYERS)]
        if not 0 <= self.dropout < 1:
            out.append(f"dropout: must be in [0, 1) (got {self.dropout})")
        return out + positive(self, "rank", "alpha")


@dataclass
class TrackingConfig:
    wandb: bool = False
    """Log to Weights & Biases through Accelerate (WANDB_MODE=offline works without a login)."""
    project: str = "gptft"
    """W&B project."""
    run_name: str | None = None
    """W&B run name (unset: the output folder's name)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    log_model: bool = False
    """Upload the final model (weights, gptft.json, config, metrics, a LoRA run's adapter) to W&B as
    an Artifact of type model."""


@dataclass
class GenerateConfig:
    max_new_tokens: int = 256
    """Longest response generated."""
    temperature: float = 0.0
    """0: greedy decoding; > 0: sampling at this temperature."""
    top_k: int | None = None
    """Sample among the k most likely tokens only."""
    top_p: float | None = None
    """Sample from the smallest set of tokens whose probability reaches p."""
    batch_size: int = 32
    """Prompts generated at once (sorted by length; finished ones leave the batch)."""
    seed: int = 123
    """Seed for sampling."""

    def problems(self) -> list[str]:
        out = positive(self, "max_new_tokens", "top_k", "batch_size") + non_negative(self, "temperature")
        out += seed_problems(self, "seed")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            out.append(f"top_p: must be in (0, 1] (got {self.top_p})")
        return out


@dataclass
class JobConfig:
    """The sections every job has; each task's job class adds its ``data`` (and more)."""

    task: str = ""
    """Which job this is (a name in the task registry, gptft.registry)."""
    output_dir: str = "runs/job"
    """Run folder: config, weights, metrics, logs, plots, checkpoints."""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


Job = JobConfig


# ---- reading and writing jobs ----------------------------------------------------------------------

def _key_lines(text: str) -> tuple[dict[str, int], list[str]]:
    """Map dotted keys of a YAML document to their (1-based) line numbers, and list the keys
    given twice in one mapping (YAML keeps the last silently: a second ``train:`` would replace
    the first section wholesale) as ``line N: duplicate key 'train' (first at line M)``."""
    lines: dict[str, int] = {}
    duplicates: list[str] = []

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                line = k.start_mark.line + 1
                if key in seen:
                    duplicates.append(f"{line}: duplicate key {key!r} (first at line {seen[key]})")
                seen.setdefault(key, line)
                lines.setdefault(key, line)
                walk(v, key)

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines, duplicates


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "model.trainable=all"]`` → ``{"train.lr": 1e-4, ...}`` (YAML values)."""
    out, bad = {}, []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            bad.append(f"override {item!r}: expected dotted.key=value")
            continue
        try:
            out[key] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            out[key] = raw
    if bad:
        raise GPTFTError("; ".join(bad))
    return out


def _apply_overrides(data: dict, overrides: dict[str, Any]) -> list[str]:
    """Set each dotted key in `data` (copying the sections it changes); return the keys that
    reach into a value instead of a section (``train.lr.x=5``)."""
    bad = []
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = data
        for i, p in enumerate(parents):
            child = node.get(p, {})
            if not isinstance(child, dict):
                bad.append(f"{key}: {'.'.join(parents[: i + 1])} is a value, not a section")
                break
            node[p] = node = dict(child)
        else:
            node[leaf] = value
    return bad


PATH_KEYS = frozenset({"output_dir", "path", "train_path", "val_path", "test_path", "checkpoint",
                       "resume"})
"""Keys (in any section) that hold a file or folder path: a leading ``~`` means the home folder."""


def _expand_home(obj: Any) -> None:
    """Expand a leading ``~`` in the path keys of `obj` and its sections, as a shell would."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _expand_home(value)
        elif f.name in PATH_KEYS and isinstance(value, str) and value.startswith("~"):
            setattr(obj, f.name, os.path.expanduser(value))


def job_from_dict(data: dict, source: str = "config", overrides: dict[str, Any] | None = None,
                  lines: dict[str, int] | None = None) -> Job:
    """Build and validate a job from plain data plus dotted overrides; raise one error listing all."""
    if not isinstance(data, dict):
        raise GPTFTError(f"{source}: expected a mapping of sections (task, model, data, train, ...)")
    data = dict(data)
    overrides = overrides or {}
    errors = _apply_overrides(data, overrides)
    spec = get_task(data.get("task", DEFAULT_TASK), f"{source}: task")
    job, more = build(spec.job_class(), data)
    errors += more
    _expand_home(job)
    if errors:
        lines = lines or {}

        def where(e: str) -> str:
            key = e.split(":")[0]
            return (f"  {source}" + (f":{lines[key]}" if key in lines else "")
                    + (" (override)" if any(o == key or o.startswith(key + ".") for o in overrides)
                       else "") + f": {e}")

        raise GPTFTError(f"{len(errors)} problem(s) in the configuration:\n"
                         + "\n".join(map(where, errors)))
    return job


MAX_YAML_VALUES = 100_000  # a job file holds a few dozen: more is an alias bomb ("billion laughs")


def safe_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` of `text`, refusing (one ``GPTFTError`` naming `source`) what would
    hang or crash later: an alias that contains its own anchor (a recursive structure), aliases
    that expand to more than ``MAX_YAML_VALUES`` values, nesting deeper than Python's stack."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_graph(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise GPTFTError(f"{source}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def _check_yaml_graph(root: yaml.Node, source: str) -> None:
    count, active, stack = 0, set(), [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            active.discard(id(node))
            continue
        if id(node) in active:
            raise GPTFTError(f"{source}:{node.start_mark.line + 1}: a YAML alias contains its own "
                             "anchor (a recursive structure): not a configuration")
        count += 1
        if count > MAX_YAML_VALUES:
            raise GPTFTError(f"{source}: the YAML expands to more than {MAX_YAML_VALUES:,} values "
                             "through its aliases (&anchor / *alias): not a configuration")
        if isinstance(node, yaml.SequenceNode | yaml.MappingNode):
            active.add(id(node))
            stack.append((node, True))
            children = node.value if isinstance(node, yaml.SequenceNode) else \
                [x for pair in node.value for x in pair]
            stack.extend((child, False) for child in children)


def load_job(path: str | Path, overrides: list[str] | None = None) -> Job:
    """Read a YAML job file, apply ``key=value`` overrides and validate everything."""
    path = Path(path)
    check_file(path, "config file")
    try:
        text = path.read_text(encoding="utf-8")
        data = safe_yaml(text, str(path))
    except OSError as e:
        raise GPTFTError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise GPTFTError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise GPTFTError(f"{path}{where}: YAML syntax error: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise GPTFTError(f"{path}: empty config file")
    lines, duplicates = _key_lines(text)
    if duplicates:
        raise GPTFTError(f"{path}:" + f"; {path}:".join(duplicates) + " (YAML would keep only the last)")
    return job_from_dict(data, str(path), parse_overrides(overrides or []), lines)


def job_to_dict(job: Job) -> dict:
    return dataclasses.asdict(job)


def job_to_yaml(job: Job, header: str = "") -> str:
    """The YAML form of a job (what ``load_job`` reads back to an equal job)."""
    return header + yaml.safe_dump(job_to_dict(job), sort_keys=False, allow_unicode=True)
