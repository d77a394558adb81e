"""The memory planner (gptft/plan.py) against the measured peak of real CPU training runs.

Each configuration is a real ``gptft finetune`` in a fresh process, its data made so that every
sequence is exactly ``max_length`` tokens (texts longer than that, truncated), for 3 steps with a
validation after each (the best weights kept from the first). The measured value is the peak
resident memory growth from the start of ``Trainer.fit`` (Linux ``VmHWM`` reset there, as the DPO
memory test does), with every freed block of 64 KiB or more returned to the system, so the peak
follows the live tensors; the planner's is its peak less what is allocated before training (the
weights). Prints one line per configuration and, with ``--json``, a JSON list.

    python benchmarks/plan_check.py            # GPT-2 and Qwen3 x full / LoRA x checkpointing
    python benchmarks/plan_check.py --only cls-full-ckpt --json
    python benchmarks/plan_check.py --jobs 2   # two runs at a time (the test's way: half the wait)
    python benchmarks/plan_check.py --device cuda --set train.mixed_precision=bf16   # on a GPU:
        # torch.cuda.max_memory_allocated (reset when fit starts) against the plan's whole peak
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's gptft

PEAK = """
import sys
from gptft import trainer
from gptft.cli import main
fit = trainer.Trainer.fit
def rss(field):
    return 1024 * int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
def measured(self):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    start = rss("VmRSS:")
    fit(self)
    print("growth_bytes", rss("VmHWM:") - start, flush=True)
trainer.Trainer.fit = measured
sys.exit(main(sys.argv[1:]))
"""

CUDA_PEAK = """
import sys, torch
from gptft import trainer
from gptft.cli import main
fit = trainer.Trainer.fit
def measured(self):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fit(self)
    print("peak_bytes", torch.cuda.max_memory_allocated(), flush=True)
trainer.Trainer.fit = measured
sys.exit(main(sys.argv[1:]))
"""

RUN = ["model.weights=random", "model.checkpoint=null", "model.drop_rate=0.0", "train.max_steps=3",
       "train.eval_every=1", "train.eval_batches=1", "train.eval_batch_size=1", "train.log_every=1",
       "train.device=cpu", "train.checkpoint_minutes=null", "train.final_eval_batches=1"]
# Two families: GPT-2 as a classifier (4 blocks, width 256; no logits) and as a language model
# (6 blocks, width 384, GPT-2's vocabulary: the loss's logits weigh in); Qwen3 as a language model
# (6 blocks, width 384, 6 query and 2 key/value heads, q/k norm, SwiGLU of 1024, the 4,096-token
# tiny-chatml vocabulary: activations weigh in).
SHAPES = {
    "cls": ("spam-tiny.yaml", ["model.n_layers=4", "model.emb_dim=256", "model.n_heads=4",
                               "model.context_length=256", "data.max_length=256",
                               "train.batch_size=8", "train.grad_accum_steps=1"]),
    "lm": ("instruct-tiny.yaml", ["model.n_layers=6", "model.emb_dim=384", "model.n_heads=6",
                                  "model.context_length=128", "data.max_length=128",
                                  "train.batch_size=4", "train.grad_accum_steps=2"]),
    "qwen3": ("instruct-tiny.yaml", ["model.name=qwen3-0.6b", "model.tokenizer=tiny-chatml",
                                     "model.n_layers=6", "model.emb_dim=384", "model.n_heads=6",
                                     "model.n_kv_heads=2", "model.head_dim=64",
                                     "model.intermediate_size=1024", "model.context_length=256",
                                     "data.max_length=256", "train.batch_size=4",
                                     "train.grad_accum_steps=2"]),
}
VARIANTS = {"full": ["model.trainable=all"], "lora": ["model.trainable=lora"]}
CONFIGS = {f"{shape}-{variant}-{'ckpt' if ckpt else 'plain'}":
           (shape, [*VARIANTS[variant], f"train.activation_checkpointing={str(ckpt).lower()}"])
           for shape in SHAPES for variant in VARIANTS for ckpt in (False, True)}
DEFAULT = [name for name in CONFIGS if not name.startswith("lm-")]  # two families, 8 configurations


def make_data(folder: Path) -> dict[str, Path]:
    """Texts of 400+ tokens (truncated to max_length): every batch is max_length long."""
    folder.mkdir(parents=True, exist_ok=True)
    long = " ".join(f"word{i % 50}" for i in range(400))
    tsv = folder / "long.tsv"
    tsv.write_text("".join(f"{'spam' if i % 2 else 'ham'}\t{i} {long}\n" for i in range(60)),
                   encoding="utf-8")
    records = [{"instruction": f"Repeat {i}.", "input": "", "output": long} for i in range(60)]
    js = folder / "long.json"
    js.write_text(json.dumps(records), encoding="utf-8")
    return {"cls": tsv, "lm": js, "qwen3": js}


def args_of(name: str, data: dict[str, Path], out: Path) -> tuple[Path, list[str]]:
    shape, more = CONFIGS[name]
    config, shape_args = SHAPES[shape]
    return ROOT / "configs" / config, [*RUN, *shape_args, *more, f"data.path={data[shape]}",
                                       f"output_dir={out}"]


def measure(config: Path, overrides: list[str], device: str = "cpu") -> int:
    """The CPU's peak resident growth from the start of ``fit``, or on CUDA the peak of
    ``torch.cuda.max_memory_allocated`` (reset at the start of ``fit``: the weights included)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "GPTFT_CPU_ALLOCATOR": "default",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    code, key = (PEAK, "growth_bytes") if device == "cpu" else (CUDA_PEAK, "peak_bytes")
    if device != "cpu":
        overrides = [o for o in overrides if o != "train.device=cpu"]
    out = subprocess.run([sys.executable, "-c", code, "finetune", "--config", str(config), *overrides],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return int(out.stdout.split(key)[-1].split()[0])


def estimate(config: Path, overrides: list[str], device: str = "cpu") -> dict:
    """The plan's peak; on the CPU less what is resident before training (the weights)."""
    from gptft.config import load_job
    from gptft.plan import plan_job

    p = plan_job(load_job(config, overrides))
    value = p.peak - p.resident_before_training if device == "cpu" else p.peak
    return {"estimate_bytes": round(value), "plan": p.to_dict()}


def check(names: list[str], folder: Path, device: str = "cpu", more: list[str] = (),
          jobs: int = 1) -> list[dict]:
    """Each configuration measured in its own process, ``jobs`` of them at once (each process's
    peak is its own, so runs side by side measure what runs one after another do)."""
    from concurrent.futures import ThreadPoolExecutor

    data = make_data(folder / "data")
    runs = {}
    for name in names:
        config, overrides = args_of(name, data, folder / name)
        runs[name] = (config, [*overrides, *more])
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        measured = dict(zip(runs, pool.map(lambda run: measure(*run, device), runs.values())))
    results = []
    for name, (config, overrides) in runs.items():
        est = estimate(config, overrides, device)
        results.append({"name": name, "measured_bytes": measured[name], **est,
                        "ratio": round(est["estimate_bytes"] / measured[name], 4)})
    return results


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="these configurations only")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides for every run, e.g. train.mixed_precision=bf16")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once on the CPU (each measures its own process)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.jobs < 1 or (args.device != "cpu" and args.jobs != 1):
        parser.error("--jobs must be 1 or more, and 1 on cuda (one device's peak memory)")
    with tempfile.TemporaryDirectory() as tmp:
        results = check(args.only or DEFAULT, Path(tmp), args.device, args.set, args.jobs)
    for r in results:
        print(f"{r['name']:<16} measured {r['measured_bytes'] / 2**20:8.1f} MiB, planned "
              f"{r['estimate_bytes'] / 2**20:8.1f} MiB ({r['ratio'] - 1:+.1%})", flush=True)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "plan"} for r in results]))


if __name__ == "__main__":
    main()
