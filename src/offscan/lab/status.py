"""Asking the scanners: their status and counters over the protocol, and operator calls.

Every scanning point of a setup (the appliance, or each agent) answers ``status`` on its
socket; :func:`sum_counters` adds up their counters and :func:`diff_counters` takes a phase's
share. Talks only to the sockets it is given, through :class:`~offscan.protocol.ApplianceClient`.
Statuses are the protocol's :class:`~offscan.protocol.messages.ApplianceStatus`, so every field
read here is checked against the wire contract.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

if TYPE_CHECKING:
    from ..protocol.messages import ApplianceStatus

T = TypeVar("T")

# A status field a phase adds up over its scanning points (each an int in ApplianceStatus).
CounterName = Literal[
    "verdicts",
    "contents_matched",
    "served_from_cache",
    "served_identity",
    "served_digest",
    "served_clone",
    "joined_in_flight",
    "bytes_read",
    "bytes_matched",
    "detections",
    "errors",
    "revalidations",
    "revalidation_bytes",
    "revalidation_rescans",
    "swaps",
]

# The counters of a scanning point's status that a phase adds up over its points.
COUNTERS: tuple[CounterName, ...] = get_args(CounterName)


async def appliance_status(sock: str, *, timeout: float = 30.0) -> ApplianceStatus:
    """The ``status`` of the scanning point listening on ``sock``."""
    from ..protocol import ApplianceClient, admin_socket_for

    c = ApplianceClient(admin_socket_for(sock), shim_id=f"lab-status-{os.getpid()}")
    await c.connect(timeout=timeout)
    try:
        return await asyncio.wait_for(c.status(), timeout)
    finally:
        await c.close()


async def appliance_control(
    sock: str, op: str, *, timeout: float = 600.0, **args: Any
) -> dict[str, Any]:
    """Run operator command ``op`` on the scanning point listening on ``sock``; its reply."""
    from ..protocol import ApplianceClient, admin_socket_for

    c = ApplianceClient(admin_socket_for(sock), shim_id=f"lab-operator-{os.getpid()}")
    await c.connect(timeout=30.0)
    try:
        return await c.control(op, timeout=timeout, **args)
    finally:
        await c.close()


async def gather_limited(coros: Iterable[Awaitable[T]], limit: int = 32) -> list[T]:
    """``asyncio.gather`` with at most ``limit`` of ``coros`` running at once."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[T]) -> T:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


def sum_counters(statuses: Sequence[ApplianceStatus]) -> dict[str, Any]:
    """:data:`COUNTERS` summed over scanning points, their pattern versions and how many."""
    out: dict[str, Any] = {k: sum(int(s.get(k) or 0) for s in statuses) for k in COUNTERS}
    out["pattern_versions"] = sorted({str(s.get("pattern_version")) for s in statuses})
    out["points"] = len(statuses)
    return out


def diff_counters(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after`` with each of :data:`COUNTERS` counted from ``before``."""
    out = dict(after)
    for k in COUNTERS:
        out[k] = after[k] - before.get(k, 0)
    return out


def registration_times(statuses: Sequence[ApplianceStatus]) -> dict[str, float]:
    """VM -> when its scanning point registered it (wall clock), from their statuses."""
    out: dict[str, float] = {}
    for s in statuses:
        for vm in s.get("vms") or []:
            out[vm["name"]] = float(vm["registered_at"])
    return out
