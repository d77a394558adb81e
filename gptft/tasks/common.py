"""Pieces both tasks build the same way: the GPT, the data loaders, the run folder's files."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from gptft.config import Job, ModelConfig, job_to_yaml
from gptft.data.sampler import EpochBatchSampler
from gptft.io import write_json, write_text
from gptft.model import GPT, GPTConfig
from gptft.runs import save_model

CONFIG_HEADER = "# The resolved configuration of this run. Re-run it with:\n" \
                "#   accelerate launch launch/finetune.py --config {path}\n"


def build_gpt(cfg: ModelConfig, vocab_size: int) -> GPT:
    """Pretrained GPT-2 weights (local folder or hub), or a fresh model of the preset's shape."""
    if cfg.weights == "pretrained":
        return GPT.from_pretrained(cfg.checkpoint or cfg.name, drop_rate=cfg.drop_rate,
                                   pad_vocab_multiple=cfg.pad_vocab_multiple)
    shape = {k: getattr(cfg, k) for k in ("n_layers", "emb_dim", "n_heads", "context_length")
             if getattr(cfg, k) is not None}
    return GPT(GPTConfig.from_name(cfg.name, vocab_size=vocab_size, drop_rate=cfg.drop_rate,
                                   pad_vocab_multiple=cfg.pad_vocab_multiple, **shape))


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


def start_run_folder(job: Job, accelerator: Accelerator) -> None:
    """Create ``output_dir`` and write the resolved ``config.yaml`` (main process)."""
    out = Path(job.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not job.train.resume:  # a new run: an earlier run's log and checkpoints go
            (out / "log.jsonl").unlink(missing_ok=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        write_text(out / "config.yaml", job_to_yaml(job, CONFIG_HEADER.format(path=out / "config.yaml")))
    accelerator.wait_for_everyone()


def save_final(accelerator: Accelerator, model: torch.nn.Module, job: Job, meta: dict,
               metrics: dict) -> None:
    """Write the final weights, ``gptft.json`` and ``metrics.json`` (main process, atomically).

    A LoRA run also keeps its adapter (``adapter/``) and saves the merged plain model. Both come
    from the gathered state dict, which every process helps build (a collective under FSDP).
    """
    state = accelerator.get_state_dict(model)  # the full weights on the main process (FSDP too)
    state = {_state_name(k): v for k, v in state.items()}
    if accelerator.is_main_process:
        out = Path(job.output_dir)
        if job.model.trainable == "lora":
            from gptft.lora import split_state_dict, write_adapter

            adapter, state = split_state_dict(state, _trainable_names(accelerator, model), job.lora)
            write_adapter(adapter, out / "adapter", job.lora,
                          extra={"base_model": job.model.checkpoint or job.model.name, **meta})
        save_model(out, state, meta)
        write_json(out / "metrics.json", metrics)
    accelerator.wait_for_everyone()


def _trainable_names(accelerator: Accelerator, model: torch.nn.Module) -> set[str]:
    """State-dict names of the parameters that train."""
    return {_state_name(n) for n, p in accelerator.unwrap_model(model).named_parameters()
            if p.requires_grad}


def _state_name(name: str) -> str:
    """A parameter's name in the plain model: without the wrappers' parts (FSDP, checkpointing,
    torch.compile's ``_orig_mod``, which Accelerate's ``get_state_dict`` keeps)."""
    return re.sub(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.", "", name)


def trainable_summary(accelerator: Accelerator, model: torch.nn.Module, policy: str) -> dict:
    """Print and return the trainable / total parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"trainable parameters ({policy}): {trainable:,} of {total:,} "
                      f"({100 * trainable / total:.2f}%)")
    return {"trainable_parameters": trainable, "total_parameters": total}
