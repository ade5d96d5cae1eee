"""``offscan shim``: watch VM directories and offload scans to the appliance.

The arguments are still defined by ``offscan.shim``; they move here (domain modules take typed
arguments, argparse lives in ``offscan.cli``).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..shim import add_shim_arguments

    p = sub.add_parser("shim", help="watch VM directories and offload scans to the appliance")
    add_shim_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..shim import run_shim_cli
    from ._common import setup_logging

    setup_logging(getattr(args, "verbose", False))
    return asyncio.run(run_shim_cli(args))
