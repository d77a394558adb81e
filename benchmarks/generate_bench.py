"""Generation throughput: ``gptft.generate`` against ``transformers``' ``generate()``.

One random GPT-2-shaped model (default: 4 layers, width 256, 4 heads, context 1,024, vocabulary
50,257, fp32, fixed seed) is built in gptft and copied into ``transformers.GPT2LMHeadModel``
(``GPT.save_pretrained`` → ``from_pretrained``). Both decode greedily the same real prompts: the
alpaca prompts of the book's test split of the instruction data (records 935.. of 1,100), the
first ``--prompts`` of them, tokenized with tiktoken's GPT-2 BPE.

Batching is the same for both: the prompts sorted by length (stable), cut into batches of
``--batch-size``, each left-padded to its longest prompt (pad id 50256, attention mask 0).
gptft's ``generate(..., batch_size=)`` forms exactly these batches itself; transformers gets them
ready-made and the padding is timed on both sides (it is negligible).

Stopping: by default neither stops early: gptft runs with ``eos_id=None`` and transformers with
``eos_token_id=None`` (no stopping criterion, no min-length processor), so every prompt gets
exactly ``--max-new-tokens`` tokens and both do the same number of steps. ``--eos`` makes both
stop a row at token 50256 (``<|endoftext|>``); transformers then keeps finished rows in the
batch until all are done (padding them), gptft drops them.

Passes are interleaved (gptft, transformers, transformers, gptft, ...) in one process, each pass
generating for all prompts; the report gives median new tokens/s (new tokens over the pass's wall
time, prefill included), the ratio gptft / transformers, and whether the tokens are identical.
Both run under ``torch.inference_mode()``.

    python benchmarks/generate_bench.py --prompts 64 --batch-size 32 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gptft.generate import generate
from gptft.model import GPT, GPTConfig
from gptft.prompts import format_prompt
from gptft.tokenizer import Tokenizer

EOT = 50256
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction-data.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="instruction data (JSON array)")
    p.add_argument("--prompts", type=int, default=64, help="number of test prompts (default 64)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed passes per implementation")
    p.add_argument("--eos", action="store_true", help="both stop a row at <|endoftext|> (50256)")
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--emb-dim", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def test_prompts(path: Path, count: int) -> list[list[int]]:
    """Token ids of the first `count` alpaca prompts of the book's test split (85% | 10% | 5%)."""
    records = json.loads(path.read_text(encoding="utf-8"))
    n_train, n_test = int(len(records) * 0.85), int(len(records) * 0.10)
    test = records[n_train : n_train + n_test]
    if count > len(test):  # more than the test split: continue with the records after it
        test = records[n_train:] + records[:n_train]
    texts = [format_prompt(r, "alpaca") for r in test[:count]]
    return Tokenizer("gpt2").encode_batch(texts)


def build_models(opts: argparse.Namespace):
    """The random gptft GPT and the same weights as a transformers GPT2LMHeadModel, both eval."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(opts.seed)
    config = GPTConfig(vocab_size=50257, context_length=opts.context_length, emb_dim=opts.emb_dim,
                       n_layers=opts.n_layers, n_heads=opts.n_heads)
    ours = GPT(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    return ours, hf


def sorted_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of each batch: prompts sorted by length (stable), as ``gptft.generate`` batches."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def run_gptft(model: GPT, prompts, opts) -> list[list[int]]:
    return generate(model, prompts, opts.max_new_tokens, eos_id=EOT if opts.eos else None,
                    batch_size=opts.batch_size)


def run_transformers(model, prompts, opts) -> list[list[int]]:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=opts.max_new_tokens, do_sample=False, pad_token_id=EOT,
                           eos_token_id=EOT if opts.eos else None, bos_token_id=None)
    out: list[list[int]] = [[] for _ in prompts]
    for batch in sorted_batches(prompts, opts.batch_size):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), EOT, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        new = model.generate(ids, attention_mask=mask, generation_config=gen)[:, width:].tolist()
        for row, i in enumerate(batch):
            tokens = new[row]
            if opts.eos and EOT in tokens:
                tokens = tokens[: tokens.index(EOT)]
            out[i] = tokens
    return out


def timed(fn, *args) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn(*args)
    return time.perf_counter() - start, out


def compare(ours: GPT, hf, prompts: list[list[int]], opts) -> dict:
    """Interleaved passes of both; medians, ratio and token agreement."""
    runners = {"gptft": lambda: run_gptft(ours, prompts, opts),
               "transformers": lambda: run_transformers(hf, prompts, opts)}
    warm = prompts[: min(len(prompts), 4)]  # first calls: lazy allocations, kernel selection
    with torch.inference_mode():
        run_gptft(ours, warm, opts)
        run_transformers(hf, warm, opts)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, list[list[int]]] = {}
    for r in range(opts.repeats):
        names = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in names:
            s, out = timed(runners[name])
            seconds[name].append(s)
            tokens.setdefault(name, out)
    results = {}
    for name, secs in seconds.items():
        n_new = sum(len(t) for t in tokens[name])
        med = statistics.median(secs)
        results[name] = {"new_tokens": n_new, "median_s": med, "tokens_per_s": n_new / med,
                         "pass_seconds": secs}
    mismatched = [i for i, (a, b) in enumerate(zip(tokens["gptft"], tokens["transformers"], strict=True))
                  if a != b]
    first_diff = []
    for i in mismatched[:5]:
        a, b = tokens["gptft"][i], tokens["transformers"][i]
        at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        first_diff.append({"prompt": i, "position": at})
    return {
        "results": results,
        "ratio": results["gptft"]["tokens_per_s"] / results["transformers"]["tokens_per_s"],
        "identical": not mismatched,
        "mismatched_prompts": len(mismatched),
        "first_differences": first_diff,
    }


def main(argv: list[str] | None = None) -> dict:
    opts = parse_args(argv)
    threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        prompts = test_prompts(opts.data, opts.prompts)
        ours, hf = build_models(opts)
        out = compare(ours, hf, prompts, opts)
    finally:
        torch.set_num_threads(threads)
    import transformers

    lengths = sorted(len(p) for p in prompts)
    out["setup"] = {
        "prompts": len(prompts), "prompt_tokens_min_median_max": [lengths[0], lengths[len(lengths) // 2],
                                                                  lengths[-1]],
        "batch_size": opts.batch_size, "max_new_tokens": opts.max_new_tokens, "eos": opts.eos,
        "model": f"{opts.n_layers} layers, width {opts.emb_dim}, {opts.n_heads} heads, "
                 f"context {opts.context_length}, fp32",
        "threads": opts.threads or threads, "repeats": opts.repeats,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    print(format_report(out), flush=True)
    if opts.json:
        opts.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


def format_report(out: dict) -> str:
    s = out["setup"]
    lines = [f"{s['prompts']} prompts ({'/'.join(map(str, s['prompt_tokens_min_median_max']))} tokens "
             f"min/median/max), batch {s['batch_size']}, {s['max_new_tokens']} new tokens, "
             f"{'stop at EOS' if s['eos'] else 'no EOS'}; {s['model']}; {s['threads']} threads; "
             f"median of {s['repeats']}; torch {s['torch']}, transformers {s['transformers']}"]
    for name, r in out["results"].items():
        passes = ", ".join(f"{x:.2f}" for x in r["pass_seconds"])
        lines.append(f"{name:>13}: {r['tokens_per_s']:8.1f} new tokens/s ({r['new_tokens']} tokens, "
                     f"median {r['median_s']:.3f} s; passes {passes})")
    lines.append(f"{'ratio':>13}: {out['ratio']:.2f}x gptft / transformers")
    if out["identical"]:
        lines.append(f"{'tokens':>13}: identical")
    else:
        lines.append(f"{'tokens':>13}: {out['mismatched_prompts']} prompt(s) differ; first: "
                     f"{out['first_differences']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
