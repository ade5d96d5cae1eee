"""``offscan patterns``: signed pattern bundles: build, diff, keygen, sign, verify, serve.

The arguments are still defined by ``offscan.updates``; they move here (domain modules take typed
arguments, argparse lives in ``offscan.cli``).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..updates import add_patterns_arguments

    p = sub.add_parser("patterns", help="signed pattern bundles: build, diff, keygen, sign, verify, serve")
    add_patterns_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..updates import cmd_patterns

    return cmd_patterns(args)
