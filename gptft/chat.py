"""Responses to conversations, prompted with the run's chat template, and the history of a chat
(``gptft chat``): the system message, the turns so far, trimmed from the oldest to fit the context.
A prompt longer than the context keeps its template and loses the middle of its text
(``fit_texts``, ``fit_messages``, ``fit_record``).
"""

from __future__ import annotations

from collections.abc import Callable

from gptft.config import GenerateConfig
from gptft.data.chat import ChatFormat
from gptft.errors import GPTFTError

CUT_MARK = " [...] "  # where the middle of a text too long for the context was cut out


def respond_to(model, fmt: ChatFormat, conversations: list[list[dict]], cfg: GenerateConfig,
               stats: dict | None = None, progress: bool = False, between_batches=None) -> list[str]:
    """The model's next assistant turn after each conversation (``ChatFormat.prompt``), generated
    ``cfg.batch_size`` at a time until the tokenizer's EOS, cut at any stop token or end-of-turn
    text (``ChatFormat.response``). `stats`, `progress` and `between_batches` as in
    ``gptft.generate.generate``."""
    from gptft.generate import generate

    prompts = [fmt.prompt(c) for c in conversations]
    tokens = generate(model, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                      top_p=cfg.top_p, eos_id=list(fmt.tokenizer.stop_ids), seed=cfg.seed,
                      batch_size=cfg.batch_size, stats=stats, progress=progress,
                      between_batches=between_batches)
    return [fmt.response(t) for t in tokens]


class Conversation:
    """A chat's messages: an optional system message, then user and assistant turns.

    ``prompt_messages(text)`` is the conversation with a new user turn, its oldest exchanges
    dropped until the prompt and ``max_new_tokens`` fit the model's context (the system message
    and the new turn are always kept). With a one-turn text style (alpaca, phi3) the prompt holds
    the new instruction only: those formats have no history.
    """

    def __init__(self, fmt: ChatFormat, context_length: int, max_new_tokens: int):
        self.fmt, self.context_length, self.max_new_tokens = fmt, context_length, max_new_tokens
        self.system: str | None = None
        self.turns: list[dict] = []
        self.trimmed = 0  # exchanges dropped from the history so far

    def reset(self) -> None:
        """Forget the turns (the system message stays)."""
        self.turns = []

    def prompt_messages(self, text: str) -> list[dict]:
        """The messages to answer `text` with: the system message, as many of the latest turns as
        fit, the new user turn. Older turns that no longer fit are dropped for good."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        new = [{"role": "user", "content": text}]
        room = self.context_length - self.max_new_tokens
        while self.turns and len(self.fmt.prompt(system + self.turns + new)) > room:
            self.turns = self.turns[2:]  # one user turn and its answer
            self.trimmed += 1
        return system + self.turns + new

    def add(self, text: str, answer: str) -> None:
        """Record an exchange."""
        self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


# ---- prompts longer than the context: keep the template, cut the middle of the text ------------------

def fit_texts(render: Callable[[list[str]], list[int]], texts: list[str], tokenizer, limit: int,
              what: str = "the prompt") -> tuple[list[str], int]:
    """`texts` (the user's parts of a prompt: an instruction, its input, a conversation's turns)
    shortened until ``render(texts)`` (the prompt's token ids: the template around them) is at
    most `limit` tokens: the longest text loses tokens from its middle, replaced by ``CUT_MARK``,
    then the next longest if needed. The template (a preamble, the role headers, the assistant
    header the answer follows) is always kept whole.

    Returns:
        The texts (as given when the prompt fits) and the tokens the prompt lost (0 when it fits).

    Raises:
        GPTFTError: even the template with every text cut out does not fit in `limit` tokens.
    """
    ids = render(texts)
    full = len(ids)
    if full <= limit:
        return list(texts), 0
    texts = list(texts)
    mark, slack = len(tokenizer.encode(CUT_MARK)), 0
    while len(ids) > limit:
        sizes = [(len(tokenizer.encode(t)) if t != CUT_MARK else 0, i) for i, t in enumerate(texts)]
        size, i = max(sizes)
        if size == 0:
            bare = len(render([""] * len(texts)))
            raise GPTFTError(f"{what}: its template alone is {bare} tokens and the model's context "
                             f"leaves {limit} for the whole prompt: no room for its text")
        text = valid_text(texts[i])[0]  # character offsets need UTF-8
        tokens, spans = tokenizer.encode_offsets(text)
        keep = max(len(tokens) - (len(ids) - limit) - mark - slack, 0)
        head, tail = (keep + 1) // 2, keep // 2
        texts[i] = ((text[: spans[head - 1][1]] if head else "") + CUT_MARK
                    + (text[spans[len(tokens) - tail][0]:] if tail else ""))
        before, ids = len(ids), render(texts)
        if len(ids) >= before:  # tokens merging across the cut: cut more next time
            slack = 2 * slack + 1
    return texts, full - len(ids)


def fit_messages(fmt: ChatFormat, messages: list[dict], limit: int,
                 what: str = "the prompt") -> tuple[list[dict], int]:
    """`messages` whose prompt (``fmt.prompt``) fits in `limit` tokens (``fit_texts``: the
    longest contents lose their middle); and the tokens cut. A one-turn prompt style reads the
    last user message only: only that one is cut."""
    if fmt.chat:
        which = list(range(len(messages)))
    else:
        which = [max(i for i, m in enumerate(messages) if m["role"] == "user")]

    def with_texts(texts: list[str]) -> list[dict]:
        out = [dict(m) for m in messages]
        for i, text in zip(which, texts):
            out[i]["content"] = text
        return out

    texts, cut = fit_texts(lambda t: fmt.prompt(with_texts(t)), [messages[i]["content"] for i in which],
                           fmt.tokenizer, limit, what)
    return (with_texts(texts) if cut else messages), cut


def fit_record(tokenizer, style: str, record: dict, limit: int,
               what: str = "the prompt") -> tuple[dict, int]:
    """An ``{"instruction", "input"?}`` record whose prompt in `style` (``gptft.prompts``) fits
    in `limit` tokens (``fit_texts``), and the tokens cut."""
    from gptft.prompts import format_prompt

    def render(texts: list[str]) -> list[int]:
        return tokenizer.encode(format_prompt({"instruction": texts[0], "input": texts[1]}, style))

    texts, cut = fit_texts(render, [record["instruction"], record.get("input") or ""], tokenizer,
                           limit, what)
    return ({**record, "instruction": texts[0], "input": texts[1]} if cut else record), cut


def valid_text(text: str) -> tuple[str, bool]:
    """`text` with lone surrogates (the undecodable bytes of a terminal, a pipe or argv, as Python
    reads them) as U+FFFD, which every tokenizer takes; and whether there were any."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), True


def cut_note(cuts: list[int], context_length: int) -> str | None:
    """The line saying how many prompts were too long and how many tokens they lost, or None."""
    cut = [n for n in cuts if n]
    if not cut:
        return None
    which = "the prompt was" if len(cuts) == 1 else f"{len(cut)} of {len(cuts)} prompts were"
    return (f"note: {which} longer than the model's context ({context_length} tokens): "
            f"{sum(cut):,} tokens cut from the middle of the text (marked {CUT_MARK.strip()}), "
            "the template kept")
