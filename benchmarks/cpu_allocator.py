"""The cost of glibc returning large freed blocks to the kernel, per training step (gptft/cpu.py).

Times the same CPU training step (the spam-tiny classifier: 4 blocks, width 256, GPT-2's
vocabulary, everything trainable, fused AdamW, a batch of 8 x 40 tokens) in two fresh processes:
glibc's defaults (``GPTFT_CPU_ALLOCATOR=default``) and ``gptft.cpu.keep_freed_memory``.

    python benchmarks/cpu_allocator.py --steps 60 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEP = """
import sys, time, torch
from gptft.classifier import GPTClassifier
from gptft.cpu import keep_freed_memory
from gptft.model import GPT, GPTConfig
keep_freed_memory()
torch.manual_seed(0)
model = GPTClassifier(GPT(GPTConfig(vocab_size=50257, context_length=256, emb_dim=256, n_layers=4,
                                    n_heads=4)), 2)
opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1, fused=True)
x, y, lengths = torch.randint(0, 50257, (8, 40)), torch.randint(0, 2, (8,)), torch.full((8,), 40)
def step():
    torch.nn.functional.cross_entropy(model(x, lengths), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(5):
    step()
steps = int(sys.argv[1])
start = time.perf_counter()
for _ in range(steps):
    step()
print((time.perf_counter() - start) / steps * 1000)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for repeat in range(args.repeats):
        for label, setting in (("glibc defaults", "default"), ("keep_freed_memory", "")):
            out = subprocess.run([sys.executable, "-c", STEP, str(args.steps)], check=True, text=True,
                                 capture_output=True, env={**env, "GPTFT_CPU_ALLOCATOR": setting}).stdout
            print(f"[repeat {repeat + 1}] {label}: {float(out.split()[-1]):.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
