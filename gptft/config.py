"""Job configuration: typed dataclasses; a YAML file is only their serialized form.

``load_job(path, overrides)`` reads a YAML file, applies dotted ``key=value`` overrides, checks
every key, type and range, and reports all problems at once in one ``GPTFTError`` that names the
file, line and field of each.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gptft.errors import GPTFTError


@dataclass
class ModelConfig:
    name: str = "gpt2-small"
    """Preset and hub name: gpt2-small, gpt2-medium, gpt2-large, gpt2-xl."""
    weights: Literal["pretrained", "random"] = "pretrained"
    """pretrained: load GPT-2 weights (``checkpoint`` or the hub); random: initialise afresh."""
    checkpoint: str | None = None
    """Local Hugging Face GPT-2 folder (config.json + model.safetensors) to load instead of the hub."""
    n_layers: int | None = None
    """Override the preset's number of blocks (random weights only)."""
    emb_dim: int | None = None
    """Override the preset's width (random weights only)."""
    n_heads: int | None = None
    """Override the preset's number of heads (random weights only)."""
    context_length: int | None = None
    """Override the preset's context length (random weights only)."""
    drop_rate: float = 0.0
    """Dropout rate during fine-tuning."""
    pad_vocab_multiple: int = 1
    """Pad the embedding table to a multiple of this (64: faster on GPUs)."""
    trainable: Literal["head", "last_block", "last_two_blocks", "all", "lora"] = "last_block"
    """Which parameters train: the head only; + last block and final LayerNorm; + the last two
    blocks; everything; or LoRA adapters (+ the classification head), see ``lora``."""

    def problems(self) -> list[str]:
        out = []
        if self.weights == "pretrained":
            shape = [k for k in ("n_layers", "emb_dim", "n_heads", "context_length")
                     if getattr(self, k) is not None]
            if shape:
                out.append(f"{', '.join(shape)}: only with weights=random "
                           "(pretrained weights fix the shape)")
        if not 0 <= self.drop_rate < 1:
            out.append(f"drop_rate: must be in [0, 1) (got {self.drop_rate})")
        return out + _positive(self, "n_layers", "emb_dim", "n_heads", "context_length",
                               "pad_vocab_multiple")


@dataclass
class ClassificationData:
    path: str | None = None
    """Local data file (CSV/TSV/JSONL). Unset: download the SMS Spam Collection into the cache."""
    format: Literal["auto", "csv", "tsv", "jsonl", "sms"] = "auto"
    """File format; auto: by extension (SMSSpamCollection / .tsv without header: sms)."""
    text_column: str = "text"
    """Column (or JSON key) holding the text."""
    label_column: str = "label"
    """Column (or JSON key) holding the label."""
    labels: list[str] | None = None
    """Label names in class-index order; unset: sorted names found in the training data
    (the SMS set maps ham → 0, spam → 1)."""
    train_path: str | None = None
    """Ready-made training split (then val_path and test_path are needed too; path is unused)."""
    val_path: str | None = None
    """Ready-made validation split."""
    test_path: str | None = None
    """Ready-made test split."""
    balance: bool = True
    """Undersample every class to the size of the smallest (the book: 747 ham, 747 spam)."""
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    """Train / validation / test fractions of a single file, after shuffling with ``seed``."""
    seed: int = 123
    """Seed of the balancing and the split."""
    max_length: int | None = None
    """Truncate texts to this many tokens; unset: the longest training text, capped by the context."""
    group_by_length: bool = True
    """Batch texts of similar length together (less padding), the batches in a random order."""

    def problems(self) -> list[str]:
        return _split_problems(self.split) + _positive(self, "max_length")


@dataclass
class InstructionData:
    path: str | None = None
    """Local JSON array or JSONL of {instruction, input?, output}; unset: download the book's set."""
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])
    """Train / validation / test fractions (the book: 85% train, 10% test, 5% validation)."""
    shuffle: bool = False
    """Shuffle with ``seed`` before splitting; false: file order, as the book."""
    seed: int = 123
    """Seed of the shuffle."""
    prompt_style: Literal["alpaca", "phi3"] = "alpaca"
    """Prompt template (gptft.data.instruction.PROMPT_STYLES)."""
    mask_prompt: bool = False
    """Train on the response only: the prompt's targets are ignored by the loss."""
    max_length: int | None = None
    """Truncate examples to this many tokens; unset: the model's context length."""
    packing: bool = False
    """Pack several examples into each row (attention and positions kept per example)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding), the batches in a random order;
    false: random batches, as the book."""

    def problems(self) -> list[str]:
        return _split_problems(self.split) + _positive(self, "max_length")


@dataclass
class TrainConfig:
    epochs: int = 5
    """Passes over the training split."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (unset: run all epochs)."""
    batch_size: int = 8
    """Examples per micro-batch on each process; a step takes batch_size x processes x grad_accum_steps."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; the loss is normalised over all of them."""
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
    """Evaluate on the validation split every this many steps (0: at epoch ends only)."""
    eval_batches: int | None = None
    """Evaluate on this many batches during training (unset: the whole split)."""
    log_every: int = 10
    """Log the training loss every this many steps."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every this many steps (0: at epoch ends only)."""
    keep_last: int = 2
    """Checkpoints to keep (older ones are pruned)."""
    resume: bool | str = False
    """true: resume from the latest checkpoint in output_dir; a path: from that checkpoint."""
    seed: int = 123
    """Seed of the model initialisation, dropout and the data order."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision (Accelerate)."""
    device: Literal["auto", "cpu"] = "auto"
    """auto: the accelerator Accelerate finds (GPU if any); cpu: force the CPU."""
    compile: bool = False
    """Compile the model with torch.compile."""
    skip_nonfinite: bool = False
    """Skip (and count) a step whose loss or gradients are not finite instead of stopping."""

    def problems(self) -> list[str]:
        out = _positive(self, "epochs", "max_steps", "batch_size", "grad_accum_steps", "lr",
                        "log_every", "keep_last", "max_grad_norm", "eval_batches")
        out += _non_negative(self, "weight_decay", "warmup_steps", "eval_every", "checkpoint_every")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"betas: two numbers in [0, 1) (got {self.betas})")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"min_lr_ratio: must be in [0, 1] (got {self.min_lr_ratio})")
        return out


@dataclass
class LoRAConfig:
    rank: int = 16
    """Rank r of the update B @ A."""
    alpha: float = 16.0
    """Scale: the update is multiplied by alpha / rank (as in the LoRA paper and peft)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    targets: list[str] = field(default_factory=lambda: ["attn.c_attn", "attn.c_proj",
                                                        "mlp.c_fc", "mlp.c_proj"])
    """Linear layers to adapt: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, head."""

    def problems(self) -> list[str]:
        known = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "head"}
        out = [f"targets: unknown layer {t!r} (known: {', '.join(sorted(known))})"
               for t in self.targets if t not in known]
        if not 0 <= self.dropout < 1:
            out.append(f"dropout: must be in [0, 1) (got {self.dropout})")
        return out + _positive(self, "rank", "alpha")


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
    batch_size: int = 8
    """Prompts generated at once."""
    seed: int = 123
    """Seed for sampling."""

    def problems(self) -> list[str]:
        out = _positive(self, "max_new_tokens", "top_k", "batch_size") + _non_negative(self, "temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            out.append(f"top_p: must be in (0, 1] (got {self.top_p})")
        return out


@dataclass
class ClassificationJob:
    task: Literal["classification"] = "classification"
    """Which job this is."""
    output_dir: str = "runs/classification"
    """Run folder: config, weights, metrics, logs, plots, checkpoints."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: ClassificationData = field(default_factory=ClassificationData)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class InstructionJob:
    task: Literal["instruction"] = "instruction"
    """Which job this is."""
    output_dir: str = "runs/instruction"
    """Run folder: config, weights, metrics, logs, responses, checkpoints."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="gpt2-medium", trainable="all"))
    data: InstructionData = field(default_factory=InstructionData)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2))
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)


Job = ClassificationJob | InstructionJob
JOBS: dict[str, type] = {"classification": ClassificationJob, "instruction": InstructionJob}


# ---- range checks ------------------------------------------------------------------------------

def _positive(obj, *names: str) -> list[str]:
    return [f"{n}: must be > 0 (got {getattr(obj, n)})" for n in names
            if getattr(obj, n) is not None and getattr(obj, n) <= 0]


def _non_negative(obj, *names: str) -> list[str]:
    return [f"{n}: must be >= 0 (got {getattr(obj, n)})" for n in names
            if getattr(obj, n) is not None and getattr(obj, n) < 0]


def _split_problems(split: list[float]) -> list[str]:
    if len(split) != 3 or any(f < 0 for f in split) or abs(sum(split) - 1) > 1e-6 or split[0] == 0:
        return [f"split: three non-negative fractions (train, val, test) summing to 1 (got {split})"]
    return []


# ---- building dataclasses from plain data, with every problem collected -------------------------

def _check_value(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Return `value` converted to type `tp`, or record an error for `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            sub: list[str] = []
            out = _check_value(value, arg, key, sub)
            if not sub:
                return out
        errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in args:
            errors.append(f"{key}: must be one of {', '.join(map(str, args))} (got {value!r})")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list of {_type_name(args[0])}, got {value!r}")
            return value
        return [_check_value(v, args[0], f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "5e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}[tp]
    if not ok:
        errors.append(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return float(value) if ok and tp is float else value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _build(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data.keys() - names:
        errors.append(f"{prefix}{'.' if prefix else ''}{key}: unknown key "
                      f"(known: {', '.join(sorted(names))})")
    values = {}
    for name in names & data.keys():
        before = len(errors)
        value = _check_value(data[name], hints[name], f"{prefix}{'.' if prefix else ''}{name}", errors)
        if len(errors) == before:  # keep the default where the value is wrong
            values[name] = value
    obj = cls(**values)
    if hasattr(obj, "problems"):
        errors += [f"{prefix}.{p}" for p in obj.problems()]
    return obj


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys of a YAML document to their (1-based) line numbers."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[key] = k.start_mark.line + 1
                walk(v, key)

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


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


def job_from_dict(data: dict, source: str = "config", overrides: dict[str, Any] | None = None,
                  lines: dict[str, int] | None = None) -> Job:
    """Build and validate a job from plain data plus dotted overrides; raise one error listing all."""
    if not isinstance(data, dict):
        raise GPTFTError(f"{source}: expected a mapping of sections (task, model, data, train, ...)")
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[leaf] = value
    task = data.get("task", "classification")
    if task not in JOBS:
        raise GPTFTError(f"{source}: task: must be one of {', '.join(JOBS)} (got {task!r})")
    errors: list[str] = []
    job = _build(JOBS[task], data, "", errors)
    if errors:
        lines = lines or {}
        where = [f"  {source}" + (f":{lines[e.split(':')[0]]}" if e.split(":")[0] in lines else "")
                 + (" (override)" if e.split(":")[0] in (overrides or {}) else "") + f": {e}"
                 for e in errors]
        raise GPTFTError(f"{len(errors)} problem(s) in the configuration:\n" + "\n".join(where))
    return job


def load_job(path: str | Path, overrides: list[str] | None = None) -> Job:
    """Read a YAML job file, apply ``key=value`` overrides and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise GPTFTError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise GPTFTError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise GPTFTError(f"{path}{where}: YAML syntax error: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise GPTFTError(f"{path}: empty config file")
    return job_from_dict(data, str(path), parse_overrides(overrides or []), _key_lines(text))


def job_to_dict(job: Job) -> dict:
    return dataclasses.asdict(job)


def job_to_yaml(job: Job, header: str = "") -> str:
    """The YAML form of a job (what ``load_job`` reads back to an equal job)."""
    return header + yaml.safe_dump(job_to_dict(job), sort_keys=False, allow_unicode=True)
