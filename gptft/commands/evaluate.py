"""Evaluate a fine-tuned classifier on a labelled file.

  gptft evaluate RUN_DIR data.csv
  gptft evaluate RUN_DIR mail.csv --text-column body --label-column category --output eval.json

Reads CSV, TSV, JSONL or the SMS format (label TAB text) as training does, with the run's label
names; prints accuracy, precision, recall, F1 and the confusion matrix (rows: true label,
columns: predicted); --output writes them as JSON.
"""

from __future__ import annotations

import argparse
import sys

from gptft.commands.options import add_labelling_arguments
from gptft.errors import GPTFTError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder of a classification fine-tune")
    parser.add_argument("file", metavar="FILE", help="labelled data: CSV, TSV, JSONL or SMS")
    parser.add_argument("--text-column", default="text", metavar="NAME",
                        help="column (or JSON key) holding the texts (default: %(default)s)")
    parser.add_argument("--label-column", default="label", metavar="NAME",
                        help="column (or JSON key) holding the labels (default: %(default)s)")
    parser.add_argument("--format", default="auto", choices=["auto", "csv", "tsv", "jsonl", "sms"],
                        help="file format; auto: by extension, as data.format (default: %(default)s)")
    add_labelling_arguments(parser, "also write the metrics to this JSON file")


def run(args: argparse.Namespace) -> int:
    from gptft.classifier import evaluate_classifier, evaluation_text
    from gptft.io import check_output, write_json

    if args.batch_size <= 0:
        raise GPTFTError(f"--batch-size: must be > 0 (got {args.batch_size})")
    if sys.stdout is None and not args.output:  # started with >&-: the metrics would go nowhere
        raise GPTFTError("the standard output is closed: nowhere to print the metrics (give --output FILE)")
    output = check_output(args.output, args.overwrite, (".json",)) if args.output else None
    result = evaluate_classifier(args.run_dir, args.file, text_column=args.text_column,
                                 label_column=args.label_column, fmt=args.format,
                                 batch_size=args.batch_size, device=args.device, settings={
                                     "text": "--text-column", "label": "--label-column",
                                     "format": "--format"})
    print(evaluation_text(result))
    if output is not None:
        write_json(output, result)
        print(f"wrote {output}")
    return 0

