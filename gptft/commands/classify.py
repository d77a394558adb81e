"""Label texts with a fine-tuned classifier: ``gptft classify RUN_DIR "text" ... [--file FILE]``.

Prints one line per text: the label, its probability and the text (cut to 60 characters).
"""

from __future__ import annotations

import argparse
import sys

from gptft.errors import GPTFTError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run folder of a classification fine-tune")
    parser.add_argument("texts", nargs="*", help="texts to label")
    parser.add_argument("--file", help="texts to label: one per line, or a CSV/TSV/JSONL with a "
                        "'text' column")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="texts labelled at once (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    texts = list(args.texts)
    if args.file:
        from gptft.data.classification import read_texts_file

        texts += read_texts_file(args.file)
    blank = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if blank:  # nothing to classify in them: no label rather than a guess
        print(f"note: text {', '.join(map(str, blank))} of {len(texts)} is empty: not labelled",
              file=sys.stderr)
        texts = [t for t in texts if t.strip()]
    if not texts:
        raise GPTFTError("no text to classify: give texts as arguments or --file")
    if args.batch_size <= 0:
        raise GPTFTError(f"--batch-size: must be > 0 (got {args.batch_size})")
    from gptft.classifier import load_classifier

    for text, pred in zip(texts, load_classifier(args.run_dir).predict(texts, args.batch_size)):
        short = text if len(text) <= 60 else text[:57] + "..."
        sys.stdout.write(f"{pred.label}\t{pred.probability:.4f}\t{short}\n")
    return 0
