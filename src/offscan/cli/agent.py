"""``offscan agent``: agent mode: a full scanner for one VM (the baseline).

The arguments are still defined by ``offscan.agent``; they move here (domain modules take typed
arguments, argparse lives in ``offscan.cli``).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..agent import add_agent_arguments

    p = sub.add_parser("agent", help="agent mode: a full scanner for one VM (the baseline)")
    add_agent_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..agent import run_agent_cli

    return asyncio.run(run_agent_cli(args))
