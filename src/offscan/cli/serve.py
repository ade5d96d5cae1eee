"""``offscan serve``: run the appliance (one per host)."""

from __future__ import annotations

import argparse
import os
import sys

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
    p.add_argument("-d", "--database", action="append", default=[], metavar="DB")
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
    p.add_argument("--hook-timeout", type=float, default=10.0, metavar="SECONDS")
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
    p.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default=os.environ.get("OFFSCAN_LOOP") or "auto",
        help="event loop: uvloop if installed (auto, the default), or the stdlib's "
        "(default: $OFFSCAN_LOOP or auto)",
    )
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..appliance import Appliance, ApplianceConfig, serve
    from ..eventloop import EventLoopError, loop_factory
    from ..eventloop import run as run_loop

    setup_logging(args.verbose)
    try:
        loop_factory(args.loop)  # refuse a loop that is not there before building anything
    except EventLoopError as exc:
        print(f"offscan: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not args.socket and not args.listen:
        print("offscan: serve needs --socket PATH and/or --listen HOST:PORT", file=sys.stderr)
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
        )
        appliance = Appliance.from_config(config)
    except (SignatureError, ValueError, OSError, RuntimeError) as exc:
        print(f"offscan: {exc}", file=sys.stderr)
        return EXIT_ERROR
    run_loop(serve(appliance, ready_file=args.ready_file), loop=args.loop)
    return EXIT_CLEAN
