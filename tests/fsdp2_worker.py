"""One process of tests/test_fsdp2.py (run by ``torchrun --nproc_per_node 2``, gloo on the CPU).

Trains the same tiny GPT four ways on the same global batches (each process its half): DDP;
gptft's FSDP2 (``gptft.fsdp.shard``) for 4 steps; the same with activation checkpointing; FSDP2
for 2 steps, a sharded checkpoint, a fresh sharded model and optimizer loaded from it, 2 more
steps. Process 0 writes the per-step losses and
the largest weight differences to the JSON file named by argv[1].
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gptft.activations import apply_activation_checkpointing
from gptft.fsdp import full_state_dict, load_sharded, save_sharded, shard
from gptft.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_layers=2, n_heads=4)
STEPS, ROWS = 4, 4  # rows per process and step


def batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 101, (2 * ROWS, 16), generator=g) for _ in range(STEPS)]
    return [d[rank * ROWS : (rank + 1) * ROWS] for d in data]


def fresh() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def step(model, optimizer, ids: torch.Tensor, scale: float) -> float:
    loss = model(ids, labels=ids.roll(-1, dims=1)).sum()
    (loss / scale).backward()  # both average gradients over processes: the sum / global tokens
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / (scale * dist.get_world_size())


def optimizer_of(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model, optimizer, data, start: int = 0, stop: int = STEPS) -> list[float]:
    scale = ROWS * 16 / 1.0  # tokens per process: DDP and FSDP average over the processes
    return [step(model, optimizer, data[i], scale) for i in range(start, stop)]


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = batches(rank)

    ddp_model = fresh()
    ddp = DistributedDataParallel(ddp_model)
    ddp_losses = train(ddp, optimizer_of(ddp), data)
    ddp_weights = {k: v.detach().clone() for k, v in ddp_model.state_dict().items()}

    model = shard(fresh())
    local = sum(p.to_local().numel() for p in model.parameters())
    optimizer = optimizer_of(model)
    fsdp_losses = train(model, optimizer, data)
    fsdp_weights = full_state_dict(model)

    checkpointed = fresh()
    apply_activation_checkpointing(checkpointed, True)
    checkpointed = shard(checkpointed)
    checkpointed_losses = train(checkpointed, optimizer_of(checkpointed), data)

    folder = [tempfile.mkdtemp(prefix="gptft-fsdp2-") if rank == 0 else None]
    dist.broadcast_object_list(folder)
    model = shard(fresh())
    optimizer = optimizer_of(model)
    first = train(model, optimizer, data, 0, 2)
    save_sharded(model, optimizer, folder[0])
    del model, optimizer
    torch.manual_seed(99)  # a different model until the checkpoint loads
    resumed = shard(GPT(CONFIG))
    optimizer = optimizer_of(resumed)
    load_sharded(resumed, optimizer, folder[0])
    rest = train(resumed, optimizer, data, 2, STEPS)
    resumed_weights = full_state_dict(resumed)

    if rank == 0:
        def diff(a, b):
            return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        result = {"ddp": ddp_losses, "fsdp": fsdp_losses, "resumed": first + rest,
                  "checkpointed": checkpointed_losses,
                  "local_share": local / sum(p.numel() for p in ddp_model.parameters()),
                  "fsdp_vs_ddp_weights": diff(fsdp_weights, ddp_weights),
                  "resumed_vs_fsdp_weights": diff(resumed_weights, fsdp_weights),
                  "weights": sorted(fsdp_weights), "sharded_files": sorted(
                      p.name for p in __import__("pathlib").Path(folder[0]).iterdir())}
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Leave without running destructors: gloo's threads can abort a process at exit
    # ("terminate called without an active exception") after all its work is done.
    sys.stdout.flush()
    os._exit(0)
