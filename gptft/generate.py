"""Generating text with a GPT: batched decoding with a KV cache (``gptft generate`` is its command).

Batched decoding with a KV cache: the prompts of a batch are left-padded, prefilled at once, then
extended one token per step. Greedy at temperature 0, else sampling with optional top-k / top-p.
Each prompt samples from its own generator, seeded from (seed, its index in the call), so its
tokens do not depend on which prompts share its batch.
"""

from __future__ import annotations

import hashlib

import torch

from gptft.config import GenerateConfig
from gptft.errors import GPTFTError
from gptft.model import GPT, KVCache
from gptft.tokenizer import Tokenizer


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


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _next_logits(model: GPT, ids: torch.Tensor, mask: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits (B, vocab) of the last position only (no vocabulary projection of the others)."""
    return model.logits(model.hidden_states(ids, attention_mask=mask, kv_cache=cache)[:, -1])


def _generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int, pick: _Picker,
                    eos_id: int | None) -> list[list[int]]:
    """Decode one batch of (already cropped) prompts; see ``generate``."""
    ctx = model.config.context_length
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, eos_id if eos_id is not None else 0, device)
    cache = KVCache(len(prompts), min(ids.size(1) + max_new_tokens, ctx))
    logits = _next_logits(model, ids, mask, cache)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        active = [row for row in range(len(prompts)) if not done[row]]
        nxt = pick(logits, active)
        for row, token in zip(active, nxt[active].tolist(), strict=True):
            if token == eos_id:
                done[row] = True
            else:
                out[row].append(token)
        if all(done) or step == max_new_tokens - 1:
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        real = torch.tensor([not d for d in done], dtype=torch.long, device=device)
        mask = torch.cat([mask, real[:, None]], dim=1)
        if ids.size(1) <= ctx:  # every row still fits: extend the cache by one position
            logits = _next_logits(model, ids[:, -1:], mask, cache)
        else:  # past the context: as the book, a fresh forward over the last ctx tokens
            logits = _next_logits(model, ids[:, -ctx:], mask[:, -ctx:], None)
    return out


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens.

    Args:
        model: the GPT; it runs in eval mode on its own device (its mode is restored after).
        prompts: token ids of each prompt (non-empty). A prompt longer than
            ``context_length - 1`` keeps its last tokens; once prompt + response exceed the
            context, each step reads the last ``context_length`` tokens only.
        max_new_tokens: the most tokens generated per prompt.
        temperature: 0 for greedy decoding; > 0 to sample from softmax(logits / temperature).
        top_k: sample among the k most likely tokens only.
        top_p: sample from the smallest set of tokens whose probability reaches p.
        eos_id: stop a prompt's response at this token (not included in the response).
        seed: seed of the sampling; prompt i draws from a generator seeded from (seed, i), so
            its tokens do not depend on the batching. Unset: drawn from torch's global RNG.
        batch_size: prompts decoded together (unset: all of them); similar lengths are batched.

    Returns:
        The new tokens of each prompt, in the order of `prompts`.
    """
    _check_args(prompts, max_new_tokens, temperature, top_k, top_p, batch_size)
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    keep = model.config.context_length - 1
    prompts = [list(p[-keep:]) for p in prompts]
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    generators = [torch.Generator().manual_seed(row_seed(seed, i)) for i in range(len(prompts))]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = batch_size or len(prompts)
    results: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            pick = _Picker(temperature, top_k, top_p, [generators[i] for i in batch])
            outs = _generate_batch(model, [prompts[i] for i in batch], max_new_tokens, pick, eos_id)
            for i, tokens in zip(batch, outs, strict=True):
                results[i] = tokens
    finally:
        model.train(was_training)
    return results


def generate_texts(model: GPT, tokenizer: Tokenizer, prompts: list[str], cfg: GenerateConfig) -> list[str]:
    """Responses to text prompts, generated ``cfg.batch_size`` at a time, decoded and stripped.

    Generation stops at the tokenizer's end-of-text token.
    """
    tokens = generate(
        model, tokenizer.encode_batch(prompts), cfg.max_new_tokens, temperature=cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, eos_id=tokenizer.eot_id, seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    return [tokenizer.decode(t).strip() for t in tokens]
