"""The HTTP side of ``gptft serve``: OpenAI's routes, request checks and error bodies (FastAPI).

Every request body is read under a size limit and checked field by field here, so that a bad one
gets a 4xx with ``{"error": {"message", "type", "param", "code"}}`` naming the field; the model
work goes to the engine (``gptft.serve.engine``), whose events come back through an asyncio queue
per HTTP request. A client that leaves, or a request past ``--timeout``, cancels its decoding at
the next token boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptft.errors import GPTFTError
from gptft.serve.engine import (
    ClassifyEngine,
    ClassifyRequest,
    Event,
    GenerationEngine,
    GenerationRequest,
    QueueFull,
)
from gptft.serve.errors import RequestError
from gptft.serve.options import ServeOptions
from gptft.serve.prompts import ROLES, end_texts, render_messages

log = logging.getLogger("gptft.serve")

# The fields each route reads; OpenAI's clients send no others unless told to.
SAMPLING_FIELDS = {"model", "temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "stream",
                   "stream_options", "n", "user"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt"}
CLASSIFY_FIELDS = {"model", "input", "user"}
MAX_STOPS = 4  # as OpenAI


@dataclass
class Served:
    """A loaded run: its engine and what the routes need to know about it."""

    kind: str  # "lm" or "classifier"
    engine: GenerationEngine | ClassifyEngine
    meta: dict[str, Any]
    tokenizer: Any
    created: int
    context_length: int


def load_served(run_dir: str | os.PathLike, device: str, max_batch: int, max_queue: int) -> Served:
    """Load a finished run (language model or classifier) and build its engine (not started)."""
    from gptft.runs import load_meta
    from gptft.tasks import TASKS

    meta = load_meta(run_dir)
    spec = TASKS.get(meta.get("task"))
    if spec is None or spec.produces not in ("lm", "classifier"):
        raise GPTFTError(f"{run_dir}: a {meta.get('task')!r} run has no model to serve")
    created = int(Path(run_dir, "gptft.json").stat().st_mtime)
    if spec.produces == "classifier":
        from gptft.classifier import load_classifier

        clf = load_classifier(run_dir, device)
        return Served("classifier", ClassifyEngine(clf, max_batch, max_queue), meta, clf.tokenizer,
                      created, clf.max_length)
    from gptft.runs import load_lm_run

    model, tokenizer, _ = load_lm_run(run_dir, device)
    return Served("lm", GenerationEngine(model, tokenizer, max_batch, max_queue), meta, tokenizer,
                  created, model.config.context_length)


def create_app(served: Served, options: ServeOptions) -> FastAPI:
    """The ASGI app serving `served`; its lifespan starts and stops the engine."""
    problems = options.problems()
    if problems:
        raise GPTFTError("serve: " + "; ".join(problems))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.engine.start()
        try:
            yield
        finally:  # uvicorn let in-flight requests finish (within its bound) before this
            await asyncio.to_thread(served.engine.stop, 10.0)

    app = FastAPI(title="gptft serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    api = _Api(served, options)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = (f"unknown request URL: {request.method} {request.url.path}" if e.status_code == 404
                   else f"{request.method} {request.url.path}: {e.detail}")
        return JSONResponse(RequestError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path,
                  type(e).__name__, e)
        body = RequestError(500, "internal server error (details in the server's log)",
                            type="server_error").body()
        return JSONResponse(body, status_code=500)

    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/models/{model_id:path}", api.model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/classify", api.classify, methods=["POST"])
    return app


class _Api:
    """The route handlers, sharing the served run and the options."""

    def __init__(self, served: Served, options: ServeOptions):
        self.served, self.options = served, options

    # ---- routes ----------------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        engine = self.served.engine
        ok = engine.alive
        body = {"status": "ok" if ok else "engine stopped", "model": self.options.model_name,
                "task": self.served.meta.get("task"), "waiting": engine.waiting()}
        if isinstance(engine, GenerationEngine):
            body["decoding"] = engine.active()
        return JSONResponse(body, status_code=200 if ok else 503)

    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request, model_id: str) -> JSONResponse:
        self._authorize(request)
        if model_id != self.options.model_name:
            raise self._unknown_model(model_id)
        return JSONResponse(self._model_card())

    async def chat(self, request: Request):
        data = await self._request(request, CHAT_FIELDS, "lm")
        messages = _messages(data)
        prompt = render_messages(self.served.meta, self.served.tokenizer, messages)
        ends = end_texts(self.served.meta, self.served.tokenizer)
        return await self._generate(request, data, [prompt], "messages", chat=True, ends=ends)

    async def completions(self, request: Request):
        data = await self._request(request, COMPLETION_FIELDS, "lm")
        return await self._generate(request, data, _strings(data, "prompt"), "prompt", chat=False)

    async def classify(self, request: Request) -> JSONResponse:
        data = await self._request(request, CLASSIFY_FIELDS, "classifier")
        texts = _strings(data, "input")
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        if blank:
            raise RequestError(400, f"input[{blank[0]}]: the text is empty", param=f"input[{blank[0]}]")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = ClassifyRequest(texts, _emitter(loop, events, 0))
        self._submit([job])
        (_, event), = await self._wait_all(request, events, [job], 1)
        _raise_failed(event)
        predictions = event.result
        data_out = [{"index": i, "object": "classification", "label": p.label,
                     "probability": p.probability, "probabilities": p.probabilities}
                    for i, p in enumerate(predictions)]
        limit = self.served.context_length  # a classifier reads its max_length first tokens
        tokens = sum(min(len(t), limit) for t in self.served.tokenizer.encode_batch(texts))
        return JSONResponse({"object": "list", "model": self.options.model_name, "data": data_out,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ---- generation ------------------------------------------------------------------------

    async def _generate(self, request: Request, data: dict, prompts: list[str | list[int]],
                        prompt_field: str, chat: bool, ends: list[str] | None = None):
        params = self._sampling(data)
        if ends:  # the template's end-of-turn text ends a reply as a stop string would
            params["stop"] = list(dict.fromkeys([*(params["stop"] or []), *ends]))
        stream, include_usage = _stream_options(data)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        jobs = []
        for i, text in enumerate(prompts):
            ids = text if isinstance(text, list) else self.served.tokenizer.encode(text)
            where = prompt_field if len(prompts) == 1 or chat else f"{prompt_field}[{i}]"
            max_tokens = self._max_tokens(len(ids), data, where)
            jobs.append(GenerationRequest(ids, max_tokens, _emitter(loop, events, i), **params))
        self._submit(jobs)
        kind = "chat.completion" if chat else "text_completion"
        reply = {"id": ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12),
                 "created": int(time.time()), "model": self.options.model_name}
        if stream:
            chunks = self._stream(request, events, jobs, reply, chat, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, finals = [""] * len(jobs), [None] * len(jobs)
        for i, event in await self._wait_all(request, events, jobs, len(jobs), texts):
            finals[i] = event
        for event in finals:
            _raise_failed(event)
        choices = [({"index": i, "message": {"role": "assistant", "content": texts[i]}}
                    if chat else {"index": i, "text": texts[i]})
                   | {"finish_reason": e.finish_reason, "logprobs": None} for i, e in enumerate(finals)]
        return JSONResponse({**reply, "object": kind, "choices": choices, "usage": _usage(finals)})

    async def _stream(self, request: Request, events: asyncio.Queue, jobs: list, reply: dict,
                      chat: bool, include_usage: bool):
        """Server-sent events: a chunk per piece of text, the finish reasons, ``[DONE]``."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        deadline = time.monotonic() + self.options.timeout

        def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else
                         {"content": text} if text is not None else {})
                choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            return _sse({**reply, "object": kind, "choices": [choice]})

        finals: list[Event | None] = [None] * len(jobs)
        try:
            if chat:
                for i in range(len(jobs)):
                    yield chunk(i, None, None, first=True)
            while any(f is None for f in finals):
                try:
                    ready = [await asyncio.wait_for(events.get(), deadline - time.monotonic())]
                except TimeoutError:
                    yield _sse(_timeout_error(self.options.timeout).body())
                    return
                while not events.empty():  # what else is there goes out in the same write
                    ready.append(events.get_nowait())
                out = []
                for i, event in ready:
                    if event.text:
                        out.append(chunk(i, event.text, None))
                    if event.done:
                        finals[i] = event
                        if event.finish_reason in ("error", "cancelled"):
                            yield "".join(out) + _sse(_failure(event).body())
                            return
                        out.append(chunk(i, None, event.finish_reason))
                yield "".join(out)
            if include_usage:
                yield _sse({**reply, "object": kind, "choices": [], "usage": _usage(finals)})
            yield "data: [DONE]\n\n"
        finally:  # also when the client left (the response is cancelled): stop the decoding
            for job in jobs:
                job.cancelled = True

    async def _wait_all(self, request: Request, events: asyncio.Queue, jobs: list, n: int,
                        texts: list[str] | None = None) -> list[tuple[int, Event]]:
        """The final event of each of `n` jobs (text gathered into `texts`), cancelling them when
        the client leaves or ``--timeout`` passes (504)."""
        finals: list[tuple[int, Event]] = []
        deadline = time.monotonic() + self.options.timeout
        gone = asyncio.create_task(_disconnected(request))
        try:
            while len(finals) < n:
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({get, gone}, timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if gone in done:
                        raise RequestError(499, "the client closed the connection", type="cancelled")
                    raise _timeout_error(self.options.timeout)
                ready = [get.result()]
                while not events.empty():
                    ready.append(events.get_nowait())
                for i, event in ready:
                    if texts is not None:
                        texts[i] += event.text
                    if event.done:
                        finals.append((i, event))
            return finals
        finally:
            gone.cancel()
            for job in jobs:
                job.cancelled = True

    # ---- checks ----------------------------------------------------------------------------

    async def _request(self, request: Request, fields: set[str], kind: str) -> dict:
        """The JSON body of a request to a model route (`kind`: ``lm`` or ``classifier``), after
        the API key, the body and its fields, and the model it names are checked."""
        self._authorize(request)
        data = await self._body(request, fields)
        self._check_model(data, kind)
        return data

    def _authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise RequestError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise RequestError(401, "incorrect API key", code="invalid_api_key")

    async def _body(self, request: Request, fields: set[str]) -> dict:
        """The JSON object of the request, read under ``max_body_bytes``; unknown fields refused."""
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise _too_large(len(body), limit)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise RequestError(400, f"the request body must be a JSON object (got {_kind(data)})")
        unknown = sorted(set(data) - fields)
        if unknown:
            raise RequestError(400, f"unrecognized request argument(s): {', '.join(unknown)} "
                               f"(this route takes {', '.join(sorted(fields))})", param=unknown[0])
        return data

    def _check_model(self, data: dict, kind: str) -> None:
        name = data.get("model")
        if not isinstance(name, str):
            raise RequestError(400, "model: required, a string (see GET /v1/models)"
                               if name is None else f"model: must be a string (got {_kind(name)})",
                               param="model")
        if name != self.options.model_name:
            raise self._unknown_model(name)
        if self.served.kind != kind:
            use = ("POST /v1/classify" if self.served.kind == "classifier"
                   else "POST /v1/chat/completions or /v1/completions")
            raise RequestError(400, f"model: {name} is a {self._what()}: use {use}", param="model",
                               code="model_not_supported")

    def _sampling(self, data: dict) -> dict:
        temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(data, "top_p", None, 0.0, 1.0, open_low=True)
        top_k = _integer(data, "top_k", None, 1)
        seed = _integer(data, "seed", None, None)
        if _integer(data, "n", 1, 1) != 1:
            raise RequestError(400, "n: only 1 choice per prompt is supported", param="n")
        if data.get("user") is not None and not isinstance(data["user"], str):
            raise RequestError(400, f"user: must be a string (got {_kind(data['user'])})", param="user")
        stop = data.get("stop")
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not (isinstance(stops, list) and len(stops) <= MAX_STOPS
                and all(isinstance(s, str) and s for s in stops)):
            raise RequestError(400, f"stop: must be a non-empty string or a list of at most {MAX_STOPS} "
                               f"(got {json.dumps(stop)[:80]})", param="stop")
        return {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed, "stop": stops}

    def _max_tokens(self, prompt_tokens: int, data: dict, prompt_field: str) -> int:
        """The request's ``max_tokens`` (or chat's newer ``max_completion_tokens``), checked
        against ``--max-new-tokens`` and the context; by default as many as both allow."""
        ctx, cap = self.served.context_length, self.options.max_new_tokens
        name = "max_tokens" if data.get("max_tokens") is not None else "max_completion_tokens"
        if prompt_tokens == 0:
            raise RequestError(400, f"{prompt_field}: the prompt is empty", param=prompt_field)
        if prompt_tokens >= ctx:
            raise RequestError(400, f"{prompt_field}: the prompt is {prompt_tokens} tokens; this "
                               f"model's context is {ctx} tokens (prompt and response together)",
                               param=prompt_field, code="context_length_exceeded")
        requested = _integer(data, name, None, 1)
        if requested is None:
            return min(cap, ctx - prompt_tokens)
        if requested > cap:
            raise RequestError(400, f"{name}: at most {cap} on this server (--max-new-tokens; "
                               f"got {requested})", param=name)
        if prompt_tokens + requested > ctx:
            raise RequestError(400, f"{name}: the prompt ({prompt_tokens} tokens) and {name} "
                               f"({requested}) exceed this model's context of {ctx} tokens",
                               param=name, code="context_length_exceeded")
        return requested

    def _submit(self, jobs: list) -> None:
        try:
            self.served.engine.submit(jobs)
        except QueueFull as e:
            raise RequestError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                               code="queue_full") from None

    def _unknown_model(self, name: str) -> RequestError:
        return RequestError(404, f"model: {name!r} is not served here; this server serves "
                            f"{self.options.model_name!r}", param="model", code="model_not_found")

    def _what(self) -> str:
        return "classifier" if self.served.kind == "classifier" else "language model"

    def _model_card(self) -> dict:
        return {"id": self.options.model_name, "object": "model", "created": self.served.created,
                "owned_by": "gptft", "task": self.served.meta.get("task"),
                "context_length": self.served.context_length}


# ---- helpers ---------------------------------------------------------------------------------

def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int):
    """A thread-safe ``emit`` that puts ``(index, event)`` on `events` in `loop`."""

    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
        except RuntimeError:  # the loop is closed: nobody waits for it any more
            pass

    return emit


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _messages(data: dict) -> list[dict[str, str]]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages: required, a non-empty list of {role, content} objects"
                           if messages is None else
                           f"messages: must be a non-empty list (got {_kind(messages)})", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(400, f"{where}: must be an object with role and content (got {_kind(m)})",
                               param=where)
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise RequestError(400, f"{where}: unrecognized key(s) {', '.join(extra)}",
                               param=f"{where}.{extra[0]}")
        if m.get("role") not in ROLES:
            raise RequestError(400, f"{where}.role: must be one of {', '.join(ROLES)} (got "
                               f"{json.dumps(m.get('role'))[:40]})", param=f"{where}.role")
        out.append({"role": m["role"], "content": _content(m.get("content"), f"{where}.content")})
    return out


def _strings(data: dict, name: str) -> list[str]:
    """The field `name` of a request: a string or a non-empty list of strings, as a list."""
    value = data.get(name)
    values = [value] if isinstance(value, str) else value
    if not (isinstance(values, list) and values and all(isinstance(v, str) for v in values)):
        raise RequestError(400, f"{name}: must be a string or a non-empty list of strings "
                           f"(got {_kind(value)})", param=name)
    return values


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text"}`` parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"{where}: must be a string or a list of text parts (got {_kind(content)})",
                       param=where)


def _number(data: dict, name: str, default, low: float, high: float, open_low: bool = False):
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"{name}: must be a number (got {_kind(value)})", param=name)
    if not (low < value if open_low else low <= value) or value > high:
        bracket = "(" if open_low else "["
        raise RequestError(400, f"{name}: must be in {bracket}{low:g}, {high:g}] (got {value})", param=name)
    return float(value)


def _integer(data: dict, name: str, default, low: int | None):
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{name}: must be an integer (got {_kind(value)})", param=name)
    if low is not None and value < low:
        raise RequestError(400, f"{name}: must be >= {low} (got {value})", param=name)
    return value


def _stream_options(data: dict) -> tuple[bool, bool]:
    stream, options = data.get("stream"), data.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(400, f"stream: must be true or false (got {_kind(stream)})", param="stream")
    if options is None:
        return bool(stream), False
    if not stream:
        raise RequestError(400, "stream_options: only with stream: true", param="stream_options")
    if not (isinstance(options, dict) and set(options) <= {"include_usage"}
            and isinstance(options.get("include_usage", False), bool)):
        raise RequestError(400, "stream_options: must be {\"include_usage\": true|false}",
                           param="stream_options")
    return True, bool(options.get("include_usage"))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _usage(finals: list) -> dict:
    prompt = sum(e.prompt_tokens for e in finals)
    completion = sum(e.completion_tokens for e in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(413, f"the request body is {size:,}+ bytes; this server takes at most "
                        f"{limit:,} (--max-body-bytes)", code="body_too_large")


def _timeout_error(seconds: float) -> RequestError:
    return RequestError(504, f"the request took longer than {seconds:g} s (--timeout)",
                        type="timeout_error", code="timeout")


def _failure(event: Event) -> RequestError:
    if event.finish_reason == "cancelled":
        return RequestError(503, "the request was cancelled: the server is shutting down",
                            type="server_error", code="cancelled")
    return RequestError(500, f"generation failed: {event.error}", type="server_error")


def _raise_failed(event: Event) -> None:
    if event.finish_reason in ("error", "cancelled"):
        raise _failure(event)
