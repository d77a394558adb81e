"""Flags that several commands share, written once."""

from __future__ import annotations

import argparse


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (a GPU if there is one), cpu, cuda or cuda:N (default: %(default)s)")


def add_labelling_arguments(parser: argparse.ArgumentParser, output_help: str) -> None:
    """``--output``/``--overwrite``/``--batch-size``/``--device`` of ``classify`` and ``evaluate``."""
    parser.add_argument("--output", metavar="FILE", help=output_help)
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="texts labelled at once (default: %(default)s)")
    add_device_argument(parser)
