"""Decoder families on the CPU: gptft's ``Decoder`` against transformers' class of the same family
and shape, and against the textbook's ``llms_from_scratch.qwen3.Qwen3Model`` (Qwen3 only).

Training step (default): AdamW steps (forward + backward + step) on seeded random token rows of
``--seq-len``, a loss target at the second half of each row's positions (as an instruction
response), mean cross-entropy over the targets. gptft computes logits at the targets only
(``model(ids, labels=labels)``); transformers gets the same labels (``-100`` elsewhere) and
computes its own logits and loss; the textbook model returns full logits and the loss is
``F.cross_entropy(..., ignore_index=-100)``. Each implementation runs in a fresh process (so the
peak resident memory, ``ru_maxrss``, is its own), ``--warmup`` untimed steps then ``--steps``
timed ones; examples/s and tokens/s (all positions) are medians of per-step rates, and so is
examples per CPU-second (process time: less sensitive to other processes' load; use it with
``--threads 1``); with
``--rounds N`` the processes are interleaved (A, B, C, A, B, C ...) and medians over rounds shown.

``--generate``: greedy decoding with the KV cache at ``--batch-size`` (default 8) of gptft's
``generate()`` against transformers' ``generate()`` on the same weights (gptft's
``save_pretrained`` → ``AutoModelForCausalLM``), no early stop on either side, passes
interleaved; new tokens/s, the ratio, and whether the tokens are identical.

    python benchmarks/families_bench.py --family qwen3
    python benchmarks/families_bench.py --family llama --generate
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def hf_config(args):
    import transformers

    shape = dict(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=args.width * 3,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 num_key_value_heads=args.kv_heads, head_dim=args.width // args.heads,
                 max_position_embeddings=max(2048, args.seq_len), tie_word_embeddings=True)
    cls = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig,
           "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig,
           "gemma3_text": transformers.Gemma3TextConfig}[args.family]
    if args.family == "gemma3_text":
        shape.update(query_pre_attn_scalar=args.width // args.heads, sliding_window=args.seq_len // 2)
    if args.family == "mistral":
        shape.update(sliding_window=None)
    return cls(**shape)


def build(impl: str, args) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = hf_config(args)
    if impl == "gptft":
        from gptft.models import build_model, config_from_hf

        return build_model(config_from_hf(cfg.to_dict()))
    if impl == "transformers":
        import transformers

        return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    if impl == "textbook":
        if args.family != "qwen3":
            raise SystemExit("the textbook model is Qwen3 only")
        try:
            from llms_from_scratch.qwen3 import Qwen3Model
        except ImportError:
            raise SystemExit("the textbook model needs: pip install llms-from-scratch --no-deps") from None

        return Qwen3Model(dict(vocab_size=args.vocab, context_length=max(2048, args.seq_len),
                               emb_dim=args.width, n_heads=args.heads, n_layers=args.layers,
                               hidden_dim=args.width * 3, head_dim=args.width // args.heads,
                               qk_norm=True, n_kv_groups=args.kv_heads, rope_base=1e6,
                               dtype=torch.float32))
    raise SystemExit(f"unknown impl {impl}")


def loss_fn(impl: str, model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    n = (labels != IGNORE_INDEX).sum()
    if impl == "gptft":
        return model(ids, labels=labels).sum() / n
    if impl == "transformers":  # it shifts the labels itself: give them unshifted
        hf_labels = torch.full_like(labels, IGNORE_INDEX)
        hf_labels[:, 1:] = ids[:, 1:].masked_fill(labels[:, :-1] == IGNORE_INDEX, IGNORE_INDEX)
        return model(input_ids=ids, labels=hf_labels).loss
    logits = model(ids)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def train_step(impl: str, args) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build(impl, args).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    rates, cpu_rates = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=g)
        labels = torch.full_like(ids, IGNORE_INDEX)
        half = args.seq_len // 2
        labels[:, half:-1] = ids[:, half + 1 :]
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = loss_fn(impl, model, ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        if step >= args.warmup:
            rates.append(args.batch_size / seconds)
            cpu_rates.append(args.batch_size / cpu_seconds)
    examples = statistics.median(rates)
    return dict(impl=impl, examples_per_s=examples, tokens_per_s=examples * args.seq_len,
                examples_per_cpu_s=statistics.median(cpu_rates),
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                loss=float(loss))


def compare_training(args) -> None:
    impls = ["gptft", "transformers"] + (["textbook"] if args.family == "qwen3" else [])
    runs: dict[str, list[dict]] = {impl: [] for impl in impls}
    for _ in range(args.rounds):  # interleaved, so that load from other processes hits all alike
        for impl in impls:
            cmd = [sys.executable, __file__, "--child", impl, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[impl].append(json.loads(out.strip().splitlines()[-1]))
    results = {impl: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "impl"}
               for impl, rs in runs.items()}
    print(f"{args.family}: width {args.width}, {args.layers} layers, {args.heads} heads "
          f"({args.kv_heads} kv), vocab {args.vocab}, batch {args.batch_size} x {args.seq_len}, "
          f"threads {args.threads or torch.get_num_threads()}, medians of {args.rounds} fresh processes each")
    base = results["gptft"]["examples_per_s"]
    for impl, r in results.items():
        cpu = results["gptft"]["examples_per_cpu_s"] / r["examples_per_cpu_s"]
        print(f"  {impl:<13} {r['examples_per_s']:8.2f} examples/s {r['tokens_per_s']:9.0f} tokens/s "
              f"{r['examples_per_cpu_s']:8.2f} examples/CPU-s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
              f"gptft/{impl} {base / r['examples_per_s']:.2f}x (per CPU-s {cpu:.2f}x)")


def compare_generation(args) -> None:
    import transformers

    from gptft.generate import generate

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = build("gptft", args).eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    hf.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, args.vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 49, (args.prompts,), generator=g)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [[prompts[i] for i in order[s : s + args.batch_size]]
               for s in range(0, len(order), args.batch_size)]

    def ours():
        return generate(model, prompts, args.max_new_tokens, batch_size=args.batch_size)

    def theirs():
        out = {}
        for batch in batches:
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            new = hf.generate(ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                              do_sample=False, pad_token_id=0)[:, width:].tolist()
            out.update({tuple(p): t for p, t in zip(batch, new)})
        return [out[tuple(p)] for p in prompts]

    times = {"gptft": [], "transformers": []}
    tokens = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, fn in (("gptft", ours), ("transformers", theirs)):
                started = time.perf_counter()
                tokens[name] = fn()
                times[name].append(time.perf_counter() - started)
    new_tokens = args.prompts * args.max_new_tokens
    rate = {k: new_tokens / statistics.median(v) for k, v in times.items()}
    print(f"{args.family} generation: {args.prompts} prompts of 16-48 tokens, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens each, greedy, threads {torch.get_num_threads()}")
    print(f"  gptft {rate['gptft']:.0f} tokens/s, transformers {rate['transformers']:.0f} tokens/s, "
          f"ratio {rate['gptft'] / rate['transformers']:.2f}x, identical tokens: "
          f"{tokens['gptft'] == tokens['transformers']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="qwen3",
                   choices=["qwen3", "llama", "qwen2", "mistral", "gemma3_text"])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per implementation")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--generate", action="store_true", help="time KV-cache generation instead")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(train_step(args.child, args)))
    elif args.generate:
        compare_generation(args)
    else:
        compare_training(args)


if __name__ == "__main__":
    main()
