"""The ``gptft`` command's entry point: parse (``gptft.commands``), run, and turn a
``GPTFTError`` into one line on stderr and exit status 2."""

from __future__ import annotations

import sys

from gptft.commands import build_parser
from gptft.errors import GPTFTError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a bare ``gptft``: what it can do, not a usage error
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    try:
        return args._run(args) or 0
    except GPTFTError as e:
        print(f"gptft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
