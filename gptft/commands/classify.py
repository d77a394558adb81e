"""Label texts with a fine-tuned classifier.

  gptft classify RUN_DIR 'a text' 'another text'
  gptft classify RUN_DIR --file texts.csv --text-column body --output predictions.csv

Prints one line per text: the label, its probability and the text (cut to 60 characters). With
--output, writes every text with its label and the probability of each class (.json, .jsonl or
.csv) and prints a count per label instead.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from gptft.commands.options import add_labelling_arguments
from gptft.errors import GPTFTError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder of a classification fine-tune")
    parser.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label")
    parser.add_argument("--file", help="texts to label: one per line (blank lines skipped), or a "
                        "CSV/TSV/JSONL file with a text column")
    parser.add_argument("--text-column", default="text", metavar="NAME",
                        help="column (or JSON key) of --file holding the texts (default: %(default)s)")
    add_labelling_arguments(parser, "write the predictions with every class's probability to FILE "
                                    "(.json, .jsonl or .csv)")


def run(args: argparse.Namespace) -> int:
    texts = list(args.texts)
    if args.file:
        from gptft.data.classification import read_texts

        from_file, skipped = read_texts(args.file, args.text_column)
        texts += from_file
        if skipped:
            print(f"note: skipped {skipped} blank line(s) of {args.file}", file=sys.stderr)
    blank = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if blank:  # nothing to classify in them: no label rather than a guess
        print(f"note: text {', '.join(map(str, blank))} of {len(texts)} is empty: not labelled",
              file=sys.stderr)
        texts = [t for t in texts if t.strip()]
    if not texts:
        raise GPTFTError("no text to classify: give texts as arguments or --file")
    if args.batch_size <= 0:
        raise GPTFTError(f"--batch-size: must be > 0 (got {args.batch_size})")
    from gptft.io import check_output, write_records

    if args.output is None and sys.stdout is None:  # started with >&-: the labels would go nowhere
        raise GPTFTError("the standard output is closed: nowhere to print the labels (give --output FILE)")
    output = check_output(args.output, args.overwrite) if args.output else None
    from gptft.classifier import load_classifier

    preds = load_classifier(args.run_dir, args.device).predict(texts, args.batch_size)
    if output is None:
        for text, pred in zip(texts, preds):
            short = text if len(text) <= 60 else text[:57] + "..."
            short = short.encode("utf-8", "backslashreplace").decode()  # undecodable argv bytes
            sys.stdout.write(f"{pred.label}\t{pred.probability:.4f}\t{short}\n")
        return 0
    write_records(output, [{"text": t, "label": p.label, "probability": p.probability,
                            "probabilities": p.probabilities} for t, p in zip(texts, preds)])
    counts = Counter(p.label for p in preds)
    print(f"wrote {len(preds)} predictions to {output} ("
          + ", ".join(f"{label} {n}" for label, n in sorted(counts.items())) + ")")
    return 0
