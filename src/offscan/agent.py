"""Agent mode (``offscan agent``): the in-guest baseline, one full scanner per VM.

An agent is the appliance pipeline and the shim in one process for one VM: its own watcher,
its own compiled database, its own verdict cache and its own update client. Nothing is shared
with other agents, which is exactly what the agentless setup is measured against. It reuses
:class:`offscan.appliance.Appliance` and :class:`offscan.shim.Shim` unchanged (same engine,
limits and events), talking over a private unix socket in the agent's state directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .appliance import Appliance
from .shim import Shim, VMSpec

log = logging.getLogger("offscan.agent")


class Agent:
    """One VM's private scanner: an Appliance plus a Shim for that VM only."""

    def __init__(self, vm: VMSpec, *, databases: Sequence[str] = (), state_dir: str | None = None,
                 updates: str | None = None, trust: str | None = None, poll: float = 60.0,
                 concurrency: int = 1, on_verdict: Any = None) -> None:
        self.vm = vm
        self._tmp = None if state_dir else tempfile.TemporaryDirectory(prefix=f"offscan-agent-{vm.name}-")
        self.state_dir = Path(state_dir or self._tmp.name)  # type: ignore[union-attr]
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket_path = str(self.state_dir / "agent.sock")
        self.appliance = Appliance(
            socket_path=self.socket_path, databases=databases, state_dir=self.state_dir / "appliance",
            concurrency=concurrency, updates=updates, trust=trust, poll=poll,
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

    def status(self) -> dict[str, Any]:
        return {"vm": self.vm.name, "shim": self.shim.stats(), "appliance": self.appliance.status()}


def add_agent_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vm", required=True, metavar="NAME=DIR", type=VMSpec.parse, help="the VM this agent protects")
    p.add_argument("-d", "--database", action="append", default=[], metavar="DB")
    p.add_argument("--state", metavar="DIR", help="the agent's own state (default: a temp dir)")
    p.add_argument("--updates", metavar="URL", help="pattern update server")
    p.add_argument("--trust", metavar="PUB", help="public key that signs pattern bundles")
    p.add_argument("--poll", type=float, default=60.0, metavar="SECONDS")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("--status-file", help="write the agent's counters here (JSON) on exit")


async def run_agent_cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    agent = Agent(args.vm, databases=args.database, state_dir=args.state, updates=args.updates,
                  trust=args.trust, poll=args.poll)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(agent.run(stop))
    if args.ready_file:
        while not os.path.exists(agent.socket_path) and not runner.done():
            await asyncio.sleep(0.01)
        Path(args.ready_file).write_text(json.dumps({"pid": os.getpid(), "socket": agent.socket_path}))
    try:
        await runner
    finally:
        if args.status_file:
            Path(args.status_file).write_text(json.dumps(agent.status(), default=str))
    return 0
