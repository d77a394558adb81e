"""Fine-tune a model from a YAML job: ``gptft finetune --config configs/spam.yaml key=value ...``.

``accelerate launch launch/finetune.py --config ...`` runs the same on any number of processes.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML job file (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.epochs=1 model.weights=random")


def run(args: argparse.Namespace) -> int:
    from gptft.signals import StopRequest

    early = StopRequest()  # a signal while torch loads: kept, and acted on once the job starts
    early.install()
    try:
        from gptft.config import load_job
        from gptft.run import finetune
        from gptft.timing import process_start

        finetune(load_job(args.config, args.overrides), started=process_start())
    finally:
        early.restore()
    return 0
