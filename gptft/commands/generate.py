"""Generate a response from an instruction run: ``gptft generate RUN_DIR --instruction "..."``.

Greedy decoding by default; sampling with --temperature (and --top-k / --top-p).
"""

from __future__ import annotations

import argparse

from gptft.config import GenerateConfig
from gptft.errors import GPTFTError
from gptft.validation import build

DEFAULTS = GenerateConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="folder of a finished instruction (or preference) run")
    parser.add_argument("--instruction", required=True, help="the instruction")
    parser.add_argument("--input", default="", help="optional input to the instruction")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                        help="longest response in tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                        help="0: greedy (default); > 0: sample")
    parser.add_argument("--top-k", type=int, default=DEFAULTS.top_k,
                        help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=DEFAULTS.top_p,
                        help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help="sampling seed (default: %(default)s)")


def _flag(problem: str) -> str:
    name, _, rest = problem.partition(":")
    return f"--{name.replace('_', '-')}:{rest}"


def run(args: argparse.Namespace) -> int:
    import torch

    from gptft.generate import generate_texts
    from gptft.prompts import format_prompt
    from gptft.runs import load_gpt
    from gptft.tokenizer import Tokenizer

    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "top_k": args.top_k, "top_p": args.top_p, "batch_size": 1, "seed": args.seed}
    cfg, problems = build(GenerateConfig, options)
    if problems:  # named by their flags: "--top-p: must be in (0, 1] (got 2.0)"
        raise GPTFTError("; ".join(map(_flag, problems)))
    model, meta = load_gpt(args.run_dir)
    missing = [k for k in ("tokenizer", "prompt_style") if k not in meta]
    if missing:
        raise GPTFTError(f"{args.run_dir}: gptft.json lacks {', '.join(missing)}")
    prompt = format_prompt({"instruction": args.instruction, "input": args.input}, meta["prompt_style"])
    if torch.cuda.is_available():
        model.to("cuda")
    print(generate_texts(model, Tokenizer(meta["tokenizer"]), [prompt], cfg)[0])
    return 0
