"""The ``offscan shim`` runner: protect the VMs a :class:`ShimConfig` names until signalled.

No argparse here: :mod:`offscan.cli.shim` parses the command line into a :class:`ShimConfig`
and calls :func:`run_shim`. This module prints one line per infected file on stdout and a
stats line on stderr at exit, installs SIGINT/SIGTERM handlers for the run, and touches
nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .backlog import DEFAULT_MAX_BACKLOG, DEFAULT_QUIET
from .prevent import DEFAULT_PREVENTION_TIMEOUT
from .shim import Shim
from .spec import VMSpec

if TYPE_CHECKING:
    from ..protocol.messages import ShimVerdict, Verdict

EXIT_OK, EXIT_ERROR = 0, 2

# The counters of the stats line printed at exit, in this order.
STATS_LINE_KEYS = (
    "events",
    "coalesced",
    "sent",
    "verdicts",
    "clean",
    "infected",
    "errors",
    "skipped",
    "backlog",
    "replayed",
    "reconnects",
    "dropped",
    "appliance",
    "failovers",
    "failbacks",
)


@dataclass(frozen=True)
class ShimConfig:
    """What ``offscan shim`` was asked to do.

    ``clone_of`` pairs ``(clone, base)`` declare VM ``clone`` a clone of VM ``base``; every
    clone must be one of ``vms``. The rest are :class:`~offscan.shim.shim.Shim`'s options.
    """

    appliance: str | tuple[str, ...]  # several: in priority order, failover between them
    vms: tuple[VMSpec, ...]
    clone_of: tuple[tuple[str, str], ...] = ()
    secret: str | None = None
    content: str = "auto"
    shim_id: str | None = None
    isolation_hook: str | None = None
    quiet: float = DEFAULT_QUIET
    max_backlog: int = DEFAULT_MAX_BACKLOG
    prevent: bool = False
    prevent_timeout: float = DEFAULT_PREVENTION_TIMEOUT


def with_clones(vms: Sequence[VMSpec], clone_of: Sequence[tuple[str, str]]) -> list[VMSpec]:
    """``vms`` with the declared bases filled in; ValueError names clones that are not VMs."""
    clones = dict(clone_of)
    specs: list[VMSpec] = []
    for spec in vms:
        base = clones.pop(spec.name, None)
        specs.append(VMSpec(spec.name, spec.root, clone_of=base) if base else spec)
    if clones:
        raise ValueError(f"--clone-of names unknown VM(s): {', '.join(sorted(clones))}")
    return specs


def _report(vm: str, relpath: str, verdict: Verdict | ShimVerdict) -> None:
    if verdict.get("status") == "infected":
        for name in verdict.get("matches") or ["?"]:
            print(f"{vm}:{relpath}: {name} FOUND", flush=True)


def stats_line(stats: dict[str, Any]) -> str:
    return "offscan shim: " + " ".join(f"{k}={stats[k]}" for k in STATS_LINE_KEYS)


async def run_shim(config: ShimConfig) -> int:
    """Run until SIGINT/SIGTERM; one line per infected file on stdout, a stats line on stderr
    at exit. Returns the exit status (2 for a configuration the shim refuses)."""
    try:
        specs = with_clones(config.vms, config.clone_of)
        shim = Shim(
            config.appliance,
            specs,
            shim_id=config.shim_id,
            secret=config.secret,
            content=config.content,
            quiet=config.quiet,
            max_backlog=config.max_backlog,
            on_verdict=_report,
            isolation_hook=config.isolation_hook,
            prevent=config.prevent,
            prevent_timeout=config.prevent_timeout,
        )
    except ValueError as exc:
        print(f"offscan shim: {exc}", file=sys.stderr)
        return EXIT_ERROR
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, shim.stop)
            installed.append(sig)
    try:
        await shim.run()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    print(stats_line(shim.stats()), file=sys.stderr)
    return EXIT_OK
