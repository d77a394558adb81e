"""Activation memory of a forward and backward pass, with and without activation checkpointing.

Each setting runs in a fresh process on the CPU: a GPT of the given shape (every parameter
training, the gradients already allocated by a first pass), then the peak resident memory is reset
(``/proc/self/clear_refs``) and a second forward + backward pass of ``hidden_states`` runs; its
peak growth over the resident memory before it is the activation memory (what the pass keeps for
the backward pass, plus the backward pass's own temporaries). glibc returns every block of 64 KiB
or more to the system when freed (``MALLOC_MMAP_THRESHOLD_``), so the peak follows live tensors.

    python benchmarks/activation_memory.py                 # 12 blocks, width 256, T=1024, batch 1
    python benchmarks/activation_memory.py --layers 12 --emb-dim 768 --seq-len 1024 --json
    python benchmarks/activation_memory.py --family qwen3-0.6b      # Qwen3's block (q/k norm, SwiGLU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PASS = """
import json, sys, torch
from gptft.activations import apply_activation_checkpointing
from gptft.models import build_model, preset_config
layers, emb, heads, T, B, setting = (int(a) for a in sys.argv[1:7])
family = sys.argv[7]
torch.manual_seed(0)
shape = dict(vocab_size=512, context_length=T, emb_dim=emb, n_layers=layers, n_heads=heads)
if family != "gpt2":  # 2 key/value heads, heads of 64, an MLP 3 x the width (Qwen3's proportions)
    shape.update(n_kv_heads=2, head_dim=64, intermediate_size=3 * emb)
model = build_model(preset_config("gpt2-small" if family == "gpt2" else family, **shape))
if setting:
    apply_activation_checkpointing(model, True if setting == 1 else setting)
ids = torch.randint(0, 512, (B, T))
def step():
    model.hidden_states(ids).float().square().mean().backward()
step()  # allocates the gradients: the measured pass adds activations only
def rss(field):
    return 1024 * int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident size (VmHWM) to the current one
before = rss("VmRSS:")
step()
print(json.dumps({"bytes": rss("VmHWM:") - before}))
"""


def measure(layers: int, emb_dim: int, heads: int, seq_len: int, batch: int, setting: int,
            family: str = "gpt2") -> int:
    """Activation bytes of one pass in a fresh process (`setting`: 0 off, 1 every block, N every
    Nth)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "GPTFT_CPU_ALLOCATOR": "default",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", PASS, *map(str, (layers, emb_dim, heads, seq_len,
                                                                 batch, setting, family))],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--emb-dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--family", default="gpt2", help="gpt2 or a family preset, e.g. qwen3-0.6b")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    args = parser.parse_args()
    shape = (args.layers, args.emb_dim, args.heads, args.seq_len, args.batch_size)
    off, on = measure(*shape, 0, args.family), measure(*shape, 1, args.family)
    result = {"family": args.family, "layers": args.layers, "emb_dim": args.emb_dim, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "activation_bytes_off": off, "activation_bytes_on": on,
              "reduction": round(1 - on / off, 4)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.family}: {args.layers} blocks, width {args.emb_dim}, T={args.seq_len}, "
              f"batch {args.batch_size}: "
              f"activations {off / 2**20:.1f} MiB without checkpointing, {on / 2**20:.1f} MiB with "
              f"(-{result['reduction']:.1%})")


if __name__ == "__main__":
    main()
