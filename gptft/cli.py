"""The ``gptft`` command's entry point: parse (``gptft.commands``), run, and turn a
``GPTFTError`` (or an OSError naming a file the user must fix: no permission, a full disk, a path
under a file) into one line on stderr and exit status 2."""

from __future__ import annotations

import sys

from gptft.commands import build_parser
from gptft.errors import GPTFTError
from gptft.io import WRITE_ERRNOS


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except GPTFTError as e:
        print(f"gptft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the user must fix (no permission, a full disk, a path under a file)
        if e.filename is None or e.errno not in WRITE_ERRNOS:
            raise
        print(f"gptft {args.command}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
