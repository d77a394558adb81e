"""Score model responses with a judge LLM: ``gptft judge RESPONSES.json --model llama3``.

Asks the judge (Ollama or an OpenAI-compatible server) to score each record's response from 0 to
100 against the correct output, writes the scores back (key ``score``) and prints their average.
Start a local judge first: ``ollama serve`` and ``ollama pull llama3``.
"""

from __future__ import annotations

import argparse
import sys

from gptft.judge import APIS, DEFAULTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("responses", metavar="RESPONSES.json",
                        help="JSON array of records with instruction, input, output and a response")
    parser.add_argument("--url", default=DEFAULTS.url, help="judge server (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULTS.model, help="judge model (default: %(default)s)")
    parser.add_argument("--api", choices=APIS, default=None,
                        help=f"server API (default: openai for a --url ending in /v1, such as gptft "
                        f"serve's, else {DEFAULTS.api})")
    parser.add_argument("--api-key-env", default=DEFAULTS.api_key_env, metavar="VAR",
                        help="environment variable holding the openai API key (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=DEFAULTS.timeout,
                        help="seconds one request may take in all (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=DEFAULTS.retries,
                        help="retries per request (default: %(default)s)")
    parser.add_argument("--retry-delay", type=float, default=DEFAULTS.retry_delay,
                        help="first backoff delay in seconds, doubling per retry (default: %(default)s)")
    parser.add_argument("--key", default=DEFAULTS.key, help="record key of the response to score")
    parser.add_argument("--output", default=None,
                        help="write the scored records to this new .json file (default: in place)")
    parser.add_argument("--overwrite", action="store_true", help="let --output replace an existing file")


def run(args: argparse.Namespace) -> int:
    from gptft.judge import judge_file, summary

    api = args.api or ("openai" if args.url.rstrip("/").endswith("/v1") else DEFAULTS.api)
    scores = judge_file(args.responses, args.url, args.model, api, api_key_env=args.api_key_env,
                        timeout=args.timeout, retries=args.retries, retry_delay=args.retry_delay,
                        key=args.key, output=args.output,
                        overwrite=args.overwrite)
    print(summary(scores))
    missing = scores.count(None)
    if missing:  # scored in part: the file holds what was scored; say so and fail
        print(f"gptft judge: {missing} of {len(scores)} records not scored (problems above; a "
              "record keeps the score of an earlier run, if any); run again to retry them",
              file=sys.stderr)
        return 1
    return 0
