"""Chat templates: conversations rendered with jinja2 exactly as ``transformers`` renders them,
and tokenized with the mask of the tokens the model learns from.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``.
``render_chat`` renders one with a template in ``transformers``' sandboxed environment
(``ImmutableSandboxedEnvironment`` with ``trim_blocks`` / ``lstrip_blocks``, ``raise_exception``,
``tojson``, ``strftime_now``, the ``{% generation %}`` tag and loop controls), so a model's own
template (``tokenizer_config.json``'s ``chat_template``) gives the text ``apply_chat_template``
gives. ``BUILTIN_TEMPLATES`` holds ``chatml`` and ``llama3`` for models without a template (GPT-2
included); ``resolve_template`` picks one for a ``data.prompt_style``.

``tokenize_chat`` gives the token ids and the assistant mask: 1 on every token of an assistant
turn, its end-of-turn token included (``<|im_end|>`` and the newline after it in ChatML,
``<|eot_id|>`` in Llama 3: what TRL's ``assistant_only_loss`` marks with its training templates).
A template with ``{% generation %}`` tags marks the turns itself (as ``transformers``'
``return_assistant_tokens_mask``); for one without (most models' own), each assistant turn starts
where the conversation before it, rendered with ``add_generation_prompt``, ends, and ends after the
first end-of-turn token that follows the message's text (plus the whitespace after it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

from gptft.errors import GPTFTError

TrainOn = Literal["assistant", "last_assistant", "all"]
TRAIN_ON = ("assistant", "last_assistant", "all")

# ChatML (OpenAI's, Qwen's): each turn `<|im_start|>ROLE\n...<|im_end|>\n`
CHATML = (
    "{%- for message in messages %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}\n"
    "{%- if message['role'] == 'assistant' %}\n"
    "{%- generation %}{{- message['content'] + '<|im_end|>\\n' }}{%- endgeneration %}\n"
    "{%- else %}\n"
    "{{- message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

# Llama 3 (Meta's instruct models): the BOS, then `<|start_header_id|>ROLE<|end_header_id|>\n\n`
# and the trimmed content closed by `<|eot_id|>`
LLAMA3 = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "{%- if message['role'] == 'assistant' %}\n"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}\n"
    "{%- else %}\n"
    "{{- message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3}
"""Named chat templates for models without one (``data.prompt_style``), with generation tags."""
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
"""The text that closes an assistant turn in each built-in template."""
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the name errors give it.

    Attributes:
        name: ``chatml`` / ``llama3``, or ``"the chat template of TOKENIZER"``.
        source: the jinja2 text.
    """

    name: str
    source: str

    @property
    def has_generation_tags(self) -> bool:
        """Whether the template marks assistant output with ``{% generation %}``."""
        return bool(_GENERATION_TAG.search(self.source))


def resolve_template(prompt_style: str, tokenizer) -> ChatTemplate:
    """The chat template of a ``data.prompt_style``: ``template`` → the tokenizer's own (an error
    naming the tokenizer when it has none), ``chatml`` / ``llama3`` → the built-in one."""
    if prompt_style == "template":
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise GPTFTError(
                f"tokenizer {tokenizer.name!r} has no chat template (tokenizer_config.json "
                f"'chat_template'); choose a named one: data.prompt_style={' or '.join(BUILTIN_TEMPLATES)}")
        return ChatTemplate(f"the chat template of {tokenizer.name}", source)
    if prompt_style in BUILTIN_TEMPLATES:
        return ChatTemplate(prompt_style, BUILTIN_TEMPLATES[prompt_style])
    raise GPTFTError(f"unknown chat template {prompt_style!r} (known: template, "
                     f"{', '.join(BUILTIN_TEMPLATES)})")


# ---- rendering ------------------------------------------------------------------------------------

def render_chat(template: str | ChatTemplate, messages: Sequence[dict],
                add_generation_prompt: bool = False, **kwargs: Any) -> str:
    """The text of `messages` through `template`, as ``transformers``' ``apply_chat_template(...,
    tokenize=False)`` renders it.

    Args:
        template: jinja2 text, or a ``ChatTemplate`` (whose name errors give).
        messages: ``{"role", "content", ...}`` dicts; keys holding None are dropped (as
            ``transformers`` does).
        add_generation_prompt: end with the header of an assistant turn (for generation).
        **kwargs: variables the template reads: the tokenizer's special tokens (``bos_token``,
            ``eos_token``, ...: ``tokenizer.special_tokens_map``) and any others
            (``enable_thinking``...).

    Raises:
        GPTFTError: the template fails (syntax, ``raise_exception``, a sandbox violation, an
            undefined value), naming the template.
    """
    return _render(_as_template(template), _plain_messages(messages), add_generation_prompt, kwargs)[0]


def _as_template(template: str | ChatTemplate) -> ChatTemplate:
    return template if isinstance(template, ChatTemplate) else ChatTemplate("chat template", template)


def _render(template: ChatTemplate, messages: list[dict], add_generation_prompt: bool,
            kwargs: dict, track: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and, with `track`, the character spans of its generation blocks."""
    try:
        compiled = _compile(template.source)
        variables = {"messages": messages, "tools": None, "documents": None,
                     "add_generation_prompt": add_generation_prompt, **_plain(kwargs)}
        if not track:
            return compiled.render(**variables), []
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        with compiled.environment.activate_tracker(blocks, spans):
            for block in compiled.generate(**variables):
                blocks.append(block)
        return "".join(blocks), spans
    except GPTFTError:
        raise
    except Exception as e:  # the template is user input: any failure of it is its own
        name = template.name if template.name.startswith("the ") else f"chat template {template.name!r}"
        first = str(e).splitlines()[0] if str(e) else ""
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise GPTFTError(f"{name}{where}: {type(e).__name__}: {first}") from None


@lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled in ``transformers``' sandboxed environment."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_extension(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _namespace_class()
    return env.from_string(source)


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' tojson: no HTML escaping, json.dumps' options
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateDict:
    """``dict(...)`` in templates, without handing the ``dict`` type itself to them."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=1)
def _namespace_class():
    """jinja2's ``namespace`` refusing underscore names (as ``transformers``' does)."""
    import jinja2
    import jinja2.utils

    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    return TemplateNamespace


@lru_cache(maxsize=1)
def _generation_extension():
    """The ``{% generation %}...{% endgeneration %}`` tag: renders its body, and records the
    body's character span while a tracker is active (``activate_tracker``)."""
    from contextlib import contextmanager
    from contextvars import ContextVar

    import jinja2
    import jinja2.nodes
    from jinja2.ext import Extension

    class GenerationTracker(Extension):
        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(activate_tracker=self.activate_tracker)
            self._tracking = ContextVar("gptft_generation_tracker", default=None)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_generation", [])
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation(self, context, caller):
            text = caller()
            tracking = self._tracking.get()
            if tracking is not None:
                blocks, spans = tracking
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

        @contextmanager
        def activate_tracker(self, blocks, spans):
            token = self._tracking.set((blocks, spans))
            try:
                yield
            finally:
                self._tracking.reset(token)

    return GenerationTracker


_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


def _plain_messages(messages: Sequence[dict]) -> list[dict]:
    """Plain-data copies of the messages, without keys holding None, reasoning under the names
    templates read: what ``transformers`` hands a template."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise GPTFTError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise GPTFTError(f"message {i}: expected an object {{role, content}}, "
                             f"got {type(message).__name__}")
        message = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _plain(value: Any) -> Any:
    """JSON-like data only (str, numbers, bools, None, lists, dicts): nothing with methods a
    template could misuse."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


# ---- tokenizing with the assistant mask -----------------------------------------------------------

def tokenize_chat(tokenizer, template: str | ChatTemplate, messages: Sequence[dict],
                  train_on: TrainOn = "assistant", add_generation_prompt: bool = False,
                  **kwargs: Any) -> tuple[list[int], list[int]]:
    """Render `messages` with `template` and tokenize them as ``apply_chat_template`` does (the
    tokenizer's special tokens passed to the template, no special tokens added around the text),
    with the mask of the tokens to learn.

    Args:
        tokenizer: a ``gptft.tokenizer`` tokenizer.
        template: jinja2 text or a ``ChatTemplate``.
        messages: the conversation.
        train_on: ``assistant``: every assistant turn; ``last_assistant``: the last one only;
            ``all``: every token.
        add_generation_prompt: end with an assistant header (a prompt for generation).
        **kwargs: further template variables (they override the special tokens).

    Returns:
        ``(ids, mask)``: the token ids, and 1 for each token of a selected assistant turn (its
        end-of-turn token included; any token overlapping the turn's text counts), else 0.
    """
    if train_on not in TRAIN_ON:
        raise GPTFTError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    template = _as_template(template)
    messages = _plain_messages(messages)
    variables = {**tokenizer.special_tokens_map, **kwargs}
    tagged = template.has_generation_tags
    text, spans = _render(template, messages, add_generation_prompt, variables, track=tagged)
    ids, offsets = tokenizer.encode_offsets(text)
    if train_on == "all":
        return ids, [1] * len(ids)
    if not tagged:
        spans = _assistant_spans(template, messages, text, variables, _end_of_turn_texts(tokenizer))
    if train_on == "last_assistant":
        spans = spans[-1:]
    return ids, _span_mask(offsets, spans)


def _span_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token overlapping a span (spans and tokens both in order)."""
    mask = [0] * len(offsets)
    k = 0
    for i, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[i] = 1
    return mask


def _end_of_turn_texts(tokenizer) -> list[str]:
    """The texts that may close an assistant turn: the tokenizer's stop tokens, and the
    built-in templates' end-of-turn tokens."""
    texts = [tokenizer.decode([i]) for i in tokenizer.stop_ids]
    return list(dict.fromkeys([*texts, *END_OF_TURN.values()]))


def _assistant_spans(template: ChatTemplate, messages: list[dict], text: str, variables: dict,
                     end_texts: Sequence[str]) -> list[tuple[int, int]]:
    """The character span of each assistant turn in `text`, for a template without generation
    tags: from the end of the conversation before it rendered with the generation prompt (the
    assistant header) to the end of the first end-of-turn text after the message's own text,
    with the whitespace that follows it."""
    spans: list[tuple[int, int]] = []
    name = template.name if template.name.startswith("the ") else f"chat template {template.name!r}"
    cursor = 0
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        content = message.get("content")
        content = content.strip() if isinstance(content, str) else ""
        start = _turn_start(template, messages[:i], text, variables)
        if start is None and i == 0:  # a conversation opened by the assistant: from its text
            start = text.find(content) if content else -1
        at = -1 if start is None or start < 0 else text.find(content, start) if content else start
        if start is not None and at < 0:
            raise GPTFTError(f"{name}: the text of message {i} (assistant) is not in the rendered "
                             "conversation; mark assistant turns with {% generation %} in the template")
        if start is None or start < cursor:
            raise GPTFTError(
                f"{name}: the conversation up to message {i} does not render as the start of the whole "
                "conversation, so its assistant turns cannot be told apart; mark them with "
                "{% generation %} ... {% endgeneration %} in the template")
        after = at + len(content)
        ends = [(j, t) for t in end_texts if t and (j := text.find(t, after)) >= 0]
        if not ends:
            raise GPTFTError(f"{name}: no end-of-turn token ({', '.join(end_texts)}) after message {i} "
                             "(assistant): the model would not learn to stop")
        j, t = min(ends)
        end = j + len(t)
        while end < len(text) and text[end].isspace():
            end += 1
        spans.append((start, end))
        cursor = end
    return spans


def _turn_start(template: ChatTemplate, before: list[dict], text: str, variables: dict) -> int | None:
    """Where the turn after the messages `before` starts in `text`: the length of `before`
    rendered with the generation prompt, when `text` starts with that (else None)."""
    try:
        prefix = _render(template, before, True, variables)[0]
    except GPTFTError:
        if before:
            raise
        return None  # many templates cannot render no message at all
    return len(prefix) if text.startswith(prefix) else None


def prompt_ids(tokenizer, template: str | ChatTemplate, messages: Sequence[dict], **kwargs: Any) -> list[int]:
    """The ids of `messages` followed by the assistant header: the prompt for the next reply."""
    return tokenize_chat(tokenizer, template, messages, "all", add_generation_prompt=True, **kwargs)[0]


def template_stop_ids(tokenizer, template: ChatTemplate) -> tuple[int, ...]:
    """The ids that end a reply under `template`: the tokenizer's stop ids, and a built-in
    template's end-of-turn token when it is one token of the tokenizer (``<|im_end|>`` in the
    tiny ChatML tokenizer; GPT-2 spells it in several tokens, so it is not among them)."""
    extra = END_OF_TURN.get(template.name)
    extra_id = tokenizer.token_id(extra) if extra else None
    return tuple(dict.fromkeys([*tokenizer.stop_ids, *([extra_id] if extra_id is not None else [])]))

