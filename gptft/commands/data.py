"""Look at a job's data as training will see it: gptft data inspect --config configs/chat-tiny.yaml.

  gptft data inspect --config configs/chat-tiny.yaml
  gptft data inspect --config configs/instruct-tiny.yaml data.path=mine.jsonl -n 5

Reads and tokenizes the data of an instruction or preference job exactly as training does (its
tokenizer, prompt style or chat template, data.train_on, truncation to max_length), then prints
N examples with the trained tokens marked (green on a terminal, [[...]] in a pipe), the
histogram of token lengths, how many examples truncation shortens, the share of tokens in the
loss, whether every trained answer ends in a target end-of-turn / EOS token, and duplicates
within and across splits, each warning naming the file and record (line). Exit status 2 on an
error (no target token at all, no answer ending in a target EOS, a bad record), else 0
(warnings included). Training runs the same checks before it starts.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True,
                                help="inspect: show what a job's model will learn from its data")
    inspect = sub.add_parser("inspect", help="show what a job's model will learn from its data",
                             description="Show what a job's model will learn from its data.")
    inspect.add_argument("--config", required=True, help="YAML job file of an instruction or "
                         "preference job (configs/*.yaml)")
    inspect.add_argument("overrides", nargs="*", metavar="key=value",
                         help="dotted overrides, e.g. data.path=chat.jsonl data.train_on=all")
    inspect.add_argument("-n", "--examples", type=int, default=3, metavar="N",
                         help="training examples to print (default: %(default)s)")
    inspect.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                         help="mark trained tokens in colour (auto: on a terminal; else [[...]])")


def run(args: argparse.Namespace) -> int:
    from gptft.config import load_job
    from gptft.data.inspect import check, context_length, prepare, report_text
    from gptft.errors import GPTFTError
    from gptft.runs import job_tokenizer

    if args.examples < 0:
        raise GPTFTError(f"-n: must be >= 0 (got {args.examples})")
    job = load_job(args.config, args.overrides)
    from gptft.tasks import get_task

    if get_task(job.task).produces != "lm":
        raise GPTFTError(f"{args.config}: a {job.task} job; gptft data inspect reads the data of "
                         "language-model jobs (instruction, preference)")
    context = context_length(job.model)
    if job.data.max_length and job.data.max_length > context:
        raise GPTFTError(f"data.max_length ({job.data.max_length}) exceeds the model's context "
                         f"length ({context})")
    data = prepare(job, job_tokenizer(job.model), job.data.max_length or context)
    report = check(data, samples=args.examples)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(report_text(report, color=color))
    if report.errors:
        print(f"gptft data inspect: {len(report.errors)} error(s): training would refuse this data",
              file=sys.stderr)
        return 2
    return 0
