"""Estimate the memory a fine-tuning job needs on each device, and the settings that make it fit.

  gptft plan --config configs/instruct.yaml
  gptft plan --config configs/instruct.yaml model.trainable=lora --gpus 8 --gpu-memory 80GB
  gptft plan --config configs/dpo.yaml --gpu-memory 24GB --json

Per device: the weights, gradients and AdamW state of what trains, the best-weights copy, the
activations (by sequence length and micro-batch, with and without train.activation_checkpointing),
the loss's logits and DPO's reference model; the peak; with --gpu-memory, whether it fits and, if
not, the settings that do (same global batch: micro-batch, accumulation, checkpointing, FSDP,
CPU offload, LoRA). With --gpus N > 1 the plan shards with FSDP unless --no-fsdp. An estimate:
docs/distributed.md says how close it came to measured peaks.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML job file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.batch_size=4 model.trainable=lora")
    parser.add_argument("--gpus", type=int, default=1, help="devices the job runs on (default: 1)")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="memory of one device, e.g. 80GB or 24GiB")
    parser.add_argument("--no-fsdp", dest="fsdp", action="store_false", default=None,
                        help="plain data parallelism on several GPUs (every device holds everything)")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="FSDP with the parameters and optimizer state on the host")
    parser.add_argument("--json", action="store_true", help="the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from gptft.config import load_job
    from gptft.errors import GPTFTError
    from gptft.plan import fix_text, fixes, parse_bytes, plan_job, report

    if args.gpus < 1:
        raise GPTFTError(f"--gpus: must be >= 1 (got {args.gpus})")
    budget = parse_bytes(args.gpu_memory) if args.gpu_memory else None
    p = plan_job(load_job(args.config, args.overrides), args.gpus, args.fsdp, args.cpu_offload)
    if not args.json:
        print(report(p, budget))
        return 0
    out = p.to_dict()
    if budget is not None:
        out["gpu_memory_bytes"] = round(budget)
        out["fits"] = p.peak <= budget
        out["fixes"] = [] if out["fits"] else [
            {"settings": option, "text": fix_text(option), "peak_bytes": round(q.peak)}
            for option, q in fixes(p.shape, p.setup, budget)]
    print(json.dumps(out, indent=2))
    return 0
