"""What one client may hold on the appliance, and who counts as the operator.

A *client* is the peer behind a connection as the kernel names it: the uid of a unix-socket
peer (``SO_PEERCRED``), the address of a TCP peer. :class:`ClientBudget` bounds, per client,
the connections it holds open and the stream scans it has running (each holds a thread of
the shared stream pool while it waits for chunks), so that one client cannot take what every
other shim needs. :func:`check_operator` admits only the appliance's own uid (or root) on the
admin socket. :func:`own_status` is the ``status`` reply a shim gets on the main socket: its
own VMs and detections only. Pure bookkeeping: touches no file and no socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from .. import protocol

if TYPE_CHECKING:
    from ..protocol.messages import StatusReport
    from .common import Clock
    from .facade import Appliance
    from .status import Counters

DEFAULT_CONNECTIONS_PER_CLIENT = 64  # open connections one uid / one address may hold
DEFAULT_STREAMS_PER_CLIENT = 32  # stream scans one client may have waiting for chunks
MAX_VMS = 100_000  # registered VMs (the inventory, rewritten on every change, stays bounded)

NOT_ADMIN = (
    "operator commands are accepted only on the appliance's admin socket "
    "(offscan serve --admin-socket; default: the main socket's path + '.admin')"
)


class StreamAborted(Exception):
    """The stream's connection went away: its scan ends at once, with no verdict."""


class _Abort:
    """The marker :func:`abort_stream` puts in a stream's queue."""

    def __repr__(self) -> str:
        return "ABORT"


ABORT: Final = _Abort()
StreamItem = bytes | None | _Abort  # a chunk, the end of the stream, or its abortion


def abort_stream(q: asyncio.Queue[StreamItem]) -> None:
    """Make the thread reading ``q`` stop now: drop what is queued, then queue :data:`ABORT`."""
    while True:
        try:
            q.get_nowait()
        except asyncio.QueueEmpty:
            break
    with contextlib.suppress(asyncio.QueueFull):
        q.put_nowait(ABORT)


def client_key(conn: protocol.Connection) -> str:
    """Who is behind ``conn``: ``uid:N`` on a unix socket, ``ip:HOST`` on TCP."""
    if conn.is_unix:
        return f"uid:{conn.peer_cred[1]}" if conn.peer_cred else "uid:?"
    host = conn.peer.rpartition(":")[0].strip("[]")
    return f"ip:{host or '?'}"


def check_operator(conn: protocol.Connection) -> None:
    """Refuse (fatal ``auth``) an admin-socket peer that is neither root nor our own uid."""
    cred = conn.peer_cred
    if not conn.is_unix or cred is None or cred[1] not in (0, os.geteuid()):
        raise protocol.ProtocolError(
            "auth", f"{conn.peer} is not an operator (uid 0 or {os.geteuid()}) of this appliance"
        )


@dataclass
class ClientBudget:
    """Per-client connection and stream counts against their limits."""

    max_connections: int = DEFAULT_CONNECTIONS_PER_CLIENT
    max_streams: int = DEFAULT_STREAMS_PER_CLIENT
    connections: Counter[str] = field(default_factory=Counter)
    streams: Counter[str] = field(default_factory=Counter)

    def admit_connection(self, client: str) -> bool:
        """Count a new connection (from its accept, before any hello); False over the limit."""
        if self.connections[client] >= self.max_connections:
            return False
        self.connections[client] += 1
        return True

    def refusal(self, client: str) -> protocol.ProtocolError:
        return protocol.ProtocolError(
            "backpressure", f"{client} already holds {self.max_connections} connections (the limit)"
        )

    def release_connection(self, client: str) -> None:
        self.connections[client] -= 1
        if self.connections[client] <= 0:
            del self.connections[client]

    def take_stream(self, client: str) -> str | None:
        """Take a stream slot; the refusal's message when the client has none left."""
        if self.streams[client] >= self.max_streams:
            return (
                f"{client} has {self.max_streams} stream scans waiting for content (the "
                "limit); send their chunks first"
            )
        self.streams[client] += 1
        return None

    def release_stream(self, client: str) -> None:
        self.streams[client] -= 1
        if self.streams[client] <= 0:
            del self.streams[client]


def own_status(app: Appliance, shim: str) -> StatusReport:
    """The ``status`` reply for shim ``shim``: the appliance's counters, but only the VMs it
    owns and the detections in them (another shim's roots and files are not its business)."""
    report = app.status()
    mine = {n for n, rec in app.inventory.vms.items() if rec.owner == shim}
    report["vms"] = [v for v in report["vms"] if v["name"] in mine]
    report["recent_detections"] = [d for d in report["recent_detections"] if d["vm"] in mine]
    return report


DRAIN_WINDOW = 10  # samples (one a second) the drain rate is measured over


class DrainMeter:
    """Verdicts per second over the last :data:`DRAIN_WINDOW` seconds (status ``drain_rate``),
    from one sample of the verdict counter a second: how fast a flood of new files drains."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque(maxlen=DRAIN_WINDOW + 1)

    def sample(self, now: float, verdicts: int) -> None:
        self.samples.append((now, verdicts))

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self.samples[0], self.samples[-1]
        return round((v1 - v0) / (t1 - t0), 1) if t1 > t0 else 0.0

    async def run(self, clock: Clock, counters: Counters) -> None:
        """Sample once a second until cancelled (an appliance background task)."""
        while True:
            self.sample(clock.monotonic(), counters.verdicts)
            await asyncio.sleep(1.0)
