"""The ``gptft`` command: one sub-command per module, each with its own arguments."""

from __future__ import annotations

import argparse
import importlib
import sys

from gptft.errors import GPTFTError

# sub-command -> module defining `add_arguments(parser)` and `run(args) -> int`
COMMANDS = {
    "finetune": "gptft.finetune",
    "classify": "gptft.classifier",
    "generate": "gptft.generate",
    "judge": "gptft.judge",
    "export": "gptft.export",
}


def build_parser() -> argparse.ArgumentParser:
    from gptft import __version__

    parser = argparse.ArgumentParser(prog="gptft", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gptft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except GPTFTError as e:
        print(f"gptft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
