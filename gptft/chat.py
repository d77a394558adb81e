"""Responses to conversations, prompted with the run's chat template, and the history of a chat
(``gptft chat``): the system message, the turns so far, trimmed from the oldest to fit the context.
"""

from __future__ import annotations

from gptft.config import GenerateConfig
from gptft.data.chat import ChatFormat


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
