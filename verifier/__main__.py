"""Command line of the verifier: ``python -m verifier {scan,...}``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` (which registers its arguments and
sets ``run`` as the parser default) and ``run(args) -> int`` (the exit status). A new subcommand is one more module
in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from verifier import check, compare, probe, scan

SUBCOMMANDS = (check, compare, probe, scan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m verifier", description="Parameter Golf submission verifier")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
