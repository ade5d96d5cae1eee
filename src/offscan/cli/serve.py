"""``offscan serve``: run the appliance (one per host)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

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
    _add_clamd_arguments(p)
    _add_fleet_arguments(p)
    _add_hardening_arguments(p)
    p.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default=os.environ.get("OFFSCAN_LOOP") or "auto",
        help="event loop: uvloop if installed (auto, the default), or the stdlib's "
        "(default: $OFFSCAN_LOOP or auto)",
    )
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.set_defaults(run=run)


def _add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    """Issue 13: the verdict tier shared by several appliances through Redis."""
    fleet = p.add_argument_group("fleet: a verdict tier shared through Redis (docs/fleet.md)")
    fleet.add_argument(
        "--cache-redis",
        metavar="URL",
        help="redis://HOST:PORT/DB, rediss://..., unix://PATH or redis+cluster://HOST:PORT",
    )
    fleet.add_argument(
        "--cache-key", metavar="FILE", help="fleet key file: shared entries are HMAC-signed"
    )
    fleet.add_argument(
        "--cache-redis-timeout",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="a Redis round trip slower than this degrades to the local cache (default 0.25)",
    )
    fleet.add_argument(
        "--cache-redis-ttl",
        type=float,
        default=7 * 24 * 3600.0,
        metavar="SECONDS",
        help="how long a shared entry lives (default 7 days)",
    )
    fleet.add_argument(
        "--cache-lock-ttl",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="single-flight lock lifetime when its holder stops refreshing it (default 3)",
    )


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


def _add_clamd_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("clamd-compatible front (clamdscan and clamd clients)")
    g.add_argument("--clamd-socket", metavar="PATH", help="answer clamd's protocol on this socket")
    g.add_argument(
        "--clamd-listen", metavar="HOST:PORT", help="and on TCP (no FILDES, RELOAD or SHUTDOWN)"
    )
    g.add_argument(
        "--clamd-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory SCAN/CONTSCAN/MULTISCAN may read (repeatable; none: path scans refused)",
    )
    g.add_argument(
        "--clamd-socket-mode",
        type=lambda v: int(v, 8),
        default=0o660,
        metavar="OCTAL",
        help="clamd socket permissions (default 660)",
    )
    g.add_argument(
        "--clamd-stream-max",
        metavar="SIZE",
        help="StreamMaxLength: longest INSTREAM accepted (default 100m)",
    )
    g.add_argument(
        "--clamd-max-connections",
        type=int,
        metavar="N",
        help="clamd clients served at once; more wait (default 32)",
    )


def _clamd_options(args: argparse.Namespace) -> dict[str, Any]:
    from ..engine import parse_size

    stream_max = None
    if args.clamd_stream_max:
        try:
            stream_max = parse_size(args.clamd_stream_max)
        except ValueError:
            print(
                f"offscan: --clamd-stream-max wants a size (64k, 25m), got {args.clamd_stream_max!r}",
                file=sys.stderr,
            )
            raise SystemExit(EXIT_ERROR) from None
    listen = None
    if args.clamd_listen:
        listen = parse_host_port(args.clamd_listen, option="--clamd-listen")
        if not 0 <= listen[1] <= 65535:
            print(f"offscan: --clamd-listen: port {listen[1]} is out of range", file=sys.stderr)
            raise SystemExit(EXIT_ERROR)
    return {
        "clamd_socket": args.clamd_socket,
        "clamd_listen": listen,
        "clamd_roots": tuple(args.clamd_root),
        "clamd_socket_mode": args.clamd_socket_mode,
        "clamd_stream_max_length": stream_max,
        "clamd_max_connections": args.clamd_max_connections,
    }


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
    if not args.socket and not args.listen and not args.clamd_socket and not args.clamd_listen:
        print(
            "offscan: serve needs --socket PATH, --listen HOST:PORT or a --clamd-* listener",
            file=sys.stderr,
        )
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
            **_clamd_options(args),
            cache_redis=args.cache_redis,
            cache_key=args.cache_key,
            cache_redis_timeout=args.cache_redis_timeout,
            cache_redis_ttl=args.cache_redis_ttl,
            cache_lock_ttl=args.cache_lock_ttl,
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
        run_loop(serve(appliance, ready_file=args.ready_file), loop=args.loop)
    except OSError as exc:  # a listener that cannot be opened (missing directory, in use, ...)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"offscan: cannot listen: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_CLEAN
