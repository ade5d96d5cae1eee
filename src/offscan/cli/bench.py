"""``offscan bench``: the lab: agent vs agentless, clone storm.

The arguments are still defined by ``offscan.lab``; they move here (domain modules take typed
arguments, argparse lives in ``offscan.cli``).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..lab import add_bench_arguments

    p = sub.add_parser("bench", help="the lab: agent vs agentless, clone storm")
    add_bench_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..lab import cmd_bench

    return cmd_bench(args)
