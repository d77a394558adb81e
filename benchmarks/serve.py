"""Load test of ``gptft serve`` on loopback: continuous batching against one request at a time.

Writes a tiny random instruct run (or serves --run), starts ``python -m gptft serve`` on a free
port in its own process, then, as clients in this process (asyncio + httpx, streaming chat
completions at temperature 0 with usage):

1. ``sequential``: --requests requests one at a time;
2. ``concurrent``: the same number from --clients clients at once;
   the two alternate in --rounds rounds; for each: generated tokens/s, and the p50/p95 of the
   latency and of the time to first token;
3. ``cancellations``: --cancel-requests requests from --clients clients, each cancelled with
   probability --cancel-share (the client leaves before the reply, or after a few chunks): every
   request not cancelled must be answered in full, none lost, and the server must be alive and
   idle afterwards.

  python benchmarks/serve.py
  python benchmarks/serve.py --clients 16 --requests 64 --max-tokens 64 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key"
INSTRUCTIONS = ["Name a color.", "Say hello.", "Translate 'cat' to French.", "What is 2 + 2?",
                "List three fruits.", "Write a haiku about rain.", "Spell 'dog' backwards.",
                "Give a synonym of fast."]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="serve this run instead of a tiny random one")
    p.add_argument("--emb-dim", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=64, help="requests per throughput phase")
    p.add_argument("--rounds", type=int, default=2,
                   help="the phases alternate this many times, --requests / rounds each time")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--cancel-requests", type=int, default=200)
    p.add_argument("--cancel-share", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1,
                   help="the server's torch threads (OMP_NUM_THREADS; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def tiny_run(folder: Path, args) -> Path:
    import torch

    from gptft.model import GPT, GPTConfig
    from gptft.runs import save_model

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, context_length=args.context_length, emb_dim=args.emb_dim,
                       n_layers=args.n_layers, n_heads=args.n_heads)
    run = folder / "tiny-instruct"
    save_model(run, GPT(config), {"task": "instruction", "model": config.to_dict(), "tokenizer": "gpt2",
                                  "prompt_style": "alpaca"})
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, args) -> subprocess.Popen:
    env = dict(os.environ, GPTFT_API_KEY=KEY, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "gptft", "serve", str(run), "--port", str(port), "--device", "cpu",
           "--model-name", "bench", "--max-batch", str(args.clients), "--max-new-tokens",
           str(args.max_tokens), "--max-queue", str(max(256, args.cancel_requests)),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.2)


async def one_request(client: httpx.AsyncClient, url: str, instruction: str, max_tokens: int,
                      leave_after: int | None = None) -> dict:
    """A streamed chat completion; with `leave_after` the client closes the stream after that
    many chunks (0: before any). Returns timings, token count and finish reason."""
    body = {"model": "bench", "messages": [{"role": "user", "content": instruction}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    result = {"finish": None, "tokens": 0, "text": ""}
    async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        if r.status_code != 200:
            return {**result, "status": r.status_code, "error": (await r.aread()).decode()}
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if leave_after is not None and chunks >= leave_after:
                return {**result, "status": 200, "left": True}
            data = line[6:]
            if data == "[DONE]":
                result["done"] = True
                break
            event = json.loads(data)
            if "error" in event:
                return {**result, "status": 200, "error": event["error"]}
            chunks += 1
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    result["text"] += choice["delta"]["content"]
                if choice["finish_reason"]:
                    result["finish"] = choice["finish_reason"]
            if event.get("usage"):
                result["tokens"] = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {**result, "status": 200, "latency": end - started,
            "ttft": (first or end) - started}


def merge(phases: list[dict]) -> dict:
    """Rounds of one phase as one: summed requests, tokens and seconds; the percentiles over
    every request."""
    seconds, tokens = sum(p["seconds"] for p in phases), sum(p["tokens"] for p in phases)
    lat = sorted(x for p in phases for x in p.pop("_latencies"))
    ttft = sorted(x for p in phases for x in p.pop("_ttfts"))
    return {"requests": sum(p["requests"] for p in phases), "clients": phases[0]["clients"],
            "rounds": len(phases), "seconds": round(seconds, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "latency_p50_s": round(pct(lat, 50), 4),
            "latency_p95_s": round(pct(lat, 95), 4), "ttft_p50_s": round(pct(ttft, 50), 4),
            "ttft_p95_s": round(pct(ttft, 95), 4)}


async def phase(url: str, n: int, clients: int, max_tokens: int) -> dict:
    """`n` requests from `clients` concurrent clients; tokens/s and latency percentiles."""
    queue = list(range(n))
    results = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                i = queue.pop(0)
                results.append(await one_request(client, url, INSTRUCTIONS[i % len(INSTRUCTIONS)],
                                                 max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    bad = [r for r in results if r["status"] != 200 or not r.get("done")]
    if bad:
        raise SystemExit(f"{len(bad)} requests failed: {bad[:3]}")
    tokens = sum(r["tokens"] for r in results)
    lat, ttft = sorted(r["latency"] for r in results), sorted(r["ttft"] for r in results)
    return {"requests": n, "clients": clients, "seconds": wall, "tokens": tokens,
            "_latencies": lat, "_ttfts": ttft}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def cancellations(url: str, n: int, clients: int, share: float, max_tokens: int, seed: int) -> dict:
    """`n` requests, a random `share` of them abandoned by their client; the rest must complete."""
    rng = random.Random(seed)
    plan = [rng.choice([0, 1, 3, 8]) if rng.random() < share else None for _ in range(n)]
    queue, results = list(range(n)), {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                i = queue.pop(0)
                results[i] = await one_request(client, url, INSTRUCTIONS[i % len(INSTRUCTIONS)],
                                               rng.randint(8, max_tokens), leave_after=plan[i])

        await asyncio.gather(*(worker() for _ in range(clients)))
    kept = [i for i in range(n) if plan[i] is None]
    answered = [i for i in kept if results[i].get("done") and results[i]["finish"] in ("stop", "length")
                and results[i]["tokens"] > 0]
    return {"requests": n, "cancelled": n - len(kept), "kept": len(kept), "answered": len(answered),
            "lost": len(kept) - len(answered), "all_results": len(results) == n}


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else tiny_run(Path(tmp), args)
        port = free_port()
        proc = start_server(run, port, args)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        try:
            asyncio.run(phase(url, 4, 4, 8))  # warm-up
            rounds = [], []  # the two phases alternate, so that a change in the machine's load
            for _ in range(args.rounds):  # falls on both
                for results, clients in zip(rounds, (1, args.clients)):
                    results.append(asyncio.run(phase(url, args.requests // args.rounds, clients,
                                                     args.max_tokens)))
            sequential, concurrent = (merge(r) for r in rounds)
            cancel = asyncio.run(cancellations(url, args.cancel_requests, args.clients, args.cancel_share,
                                               args.max_tokens, args.seed))
            time.sleep(0.5)
            health = httpx.get(f"http://127.0.0.1:{port}/health").json()
            alive = proc.poll() is None and health["status"] == "ok"
        finally:
            proc.terminate()
            code = proc.wait(60)
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": machine() + f"; server torch threads {args.threads}",
           "model": None if args.run else f"random GPT, emb_dim {args.emb_dim}, {args.n_layers} layers, "
           f"context {args.context_length}", "max_tokens": args.max_tokens,
           "sequential": sequential, "concurrent": concurrent,
           "speedup": round(concurrent["tokens_per_s"] / sequential["tokens_per_s"], 2),
           "cancellations": cancel, "server_alive_after": alive, "server_idle_after": health,
           "exit_status_on_sigterm": code}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


def machine() -> str:
    load = os.getloadavg()[0]
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = cpu
    return f"{platform.system()}, {model}, {os.cpu_count()} CPUs, load average {load:.1f} at the end"


if __name__ == "__main__":
    main()
