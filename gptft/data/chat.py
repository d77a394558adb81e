"""Conversations as token ids and loss targets: what a chat-template run trains on.

A chat template renders a conversation to token ids with an assistant mask (1 on the tokens of
each assistant turn, its end-of-turn token included: ``gptft.templates``). From it:

* ``data.train_on`` picks the targets: ``assistant`` (every assistant turn but those with
  OpenAI's ``"weight": 0``), ``last_assistant`` (the last one only) or ``all`` (every token);
  padding is never a target (``gptft.data.collate``);
* a conversation longer than ``max_length + 1`` tokens loses whole turns from its start (a system
  message is kept) until it fits; when even its last exchange does not fit, it is cut at
  ``max_length + 1`` tokens and its last answer loses its end. Both are counted (``Fitted``), and
  reported before training and by ``gptft data inspect``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset

from gptft.errors import GPTFTError

# (messages, add_generation_prompt) -> (token ids, assistant mask)
Encode = Callable[[list[dict], bool], tuple[list[int], list[int]]]


def spans(mask: Sequence[int]) -> list[tuple[int, int]]:
    """The ``[start, end)`` runs of 1 in `mask`: one per assistant turn."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def targets(mask: Sequence[int], messages: list[dict], train_on: str) -> list[int]:
    """Which tokens the loss learns (1) for `train_on`, from a rendering's assistant mask."""
    if train_on == "all":
        return [1] * len(mask)
    runs = spans(mask)
    answers = [m for m in messages if m["role"] == "assistant"]
    weighted = any("weight" in m for m in answers)
    if weighted and len(runs) != len(answers):
        raise GPTFTError(f"the chat template marks {len(runs)} assistant span(s) in a conversation "
                         f"with {len(answers)} assistant turns: cannot apply 'weight'")
    keep = runs[-1:] if train_on == "last_assistant" else [
        run for run, m in zip(runs, answers if weighted else [{}] * len(runs))
        if m.get("weight", 1)]
    out = [0] * len(mask)
    for start, end in keep:
        out[start:end] = [1] * (end - start)
    return out


@dataclass
class Fitted:
    """One conversation's tokens and targets after fitting it to the length limit.

    Attributes:
        dropped: assistant turns dropped from the start to fit.
        cut: the kept part was still too long and was cut at the limit (its last answer, end-of-turn
            included, partly lost).
        length: the token count before fitting.
    """

    input_ids: list[int]
    target_mask: list[int]
    assistant_mask: list[int]
    dropped: int = 0
    cut: bool = False
    length: int = 0

    @property
    def lost_answer(self) -> bool:
        return bool(self.dropped or self.cut)


def fit(messages: list[dict], encode: Encode, train_on: str, limit: int) -> Fitted:
    """`messages` as ids and targets of at most `limit` tokens, whole turns dropped from the start
    (keeping a leading system message) until it fits, else cut at `limit`."""
    ids, mask = encode(messages, False)
    full = len(ids)
    if full <= limit:
        return Fitted(ids, targets(mask, messages, train_on), mask, length=full)
    system = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(system):]
    starts = [i for i, m in enumerate(body) if m["role"] == "user" and i > 0]
    kept = body
    for start in starts:
        kept = body[start:]
        ids, mask = encode(system + kept, False)
        if len(ids) <= limit:
            break
    dropped = sum(m["role"] == "assistant" for m in body[: len(body) - len(kept)])
    tmask = targets(mask, system + kept, train_on)
    cut = len(ids) > limit
    return Fitted(ids[:limit], tmask[:limit], mask[:limit], dropped=dropped, cut=cut, length=full)


class ChatDataset(Dataset):
    """Conversations tokenized once with their targets (``fit``).

    Items are ``{"input_ids", "target_mask"}`` (``gptft.data.collate`` turns them into inputs and
    labels). Attributes: ``lengths`` (tokens of each item) and ``fitted`` (each one's ``Fitted``).
    """

    def __init__(self, records: Sequence[dict], encode: Encode, train_on: str, max_length: int):
        self.records = list(records)
        self.fitted = [fit(r["messages"], encode, train_on, max_length + 1) for r in self.records]
        self.items = [{"input_ids": f.input_ids, "target_mask": f.target_mask} for f in self.fitted]
        self.lengths: list[int] = [len(f.input_ids) for f in self.fitted]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def truncation_report(datasets: dict[str, ChatDataset]) -> str | None:
    """A line saying how many examples fitting shortened and how many lost an answer, or None."""
    parts = []
    for split, data in datasets.items():
        short = sum(f.dropped > 0 or f.cut for f in data.fitted)
        if short:
            cut = sum(f.cut for f in data.fitted)
            parts.append(f"{split} {short} of {len(data)} ({cut} cut inside their last answer)")
    if not parts:
        return None
    return ("truncation to max_length: examples that lost an answer (whole turns dropped from the "
            "start, or cut): " + ", ".join(parts))


def preference_items(records: Sequence[dict], encode: Encode, max_length: int) -> list[dict]:
    """Pairs rendered with a chat template: the prompt (its messages, then the assistant header)
    and each response as the prompt's conversation plus one assistant turn, cut at
    ``max_length + 1`` tokens; ``prompt_len`` counts the tokens the two share."""
    items = []
    for record in records:
        prompt, _ = encode(record["messages"], True)
        pair = {}
        for key in ("chosen", "rejected"):
            ids, _ = encode(record["messages"] + [{"role": "assistant", "content": record[key]}], False)
            pair[key] = ids[: max_length + 1]
        shared = _common_prefix(prompt, pair["chosen"], pair["rejected"])
        items.append({**pair, "prompt_len": shared})
    return items


def _common_prefix(*seqs: list[int]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


# ---- the run's format: a chat template or a text prompt style -------------------------------------

class ChatFormat:
    """How a run turns conversations into tokens: a chat template (``template``, ``chatml``,
    ``llama3``) or one of ``gptft.prompts``' one-turn text styles (``alpaca``, ``phi3``). The same
    object serves training, ``generate``, ``chat`` and the test-set responses.

    Attributes:
        style: the prompt style (``data.prompt_style``, resolved: ``template`` when the tokenizer
            has a chat template and none was set, else ``alpaca``).
        tokenizer: the run's tokenizer.
        template: the ``gptft.templates.ChatTemplate`` (None for a text style).
    """

    def __init__(self, style: str | None, tokenizer, template_source: str | None = None):
        from gptft.data.conversations import TEMPLATE_STYLES

        self.tokenizer = tokenizer
        self.style = style or ("template" if getattr(tokenizer, "chat_template", None) else "alpaca")
        self.template = None
        if self.style in TEMPLATE_STYLES:
            from gptft.templates import ChatTemplate, resolve_template

            name = self.style if self.style != "template" else f"the chat template of {tokenizer.name}"
            self.template = (ChatTemplate(name, template_source) if template_source
                             else resolve_template(self.style, tokenizer))

    @property
    def chat(self) -> bool:
        """Whether a chat template renders the conversations (else a one-turn text style)."""
        return self.template is not None

    def encode(self, messages: list[dict],
               add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and assistant mask of a conversation (``gptft.templates.tokenize_chat``)."""
        from gptft.templates import tokenize_chat

        return tokenize_chat(self.tokenizer, self.template, messages, "assistant", add_generation_prompt)

    def prompt(self, messages: list[dict]) -> list[int]:
        """The ids that ask the model for the next assistant turn after `messages`."""
        if self.chat:
            return self.encode(messages, True)[0]
        from gptft.prompts import format_prompt

        user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        return self.tokenizer.encode(format_prompt({"instruction": user, "input": ""}, self.style))

    def end_texts(self) -> list[str]:
        """The texts that end an assistant turn: the stop tokens, and with a chat template the
        built-in templates' end-of-turn markers (text, not one token, with GPT-2's vocabulary)."""
        from gptft.templates import END_OF_TURN

        texts = [self.tokenizer.decode([i]) for i in self.tokenizer.stop_ids]
        return list(dict.fromkeys(texts + (list(END_OF_TURN.values()) if self.chat else [])))

    def response(self, ids: list[int]) -> str:
        """The text of generated ids, up to the first stop token or end-of-turn text, stripped."""
        stops = set(self.tokenizer.stop_ids)
        ids = next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)
        text = self.tokenizer.decode(ids)
        for end in self.end_texts():
            text = text.split(end)[0]
        return text.strip()

    def meta(self) -> dict:
        """What ``gptft.json`` records so that a run reloads this format."""
        out = {"prompt_style": self.style}
        if self.template is not None:
            out["chat_template"] = self.template.source
        return out
