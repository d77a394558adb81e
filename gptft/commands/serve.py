"""Serve a finished run behind an OpenAI-compatible HTTP API: gptft serve RUN_DIR --port 8000

Language-model runs (instruction, preference) answer POST /v1/chat/completions and
/v1/completions (streaming with "stream": true); classification runs answer POST /v1/classify.
Both answer GET /v1/models and GET /health. Concurrent requests are batched on the model
(continuous batching, up to --max-batch at once); more than --max-queue waiting get HTTP 429.
The API key comes from --api-key or the environment variable GPTFT_API_KEY (prefer the variable:
a command line is visible to other users of the machine); without one, anyone who can reach
--host may use the server. SIGTERM or Ctrl-C stops taking requests, lets those in flight finish
(at most --timeout seconds) and exits.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from gptft.commands.options import add_device_argument
from gptft.errors import GPTFTError

KEY_ENV = "GPTFT_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gptft.serve.options import ServeOptions

    d = ServeOptions(model_name="-")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="folder of a finished run (language "
                        "model or classifier)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' (default: ${KEY_ENV} if set)")
    parser.add_argument("--model-name", default=None,
                        help="the model's name in the API (default: the run folder's name)")
    parser.add_argument("--max-batch", type=int, default=d.max_batch,
                        help="requests decoded together (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help="the largest max_tokens a request may ask for (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="requests waiting for a place in the batch before HTTP 429 "
                        "(default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=d.timeout,
                        help="seconds a request may take, and the bound on finishing in-flight "
                        "requests at shutdown (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help="largest request body in bytes (default: %(default)s)")
    parser.add_argument("--log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default: %(default)s)")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from gptft.serve.app import create_app, load_served
    from gptft.serve.options import ServeOptions

    api_key = args.api_key if args.api_key is not None else os.environ.get(KEY_ENV) or None
    name = args.model_name if args.model_name is not None else Path(args.run_dir).resolve().name
    options = ServeOptions(model_name=name, api_key=api_key, max_batch=args.max_batch,
                           max_new_tokens=args.max_new_tokens, max_queue=args.max_queue,
                           timeout=args.timeout, max_body_bytes=args.max_body_bytes)
    problems = options.problems()
    if not 0 <= args.port <= 65535:
        problems.append(f"port: must be in 0..65535 (got {args.port})")
    if problems:  # named by their flags: "--max-batch: must be > 0 (got 0)"
        raise GPTFTError("; ".join(_flag(p) for p in problems))
    served = load_served(args.run_dir, args.device, options.max_batch, options.max_queue)
    app = create_app(served, options)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"gptft serve: warning: no API key and --host {args.host}: anyone who reaches this "
              f"address can use the model (set {KEY_ENV})", file=sys.stderr)
    print(f"gptft serve: {name} ({served.meta.get('task')} run) at http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=max(1, int(args.timeout)))
    # uvicorn re-raises the signal that stopped it once it has shut down; with this handler in
    # place a SIGTERM then ends in a normal return (exit status 0), not a kill by the signal.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _flag(problem: str) -> str:
    name, _, rest = problem.partition(":")
    return f"--{name.replace('_', '-')}:{rest}"
