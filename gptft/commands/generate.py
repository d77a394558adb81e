"""Generate responses with an instruction (or preference) run.

  gptft generate RUN_DIR --instruction 'Name a color.'
  gptft generate RUN_DIR --file prompts.jsonl --output responses.jsonl

--file reads JSON Lines (or a JSON array) of {"instruction", "input"} records (or, for a run
trained with a chat template, {"messages": [...]} conversations to continue) and writes each
record with its "model_response" added, as JSON Lines, to --output or the standard output. The
prompt is the run's: its prompt style or chat template, as in training. A prompt longer than the
model's context keeps its template and loses the middle of its text (marked [...]; a note says how
many tokens). --max-new-tokens defaults to the run's generate.max_new_tokens (its config.yaml).
Greedy decoding by default; sampling with --temperature > 0 (and --top-k / --top-p, which only
apply when sampling).
"""

from __future__ import annotations

import argparse
import json
import sys

from gptft.commands.options import add_device_argument
from gptft.config import GenerateConfig
from gptft.errors import GPTFTError
from gptft.validation import build

DEFAULTS = GenerateConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="folder of a finished instruction (or preference) run")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--instruction", help="the instruction")
    prompts.add_argument("--file", metavar="PROMPTS.jsonl",
                         help="JSON Lines (or a JSON array) of {instruction, input} records")
    parser.add_argument("--input", default="", help="optional input to --instruction")
    parser.add_argument("--output", metavar="FILE.jsonl",
                        help="with --file: write the records with their responses here (default: "
                        "the standard output)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    add_sampling_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                        help="prompts generated at once with --file (default: %(default)s)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding flags ``generate`` and ``chat`` share."""
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest response in tokens (default: the run's generate.max_new_tokens, "
                        f"else {DEFAULTS.max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                        help="0: greedy (default); > 0: sample at this temperature")
    parser.add_argument("--top-k", type=int, default=DEFAULTS.top_k,
                        help="when sampling: among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, default=DEFAULTS.top_p,
                        help="when sampling: nucleus threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help="sampling seed (default: %(default)s)")
    add_device_argument(parser)


def _flag(problem: str) -> str:
    name, _, rest = problem.partition(":")
    return f"--{name.replace('_', '-')}:{rest}"


def sampling_config(args: argparse.Namespace, batch_size: int = 1) -> GenerateConfig:
    """The checked ``GenerateConfig`` of the flags; a note when --top-k / --top-p cannot apply.
    --max-new-tokens not given: the run's ``generate.max_new_tokens`` (its ``config.yaml``)."""
    from gptft.runs import saved_generate_config

    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = saved_generate_config(args.run_dir).max_new_tokens
    options = {"max_new_tokens": max_new_tokens, "temperature": args.temperature,
               "top_k": args.top_k, "top_p": args.top_p, "batch_size": batch_size, "seed": args.seed}
    cfg, problems = build(GenerateConfig, options)
    if problems:  # named by their flags: "--top-p: must be in (0, 1] (got 2.0)"
        raise GPTFTError("; ".join(map(_flag, problems)))
    unused = [f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p)) if v is not None]
    if unused and args.temperature == 0:
        print(f"note: {' and '.join(unused)} {'apply' if len(unused) > 1 else 'applies'} only when "
              "sampling (--temperature > 0); decoding greedily", file=sys.stderr)
    return cfg


def require_stdout(what: str) -> None:
    """Refuse to start when the standard output is closed (``>&-``): `what` would go nowhere."""
    if sys.stdout is None:
        raise GPTFTError(f"the standard output is closed: nowhere to print {what}")


def run(args: argparse.Namespace) -> int:
    from gptft.chat import cut_note, fit_messages, fit_record, valid_text
    from gptft.generate import read_prompt_records, respond
    from gptft.io import check_output, write_records
    from gptft.runs import load_chat_run

    if args.output is None:
        require_stdout("the responses (give --file with --output FILE)" if args.file else "the response")
    if args.file is None and args.output:
        raise GPTFTError("--output: only with --file (one --instruction prints its response)")
    if args.file is not None and args.input:
        raise GPTFTError("--input: only with --instruction (--file records carry their own input)")
    cfg = sampling_config(args, args.batch_size)
    output = check_output(args.output, args.overwrite, (".jsonl",)) if args.output else None
    if args.file:
        records = read_prompt_records(args.file)
    else:  # undecodable bytes of argv (lone surrogates) as U+FFFD, which every tokenizer takes
        (instruction, bad), (text, bad_input) = valid_text(args.instruction), valid_text(args.input)
        flags = [flag for flag, found in (("--instruction", bad), ("--input", bad_input)) if found]
        if flags:
            print(f"note: bytes of {' and '.join(flags)} are not UTF-8: read as U+FFFD", file=sys.stderr)
        records = [{"instruction": instruction, "input": text}]
    model, fmt = load_chat_run(args.run_dir, args.device)
    limit = model.config.context_length - 1  # what generation reads of a prompt
    where = [f"{args.file}: record {i + 1}" if args.file else "--instruction" for i in range(len(records))]
    progress = args.file is not None
    if fmt.chat:  # the run's chat template: a record's messages, or its instruction as one user turn
        from gptft.chat import respond_to
        from gptft.data.conversations import instruction_messages

        conversations = [r["messages"] if "messages" in r else instruction_messages({**r, "output": ""})[:1]
                         for r in records]
        fitted = [fit_messages(fmt, c, limit, w) for c, w in zip(conversations, where)]
    else:
        fitted = [fit_record(fmt.tokenizer, fmt.style, r, limit, w) for r, w in zip(records, where)]
    note = cut_note([cut for _, cut in fitted], model.config.context_length)
    if note:
        print(note, file=sys.stderr)
    prompts = [prompt for prompt, _ in fitted]
    responses = (respond_to(model, fmt, prompts, cfg, progress=progress) if fmt.chat
                 else respond(model, fmt.tokenizer, prompts, fmt.style, cfg, progress=progress))
    if args.file is None:
        print(responses[0])
        return 0
    results = [{**r, "model_response": text} for r, text in zip(records, responses)]
    if output is None:
        sys.stdout.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    else:
        write_records(output, results)
        print(f"wrote {len(results)} responses to {output}", file=sys.stderr)
    return 0
