"""``offscan agent``: agent mode: a full scanner for one VM (the baseline).

The argparse definition of the command; :func:`config_from_args` turns the parsed arguments
into an :class:`~offscan.agent.AgentConfig` and :func:`offscan.agent.run_agent` runs it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..agent import AgentConfig


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("agent", help="agent mode: a full scanner for one VM (the baseline)")
    add_agent_arguments(p)
    p.set_defaults(run=run)


def add_agent_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``offscan agent`` options to ``p``."""
    from ..shim.spec import VMSpec

    p.add_argument(
        "--vm",
        required=True,
        metavar="NAME=DIR",
        type=VMSpec.parse,
        help="the VM this agent protects",
    )
    p.add_argument(
        "-d",
        "--database",
        action="append",
        default=[],
        metavar="DB",
        help="signature database file or directory (repeatable)",
    )
    p.add_argument("--state", metavar="DIR", help="the agent's own state (default: a temp dir)")
    p.add_argument("--updates", metavar="URL", help="pattern update server")
    p.add_argument("--trust", metavar="PUB", help="public key that signs pattern bundles")
    p.add_argument(
        "--poll", type=float, default=60.0, metavar="SECONDS", help="update poll interval"
    )
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("--status-file", help="write the agent's counters here (JSON) on exit")


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The :class:`~offscan.agent.AgentConfig` the parsed ``offscan agent`` arguments ask for."""
    from ..agent import AgentConfig

    databases: list[str] = args.database
    return AgentConfig(
        vm=args.vm,
        databases=tuple(databases),
        state_dir=args.state,
        updates=args.updates,
        trust=args.trust,
        poll=args.poll,
        ready_file=args.ready_file,
        status_file=args.status_file,
    )


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..agent import run_agent
    from ._common import setup_logging

    setup_logging(False)  # agent mode has no --verbose: INFO, like the appliance it embeds
    return asyncio.run(run_agent(config_from_args(args)))
