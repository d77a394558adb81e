"""Score model responses with a judge LLM (Ollama or an OpenAI-compatible server), as the book's ch. 7.

``judge_file`` (the ``gptft judge`` command) asks the judge to score each record's response from 0
to 100 against the correct output, writes the scores back into the file (key ``score``) and prints
their average. Start a local judge first: ``ollama serve`` and ``ollama pull llama3``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gptft.data.readers import read_json_records
from gptft.errors import GPTFTError
from gptft.io import write_json
from gptft.prompts import format_prompt, get_style
from gptft.validation import check, non_negative, positive

SEED = 123  # the book's judge options
NUM_CTX = 2048
GIVE_UP_AFTER = 3  # records in a row without an answer (timeouts, failed connections): stop


@dataclass
class JudgeOptions:
    """How to reach the judge and what to score (the ``gptft judge`` flags)."""

    url: str = "http://localhost:11434"
    """Server root, e.g. http://localhost:11434 (Ollama) or https://api.openai.com."""
    model: str = "llama3"
    """The judge model's name on that server."""
    api: Literal["ollama", "openai"] = "ollama"
    """ollama (/api/chat) or openai (/v1/chat/completions)."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the API key (openai API only)."""
    timeout: float = 60.0
    """Seconds one request may take in all (a server trickling its reply is cut off)."""
    retries: int = 3
    """Further attempts after a connection error, timeout, HTTP 429 or 5xx."""
    retry_delay: float = 1.0
    """First backoff delay in seconds; it doubles with each retry."""
    key: str = "model_response"
    """The record key holding the response to score."""

    def problems(self) -> list[str]:
        out = [] if self.url.startswith(("http://", "https://")) else [
            f"url: must start with http:// or https:// (got {self.url!r})"]
        return out + positive(self, "timeout") + non_negative(self, "retries", "retry_delay")


DEFAULTS = JudgeOptions()
APIS = ("ollama", "openai")


def format_input(entry: dict) -> str:
    """The Alpaca instruction (and input) text of a record, without the response header."""
    return format_prompt(entry, "alpaca").removesuffix(get_style("alpaca").response_header)


def judge_prompt(entry: dict, key: str = DEFAULTS.key) -> str:
    """The book's scoring prompt for one record."""
    return (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
            f"score the model response `{entry[key]}` on a scale from 0 to 100, where 100 is the "
            "best score. Respond with the integer number only.")


def parse_score(reply: str) -> int | None:
    """The score in a judge's reply ("85", "Score: 85"), or None unless it holds exactly one
    number and that number is an integer from 0 to 100."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", reply)
    if len(numbers) != 1 or not numbers[0].isdigit() or len(numbers[0].lstrip("0")) > 3:
        return None  # (a 5,000-digit number is not a score, and int() would refuse it)
    score = int(numbers[0])
    return score if score <= 100 else None


class RecordError(Exception):
    """The judge gave no usable reply for one record (the others go on); `no_answer` when none
    came at all (every attempt timed out or lost its connection)."""

    def __init__(self, message: str, no_answer: bool = False):
        super().__init__(message)
        self.no_answer = no_answer


class UnreachableError(Exception):
    """The judge's server could not be connected to."""


class Stopped(Exception):
    """Judging stopped before the last record: `scores` of the records before, `message` why;
    `interrupted` on Ctrl-C."""

    def __init__(self, scores: list[int | None], message: str, interrupted: bool = False):
        super().__init__(message)
        self.scores, self.interrupted = scores, interrupted


class JudgeInterrupted(KeyboardInterrupt):
    """Ctrl-C while judging; the message says what was kept (the command line exits 130)."""


@dataclass
class Judge:
    """A client for one judge model behind an Ollama or OpenAI-compatible chat endpoint.

    Connection errors, timeouts, HTTP 429 and 5xx are retried ``retries`` times with exponential
    backoff (``retry_delay``, then twice that, ...). The API key is only ever sent in a header. A
    user name and password in `url` (``http://user:PASSWORD@host``) are sent as HTTP Basic
    authentication (unless an API key is) and never shown: messages name ``shown_url``.
    """

    url: str
    model: str
    api: str = DEFAULTS.api
    api_key: str | None = field(default=None, repr=False)
    timeout: float = DEFAULTS.timeout
    retries: int = DEFAULTS.retries
    retry_delay: float = DEFAULTS.retry_delay

    def __post_init__(self) -> None:
        check(JudgeOptions, {"url": self.url, "model": self.model, "api": self.api,
                             "timeout": self.timeout, "retries": self.retries,
                             "retry_delay": self.retry_delay}, "judge")
        self.url, self.shown_url, self._basic = _split_credentials(self.url.rstrip("/"))

    @property
    def endpoint(self) -> str:
        if self.api == "ollama":
            return self.url + "/api/chat"
        # an OpenAI base URL (the openai client's base_url, e.g. gptft serve's .../v1) or a root
        return self.url + ("/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions")

    def body(self, prompt: str) -> dict:
        """The JSON request for `prompt`: deterministic decoding, the book's options."""
        messages = [{"role": "user", "content": prompt}]
        if self.api == "ollama":
            return {"model": self.model, "messages": messages,
                    "options": {"seed": SEED, "temperature": 0, "num_ctx": NUM_CTX}}
        return {"model": self.model, "messages": messages, "temperature": 0, "seed": SEED}

    def redact(self, text: str) -> str:
        """`text` with the API key and the URL's password replaced by ``***``."""
        for secret in (self.api_key, *self._basic[1:]):
            if secret:
                text = text.replace(secret, "***")
        return text

    def ask(self, prompt: str) -> str:
        """The judge's reply to `prompt`, retrying transient failures.

        Raises:
            RecordError: the server answered, but with no usable reply.
            UnreachableError: no connection could be made after all retries.
        """
        attempt = 0
        while True:
            try:
                return self._ask_once(prompt)
            except _Transient as e:
                if attempt == self.retries:
                    if e.unreachable:
                        raise UnreachableError(str(e)) from None
                    raise RecordError(f"{e} (after {attempt + 1} attempts)", e.no_answer) from None
            time.sleep(self.retry_delay * 2**attempt)
            attempt += 1

    def _ask_once(self, prompt: str) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        elif self._basic[0] is not None:
            import base64

            pair = f"{self._basic[0]}:{self._basic[1] or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        request = urllib.request.Request(
            self.endpoint, data=json.dumps(self.body(prompt)).encode(), headers=headers, method="POST"
        )
        watchdog = _Watchdog(self.timeout)
        try:
            return self._exchange(request, watchdog)
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:  # not followed: the request and the key go to --url only
                raise RecordError(f"{self.endpoint} redirects (HTTP {e.code}) to "
                                  f"{e.headers.get('Location')}; redirects are not followed, so the "
                                  "request and any API key go only to --url: pass the new address "
                                  "as --url") from None
            detail = f"HTTP {e.code} from {self.endpoint}: {_snippet(e)}"
            if e.code == 429 or e.code >= 500:
                raise _Transient(detail) from None
            raise RecordError(detail) from None
        except (RecordError, OSError, http.client.HTTPException) as e:
            if watchdog.fired:
                raise _Transient(f"no complete reply from {self.endpoint} within {self.timeout:g} s",
                                 no_answer=True) from None
            if isinstance(e, RecordError):
                raise
            if isinstance(e, urllib.error.URLError) and isinstance(e.reason, TimeoutError):
                raise _Transient(f"no connection to {self.endpoint} within {self.timeout:g} s",
                                 no_answer=True) from None
            if isinstance(e, urllib.error.URLError):  # no connection (refused, unknown host, ...)
                raise _Transient(f"cannot connect to {self.endpoint}: {e.reason}",
                                 unreachable=True) from None
            if isinstance(e, TimeoutError):
                raise _Transient(f"no complete reply from {self.endpoint} within {self.timeout:g} s",
                                 no_answer=True) from None
            raise _Transient(f"connection to {self.endpoint} failed: {type(e).__name__}: {e}",
                             no_answer=True) from None
        finally:
            watchdog.cancel()

    def _exchange(self, request: urllib.request.Request, watchdog: _Watchdog) -> str:
        """Send `request` and read the whole reply before `watchdog`'s deadline."""
        opener = urllib.request.build_opener(_DeadlineHTTPHandler(watchdog),
                                             _DeadlineHTTPSHandler(watchdog), _NoRedirects())
        with opener.open(request, timeout=self.timeout) as response:
            reply = self._read_ollama(response) if self.api == "ollama" else self._read_openai(response)
        if watchdog.fired:  # the socket was shut mid-reply: what was read is incomplete
            raise TimeoutError
        return reply

    def _read_ollama(self, response) -> str:
        parts = []
        for raw in response:
            if not raw.strip():
                continue
            chunk = _loads(raw)
            if "error" in chunk:
                raise RecordError(f"the judge reported an error: {chunk['error']}")
            message = chunk.get("message")
            parts.append(str(message.get("content", "")) if isinstance(message, dict) else "")
            if chunk.get("done"):
                break
        return "".join(parts)

    def _read_openai(self, response) -> str:
        reply = _loads(response.read())
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise RecordError(f"unexpected reply: {json.dumps(reply)}") from None


class _Watchdog:
    """The overall deadline of one request: `seconds` after it starts, the connection's socket is
    shut down, so a server that trickles bytes (each within the socket timeout) cannot hold a
    request for longer."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.fired = False
        self._timer: threading.Timer | None = None

    def arm(self, sock: socket.socket) -> None:
        self._timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._fire, (sock,))
        self._timer.daemon = True
        # The timer's thread blocks the stop signals (it inherits the mask set around its start):
        # the kernel then delivers a Ctrl-C to the main thread, whose blocked read it interrupts;
        # delivered to the timer's thread, it would wait for the read's timeout.
        if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
            self._timer.start()
            return
        stops = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            self._timer.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _fire(self, sock: socket.socket) -> None:
        self.fired = True
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read, which then ends
        except OSError:
            pass

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _Deadline:
    """A urllib handler mix-in whose connections arm a `_Watchdog` once connected."""

    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self.watchdog = watchdog

    def do_open(self, http_class, req, **kwargs):
        watchdog = self.watchdog

        class Connection(http_class):
            def connect(self):
                super().connect()
                watchdog.arm(self.sock)

        return super().do_open(Connection, req, **kwargs)


class _DeadlineHTTPHandler(_Deadline, urllib.request.HTTPHandler):
    pass


class _DeadlineHTTPSHandler(_Deadline, urllib.request.HTTPSHandler):
    pass


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: urllib would copy the Authorization header to another host (and turn the
    POST into a GET); the 3xx is reported instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _Transient(Exception):
    """A failure worth retrying; `unreachable` when no connection was made, `no_answer` when the
    connection timed out or broke before a whole reply came."""

    def __init__(self, message: str, unreachable: bool = False, no_answer: bool = False):
        super().__init__(message)
        self.unreachable, self.no_answer = unreachable, no_answer


def _split_credentials(url: str) -> tuple[str, str, tuple[str | None, str | None, str | None]]:
    """`url` without its ``user:password@`` part, the same shown with ``***`` for the password,
    and (user, password, password as typed) for Basic authentication and redaction."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, url, (None, None, None)
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, typed = userinfo.partition(":")
    clean = urllib.parse.urlunsplit(parts._replace(netloc=host))
    shown = urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}" if typed else
                                                   f"{user}@{host}"))
    return clean, shown, (urllib.parse.unquote(user), urllib.parse.unquote(typed) or None,
                          typed or None)


def _loads(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):  # ValueError: also an integer of > 4,300 digits
        raise RecordError(f"reply is not JSON: {_clip(repr(raw))}") from None
    if not isinstance(data, dict):
        raise RecordError(f"reply is not a JSON object: {data}")
    return data


def _snippet(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read().decode("utf-8", "replace").strip()
    except OSError:
        body = ""
    return body or str(error.reason)


def load_records(path: str | os.PathLike, key: str = DEFAULTS.key) -> list[dict]:
    """Read a responses file (a JSON array) and check every record; one error lists each distinct
    problem once, with the records that have it."""
    records = [r.value for r in read_json_records(path, "json")]
    problems: list[tuple[int, str]] = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            problems.append((i, "not a JSON object"))
            continue
        for name in ("instruction", "output", key):
            if not isinstance(record.get(name), str):
                problems.append((i, f"{name!r} " + ("is not a string" if name in record
                                                    else "is missing")))
        if record.get("input") is not None and not isinstance(record["input"], str):
            problems.append((i, "'input' is not a string"))
    if problems:
        raise GPTFTError(f"{path}: " + "; ".join(grouped(problems)))
    return records


def grouped(problems: list[tuple[int, str]], shown: int = 5) -> list[str]:
    """``record 3: PROBLEM`` or ``records 0, 1, 2, 3, 4 and 15 more: PROBLEM``, once per distinct
    problem (in order of first appearance)."""
    by_problem: dict[str, list[int]] = {}
    for index, problem in problems:
        by_problem.setdefault(problem, []).append(index)
    out = []
    for problem, indices in by_problem.items():
        more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
        which = ", ".join(map(str, indices[:shown])) + more
        out.append(f"record{'s' if len(indices) > 1 else ''} {which}: {problem}")
    return out


def score_records(records: list[dict], judge: Judge, key: str = DEFAULTS.key,
                  warn: Callable[[str], None] | None = None) -> list[int | None]:
    """Scores of `records` (None where the judge gave no usable reply).

    An empty response scores 0 without asking the judge. Each distinct problem is reported to
    `warn` once when first met, and at the end with the other records that had it. `warn` defaults
    to printing to stderr (above a progress bar over the records, shown on a terminal).

    Raises:
        Stopped: with the scores so far, when the server cannot be connected to, when
            ``GIVE_UP_AFTER`` records in a row got no answer at all, or on Ctrl-C.
    """
    from tqdm.auto import tqdm

    bar = tqdm(records, desc="judging", unit="record", leave=False, disable=None, file=sys.stderr)
    warn = warn or (lambda line: bar.write(line, file=sys.stderr))
    scores: list[int | None] = []
    failures: list[tuple[int, str]] = []
    silent = 0  # records in a row without an answer
    try:
        for i, record in enumerate(bar):
            if not record[key].strip():
                scores.append(0)
                continue
            score, problem, silent = _score_one(judge, record, key, silent)
            if problem is not None:
                if all(p != problem for _, p in failures):
                    warn(f"record {i}: {problem}")
                failures.append((i, problem))
            scores.append(score)
            if silent >= GIVE_UP_AFTER:
                raise Stopped(scores, f"the judge at {judge.shown_url} did not answer {silent} "
                              "records in a row (see above)")
    except UnreachableError as e:
        raise Stopped(scores, judge.redact(_unreachable_message(judge, str(e)))) from None
    except KeyboardInterrupt:
        raise Stopped(scores, "interrupted", interrupted=True) from None
    finally:
        bar.close()
    repeated = [(i, p) for i, p in failures if sum(q == p for _, q in failures) > 1]
    for line in grouped(repeated):
        warn(f"the same problem for {line}")
    return scores


def _score_one(judge: Judge, record: dict, key: str, silent: int) -> tuple[int | None, str | None, int]:
    """(score, problem, records in a row without an answer, this one included)."""
    try:
        reply = judge.ask(judge_prompt(record, key))
    except RecordError as e:
        return None, _clip(judge.redact(str(e))), silent + 1 if e.no_answer else 0
    score = parse_score(reply)
    problem = None if score is not None else \
        f"reply is not an integer score: {_clip(judge.redact(reply.strip()))!r}"
    return score, problem, 0


def _clip(text: str, limit: int = 300) -> str:
    """`text` cut to `limit` characters (after redaction, so no partial key survives)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unreachable_message(judge: Judge, detail: str) -> str:
    message = f"cannot reach the judge at {judge.shown_url} ({detail}; {judge.retries + 1} attempts)."
    if judge.api == "ollama":
        message += (f" Start Ollama with `ollama serve` and fetch the model with "
                    f"`ollama pull {judge.model}`, or pass --url.")
    return message


def judge_file(
    path: str | os.PathLike,
    url: str = DEFAULTS.url,
    model: str = DEFAULTS.model,
    api: str = DEFAULTS.api,
    *,
    api_key_env: str | None = DEFAULTS.api_key_env,
    timeout: float = DEFAULTS.timeout,
    retries: int = DEFAULTS.retries,
    retry_delay: float = DEFAULTS.retry_delay,
    key: str = DEFAULTS.key,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Scores:
    """Score every record of a responses file and write the scores back (key ``score``).

    Args:
        path: JSON array of records with ``instruction``, ``input``, ``output`` and `key`.
        url: server root, e.g. ``http://localhost:11434`` (Ollama) or ``https://api.openai.com``.
        model: the judge model's name on that server.
        api: ``ollama`` (``/api/chat``) or ``openai`` (``/v1/chat/completions``).
        api_key_env: environment variable holding the API key sent as a Bearer token (openai
            API only; unset or empty: no Authorization header).
        timeout: seconds a request may take in all (connecting, sending, reading the reply).
        retries: further attempts after a connection error, timeout, HTTP 429 or 5xx.
        retry_delay: first backoff delay in seconds; it doubles with each retry.
        key: the record key holding the response to score.
        output: where to write the scored records (atomically; a new ``.json`` file unless
            `overwrite`; never a symbolic link); default: `path` itself (not a link).
        overwrite: let `output` replace an existing file.
        warn: receives one line per record left unscored (default: printed to stderr).

    A record the judge fails on keeps the score an earlier run gave it (else gets null); each
    request has an overall deadline of `timeout` seconds; redirects are not followed. When the
    server cannot be reached, or ``GIVE_UP_AFTER`` records in a row got no answer, judging stops;
    then, and on Ctrl-C, the scores obtained so far are written (the records not reached keep an
    earlier score, else get null).

    Returns:
        One score per record: 0..100, or None where the judge's reply was unusable (a ``Scores``
        list: its ``empty`` counts the empty responses, scored 0 without asking the judge).

    Raises:
        GPTFTError: bad file or records, an output that exists or is a link, every response empty,
            an unreachable or silent server, no response scored at all (nothing is written then),
            or the file cannot be written (the old one is kept).
        JudgeInterrupted: Ctrl-C (the scores obtained so far are written).
    """
    records = load_records(path, key)
    target = _check_target(Path(path), output, overwrite)
    empty = sum(not r[key].strip() for r in records)
    if records and empty == len(records):
        raise GPTFTError(f"{path}: every response ({key!r}) is empty: nothing to ask the judge "
                         "(did the generation fail?); nothing was written")
    api_key = os.environ.get(api_key_env) if api == "openai" and api_key_env else None
    judge = Judge(url, model, api, api_key or None, timeout, retries, retry_delay)
    try:
        scores = score_records(records, judge, key, warn)
    except Stopped as stop:
        judged = [s for r, s in zip(records, stop.scores) if r[key].strip() and s is not None]
        if judged:
            _write_scores(target, records, stop.scores + [None] * (len(records) - len(stop.scores)))
        kept = (f"the {len(judged)} scores obtained were written to {target}; run again to score "
                "the rest" if judged else "nothing was written")
        message = f"{stop}; stopped after {len(stop.scores)} of {len(records)} records: {kept}"
        if stop.interrupted:
            raise JudgeInterrupted(message) from None
        raise GPTFTError(message) from None
    asked = [s for r, s in zip(records, scores, strict=True) if r[key].strip()]
    if asked and all(s is None for s in asked):
        raise GPTFTError(f"the judge scored none of the {len(asked)} responses it was asked about "
                         f"(see the problems above); {target} was left unchanged")
    _write_scores(target, records, scores)
    return Scores(scores, empty=empty)


class Scores(list):
    """One score per record (0..100, or None), and how many were empty responses scored 0
    without asking the judge (`empty`)."""

    def __init__(self, scores: list[int | None], empty: int = 0):
        super().__init__(scores)
        self.empty = empty


def _check_target(path: Path, output: str | os.PathLike | None, overwrite: bool) -> Path:
    """The file the scores go to, checked before any request: `output` (a new ``.json`` file, or
    an existing one with `overwrite`), else `path` itself; never a symbolic link (a link would be
    replaced by a regular file, or written through)."""
    from gptft.io import check_output

    if output is not None:
        return check_output(output, overwrite, (".json",))
    if path.is_symlink():
        raise GPTFTError(f"{path}: is a symbolic link; gptft does not replace links: pass --output "
                         "to write the scores elsewhere, or judge the file the link points to")
    return path


def _write_scores(target: Path, records: list[dict], scores: list[int | None]) -> None:
    for record, score in zip(records, scores, strict=True):
        if score is not None or not _is_score(record.get("score")):
            record["score"] = score  # a failure keeps an earlier run's score
    write_json(target, records)


def _is_score(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100


def summary(scores: list[int | None]) -> str:
    """The two summary lines: number of scores (the empty responses, scored 0 without asking the
    judge, counted apart), and their average over the scored records only."""
    got = [s for s in scores if s is not None]
    empty = getattr(scores, "empty", 0)
    apart = (f" ({len(got) - empty} by the judge; {empty} empty response"
             f"{'s' if empty > 1 else ''} scored 0 without asking it)") if empty else ""
    if not got:
        return f"Number of scores: 0 of {len(scores)}\nAverage score: n/a (no record scored)"
    return (f"Number of scores: {len(got)} of {len(scores)}{apart}\n"
            f"Average score: {sum(got) / len(got):.2f} (over the {len(got)} scored records)")
