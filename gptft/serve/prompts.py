"""How a chat request becomes the text the model continues, and where a response stops.

Everything ``gptft serve`` knows about a run's prompt format is in these two functions, so that
chat templates plug in here and nowhere else.
"""

from __future__ import annotations

from typing import Any

from gptft.prompts import format_prompt, get_style
from gptft.serve.errors import RequestError

# OpenAI's roles for instructions to the model; "developer" is the newer name of "system".
SYSTEM_ROLES = ("system", "developer")
ROLES = (*SYSTEM_ROLES, "user", "assistant")


def render_messages(meta: dict[str, Any], tokenizer, messages: list[dict[str, str]]) -> str | list[int]:
    """The prompt for `messages` (``[{"role", "content": str}, ...]``, roles in ``ROLES``, already
    type-checked), ready for generation: it ends where the assistant's reply begins.

    A run tuned with a chat template (``gptft.json``'s ``chat_template``) gets every turn rendered
    with it and the generation prompt, as ``gptft chat`` does (the token ids are returned). A run
    with a one-turn prompt style (``meta["prompt_style"]``: alpaca, phi3) gets the system messages
    and then the user messages, joined by blank lines, as the instruction; a conversation with an
    assistant turn is refused (400), as the model never saw one.

    Raises:
        RequestError: no user message, or an assistant turn the prompt style cannot show.
    """
    if meta.get("chat_template"):  # a run tuned on conversations: every turn, its template
        return chat_format(meta, tokenizer).prompt(messages)
    style = get_style(meta["prompt_style"])
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            raise RequestError(400, f"messages[{i}]: this run's prompt style ({style.name}) takes "
                               "one instruction, not a conversation with assistant turns; send the "
                               "system and user messages only", param=f"messages[{i}].role")
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise RequestError(400, "messages: no user message", param="messages")
    system = [m["content"] for m in messages if m["role"] in SYSTEM_ROLES]
    return format_prompt({"instruction": "\n\n".join(system + users), "input": ""}, style)


def stop_ids(tokenizer) -> frozenset[int]:
    """The token ids that end a response (not part of it): the tokenizer's end-of-text token.
    Every stop-token decision of the server reads this set; a tokenizer that declares several
    (a chat model's end-of-turn token besides its end-of-text) adds them here."""
    declared = getattr(tokenizer, "stop_ids", None)
    return frozenset(declared) if declared else frozenset({tokenizer.eot_id})


def chat_format(meta: dict[str, Any], tokenizer):
    """The run's ``gptft.data.chat.ChatFormat`` (its prompt style or chat template)."""
    from gptft.data.chat import ChatFormat

    return ChatFormat(meta.get("prompt_style"), tokenizer, meta.get("chat_template"))


def end_texts(meta: dict[str, Any], tokenizer) -> list[str]:
    """Texts that end a chat reply besides the stop tokens: a built-in template's end-of-turn
    marker, which GPT-2's vocabulary spells with several tokens (empty for prompt styles)."""
    if not meta.get("chat_template"):
        return []
    stops = {tokenizer.decode([i]) for i in stop_ids(tokenizer)}
    return [t for t in chat_format(meta, tokenizer).end_texts() if t not in stops]
