"""Export a run as a Hugging Face ``transformers`` folder: ``gptft export RUN_DIR OUT_DIR``.

A language-model run becomes a ``GPT2LMHeadModel`` folder, a classification run a
``GPT2ForSequenceClassification`` folder (LoRA adapters already merged), each with GPT-2's
tokenizer files (``AutoTokenizer.from_pretrained(OUT_DIR)`` works offline); the folder is built
under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="folder of a finished run (any task)")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="folder to write (config.json, model.safetensors, tokenizer files, ...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it is an earlier export (it holds .gptft-export)")


def run(args: argparse.Namespace) -> int:
    from gptft.export import export_run

    out = export_run(args.run_dir, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0
