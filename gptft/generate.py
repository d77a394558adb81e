"""Generating text with a language model (GPT-2 or any family of ``gptft.models``); ``gptft generate``
is its command.

Batched decoding with a KV cache: the prompts are sorted by length and cut into batches; a batch
is left-padded and prefilled at once (a prefix that all its prompts share, such as an instruction
template's preamble, is computed once), then extended one token per step into a cache allocated
for the whole response, with per-row positions and a key mask sliced from the batch's buffers;
rows that reach ``eos_id`` are dropped from the batch. Greedy at temperature 0 (on the CPU the
vocabulary projection and its argmax run fused, chunk by chunk), else sampling with optional
top-k / top-p. Each prompt samples from its own generator, seeded from (seed, its index in the
call), so its tokens do not depend on which prompts share its batch.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from gptft.config import GenerateConfig
from gptft.errors import GPTFTError
from gptft.model import KVCache
from gptft.modes import eval_mode
from gptft.tokenizer import Tokenizer

LanguageModel = nn.Module
"""Any model of the interface ``gptft.model.GPT`` and ``gptft.models.Decoder`` offer
(``last_hidden_state``, ``logits``, ``lm_head``, ``config.context_length``)."""


def top_k_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row, in descending order, and their token ids: (B, k) each."""
    return torch.topk(logits, min(k, logits.size(-1)), dim=-1)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep, per row, the smallest set of most likely tokens whose probability reaches `p`.

    The most likely token is always kept; the others are set to -inf.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each token
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def row_seed(seed: int, index: int) -> int:
    """A 63-bit seed for prompt `index` of a call seeded with `seed`."""
    digest = hashlib.sha256(f"gptft:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check_args(prompts, max_new_tokens, temperature, top_k, top_p, batch_size) -> None:
    problems = [f"prompt {i} is empty" for i, p in enumerate(prompts) if len(p) == 0]
    if max_new_tokens < 0:
        problems.append(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    if temperature < 0:
        problems.append(f"temperature must be >= 0 (got {temperature})")
    if top_k is not None and top_k <= 0:
        problems.append(f"top_k must be > 0 (got {top_k})")
    if top_p is not None and not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1] (got {top_p})")
    if batch_size is not None and batch_size <= 0:
        problems.append(f"batch_size must be > 0 (got {batch_size})")
    if problems:
        raise GPTFTError("generate: " + "; ".join(problems))


class _Picker:
    """Chooses the next token of each row: argmax, or a draw from the row's own generator."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None,
                 generators: list[torch.Generator]):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generators = generators

    def __call__(self, logits: torch.Tensor, active: list[int]) -> torch.Tensor:
        """Next tokens (B,) on the logits' device for (B, vocab) `logits`; rows not in `active`
        get argmax (their token is ignored) and leave their generator untouched."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        ids = None  # column j of `logits` is token j, or token ids[:, j] after top-k
        if self.top_k is not None:
            logits, ids = top_k_logits(logits, self.top_k)
        if self.top_p is not None:
            logits = top_p_filter(logits, self.top_p)
        probs = torch.softmax(logits, dim=-1).cpu()
        choice = probs.argmax(dim=-1)
        for row in active:
            choice[row] = torch.multinomial(probs[row], 1, generator=self.generators[row]).item()
        choice = choice.to(logits.device)
        return choice if ids is None else ids.gather(1, choice[:, None])[:, 0]


class _Greedy:
    """``model.logits(hidden).argmax(-1)`` (B,) for final hidden states (B, emb_dim).

    On the CPU the vocabulary is projected ``chunk`` rows at a time as ``weight[rows] @ hidden.T``,
    a tall product that BLAS runs faster than the wide ``hidden @ weight.T`` (with the same float
    results on the CPUs tried), into a (vocab, B) buffer kept for the whole batch. While a chunk
    is in cache, the maximum of each run of ``run`` tokens is taken (a fast reduction, unlike an
    argmax down a column); at the end each row's first run holding its maximum is searched for
    the first position of it. Ties thus go to the lowest token id, as with ``argmax``.
    Elsewhere (GPU, a wrapped or biased head, autocast) it is the plain projection and argmax.
    """

    chunk, run = 16384, 64

    def __init__(self, model: LanguageModel):
        self.model = model
        self.buffer: torch.Tensor | None = None

    def fused(self, hidden: torch.Tensor) -> bool:
        head = self.model.lm_head
        # Soft-capped logits (Gemma) are argmax'd as the model computes them: tanh is monotonic,
        # but it can round two different logits to one value, and ties go to the lower id.
        capped = getattr(self.model.config, "final_logit_softcapping", None) is not None
        return (hidden.device.type == "cpu" and type(head) is nn.Linear and head.bias is None
                and hidden.dtype == head.weight.dtype and not torch.is_autocast_enabled("cpu")
                and not capped)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.fused(hidden):
            return self.model.logits(hidden).argmax(dim=-1)
        B, vocab, chunk, run = hidden.size(0), self.model.config.vocab_size, self.chunk, self.run
        n = -(-vocab // chunk)
        if self.buffer is None or self.buffer.shape != (n * chunk, B) or self.buffer.dtype != hidden.dtype:
            self.buffer = hidden.new_full((n * chunk, B), float("-inf"))  # rows past vocab stay -inf
        buffer, weight, ht = self.buffer, self.model.lm_head.weight, hidden.contiguous().t()
        run_max = hidden.new_empty(n * chunk // run, B)
        per_chunk = chunk // run
        for j in range(n):
            start = j * chunk
            end = min(start + chunk, vocab)
            torch.mm(weight[start:end], ht, out=buffer[start:end])
            torch.amax(buffer[start : start + chunk].view(per_chunk, run, B), dim=1,
                       out=run_max[j * per_chunk : (j + 1) * per_chunk])
        first = run_max.argmax(dim=0)  # (B,) the first run holding each row's maximum
        rows = (first * run)[None, :] + torch.arange(run)[:, None]  # (run, B)
        return buffer.gather(0, rows).argmax(dim=0) + first * run


class _Rows:
    """The state of a batch being decoded, one row per unfinished prompt.

    ``ids`` / ``real`` (B, width + max_new_tokens - 1) hold every token fed so far and whether it is
    a real token (left padding is not; generated positions are), ``pos`` (B,) the position of the
    next token, ``index`` the prompt each row decodes, in the batch given to ``_generate_batch``.
    """

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, pad_id: int, device):
        width = max(len(p) for p in prompts)
        total = width + max_new_tokens - 1  # the last new token is never fed back
        ids = torch.full((len(prompts), total), pad_id, dtype=torch.long)
        real = torch.ones((len(prompts), total), dtype=torch.bool)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) : width] = torch.tensor(p, dtype=torch.long)
            real[row, : width - len(p)] = False
        self.width = width
        self.padded = bool(not real[:, :width].all())
        self.ids, self.real = ids.to(device), real.to(device)
        self.pos = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        self.index = torch.arange(len(prompts), device=device)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep these rows (a (B',) index tensor), in this order."""
        self.ids, self.real = self.ids[rows], self.real[rows]
        self.pos, self.index = self.pos[rows], self.index[rows]
        self.padded = bool(not self.real[:, : self.width].all())


# A prompt prefix shared by every prompt of a batch (an instruction template's preamble, a system
# prompt) is computed once when it has at least this many tokens.
_MIN_SHARED_PREFIX = 4


def _prefill(model: LanguageModel, prompts: list[list[int]], rows: _Rows, cache: KVCache) -> torch.Tensor:
    """Feed the left-padded prompts into `cache`; the final hidden state (B, emb_dim) of each last
    token. The longest prefix every prompt shares (but for its last token) is computed once, for
    one row, and copied into each row's cache after its padding; the rest is fed from there."""
    width = rows.width
    shared = len(os.path.commonprefix(prompts)) if len(prompts) > 1 else 0
    shared = min(shared, min(len(p) for p in prompts) - 1)
    if shared < _MIN_SHARED_PREFIX:
        return model.last_hidden_state(rows.ids[:, :width], attention_mask=rows.real[:, :width],
                                       kv_cache=cache)
    prefix = KVCache(1, shared)
    model.last_hidden_state(torch.tensor([prompts[0][:shared]], device=rows.ids.device), kv_cache=prefix)
    cache.share_prefix(prefix, [width - len(p) for p in prompts])
    start = cache.length
    return model.last_hidden_state(rows.ids[:, start:width], attention_mask=rows.real[:, :width],
                                   kv_cache=cache)


def _generate_batch(model: LanguageModel, prompts: list[list[int]], max_new_tokens: int, pick: _Picker,
                    eos_id: int | Sequence[int] | None) -> list[list[int]]:
    """Decode one batch of (already cropped) prompts; see ``generate``.

    The prompts are prefilled at once into a ``KVCache`` sized for the whole response; each step
    then feeds one token per row with a key mask sliced from the batch's ``real`` flags and
    positions kept per row (no concatenation, no recount). New tokens collect in a tensor, read
    back once at the end. With ``eos_id``, finished rows are dropped from the batch (the cache
    and every per-row tensor compacted) once they are an eighth of it. Once prompt + response
    exceed the context, each step is a fresh forward over the last ``context_length`` tokens
    (the book's sliding window).
    """
    ctx = model.config.context_length
    device = next(model.parameters()).device
    stops = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    eos_id = stops[0] if stops else None
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    rows = _Rows(prompts, max_new_tokens, eos_id if eos_id is not None else 0, device)
    n = rows.width  # tokens per row so far
    cache = KVCache(len(prompts), min(rows.ids.size(1), ctx))
    hidden = _prefill(model, prompts, rows, cache)
    out = torch.full((len(prompts), max_new_tokens), -1, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    check_every = 1 if device.type == "cpu" else 8  # finished rows cost a host sync to count
    greedy = _Greedy(model) if pick.temperature == 0 else None
    for step in range(max_new_tokens):
        if greedy is not None:
            nxt = greedy(hidden)
        else:
            active = (~done).nonzero()[:, 0].tolist() if eos_id is not None else range(len(done))
            nxt = pick(model.logits(hidden), list(active))
        out[rows.index, step] = nxt
        if step == max_new_tokens - 1:
            break
        if eos_id is not None:
            done |= (nxt == eos_id) if len(stops) == 1 else torch.isin(nxt, stop_ids)
            if step % check_every == check_every - 1 or greedy is None:
                finished = int(done.sum())
                if finished == len(done):
                    break
                if finished and finished * 8 >= len(done):  # drop the finished rows
                    keep = (~done).nonzero()[:, 0]
                    kept = keep.tolist()
                    rows.keep(keep)
                    cache.keep(keep)
                    nxt, done = nxt[keep], done[keep]
                    pick.generators = [pick.generators[i] for i in kept]
        rows.ids[:, n] = nxt
        n += 1
        if n <= ctx:  # every row still fits: extend the cache by one position
            mask = rows.real[:, None, None, :n] if rows.padded else None
            hidden = model.last_hidden_state(nxt[:, None], attention_mask=mask,
                                             position_ids=rows.pos[:, None], kv_cache=cache)
            rows.pos += 1
        else:  # past the context: as the book, a fresh forward over the last ctx tokens
            window = slice(n - ctx, n)
            hidden = model.last_hidden_state(rows.ids[:, window], attention_mask=rows.real[:, window])
    tokens = out.tolist()
    for stop in (*stops, -1):
        tokens = [t[: t.index(stop)] if stop in t else t for t in tokens]
    return tokens


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | Sequence[int] | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    stats: dict | None = None,
    progress: bool = False,
    between_batches: Callable[[], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
        model: the language model; it runs in eval mode on its own device (its mode is restored after).
        prompts: token ids of each prompt (non-empty). A prompt longer than
            ``context_length - 1`` keeps its last tokens; once prompt + response exceed the
            context, each step reads the last ``context_length`` tokens only.
        max_new_tokens: the most tokens generated per prompt.
        temperature: 0 for greedy decoding; > 0 to sample from softmax(logits / temperature).
        top_k: sample among the k most likely tokens only.
        top_p: sample from the smallest set of tokens whose probability reaches p.
        eos_id: stop a prompt's response at this token, or at any of these tokens (not included in
            the response).
        seed: seed of the sampling; prompt i draws from a generator seeded from (seed, i), so
            its tokens do not depend on the batching. Unset: drawn from torch's global RNG.
        batch_size: prompts decoded together (unset: all of them); the prompts are sorted by
            length first, so that a batch holds prompts of similar lengths.
        stats: a dict to receive ``prompts``, ``new_tokens``, ``seconds`` (wall time of the
            decoding) and ``tokens_per_s`` (new tokens per second).
        progress: a bar over the prompts (on a terminal only).
        between_batches: called after each batch (``batch_count`` of them), e.g. to stop on a
            signal there (``gptft.signals.BatchStops``).

    Returns:
        The new tokens of each prompt, in the order of `prompts`.
    """
    _check_args(prompts, max_new_tokens, temperature, top_k, top_p, batch_size)
    started = time.perf_counter()
    if not prompts or max_new_tokens == 0:
        if stats is not None:
            stats.update(prompts=len(prompts), new_tokens=0, seconds=0.0, tokens_per_s=0.0)
        return [[] for _ in prompts]
    keep = model.config.context_length - 1
    prompts = [list(p[-keep:]) for p in prompts]
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    generators = [torch.Generator().manual_seed(row_seed(seed, i)) for i in range(len(prompts))]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = batch_size or len(prompts)
    results: list[list[int]] = [[] for _ in prompts]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", leave=False, dynamic_ncols=True,
               disable=None if progress else True)  # None: shown on a terminal only
    with eval_mode(model), bar:
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            pick = _Picker(temperature, top_k, top_p, [generators[i] for i in batch])
            outs = _generate_batch(model, [prompts[i] for i in batch], max_new_tokens, pick, eos_id)
            for i, tokens in zip(batch, outs, strict=True):
                results[i] = tokens
            bar.update(len(batch))
            if between_batches is not None:
                between_batches()
    if stats is not None:
        seconds = time.perf_counter() - started
        new_tokens = sum(len(t) for t in results)
        stats.update(prompts=len(prompts), new_tokens=new_tokens, seconds=seconds,
                     tokens_per_s=new_tokens / seconds if seconds > 0 else 0.0)
    return results


def batch_count(prompts: int, max_new_tokens: int, batch_size: int | None) -> int:
    """How many batches ``generate`` decodes `prompts` prompts in."""
    if not prompts or max_new_tokens == 0:
        return 0
    return -(-prompts // (batch_size or prompts))


def generate_texts(model: LanguageModel, tokenizer: Tokenizer, prompts: list[str], cfg: GenerateConfig,
                   stats: dict | None = None, progress: bool = False,
                   between_batches: Callable[[], None] | None = None) -> list[str]:
    """Responses to text prompts, generated ``cfg.batch_size`` at a time (prompts of similar
    lengths together), decoded and stripped.

    Generation stops at any of the tokenizer's ``stop_ids`` (GPT-2: its end-of-text token).
    `stats`, `progress` (a bar over the prompts) and `between_batches` as in ``generate``.
    """
    tokens = generate(
        model, tokenizer.encode_batch(prompts), cfg.max_new_tokens, temperature=cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, eos_id=list(tokenizer.stop_ids), seed=cfg.seed,
        batch_size=cfg.batch_size, stats=stats, progress=progress, between_batches=between_batches,
    )
    return [tokenizer.decode(t).strip() for t in tokens]


def respond(model: LanguageModel, tokenizer: Tokenizer, records: list[dict], prompt_style: str,
            cfg: GenerateConfig, progress: bool = False) -> list[str]:
    """The model's response to each ``{"instruction", "input"?}`` record, in its prompt style."""
    from gptft.prompts import format_prompt

    prompts = [format_prompt({"instruction": r["instruction"], "input": r.get("input") or ""},
                             prompt_style) for r in records]
    return generate_texts(model, tokenizer, prompts, cfg, progress=progress)


def read_prompt_records(path: str) -> list[dict]:
    """``{"instruction", "input"?, ...}`` records from a JSON Lines file or a JSON array (other
    keys kept): the prompts of ``gptft generate --file``."""
    from gptft.data.instruction import read_records

    def problem(record) -> str | None:
        if not isinstance(record, dict):
            return f"expected an object with instruction and input, got {type(record).__name__}"
        if "messages" in record:  # a conversation to continue (runs with a chat template)
            from gptft.data.conversations import parse_messages

            messages, problem = parse_messages(record["messages"])
            if messages is not None:
                record["messages"] = messages
            return problem
        if not isinstance(record.get("instruction"), str):
            return "'instruction' must be a string" if "instruction" in record else (
                "missing key 'instruction'")
        if not isinstance(record.get("input") or "", str):
            return f"'input' must be a string, got {type(record['input']).__name__}"
        return None

    return read_records(path, problem=problem, fields="instruction, input")
