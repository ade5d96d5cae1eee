"""Agent mode (``offscan agent``): the in-guest baseline, one full scanner per VM.

An agent is the appliance pipeline and the shim in one process for one VM: its own watcher,
its own compiled database, its own verdict cache and its own update client. Nothing is shared
with other agents, which is exactly what the agentless setup is measured against. It reuses
:class:`offscan.appliance.Appliance` and :class:`offscan.shim.Shim` unchanged (same engine,
limits and events), talking over a private unix socket in the agent's state directory.
The command line (``offscan.cli.agent``) builds an :class:`AgentConfig` for :func:`run_agent`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from ._fsutil import atomic_write
from .appliance import Appliance
from .shim import Shim, VMSpec
from .shim.sender import VerdictCallback

if TYPE_CHECKING:
    from .protocol.messages import StatusReport

log = logging.getLogger("offscan.agent")


class AgentStatus(TypedDict):
    """What an agent reports (``Agent.status()``, its ``--status-file``): its VM, its shim's
    counters and its appliance's status report."""

    vm: str
    shim: dict[str, Any]  # Shim.stats()
    appliance: StatusReport


class Agent:
    """One VM's private scanner: an Appliance plus a Shim for that VM only."""

    def __init__(
        self,
        vm: VMSpec,
        *,
        databases: Sequence[str] = (),
        state_dir: str | None = None,
        updates: str | None = None,
        trust: str | None = None,
        poll: float = 60.0,
        concurrency: int = 1,
        on_verdict: VerdictCallback | None = None,
    ) -> None:
        self.vm = vm
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if state_dir:
            self.state_dir = Path(state_dir)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"offscan-agent-{vm.name}-")
            self.state_dir = Path(self._tmp.name)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_path = str(self.state_dir / "agent.sock")
        self.appliance = Appliance(
            socket_path=self.socket_path,
            databases=databases,
            state_dir=self.state_dir / "appliance",
            concurrency=concurrency,
            updates=updates,
            trust=trust,
            poll=poll,
            # the agent's own VM is the one root it scans: its directory is the only VM area
            vm_areas=(os.path.dirname(os.path.realpath(vm.root)) or "/",),
        )
        self.shim = Shim(self.socket_path, [vm], shim_id=f"agent-{vm.name}", on_verdict=on_verdict)

    async def run(self, stop: asyncio.Event) -> None:
        await self.appliance.start()
        task = asyncio.create_task(self.shim.run())
        try:
            await stop.wait()
        finally:
            self.shim.stop()
            await asyncio.gather(task, return_exceptions=True)
            await self.appliance.stop()
            if self._tmp is not None:
                self._tmp.cleanup()

    def status(self) -> AgentStatus:
        return {"vm": self.vm.name, "shim": self.shim.stats(), "appliance": self.appliance.status()}


@dataclass(frozen=True)
class AgentConfig:
    """What ``offscan agent`` was asked to do: the VM, the agent's :class:`Agent` options, and
    the files it reports through (``ready_file`` once its socket listens, ``status_file`` with
    its counters on exit)."""

    vm: VMSpec
    databases: tuple[str, ...] = ()
    state_dir: str | None = None
    updates: str | None = None
    trust: str | None = None
    poll: float = 60.0
    ready_file: str | None = None
    status_file: str | None = None


async def run_agent(config: AgentConfig) -> int:
    """Run one agent until SIGINT/SIGTERM; returns the exit status."""
    agent = Agent(
        config.vm,
        databases=config.databases,
        state_dir=config.state_dir,
        updates=config.updates,
        trust=config.trust,
        poll=config.poll,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(agent.run(stop))
    if config.ready_file:
        while not os.path.exists(agent.socket_path) and not runner.done():
            await asyncio.sleep(0.01)
        # Atomic so a reader polling for the file never sees it half written; not synced: it
        # only means something to whoever started this process, not after a crash.
        atomic_write(
            config.ready_file,
            json.dumps({"pid": os.getpid(), "socket": agent.socket_path}),
            fsync=False,
        )
    try:
        await runner
    finally:
        if config.status_file:
            # Read once this process exited; a lost status after a power cut is a lost run.
            atomic_write(config.status_file, json.dumps(agent.status(), default=str), fsync=False)
    return 0
