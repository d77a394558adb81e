r"""Chat with an instruction (or preference) run: type a message, read its answer.

  gptft chat RUN_DIR
  printf 'My name is Ada.\nWhat is my name?\n' | gptft chat RUN_DIR

Each line read is one user turn. A run trained with a chat template (data.prompt_style template,
chatml, llama3) keeps the conversation: every answer sees the turns before it, rendered with the
same template as in training; the oldest turns are dropped once the conversation no longer fits
the model's context. A run with a one-turn prompt style (alpaca, phi3) answers each line on its
own. /reset forgets the conversation, /system TEXT sets the system message (and starts afresh),
/quit or end of input (Ctrl-D, or no standard input at all) ends the chat; an empty line is
skipped. A message longer than the model's context keeps the template and loses the middle of
its text (marked [...], with a note). Greedy decoding by default; sampling with --temperature > 0;
--max-new-tokens defaults to the run's generate.max_new_tokens.
"""

from __future__ import annotations

import argparse
import sys

from gptft.commands.generate import add_sampling_arguments, require_stdout, sampling_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="folder of a finished instruction (or preference) run")
    parser.add_argument("--system", default=None, metavar="TEXT",
                        help="system message to start with (a chat template's runs)")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from gptft.chat import Conversation, cut_note, fit_messages, respond_to, valid_text
    from gptft.runs import load_chat_run

    require_stdout("the answers")
    cfg = sampling_config(args)
    if sys.stdin is None:  # started with the standard input closed (<&-): no message will come
        return 0
    model, fmt = load_chat_run(args.run_dir, args.device)
    chat = Conversation(fmt, model.config.context_length, cfg.max_new_tokens)
    chat.system = args.system if fmt.chat else None
    if args.system and not fmt.chat:
        note(f"note: --system ignored: the {fmt.style} prompt style has no system message")
    interactive = sys.stdin.isatty()
    if interactive:
        kind = (f"{fmt.style} chat template; /reset, /system TEXT" if fmt.chat
                else f"{fmt.style} prompts: each line on its own")
        note(f"chatting with {args.run_dir} ({kind}); /quit or Ctrl-D to end")
    while True:
        if interactive:
            print(">> ", end="", file=sys.stderr, flush=True)
        line, undecodable = valid_text(sys.stdin.readline())
        if undecodable:
            note("note: bytes of this line are not UTF-8: read as U+FFFD")
        text = line.strip()
        if not line or text == "/quit":
            return 0
        if not text:
            continue
        if text == "/reset" or text == "/system" or text.startswith("/system "):
            command(chat, text)
            continue
        trimmed = chat.trimmed
        messages = chat.prompt_messages(text)
        if chat.trimmed > trimmed:
            note(f"(the {chat.trimmed - trimmed} oldest exchange(s) no longer fit the context: dropped)")
        messages, cut = fit_messages(fmt, messages, model.config.context_length - 1, "the message")
        if cut:
            note(cut_note([cut], model.config.context_length))
        answer = respond_to(model, fmt, [messages], cfg)[0]
        if fmt.chat:
            chat.add(text, answer)
        print(answer or "(empty response: the model ended its answer at once)", flush=True)


def command(chat, text: str) -> None:
    """``/reset`` and ``/system TEXT``."""
    if text == "/reset":
        chat.reset()
        note("(conversation reset)")
        return
    if not chat.fmt.chat:
        note(f"note: the {chat.fmt.style} prompt style has no system message")
        return
    chat.system = text[len("/system"):].strip() or None
    chat.reset()
    note("(system message " + ("set" if chat.system else "cleared") + "; conversation reset)")


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
