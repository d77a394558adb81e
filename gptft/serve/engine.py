"""The engines of ``gptft serve``: one thread owns the model and batches every request on it.

``GenerationEngine`` does continuous batching: each request holds one row of a ``SlotCache``
while it decodes; at every token boundary the requests that finished, were cancelled or whose
client left give their slot back, and waiting requests are prefilled into free slots and join
the next decoding step. Each step feeds one token per row with its own position and a key mask
of its own length, so a request's tokens do not depend on its batch-mates: at temperature 0 they
are ``gptft generate``'s, and when sampling each request draws from its own generator seeded as
``generate`` seeds its first prompt (``row_seed(seed, 0)``).

``ClassifyEngine`` labels the texts of every waiting request in one call of ``Classifier.predict``.

Requests come from the web server's event loop; results go back through each request's ``emit``
callback (called on the engine thread, so it must be thread-safe). A full queue refuses a
request at once (``QueueFull``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gptft.generate import _Picker, row_seed

log = logging.getLogger("gptft.serve")


class QueueFull(Exception):
    """More requests wait than ``max_queue`` allows."""


@dataclass
class Event:
    """What a request hears from the engine: new ``text``, then once ``done`` with its reason
    (``stop``, ``length``, ``cancelled``, ``error``) and token counts, or a ``result`` (classify)."""

    text: str = ""
    done: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    result: Any = None
    error: str | None = None


@dataclass
class GenerationRequest:
    """One prompt to continue. `emit` receives its events (on the engine thread)."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cancelled: bool = False
    """Set from any thread: the engine drops the request at the next token boundary."""


@dataclass
class ClassifyRequest:
    """Texts to label; `emit` receives one ``Event(result=[Prediction, ...], done=True)``."""

    texts: list[str]
    emit: Callable[[Event], None]
    cancelled: bool = False


class SlotCache:
    """Keys and values of up to ``slots`` sequences, each with its own length.

    Row ``i`` of a decoding batch lives in slot ``i``; the engine keeps the rows packed (a
    leaving row's slot takes the last row's keys), so the keys of a step are a view, not a copy.
    Before each forward the engine ``bind``s the call: which slots it covers, where each row's
    new keys go, and how many positions the returned keys span (the rest of a row's span is
    masked by the engine's 4-D mask). It duck-types ``KVCache`` for ``hidden_states``:
    ``update(layer, k, v)`` and ``length`` (which the model advances; nothing here reads it).

    Each slot holds ``capacity`` positions, grown (doubled, up to ``max_length``) when a call
    needs more: the memory follows the longest sequence served so far, not the context length
    times the slots.
    """

    def __init__(self, slots: int, max_length: int):
        self.slots, self.max_length = slots, max_length
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.length = 0
        self.capacity = 0
        self._rows, self._starts, self._width = slice(0, 0), torch.zeros(0, dtype=torch.long), 0

    def bind(self, rows: slice, starts: torch.Tensor, width: int) -> None:
        """The next forward covers slots `rows`; row ``b`` writes its keys from position
        ``starts[b]``; the keys returned span positions ``[0, width)``."""
        if width > self.max_length:
            raise ValueError(f"slot cache: {width} positions > max_length {self.max_length}")
        if width > self.capacity:
            self.capacity = min(self.max_length, max(width, 2 * self.capacity, 64))
            for cached in (self.k, self.v):
                for layer, t in enumerate(cached):
                    grown = t.new_zeros((*t.shape[:2], self.capacity, t.size(3)))
                    grown[:, :, : t.size(2)] = t
                    cached[layer] = grown
        self._rows, self._starts, self._width, self.length = rows, starts, width, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's (B, H, T, hd) keys/values of `layer`; return (B, H, width, hd)."""
        if layer == len(self.k):  # first use of this layer: allocate every slot
            shape = (self.slots, k.size(1), self.capacity, k.size(3))
            self.k.append(k.new_zeros(shape))
            self.v.append(v.new_zeros(shape))
        keys, values = self.k[layer][self._rows], self.v[layer][self._rows]
        if k.size(2) == 1:  # a decoding step: one new position per row, each at its own place
            index = torch.arange(k.size(0), device=k.device)
            keys[index, :, self._starts] = k[:, :, 0]
            values[index, :, self._starts] = v[:, :, 0]
        else:  # a prefill: every row from the same start (shorter prompts padded)
            start = int(self._starts[0])
            keys[:, :, start : start + k.size(2)] = k
            values[:, :, start : start + k.size(2)] = v
        return keys[:, :, : self._width], values[:, :, : self._width]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of slot `source` into slot `target`."""
        for cached in (self.k, self.v):
            for t in cached:
                t[target, :, :length] = t[source, :, :length]


class _Engine:
    """The queue and the thread shared by both engines; subclasses define ``_work``."""

    def __init__(self, max_batch: int, max_queue: int):
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: deque = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="gptft-serve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, requests: list) -> None:
        """Queue `requests` (all or none). Raises ``QueueFull`` when they do not fit."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests wait already (--max-queue "
                                f"{self.max_queue})")
            self._waiting.extend(requests)
            self._cond.notify()

    def waiting(self) -> int:
        return len(self._waiting)

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what is left and end the thread (the web server has let in-flight requests
        finish before, within its bound)."""
        with self._cond:
            self._stopping = True
            for request in self._waiting:
                request.cancelled = True
            self._cond.notify()
        self._cancel_active()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _cancel_active(self) -> None:
        pass

    def _busy(self) -> bool:
        return False

    def _take(self) -> list | None:
        """The waiting requests this round admits (may be none while others decode); None once
        stopping with nothing left."""
        with self._cond:
            while not self._waiting and not self._busy() and not self._stopping:
                self._cond.wait()
            if self._stopping and not self._busy():
                for request in self._waiting:
                    request.emit(Event(done=True, finish_reason="cancelled"))
                self._waiting.clear()
                return None
            return self._admit()

    def _admit(self) -> list:
        raise NotImplementedError

    def _run(self) -> None:
        with torch.inference_mode():
            while (admitted := self._take()) is not None:
                try:
                    self._work(admitted)
                except Exception as e:  # a failed round fails its requests, never the server
                    log.exception("engine round failed")
                    for request in admitted:
                        request.emit(Event(done=True, finish_reason="error",
                                           error=f"{type(e).__name__}: {e}"))

    def _work(self, admitted: list) -> None:
        raise NotImplementedError


class _Row:
    """A request being decoded: its slot is its index in ``GenerationEngine._rows``."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.length = 0  # positions in its slot
        self.out: list[int] = []  # tokens generated so far (a stop token excluded)
        self.pending: int | None = None  # the last token, still to feed
        self.sent = 0  # characters of the response emitted
        self.finished = False
        seed = request.seed if request.seed is not None else random.getrandbits(62)
        self.pick = _Picker(request.temperature, request.top_k, request.top_p,
                            [torch.Generator().manual_seed(row_seed(seed, 0))])


class GenerationEngine(_Engine):
    """Continuous batching of ``GenerationRequest``s on a language model (module docstring).

    Args:
        model: a decoder offering ``hidden_states(ids, attention_mask, position_ids, kv_cache,
            last_only)``, ``logits(hidden)`` and ``config.context_length``.
        tokenizer: ``decode(ids)``; stop tokens come from ``gptft.serve.prompts.stop_ids``.
        max_batch: the most requests decoded together (KV-cache slots).
        max_queue: the most requests waiting for a slot.
    """

    def __init__(self, model, tokenizer, max_batch: int, max_queue: int):
        from gptft.serve.prompts import stop_ids

        super().__init__(max_batch, max_queue)
        self.model, self.tokenizer, self.stop_ids = model.eval(), tokenizer, stop_ids(tokenizer)
        self.context_length = model.config.context_length
        self.device = next(model.parameters()).device
        self.cache = SlotCache(max_batch, self.context_length)
        self._rows: list[_Row] = []
        self.steps = 0  # decoding steps run (a batch of any size counts once)
        self.peak = 0  # the most requests decoded in one step
        self.cancelled = 0  # requests that left before their end (client gone, timeout, shutdown)

    def active(self) -> int:
        return len(self._rows)

    def _busy(self) -> bool:
        return bool(self._rows)

    def _cancel_active(self) -> None:
        for row in list(self._rows):
            row.request.cancelled = True

    def _admit(self) -> list:
        admitted = []
        while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
            admitted.append(self._waiting.popleft())
        return admitted

    def _work(self, admitted: list[GenerationRequest]) -> None:
        try:
            for request in admitted:
                if request.cancelled:
                    request.emit(Event(done=True, finish_reason="cancelled"))
            new = [_Row(request) for request in admitted if not request.cancelled]
            if new:
                first = len(self._rows)
                self._rows += new
                self._accept(new, self._prefill(new, first))
            self._leave()
            if self._rows:
                self._step()
                self._leave()
        except Exception as e:  # fail the requests of this step; the engine goes on
            log.exception("engine step failed")
            decoding = {id(r.request) for r in self._rows}
            for request in [r.request for r in self._rows if not r.finished] + [
                    q for q in admitted if id(q) not in decoding and not q.cancelled]:
                request.emit(Event(done=True, finish_reason="error", error=f"{type(e).__name__}: {e}"))
            self._rows.clear()

    def _prefill(self, rows: list[_Row], first: int) -> torch.Tensor:
        """Feed the prompts of `rows` together into slots ``first, first + 1, ...`` (right-padded,
        each row's keys masked to its own length); the final hidden state (B, emb_dim) of each
        prompt's last token."""
        lengths = [len(r.request.prompt_ids) for r in rows]
        B, T = len(rows), max(lengths)
        ids = torch.zeros((B, T), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : lengths[b]] = torch.tensor(row.request.prompt_ids)
            row.length = lengths[b]
        self.cache.bind(slice(first, first + B), torch.zeros(B, dtype=torch.long), T)
        n = torch.tensor(lengths, device=self.device)
        positions = torch.arange(T, device=self.device)
        causal = positions[None, :] <= positions[:, None]  # (T, T): query, key
        mask = causal[None] & (positions[None, None, :] < n[:, None, None])  # (B, T, T)
        if B == 1:  # one prompt: only its last position is needed
            return self.model.hidden_states(ids.to(self.device), attention_mask=mask[:, None],
                                            position_ids=positions[None], kv_cache=self.cache,
                                            last_only=True)[:, -1]
        hidden = self.model.hidden_states(ids.to(self.device), attention_mask=mask[:, None],
                                          position_ids=positions[None].expand(B, T), kv_cache=self.cache)
        return hidden[torch.arange(B, device=self.device), n - 1]

    def _step(self) -> None:
        """Feed every row's pending token at its own position; choose each row's next token."""
        rows = self._rows
        lengths = torch.tensor([r.length for r in rows], device=self.device)
        width = max(r.length for r in rows) + 1
        self.cache.bind(slice(0, len(rows)), lengths, width)
        keys = torch.arange(width, device=self.device)[None, :] <= lengths[:, None]  # (B, width)
        tokens = torch.tensor([[r.pending] for r in rows], device=self.device)
        hidden = self.model.hidden_states(tokens, attention_mask=keys[:, None, None, :],
                                          position_ids=lengths[:, None], kv_cache=self.cache,
                                          last_only=True)[:, -1]
        for r in rows:
            r.length += 1
        self.steps += 1
        self.peak = max(self.peak, len(rows))
        self._accept(rows, hidden)

    def _accept(self, rows: list[_Row], hidden: torch.Tensor) -> None:
        """Choose each row's next token from its (B, emb_dim) final hidden state and emit its new
        text. (``generate``'s fused ``_Greedy`` head was slower here at emb_dim 64 on the CPU:
        2.9 s against 2.6 s for 16 x 64 tokens, so the projection is the plain one.)"""
        logits = self.model.logits(hidden)
        chosen = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.request.temperature > 0:
                chosen[i] = int(row.pick(logits[i : i + 1], [0])[0])
            self._extend(row, chosen[i])

    def _extend(self, row: _Row, token: int) -> None:
        request = row.request
        finish = None
        if token in self.stop_ids:
            finish = "stop"
        else:
            row.out.append(token)
            row.pending = token
        text = self.tokenizer.decode(row.out)
        for stop in request.stop:
            at = text.find(stop)
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish is None and (len(row.out) >= request.max_tokens
                               or row.length + 1 > self.context_length):
            finish = "length"
        if finish is None:
            safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character waits for its bytes
            safe -= _held_back(text[:safe], request.stop)
            if safe > row.sent:
                request.emit(Event(text=text[row.sent : safe]))
                row.sent = safe
            return
        request.emit(Event(text=text[row.sent :], done=True, finish_reason=finish,
                           prompt_tokens=len(request.prompt_ids), completion_tokens=len(row.out)))
        row.finished = True  # leaves at this boundary

    def _leave(self) -> None:
        """Drop finished and cancelled rows; the last rows move into the freed slots."""
        i = 0
        while i < len(self._rows):
            row = self._rows[i]
            if not (row.finished or row.request.cancelled):
                i += 1
                continue
            if not row.finished:
                self.cancelled += 1
                row.request.emit(Event(done=True, finish_reason="cancelled",
                                       prompt_tokens=len(row.request.prompt_ids),
                                       completion_tokens=len(row.out)))
            last = len(self._rows) - 1
            if i != last:
                self.cache.move(last, i, self._rows[last].length)
                self._rows[i] = self._rows[last]
            self._rows.pop()


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could begin a stop string (not emitted yet)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class ClassifyEngine(_Engine):
    """Labels the texts of every waiting request (up to ``max_batch`` texts a round; a request
    with more runs alone) with one ``Classifier.predict`` call."""

    def __init__(self, classifier, max_batch: int, max_queue: int):
        super().__init__(max_batch, max_queue)
        self.classifier = classifier

    def _admit(self) -> list:
        admitted, texts = [], 0
        while self._waiting and (not admitted or texts + len(self._waiting[0].texts) <= self.max_batch):
            request = self._waiting.popleft()
            admitted.append(request)
            texts += len(request.texts)
        return admitted

    def _work(self, admitted: list[ClassifyRequest]) -> None:
        live = [r for r in admitted if not r.cancelled]
        for r in admitted:
            if r.cancelled:
                r.emit(Event(done=True, finish_reason="cancelled"))
        if not live:
            return
        started = time.perf_counter()
        predictions = self.classifier.predict([t for r in live for t in r.texts], self.max_batch)
        log.debug("classified %d texts in %.3f s", len(predictions), time.perf_counter() - started)
        for r in live:
            r.emit(Event(done=True, finish_reason="stop", result=predictions[: len(r.texts)]))
            predictions = predictions[len(r.texts) :]
