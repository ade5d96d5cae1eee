"""What several subcommands share: exit codes, the ``--appliance`` argument, operator calls."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR = 0, 1, 2  # clamscan's: 1 means "virus found"
DEFAULT_SOCKET = "/run/offscan/appliance.sock"

Runner = Callable[[argparse.Namespace], int]


def add_appliance_arguments(q: argparse.ArgumentParser) -> None:
    """``--appliance``, ``--secret`` and ``--json`` for the commands that talk to an appliance."""
    q.add_argument(
        "--appliance",
        "--socket",
        dest="appliance",
        metavar="SOCKET|HOST:PORT",
        default=os.environ.get("OFFSCAN_APPLIANCE", DEFAULT_SOCKET),
        help=f"the appliance (default: $OFFSCAN_APPLIANCE or {DEFAULT_SOCKET})",
    )
    q.add_argument(
        "--admin-socket",
        metavar="PATH",
        help="the appliance's admin socket (default: the --appliance socket's path + '.admin')",
    )
    q.add_argument(
        "--secret",
        default=os.environ.get("OFFSCAN_SECRET"),
        help="shared secret for a TCP appliance (default: $OFFSCAN_SECRET)",
    )
    q.add_argument("--json", action="store_true", help="print the appliance's reply as JSON")


def socket_address(text: str) -> str:
    """An ``--appliance`` value as :func:`offscan.protocol.connect` takes it: a bare name
    with no ``/`` and no ``:`` (``app.sock``) is a socket in the current directory."""
    if ":" not in text and "/" not in text:
        return os.path.abspath(text)
    return text


def admin_address(args: argparse.Namespace) -> str:
    """Where operator commands go: ``--admin-socket``, else the admin socket next to the
    ``--appliance`` socket. A TCP appliance has none (a one-line error, exit 2)."""
    given = getattr(args, "admin_socket", None)
    if given:
        return socket_address(given)
    from ..protocol import admin_socket_for, parse_address

    try:
        kind, _ = parse_address(socket_address(args.appliance))
    except ValueError as exc:
        print(f"offscan: --appliance: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
    if kind != "unix":
        print(
            f"offscan: operator commands go to the appliance's admin socket (a unix socket "
            f"on its host), not to TCP {args.appliance}: give --admin-socket PATH",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_ERROR)
    return admin_socket_for(socket_address(args.appliance))


def parse_host_port(text: str, *, option: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` → ``(host, port)``; a bad value ends the command with a one-line error."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        print(f"offscan: {option} wants HOST:PORT (port 0..65535), got {text!r}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)
    return host, int(port)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def control(args: argparse.Namespace, op: str, **kw: object) -> tuple[int, dict[str, Any]]:
    """Run operator command ``op`` on the appliance; print the reply with ``--json``."""
    import asyncio

    from ..protocol import ApplianceClient, ProtocolError, RequestError

    address = admin_address(args)

    async def call() -> dict[str, Any]:
        client = ApplianceClient(address, shim_id=f"operator-{os.getpid()}", secret=args.secret)
        await client.connect()
        try:
            return await client.control(op, timeout=600, **kw)
        finally:
            await client.close()

    try:
        reply = asyncio.run(call())
    except RequestError as exc:
        print(f"offscan: {exc}", file=sys.stderr)
        return EXIT_ERROR, {}
    except (OSError, ConnectionError, TimeoutError, ProtocolError, ValueError) as exc:
        print(f"offscan: cannot reach the appliance at {address}: {exc}", file=sys.stderr)
        return EXIT_ERROR, {}
    reply = {k: v for k, v in reply.items() if k not in ("t", "id")}
    if args.json:
        print(json.dumps(reply, indent=1))
    return EXIT_CLEAN, reply
