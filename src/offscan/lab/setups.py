"""The two setups under comparison, and what every run of a bench shares.

:class:`Lab` is the work directory of a bench with its master image and signature databases
(and, for the update workload, signed bundles and a trusted key). :class:`Setup` is one side
while it runs, agentless (one ``offscan serve`` and one shim for every VM) or agent (one
``offscan agent`` per VM): its processes, scanning points, event logs and update server. Both
write only inside the lab's work directory; the processes are started through a ProcSet.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .._fsutil import atomic_write
from .config import BenchConfig
from .eventlogs import EventTail
from .image import ContentMaker, LabVM, build_master, build_vm, plan_image
from .procs import ProcSet, wait_ready_async
from .signatures import build_signatures, write_database
from .status import appliance_status, gather_limited

if TYPE_CHECKING:
    from rich.console import Console

    from ..protocol.messages import ApplianceStatus
    from ..updates import UpdateServer
    from .worker import ShimWorker


class Lab:
    """What every run of a bench shares: the work directory, the master image, the
    signature databases (and for the update workload signed bundles and a trusted key)."""

    def __init__(self, cfg: BenchConfig, console: Console) -> None:
        self.cfg = cfg
        self.console = console
        self.work = Path(tempfile.mkdtemp(prefix="offscan-lab-", dir=cfg.work))
        self.plan = plan_image(cfg.files, shared=cfg.shared, seed=cfg.seed)
        self.maker = ContentMaker(cfg.seed)
        self.master = self.work / "master"
        self.master_bytes = build_master(self.master, self.plan, self.maker, cfg.seed)
        self.db_v1 = build_signatures(cfg.sigs, seed=cfg.seed)
        self.db_v2 = build_signatures(cfg.sigs, seed=cfg.seed, version=2)
        self.db_dir = self.work / "db"
        write_database(self.db_dir, self.db_v1)
        self.signatures = sum(len(v) for v in self.db_v1.values())
        self._bundles: dict[str, bytes] | None = None
        self.trust: Path | None = None
        self.store_v1: Path | None = None

    def bundles(self) -> dict[str, bytes]:
        """Signed v1 full, v2 delta and v2 full bundles; a v1 store to seed scanners with."""
        if self._bundles is None:
            from ..updates import (
                PatternStore,
                build_delta,
                build_full,
                generate_key,
                load_private_key,
            )

            key, pub, _ = generate_key(self.work / "publisher")
            signer = load_private_key(key)
            self.trust = pub
            self._bundles = {
                "v1-full.osb": build_full(self.db_v1, 1).signed(signer).to_bytes(),
                "v2-delta-1.osb": build_delta(self.db_v1, self.db_v2, 2, 1)
                .signed(signer)
                .to_bytes(),
                "v2-full.osb": build_full(self.db_v2, 2).signed(signer).to_bytes(),
            }
            self.store_v1 = self.work / "store-v1"
            PatternStore(self.store_v1, str(pub)).apply(self._bundles["v1-full.osb"], source="lab")
        return self._bundles

    def seed_store(self, state: Path) -> None:
        """Give a scanner pattern version 1 on disk, as if it had shipped with it."""
        assert self.store_v1 is not None
        state.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.store_v1, state / "patterns", symlinks=True)

    def close(self) -> None:
        """Remove the work directory (unless ``--keep``)."""
        if self.cfg.keep:
            self.console.print(f"kept the work directory {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


class Setup:
    """One side of the comparison while it runs: its processes, scanning points and logs."""

    def __init__(self, kind: str, lab: Lab, rundir: Path) -> None:
        self.kind = kind
        self.lab = lab
        self.rundir = rundir
        self.procs = ProcSet(rundir / "logs")
        self.sockets: list[str] = []
        self.tails: list[EventTail] = []
        self.t0: dict[str, float] = {}  # VM -> when protection was asked for
        self.worker: ShimWorker | None = None
        self.server: UpdateServer | None = None
        self.scan_args: list[str] = ["-d", str(lab.db_dir)]

    def use_updates(self) -> None:
        """Serve the signed bundles over HTTP and have every scanner start on v1 and poll it."""
        from ..updates import UpdateServer

        bundles = self.lab.bundles()
        pub = self.rundir / "published"
        pub.mkdir(parents=True)
        (pub / "v1-full.osb").write_bytes(bundles["v1-full.osb"])
        server = self.server = UpdateServer(pub, host="127.0.0.1", port=0)
        server.start()
        self.scan_args = [
            "--updates",
            server.url,
            "--trust",
            str(self.lab.trust),
            "--poll",
            "3600",
        ]

    def publish(self, name: str) -> None:
        """Publish bundle ``name`` on the update server, atomically (it never serves half)."""
        # No fsync: the published directory is scratch, deleted with the run, and syncing here
        # would put writeback into the update phase being measured.
        atomic_write(self.rundir / "published" / name, self.lab.bundles()[name], fsync=False)

    async def start_appliance(self) -> str:
        """Launch ``offscan serve`` and wait until it listens; returns its socket."""
        state = self.rundir / "state"
        if self.server is not None:
            self.lab.seed_store(state)
        sock = str(self.rundir / "a.sock")
        ready = self.rundir / "appliance.ready"
        self.procs.launch(
            "appliance",
            [
                "-m",
                "offscan",
                "serve",
                "--socket",
                sock,
                "--state",
                str(state),
                "--ready-file",
                str(ready),
                "--vm-area",  # the lab's VMs (and their clones) live in its work directory
                str(self.lab.work.resolve()),
                *self.scan_args,
            ],
        )
        await wait_ready_async(self.procs, "appliance", ready)
        self.sockets.append(sock)
        self.tails.append(EventTail(state / "events.jsonl"))
        return sock

    def start_shim(self, vms: Sequence[LabVM]) -> None:
        """Launch one ``offscan shim`` for every VM (protection is asked for at its launch)."""
        argv = ["-m", "offscan", "shim", "--appliance", self.sockets[0], "--shim-id", "lab-shim"]
        for vm in vms:
            argv += ["--vm", f"{vm.name}={vm.root}"]
        self.procs.launch("shim", argv)
        for vm in vms:
            self.t0[vm.name] = self.procs.launched["shim"]

    async def start_agents(
        self,
        vms: Sequence[LabVM],
        *,
        batch: int,
        before_launch: Callable[[LabVM], Awaitable[None]] | None = None,
    ) -> None:
        """Launch one agent per VM, ``batch`` at a time; the next batch starts when the
        previous one listens (a storm of imports and compiles would only thrash 2 cores)."""
        for i in range(0, len(vms), max(1, batch)):
            group = vms[i : i + max(1, batch)]
            readies = []
            for vm in group:
                if before_launch is not None:
                    await before_launch(vm)
                state = self.rundir / "s" / vm.name
                if self.server is not None:
                    self.lab.seed_store(state / "appliance")
                ready = state / "ready.json"
                label = f"agent-{vm.name}"
                self.procs.launch(
                    label,
                    [
                        "-m",
                        "offscan",
                        "agent",
                        "--vm",
                        f"{vm.name}={vm.root}",
                        "--state",
                        str(state),
                        "--ready-file",
                        str(ready),
                        *self.scan_args,
                    ],
                )
                self.t0[vm.name] = self.procs.launched[label]
                self.sockets.append(str(state / "agent.sock"))
                self.tails.append(EventTail(state / "appliance" / "events.jsonl"))
                readies.append((label, ready))
            for label, ready in readies:
                await wait_ready_async(self.procs, label, ready)

    async def statuses(self) -> list[ApplianceStatus]:
        """The status of every scanning point of the setup."""
        return await gather_limited([appliance_status(s) for s in self.sockets])

    def close(self) -> None:
        """Stop every process of the setup and its update server."""
        try:
            self.procs.close()
        finally:
            if self.server is not None:
                self.server.close()
                self.server = None


def build_vms(lab: Lab, root: Path, n: int) -> list[LabVM]:
    """``n`` VMs copied from the lab's master under ``root``, synced to disk."""
    vms = [
        build_vm(
            root / f"vm-{i:03d}", f"vm-{i:03d}", i, lab.master, lab.plan, lab.maker, lab.cfg.seed
        )
        for i in range(n)
    ]
    os.sync()  # written back before measuring, so writeback does not land in a setup's run
    return vms
