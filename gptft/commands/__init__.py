"""The ``gptft`` sub-commands: each module holds only its arguments and its call into the library.

Each defines ``add_arguments(parser)`` and ``run(args) -> int``; its docstring is its help, so
it is written for the command's users (plain text, no reST markup).
"""

from __future__ import annotations

import argparse

from gptft import __version__
from gptft.commands import chat, classify, data, evaluate, export, finetune, generate, judge, plan, serve

COMMANDS = {"finetune": finetune, "classify": classify, "evaluate": evaluate, "generate": generate,
            "chat": chat, "judge": judge, "export": export, "serve": serve, "data": data,
            "plan": plan}


def build_parser() -> argparse.ArgumentParser:
    """The ``gptft`` parser: ``--version`` and one sub-parser per command."""
    parser = argparse.ArgumentParser(
        prog="gptft", description="Fine-tune GPT-2 models as text classifiers, instruction "
        "followers and by preference (DPO), and use the runs.")
    parser.add_argument("--version", action="version", version=f"gptft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                help="gptft COMMAND --help shows its flags")
    for name, module in COMMANDS.items():
        text = plain(module.__doc__)
        summary = text.splitlines()[0].split(": gptft ")[0].rstrip(".")  # without its example
        p = sub.add_parser(name, help=summary, description=text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def plain(doc: str) -> str:
    """A docstring as help text: reST literals (double backquotes) as plain quotes-free text."""
    return doc.replace("``", "").strip()
