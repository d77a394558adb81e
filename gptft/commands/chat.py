"""Chat with an instruction (or preference) run: type an instruction, read its response.

  gptft chat RUN_DIR
  printf 'Name a color.\nWhat is 2 + 2?\n' | gptft chat RUN_DIR

Each line read is one instruction, answered on its own (the prompt format has no conversation
history). An empty line is skipped; /quit or end of input (Ctrl-D) ends the chat. Greedy decoding
by default; sampling with --temperature > 0.
"""

from __future__ import annotations

import argparse
import sys

from gptft.commands.generate import add_sampling_arguments, sampling_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="folder of a finished instruction (or preference) run")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from gptft.generate import respond
    from gptft.runs import load_lm_run

    cfg = sampling_config(args)
    model, tokenizer, style = load_lm_run(args.run_dir, args.device)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.run_dir} ({style} prompts); /quit or Ctrl-D to end", file=sys.stderr)
    while True:
        if interactive:
            print(">> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        if line.strip():
            response = respond(model, tokenizer, [{"instruction": line.strip()}], style, cfg)[0]
            print(response or "(empty response: the model ended its answer at once)", flush=True)
