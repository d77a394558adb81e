"""The training flow every task shares, and the pieces tasks build the same way.

``run_task`` builds the trainer, fits, evaluates each split, saves the run folder and lets the
task write its own outputs. A task (see ``gptft.task.TaskBase``) supplies its data, model, loss,
metrics and declared outputs; ``gptft.registry`` registers it under a name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from gptft import runfolder
from gptft.checkpoints import ResumePoint
from gptft.config import Job, ModelConfig, job_to_yaml
from gptft.console import SPLITS, duration, metrics_table  # noqa: F401 (metrics_table: moved)
from gptft.data.sampler import EpochBatchSampler
from gptft.errors import GPTFTError
from gptft.io import write_json, write_text
from gptft.model import tied_names
from gptft.registry import declared_outputs, get_task
from gptft.runfolder import RunFolder
from gptft.runs import (  # noqa: F401 (job_tokenizer: the tasks' import)
    TOKENIZER_DIR,
    check_vocab,
    is_run_folder,
    job_tokenizer,
    load_gpt,
    save_model,
)
from gptft.signals import Interrupted, StopRequest, signal_at
from gptft.task import TaskBase
from gptft.timing import Phases
from gptft.tokenizer import HFTokenizer
from gptft.trainer import Trainer

CONFIG_HEADER = "# The resolved configuration of this run. Re-run it with:\n" \
                "#   accelerate launch launch/finetune.py --config {path}\n"


def run_task(task: TaskBase, resume: ResumePoint | None = None, phases: Phases | None = None,
             stop: StopRequest | None = None) -> dict:
    """Train, evaluate every split, write the run folder and the task's outputs; the metrics.

    `stop` (``gptft.finetune``'s): a signal after training stops the run where a phase ends, with
    a checkpoint of the last step (``Trainer.save_last_checkpoint``) to resume from.
    """
    job, acc = task.job, task.accelerator
    phases = phases or Phases()

    def stop_point(phase: str) -> None:
        if stop is not None and stop.agreed(acc):
            path = trainer.save_last_checkpoint()
            raise Interrupted(f"stopped by {stop.name} during the {phase}, after training: "
                              f"checkpoint {path} of step {trainer.state.step} saved; continue with "
                              "the same command and train.resume=true (it evaluates and saves then)")

    signal_at("resume loading")
    if job.model.adapter:  # a PEFT adapter to continue from (a checkpoint, if resuming, comes later)
        from gptft.lora import load_adapter

        load_adapter(task.model, job.model.adapter)
    trainer = Trainer(job, acc, task, task.model, task.loader("train", train=True), task.loader("val"),
                      eval_loader=task.loader, resume=resume, phases=phases)
    trainer.fit()
    stop_point("end of training")
    signal_at("final evaluation")
    metrics: dict[str, Any] = {**task.counts, "steps": trainer.state.step,
                               "best_step": trainer.state.best_step}
    bound = job.train.final_eval_batches
    if bound:
        metrics["final_eval_batches"] = bound
        trainer.print(f"final evaluation on at most {bound} batches per split "
                      "(train.final_eval_batches): not the whole splits")
    with phases("final_evaluation"):
        for split in (s for s in SPLITS if task.has_split(s)):
            gathered = trainer.gather(trainer.loader(split), bound, desc=f"evaluate {split}")
            values = task.eval_metrics(gathered)
            task.eval_names = tuple(values)
            metrics.update({f"{split}_{k}": v for k, v in values.items()})
            metrics.update(task.split_report(split, gathered))
            stop_point("final evaluation")
    trainer.log({f"final/{k}": v for k, v in metrics.items() if isinstance(v, float)})
    meta = {"task": job.task, "produces": get_task(job.task).produces,
            "architecture": task.backbone().architecture, "model": task.gpt_config().to_dict(),
            "tokenizer": task.tokenizer.name, **task.meta()}
    signal_at("saving")
    with phases("saving"):
        if acc.is_main_process and isinstance(task.tokenizer, HFTokenizer):  # its files go along
            (Path(job.output_dir) / TOKENIZER_DIR).mkdir(exist_ok=True)
            task.tokenizer.save(Path(job.output_dir) / TOKENIZER_DIR)
        save_final(acc, trainer.model, job, meta, metrics)
    stop_point("final save")
    signal_at("outputs")
    task.write_outputs(trainer, metrics)
    stop_point("outputs (plots, responses)")
    signal_at("marking finished")
    metrics["time"] = phases.report()
    if acc.is_main_process:
        write_json(RunFolder(job.output_dir).metrics, rounded(metrics))
        runfolder.mark(Path(job.output_dir), "finished")  # last: the final files form one set
        print(closing_summary(task, metrics), flush=True)
    return metrics


def rounded(value: Any, digits: int = 6) -> Any:
    """Floats to `digits` decimals (no float32 noise in ``metrics.json``), recursively."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def closing_summary(task: TaskBase, metrics: dict) -> str:
    """What the run ends with: the final metrics, where the time went, the run folder and the
    commands to try next."""
    out = task.job.output_dir
    time = metrics["time"]
    phases = ", ".join(f"{k.replace('_', ' ')} {duration(v)}" for k, v in time.items() if k != "total")
    bounded = metrics.get("final_eval_batches")
    kept = (f"step {metrics['best_step']} of {metrics['steps']}, the best by {task.best_metric}"
            if metrics["best_step"] >= 0 else f"the last weights, step {metrics['steps']}: no validation ran")
    files = RunFolder(out).files(task.outputs)
    lines = [f"final evaluation of the kept model ({kept}"
             + (f"; at most {bounded} batches per split)" if bounded else ")") + ":",
             task.summary(metrics),
             f"elapsed: {duration(time['total'])} ({phases})",
             f"run folder: {out} ({', '.join(files)})"]
    commands = task.next_commands(out)
    if commands:
        lines += ["next:", *(f"  {c}" for c in commands)]
    return "\n".join(lines)


# ---- pieces tasks build the same way ------------------------------------------------------------------

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


def start_run_folder(job: Job, accelerator: Accelerator, resuming: bool = False) -> None:
    """Mark ``output_dir`` as a running gptft run and write the resolved ``config.yaml`` (main
    process), after ``gptft.runfolder.check_new_run`` allowed it; a new run with
    ``train.overwrite`` first removes the earlier run's files (only those gptft wrote)."""
    out = RunFolder(job.output_dir)
    if accelerator.is_main_process:
        out.root.mkdir(parents=True, exist_ok=True)
        runfolder.mark(out.root, "running")  # first: readers refuse the folder until the run has finished
        if not resuming and job.train.overwrite:  # (a reset that fails midway: not "finished")
            runfolder.reset_run_folder(out.root, declared_outputs())  # of any task: it may be another's
        write_text(out.config, job_to_yaml(job, CONFIG_HEADER.format(path=out.config)))
    accelerator.wait_for_everyone()


def save_final(accelerator: Accelerator, model: torch.nn.Module, job: Job, meta: dict,
               metrics: dict) -> None:
    """Write the final weights, ``gptft.json`` and ``metrics.json`` (main process, atomically).

    A LoRA run also keeps its adapter (``adapter/``) and saves the merged plain model. Both come
    from the gathered state dict, which every process helps build (a collective under FSDP).
    """
    state = accelerator.get_state_dict(model)  # the full weights on the main process (FSDP too)
    state = {_state_name(k): v for k, v in state.items()}
    tied = {_state_name(k) for k in tied_names(accelerator.unwrap_model(model))}
    if accelerator.is_main_process:
        out = RunFolder(job.output_dir)
        if job.model.trainable == "lora":
            from gptft.lora import base_model_name, split_state_dict, write_adapter

            adapter, state = split_state_dict(state, _trainable_names(accelerator, model), job.lora)
            write_adapter(adapter, out.adapter, job.lora,
                          extra={"base_model": base_model_name(job.model), **meta})
        save_model(out.root, state, meta, tied)
        write_json(out.metrics, metrics)
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
