"""The ``gptft`` command's entry point: parse (``gptft.commands``), run, and turn a
``GPTFTError`` (or an OSError naming a file the user must fix: no permission, a full disk, a path
under a file) into one line on stderr and exit status 2 (a run stopped by a signal after saving a
checkpoint: exit status 75, ``gptft.signals.EXIT_INTERRUPTED``; a second Ctrl-C: 130)."""

from __future__ import annotations

import os
import sys

from gptft.commands import build_parser
from gptft.errors import GPTFTError
from gptft.io import WRITE_ERRNOS
from gptft.signals import EXIT_INTERRUPTED, Interrupted


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a bare ``gptft``: what it can do, not a usage error
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    try:
        return args._run(args) or 0
    except Interrupted as e:  # stopped on a signal, with a checkpoint to resume from
        if os.environ.get("RANK", "0") == "0":  # one line, from the main process of a launch
            print(f"gptft {args.command}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(f"gptft {args.command}: interrupted", file=sys.stderr)
        return 130
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
