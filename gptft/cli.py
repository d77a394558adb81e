"""The ``gptft`` command's entry point: parse (``gptft.commands``), run, and turn a
``GPTFTError`` (or an OSError naming a file the user must fix: no permission, a full disk, a path
under a file) into one line on stderr and exit status 2 (a run stopped by a signal after saving a
checkpoint: exit status 75, ``gptft.signals.EXIT_INTERRUPTED``; a second Ctrl-C: 130).

``run`` is what the installed command and ``launch/finetune.py`` call: ``main``, then
``exit_now``. Tests and other Python code call ``main``, which returns the exit status.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

from gptft.commands import build_parser
from gptft.errors import GPTFTError
from gptft.io import WRITE_ERRNOS
from gptft.signals import EXIT_INTERRUPTED, Interrupted

EXIT_BROKEN_PIPE = 141  # what a shell reports for a program ended by SIGPIPE (128 + 13)


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
    except BrokenPipeError:  # stdout closed early (`| head`): nothing more can go out, no traceback
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the final flush
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as e:  # a message, where the command kept something (gptft judge)
        print(f"gptft {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except GPTFTError as e:
        print(f"gptft {args.command}: error: {clipped(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the user must fix (no permission, a full disk, a path under a file)
        if e.filename is None or e.errno not in WRITE_ERRNOS:
            raise
        print(f"gptft {args.command}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


MAX_ERROR = 2000  # characters of an error line (a value quoted from a huge file stays readable)


def clipped(message: str) -> str:
    """`message` cut to ``MAX_ERROR`` characters, saying how much was left out."""
    if len(message) <= MAX_ERROR:
        return message
    return f"{message[:MAX_ERROR]}... ({len(message) - MAX_ERROR:,} more characters left out)"


def run(argv: list[str] | None = None) -> NoReturn:
    """``main(argv)``, then end the process with its status (``exit_now``)."""
    plug_closed_streams()
    exit_now(main(argv))


def plug_closed_streams() -> None:
    """Put ``/dev/null`` on a standard descriptor (0, 1, 2) the process was started without
    (``<&-``, ``>&-``), so that no file gptft opens takes its number and receives what a library
    or a child process writes there. Python has already set the matching ``sys.stdin`` /
    ``sys.stdout`` / ``sys.stderr`` to None, which the commands check."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:  # a lower descriptor was closed too and took it: move it in place
                os.dup2(opened, fd)
                os.close(opened)


def exit_now(code: int) -> NoReturn:
    """End the process with `code` once everything it wrote is out, without the interpreter's
    teardown of every loaded module.

    What a normal exit does that matters is done here, in the same order: non-daemon threads are
    joined, the ``atexit`` handlers run (W&B, logging, anything a user registered), stdout and
    stderr are flushed. What is skipped is freeing each module and object one by one, which does
    nothing for the run's files and takes 0.4-1 s with torch and its compiler stack loaded
    (``benchmarks/e2e.py``'s "exit" column; docs/benchmarks.md).
    """
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with it closed (>&-)
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can go out
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
