"""The parser of every subcommand, assembled from this package's modules, and ``main``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from . import agent, bench, demo, images, operator, patterns, scan, serve, shim

DESCRIPTION = "offscan: an agentless scan offload engine"
# Order of the subcommands in --help: the user's path from trying it to running it.
MODULES = (scan, images, serve, shim, operator, agent, bench, patterns, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offscan", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"offscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
