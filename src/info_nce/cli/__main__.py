"""`info-nce` / `python -m info_nce`: subcommands plot, demo and bench.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; the module is imported only when its subcommand runs, so
``info-nce --help`` needs none of the extras.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "plot": "plot the loss surface of the info-nce-pytorch README (needs matplotlib)",
    "bench": "time and measure the dense loss against the blockwise engine",
    "demo": "train an encoder with InfoNCE that recovers hidden factors (Zimmermann et al. 2021)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="info-nce", description="InfoNCE contrastive loss for PyTorch."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        _module(name).add_arguments(subparser)
    return parser


def _module(name: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"info_nce.cli.{name}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = _module(args.command).run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
