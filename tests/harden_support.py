"""Helpers for the hardening tests (issue 14): raw clients that misbehave on purpose, an
in-process appliance on private sockets, and a process's resident memory.

Everything here is owned by the caller and cleaned up by it; nothing measures time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from offscan import protocol
from offscan.appliance import Appliance
from offscan.protocol import Connection

SECRET = "s3cret"


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def raw_frame(msg: dict[str, Any]) -> bytes:
    return protocol.pack(msg)


def raw_hello(sock: socket.socket, shim: str, secret: str | None = None) -> dict[str, Any]:
    """Blocking hello on a raw socket; the welcome."""
    msg: dict[str, Any] = {"t": "hello", "v": protocol.PROTOCOL_VERSION, "shim": shim}
    if secret:
        msg["secret"] = secret
    sock.sendall(raw_frame(msg))
    header = _recv_exact(sock, 4)
    (n,) = protocol.HEADER.unpack(header)
    return protocol.unpack(_recv_exact(sock, n))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise ConnectionError("closed")
        buf += got
    return buf


def flood_without_reading(sock: socket.socket, frame: bytes, count: int, stall: float) -> int:
    """Send ``frame`` up to ``count`` times, never reading; stop when the peer stops taking
    them for ``stall`` seconds (a hang guard). The number of frames sent in full."""
    sock.setblocking(False)
    data = memoryview(frame * count)
    sent = 0
    while sent < len(data):
        _, writable, _ = select.select([], [sock], [], stall)
        if not writable:
            break
        try:
            sent += sock.send(data[sent : sent + (1 << 16)])
        except BlockingIOError:
            continue
        except OSError:
            break
    return sent // len(frame)


async def connect_from(host: str, port: int, source: str) -> Connection:
    """A TCP Connection to ``host:port`` from the loopback address ``source`` (127.0.0.N),
    so that one test can play several clients."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return Connection(sock)


async def hello(conn: Connection, shim: str, secret: str | None = SECRET) -> dict[str, Any]:
    msg: dict[str, Any] = {"t": "hello", "v": protocol.PROTOCOL_VERSION, "shim": shim}
    if secret:
        msg["secret"] = secret
    await conn.send(msg)
    welcome, _ = await conn.recv()
    return welcome


async def request(conn: Connection, msg: dict[str, Any]) -> dict[str, Any]:
    """Send ``msg`` and read frames until its reply (same id)."""
    await conn.send(msg)
    while True:
        reply, fds = await conn.recv()
        for fd in fds:
            os.close(fd)
        if reply.get("id") == msg["id"] and reply["t"] != "ping":
            return reply


@contextlib.asynccontextmanager
async def appliance(tmp: Path, **options: Any) -> AsyncIterator[Appliance]:
    """An in-process appliance on ``tmp/app.sock`` (admin socket next to it) and, with
    ``tcp=True``, a TCP listener on 127.0.0.1 with :data:`SECRET`."""
    if options.pop("tcp", False):
        options.setdefault("listen", ("127.0.0.1", 0))
        options.setdefault("secret", SECRET)
    app = Appliance(socket_path=str(tmp / "app.sock"), **options)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()
