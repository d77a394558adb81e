"""Export a run as a Hugging Face GPT-2 folder: ``gptft export RUN_DIR OUT_DIR``.

Writes ``config.json`` and ``model.safetensors`` (LoRA adapters already merged) that
``transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR)`` loads; the folder is built under a
temporary name and renamed into place.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="folder of a finished instruction run")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (config.json, model.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is not empty")


def run(args: argparse.Namespace) -> int:
    from gptft.export import export_run

    out = export_run(args.run_dir, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'} "
          "(tokenizer: GPT-2's BPE, e.g. transformers' AutoTokenizer 'gpt2')")
    return 0
