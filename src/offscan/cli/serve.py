"""``offscan serve``: run the appliance (one per host)."""

from __future__ import annotations

import argparse
import os
import sys

from ..appliance.config import DEFAULT_VM_AREAS
from ..appliance.limits import DEFAULT_CONNECTIONS_PER_CLIENT, DEFAULT_STREAMS_PER_CLIENT
from ..signatures import SignatureError
from ._common import EXIT_CLEAN, EXIT_ERROR, parse_host_port, setup_logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the appliance (one per host)")
    p.add_argument("--socket", metavar="PATH", help="unix socket for local shims")
    p.add_argument(
        "--listen", metavar="HOST:PORT", help="TCP listener for remote shims (needs a secret)"
    )
    p.add_argument(
        "--secret",
        default=os.environ.get("OFFSCAN_SECRET"),
        help="shared secret for TCP clients (default: $OFFSCAN_SECRET)",
    )
    p.add_argument(
        "-d",
        "--database",
        action="append",
        default=[],
        metavar="DB",
        help="signature database file or directory (repeatable; default: the bundled EICAR)",
    )
    p.add_argument(
        "--state", metavar="DIR", help="state directory: inventory, verdict cache, event log"
    )
    p.add_argument("--concurrency", type=int, default=4, help="concurrent reads+scans (default 4)")
    p.add_argument(
        "--socket-mode",
        type=lambda v: int(v, 8),
        default=0o600,
        metavar="OCTAL",
        help="unix socket permissions (default 600)",
    )
    p.add_argument(
        "--policies", metavar="TOML", help="policy file ([default] and [vm.NAME] tables)"
    )
    p.add_argument(
        "--isolation-hook",
        metavar="CMD",
        help="run as CMD VM TAG... with JSON on stdin when a VM's tags change",
    )
    p.add_argument(
        "--hook-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long the isolation hook may run (default 10)",
    )
    p.add_argument(
        "--quarantine", metavar="DIR", help="quarantine vault (default: STATE/quarantine)"
    )
    p.add_argument("--metrics", metavar="HOST:PORT", help="Prometheus metrics endpoint")
    p.add_argument(
        "--updates", metavar="URL", help="pattern update server (offscan patterns serve)"
    )
    p.add_argument(
        "--trust", metavar="PUB", help="Ed25519 public key that must sign pattern bundles"
    )
    p.add_argument(
        "--poll", type=float, default=60.0, metavar="SECONDS", help="update poll interval"
    )
    _add_hardening_arguments(p)
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.set_defaults(run=run)


def _add_hardening_arguments(p: argparse.ArgumentParser) -> None:
    """Issue 14: the operator's socket, where VM roots may be, per-client limits."""
    p.add_argument(
        "--admin-socket",
        metavar="PATH",
        help="unix socket (mode 600) for operator commands: vm, policy, quarantine, reload, "
        "status (default: SOCKET.admin; '' for none)",
    )
    p.add_argument(
        "--vm-area",
        action="append",
        metavar="DIR",
        help="a directory VM roots may lie under (repeatable; default: "
        + ", ".join(DEFAULT_VM_AREAS)
        + ")",
    )
    p.add_argument(
        "--connections-per-client",
        type=int,
        default=DEFAULT_CONNECTIONS_PER_CLIENT,
        metavar="N",
        help=f"open connections one uid or address may hold (default {DEFAULT_CONNECTIONS_PER_CLIENT})",
    )
    p.add_argument(
        "--streams-per-client",
        type=int,
        default=DEFAULT_STREAMS_PER_CLIENT,
        metavar="N",
        help=f"stream scans one client may have open (default {DEFAULT_STREAMS_PER_CLIENT})",
    )


def run(args: argparse.Namespace) -> int:
    import asyncio

    from ..appliance import Appliance, ApplianceConfig, serve

    setup_logging(args.verbose)
    if not args.socket and not args.listen:
        print("offscan: serve needs --socket PATH and/or --listen HOST:PORT", file=sys.stderr)
        return EXIT_ERROR
    for option, path in (("--socket", args.socket), ("--admin-socket", args.admin_socket)):
        where = os.path.dirname(os.path.abspath(path)) if path else None
        if where and not os.path.isdir(where):
            print(f"offscan: {option} {path}: no directory {where}", file=sys.stderr)
            return EXIT_ERROR
    try:
        config = ApplianceConfig(
            socket_path=args.socket,
            listen=parse_host_port(args.listen) if args.listen else None,
            secret=args.secret,
            databases=tuple(args.database),
            state_dir=args.state,
            concurrency=args.concurrency,
            socket_mode=args.socket_mode,
            policy_file=args.policies,
            isolation_hook=args.isolation_hook,
            hook_timeout=args.hook_timeout,
            quarantine_dir=args.quarantine,
            metrics=parse_host_port(args.metrics, option="--metrics") if args.metrics else None,
            updates=args.updates,
            trust=args.trust,
            poll=args.poll,
            admin_socket=args.admin_socket,
            vm_areas=tuple(args.vm_area or DEFAULT_VM_AREAS),
            connections_per_client=args.connections_per_client,
            streams_per_client=args.streams_per_client,
        )
        appliance = Appliance.from_config(config)
    except (SignatureError, ValueError, OSError, RuntimeError) as exc:
        print(f"offscan: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        asyncio.run(serve(appliance, ready_file=args.ready_file))
    except OSError as exc:  # a listener that cannot be opened (address in use, permissions)
        print(f"offscan: serve: {exc.strerror or exc}{_where(exc)}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_CLEAN


def _where(exc: OSError) -> str:
    return f": {exc.filename}" if exc.filename else ""
