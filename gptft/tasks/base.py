"""The pieces tasks build the same way: the model, the data loaders, the parameter counts.

A task (``gptft.task.TaskBase``, re-exported here) supplies its data, model, loss, metrics and
declared outputs; ``gptft.registry`` names it; ``gptft.run`` runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from gptft.config import Job, ModelConfig
from gptft.data.sampler import EpochBatchSampler
from gptft.errors import GPTFTError
from gptft.runs import (  # noqa: F401 (job_tokenizer: the tasks' import)
    check_vocab,
    is_run_folder,
    job_tokenizer,
    load_gpt,
)
from gptft.task import TaskBase  # noqa: F401 (the tasks' import)


def build_gpt(cfg: ModelConfig, vocab_size: int, device: torch.device | None = None) -> torch.nn.Module:
    """The language model of a job, of any family (``gptft.models``): pretrained weights (a
    finished gptft language-model run, a Hugging Face folder or the hub), or a fresh model of the
    preset's architecture, built directly on `device` (a fresh model is initialised there, not on
    the CPU first)."""
    from gptft.models import from_pretrained, hub_repo, preset_config

    shape = cfg.shape()
    if cfg.weights == "pretrained" and cfg.checkpoint and is_run_folder(cfg.checkpoint):
        model, _ = load_gpt(cfg.checkpoint, device, drop_rate=cfg.drop_rate,
                            pad_vocab_multiple=cfg.pad_vocab_multiple)  # its shape from gptft.json
        return check_checkpoint_shape(model, shape, cfg.checkpoint).train()
    if cfg.weights == "pretrained":
        source = cfg.checkpoint or hub_repo(cfg.name)
        model = from_pretrained(source, device=device, drop_rate=cfg.drop_rate,
                                pad_vocab_multiple=cfg.pad_vocab_multiple)
        check_vocab(model.config.vocab_size, vocab_size,
                    Path(cfg.checkpoint) / "config.json" if cfg.checkpoint else cfg.name,
                    exact=model.architecture == "gpt2")
        return check_checkpoint_shape(model, shape, cfg.checkpoint or cfg.name)
    from gptft.models import build_model

    config = preset_config(cfg.name, vocab_size=vocab_size, drop_rate=cfg.drop_rate,
                           pad_vocab_multiple=cfg.pad_vocab_multiple, **shape)
    check_model_fits(config, device)
    with torch.device(device or "cpu"):
        return build_model(config)


build_model = build_gpt


def check_model_fits(config, device: torch.device | None) -> None:
    """Refuse, before allocating, a model whose fp32 weights alone exceed the memory of the
    device it is built on (an ``emb_dim`` or ``context_length`` typed with extra zeros), from the
    parameter count of its shape (``gptft.plan.Shape``, any family)."""
    from gptft.plan import Shape

    params = Shape.from_config(config, getattr(config, "architecture", "gpt2")).params()
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        import os

        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * params > memory:
        raise GPTFTError(f"model: {config.n_layers} layers of width emb_dim={config.emb_dim:,}, "
                         f"context_length={config.context_length:,}: about {params / 1e9:,.1f} billion "
                         f"parameters, {4 * params / 2**30:,.0f} GiB for the weights alone, more than the "
                         f"{memory / 2**30:,.0f} GiB of this {device.type.upper()}; choose a smaller "
                         "model.emb_dim, model.context_length or model.n_layers")


def check_checkpoint_shape(model: torch.nn.Module, shape: dict[str, int], source: str) -> torch.nn.Module:
    """`model` if the shape keys a config sets (with a checkpoint) are the checkpoint's."""
    wrong = [f"model.{k}={v} (the checkpoint has {getattr(model.config, k, None)})"
             for k, v in shape.items() if getattr(model.config, k, None) != v]
    if wrong:
        raise GPTFTError(f"{source}: the checkpoint's shape differs from the config: " + ", ".join(wrong)
                         + "; drop these keys (or set them to null) to take the checkpoint's shape")
    return model


def make_loader(dataset: Dataset, collate: Callable, batch_size: int, seed: int, *,
                shuffle: bool, group_by_length: bool, accelerator: Accelerator) -> DataLoader:
    """A DataLoader over an ``EpochBatchSampler`` (seeded order per epoch, optional grouping).

    Batches are cut from global batches of ``batch_size * num_processes`` examples, so N
    processes see per step what one process with N times the batch sees. A training loader
    (``shuffle``) drops the incomplete last global batch, as the book's ``drop_last=True``
    (unless the split is smaller than one global batch: then that is the only batch).
    """
    sampler = EpochBatchSampler(dataset.lengths, batch_size, seed=seed, shuffle=shuffle,
                                group_by_length=group_by_length,
                                num_processes=accelerator.num_processes, drop_last=shuffle)
    # Its own generator: each new iterator draws a seed from it, not from the global RNG that
    # dropout uses, so a run resumed mid-epoch (a new iterator) keeps the uninterrupted RNG stream.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                      pin_memory=accelerator.device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


def eval_batch_size(job: Job) -> int:
    """``train.eval_batch_size``, or 4 x the training batch (no gradients to keep)."""
    return job.train.eval_batch_size or 4 * job.train.batch_size


def trainable_summary(accelerator: Accelerator, model: torch.nn.Module, policy: str) -> dict:
    """Print and return the trainable / total parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"trainable parameters ({policy}): {trainable:,} of {total:,} "
                      f"({100 * trainable / total:.2f}%)")
    return {"trainable_parameters": trainable, "total_parameters": total}
