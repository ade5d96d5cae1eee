"""``offscan shim``: watch VM directories and offload scans to the appliance.

The argparse definition of the command; :func:`config_from_args` turns the parsed arguments
into a :class:`~offscan.shim.cli.ShimConfig` and :mod:`offscan.shim.cli` runs the shim.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..shim.cli import ShimConfig
    from ..shim.spec import VMSpec


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("shim", help="watch VM directories and offload scans to the appliance")
    add_shim_arguments(p)
    p.set_defaults(run=run)


def add_shim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``offscan shim`` options to ``parser``."""
    _add_what_arguments(parser)
    _add_how_arguments(parser)


def _add_what_arguments(parser: argparse.ArgumentParser) -> None:
    """The appliance, the VMs and their lineage, the secret."""
    from ..shim.spec import VMSpec, parse_clone_of

    def vm_spec(text: str) -> VMSpec:
        try:
            return VMSpec.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def clone_pair(text: str) -> tuple[str, str]:
        try:
            return parse_clone_of(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument(
        "--appliance",
        required=True,
        action="append",
        metavar="SOCKET|HOST:PORT",
        help="the appliance: a unix socket path or HOST:PORT; repeat for an ordered failover "
        "list (the first healthy one is used)",
    )
    parser.add_argument(
        "--vm",
        action="append",
        required=True,
        type=vm_spec,
        metavar="NAME=DIR",
        dest="vms",
        help="a VM to protect and the directory holding its files (repeatable)",
    )
    parser.add_argument(
        "--clone-of",
        action="append",
        default=[],
        type=clone_pair,
        metavar="CLONE=BASE",
        help="declare VM CLONE a clone of VM BASE (repeatable)",
    )
    parser.add_argument(
        "--secret",
        default=os.environ.get("OFFSCAN_SECRET"),
        help="shared secret for a TCP appliance (default: $OFFSCAN_SECRET)",
    )


def _add_how_arguments(parser: argparse.ArgumentParser) -> None:
    """How the shim sends content, names itself, isolates and batches."""
    from ..shim.backlog import DEFAULT_MAX_BACKLOG, DEFAULT_QUIET

    parser.add_argument(
        "--content",
        choices=["auto", "path", "fd", "stream"],
        default="auto",
        help="how the appliance reads files (default: path on a unix socket, stream on TCP)",
    )
    parser.add_argument(
        "--shim-id",
        default=None,
        help="name of this shim (default shim-HOSTNAME; keep it stable: the "
        "appliance lets only the registering shim scan in a VM)",
    )
    parser.add_argument(
        "--isolation-hook",
        metavar="CMD",
        help="for fail-closed VMs: run CMD VM [unprotected] with JSON on stdin when "
        "the VM loses and regains protection",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=DEFAULT_QUIET,
        metavar="SECONDS",
        help=f"silence after a file's last event before it is sent (default {DEFAULT_QUIET})",
    )
    parser.add_argument(
        "--max-backlog",
        type=int,
        default=DEFAULT_MAX_BACKLOG,
        metavar="N",
        help=f"undelivered paths kept at most (default {DEFAULT_MAX_BACKLOG})",
    )
    _add_prevent_arguments(parser)


def _add_prevent_arguments(parser: argparse.ArgumentParser) -> None:
    """On-access prevention (fanotify permission events; docs/prevention.md)."""
    from ..shim.prevent import DEFAULT_PREVENTION_TIMEOUT

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 < value <= 600:
            raise argparse.ArgumentTypeError(f"expected seconds in (0, 600], got {text!r}")
        return value

    parser.add_argument(
        "--prevent",
        action="store_true",
        help="hold every open in the VMs until its verdict (deny infected files); without "
        "it, VMs whose policy says prevention = true are held",
    )
    parser.add_argument(
        "--prevent-timeout",
        type=seconds,
        default=DEFAULT_PREVENTION_TIMEOUT,
        metavar="SECONDS",
        help="how long a held open waits before the VM's fail mode answers, unless its "
        f"policy sets prevention_timeout (default {DEFAULT_PREVENTION_TIMEOUT})",
    )


def config_from_args(args: argparse.Namespace) -> ShimConfig:
    """The :class:`~offscan.shim.cli.ShimConfig` the parsed ``offscan shim`` arguments ask for."""
    from ..shim.cli import ShimConfig

    vms: list[VMSpec] = args.vms
    clone_of: list[tuple[str, str]] = args.clone_of
    return ShimConfig(
        appliance=args.appliance[0] if len(args.appliance) == 1 else tuple(args.appliance),
        vms=tuple(vms),
        clone_of=tuple(clone_of),
        secret=args.secret,
        content=args.content,
        shim_id=args.shim_id,
        isolation_hook=args.isolation_hook,
        quiet=args.quiet,
        max_backlog=args.max_backlog,
        prevent=args.prevent,
        prevent_timeout=args.prevent_timeout,
    )


async def run_shim_cli(args: argparse.Namespace) -> int:
    """``offscan shim``: run until SIGINT/SIGTERM; one line per infected file on stdout, a
    stats line on stderr at exit."""
    from ..shim.cli import run_shim

    return await run_shim(config_from_args(args))


def run(args: argparse.Namespace) -> int:
    import sys

    from ..eventloop import EventLoopError
    from ..eventloop import run as run_loop  # uvloop where installed ($OFFSCAN_LOOP)
    from ._common import EXIT_ERROR, setup_logging

    setup_logging(getattr(args, "verbose", False))
    try:
        return run_loop(run_shim_cli(args))
    except EventLoopError as exc:
        print(f"offscan: {exc}", file=sys.stderr)
        return EXIT_ERROR
