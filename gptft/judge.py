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
import sys
import time
import urllib.error
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
    """Seconds to wait for each reply."""
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
    if len(numbers) != 1 or not numbers[0].isdigit():
        return None
    score = int(numbers[0])
    return score if score <= 100 else None


class RecordError(Exception):
    """The judge gave no usable reply for one record (the others go on)."""


class UnreachableError(Exception):
    """The judge's server could not be connected to."""


@dataclass
class Judge:
    """A client for one judge model behind an Ollama or OpenAI-compatible chat endpoint.

    Connection errors, timeouts, HTTP 429 and 5xx are retried ``retries`` times with exponential
    backoff (``retry_delay``, then twice that, ...). The API key is only ever sent in a header.
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
        self.url = self.url.rstrip("/")

    @property
    def endpoint(self) -> str:
        return self.url + ("/api/chat" if self.api == "ollama" else "/v1/chat/completions")

    def body(self, prompt: str) -> dict:
        """The JSON request for `prompt`: deterministic decoding, the book's options."""
        messages = [{"role": "user", "content": prompt}]
        if self.api == "ollama":
            return {"model": self.model, "messages": messages,
                    "options": {"seed": SEED, "temperature": 0, "num_ctx": NUM_CTX}}
        return {"model": self.model, "messages": messages, "temperature": 0, "seed": SEED}

    def redact(self, text: str) -> str:
        """`text` with the API key replaced by ``***``."""
        return text.replace(self.api_key, "***") if self.api_key else text

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
                    raise RecordError(f"{e} (after {attempt + 1} attempts)") from None
            time.sleep(self.retry_delay * 2**attempt)
            attempt += 1

    def _ask_once(self, prompt: str) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.endpoint, data=json.dumps(self.body(prompt)).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return self._read_ollama(response) if self.api == "ollama" else self._read_openai(response)
        except urllib.error.HTTPError as e:
            detail = f"HTTP {e.code} from {self.endpoint}: {_snippet(e)}"
            if e.code == 429 or e.code >= 500:
                raise _Transient(detail) from None
            raise RecordError(detail) from None
        except urllib.error.URLError as e:  # no connection (refused, unknown host, connect timeout)
            raise _Transient(f"cannot connect to {self.endpoint}: {e.reason}", unreachable=True) from None
        except TimeoutError:
            raise _Transient(f"no reply from {self.endpoint} within {self.timeout:g} s") from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise _Transient(f"connection to {self.endpoint} failed: {type(e).__name__}: {e}") from None

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


class _Transient(Exception):
    """A failure worth retrying; `unreachable` when no connection was made."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


def _loads(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RecordError(f"reply is not JSON: {raw!r}") from None
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
    """Read a responses file (a JSON array) and check every record; one error lists the problems."""
    records = [r.value for r in read_json_records(path, "json")]
    problems = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            problems.append(f"record {i}: not a JSON object")
            continue
        for name in ("instruction", "output", key):
            if not isinstance(record.get(name), str):
                problems.append(f"record {i}: {name!r} " + ("is not a string" if name in record
                                                             else "is missing"))
        if record.get("input") is not None and not isinstance(record["input"], str):
            problems.append(f"record {i}: 'input' is not a string")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise GPTFTError(f"{path}: " + "; ".join(problems[:10]) + more)
    return records


def score_records(records: list[dict], judge: Judge, key: str = DEFAULTS.key,
                  warn: Callable[[str], None] | None = None) -> list[int | None]:
    """Scores of `records` (None where the judge gave no usable reply, each reported to `warn`).

    An empty response scores 0 without asking the judge. `warn` defaults to printing to stderr.
    """
    warn = warn or _print_err
    scores: list[int | None] = []
    for i, record in enumerate(records):
        if not record[key].strip():
            scores.append(0)
            continue
        try:
            reply = judge.ask(judge_prompt(record, key))
        except RecordError as e:
            warn(_clip(judge.redact(f"record {i}: {e}")))
            scores.append(None)
            continue
        except UnreachableError as e:
            raise GPTFTError(judge.redact(_unreachable_message(judge, str(e)))) from None
        score = parse_score(reply)
        if score is None:
            warn(f"record {i}: reply is not an integer score: {_clip(judge.redact(reply.strip()))!r}")
        scores.append(score)
    return scores


def _clip(text: str, limit: int = 300) -> str:
    """`text` cut to `limit` characters (after redaction, so no partial key survives)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _print_err(line: str) -> None:
    print(line, file=sys.stderr)


def _unreachable_message(judge: Judge, detail: str) -> str:
    message = f"cannot reach the judge at {judge.url} ({detail}; {judge.retries + 1} attempts)."
    if judge.api == "ollama":
        message += (f" Start Ollama with `ollama serve` and fetch the model with "
                    f"`ollama pull {judge.model}`, or pass --url.")
    return message + " Nothing was written."


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
    warn: Callable[[str], None] | None = None,
) -> list[int | None]:
    """Score every record of a responses file and write the scores back (key ``score``).

    Args:
        path: JSON array of records with ``instruction``, ``input``, ``output`` and `key`.
        url: server root, e.g. ``http://localhost:11434`` (Ollama) or ``https://api.openai.com``.
        model: the judge model's name on that server.
        api: ``ollama`` (``/api/chat``) or ``openai`` (``/v1/chat/completions``).
        api_key_env: environment variable holding the API key sent as a Bearer token (openai
            API only; unset or empty: no Authorization header).
        timeout: seconds to wait for each reply.
        retries: further attempts after a connection error, timeout, HTTP 429 or 5xx.
        retry_delay: first backoff delay in seconds; it doubles with each retry.
        key: the record key holding the response to score.
        output: where to write the scored records (atomically); default: `path` itself.
        warn: receives one line per record left unscored (default: printed to stderr).

    Returns:
        One score per record: 0..100, or None where the judge's reply was unusable.

    Raises:
        GPTFTError: bad file or records, or an unreachable server (nothing is written then).
    """
    records = load_records(path, key)
    api_key = os.environ.get(api_key_env) if api == "openai" and api_key_env else None
    judge = Judge(url, model, api, api_key or None, timeout, retries, retry_delay)
    scores = score_records(records, judge, key, warn)
    for record, score in zip(records, scores, strict=True):
        record["score"] = score
    target = Path(output) if output is not None else Path(path)
    try:
        write_json(target, records)
    except OSError as e:
        raise GPTFTError(f"{target}: cannot write the scores: {e}") from None
    return scores


def summary(scores: list[int | None]) -> str:
    """The two summary lines: number of scores, and their average over the scored records."""
    got = [s for s in scores if s is not None]
    average = f"{sum(got) / len(got):.2f}" if got else "n/a"
    return f"Number of scores: {len(got)} of {len(scores)}\nAverage score: {average}"
