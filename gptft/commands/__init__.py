"""The ``gptft`` sub-commands: each module holds only its arguments and its call into the library.

Each defines ``add_arguments(parser)`` and ``run(args) -> int``; its docstring is its help.
"""

from __future__ import annotations

import argparse

from gptft import __version__
from gptft.commands import classify, export, finetune, generate, judge

COMMANDS = {"finetune": finetune, "classify": classify, "generate": generate, "judge": judge,
            "export": export}


def build_parser() -> argparse.ArgumentParser:
    """The ``gptft`` parser: ``--version`` and one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="gptft", description="Fine-tune GPT-2 models as text "
                                     "classifiers and instruction followers.")
    parser.add_argument("--version", action="version", version=f"gptft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser
