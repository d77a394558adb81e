"""Prompt styles: how an instruction record becomes the text a model reads (no torch here).

A record is ``{"instruction": str, "input": str (optional), "output": str}``. ``format_prompt``
gives the prompt up to and including the response header (ready for generation);
``format_example`` the prompt and the response that follows it in training.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptft.errors import GPTFTError


@dataclass(frozen=True)
class PromptStyle:
    """How a record becomes text.

    Attributes:
        name: the style's name (``data.prompt_style``).
        template: the prompt's start; ``{instruction}`` (and ``{input}``) are filled in.
        input_template: appended only when the record's input is non-empty; ``{input}`` filled in.
        response_header: what precedes the response (the prompt ends with it).
    """

    name: str
    template: str
    input_template: str
    response_header: str


PROMPT_STYLES: dict[str, PromptStyle] = {
    style.name: style
    for style in (
        PromptStyle(
            name="alpaca",
            template="Below is an instruction that describes a task. Write a response that "
                     "appropriately completes the request.\n\n### Instruction:\n{instruction}",
            input_template="\n\n### Input:\n{input}",
            response_header="\n\n### Response:\n",
        ),
        PromptStyle(
            name="phi3",
            template="<|user|>\n{instruction}",
            input_template="\n{input}",
            response_header="\n<|assistant|>\n",
        ),
    )
}


def get_style(style: str | PromptStyle) -> PromptStyle:
    """The ``PromptStyle`` named `style` (or `style` itself)."""
    if isinstance(style, PromptStyle):
        return style
    if style not in PROMPT_STYLES:
        raise GPTFTError(f"unknown prompt style {style!r} (known: {', '.join(PROMPT_STYLES)})")
    return PROMPT_STYLES[style]


def format_prompt(record: dict, style: str | PromptStyle) -> str:
    """The prompt of `record`, ending with the response header: ready for generation.

    Args:
        record: ``{"instruction", "input"?, ...}``; an empty or missing input adds no input part.
        style: a name in ``PROMPT_STYLES`` or a ``PromptStyle``.
    """
    style = get_style(style)
    fields = {"instruction": record["instruction"], "input": record.get("input") or ""}
    text = style.template.format(**fields)
    if fields["input"]:
        text += style.input_template.format(**fields)
    return text + style.response_header


def format_example(record: dict, style: str | PromptStyle) -> tuple[str, str]:
    """``(prompt, response)``: ``prompt + response`` is the full training text of `record`."""
    return format_prompt(record, style), record["output"]
