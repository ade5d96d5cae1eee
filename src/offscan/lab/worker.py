"""The clone storms' shim: a :class:`~offscan.shim.Shim` in a process of its own, fed VMs.

:func:`worker_main` is that process's entry point and :func:`run_shim_worker` its body;
:class:`ShimWorker` is the lab's handle on it: it launches the process through a
:class:`~offscan.lab.procs.ProcSet`, hands it new VMs on stdin and collects what it reports on
stdout. The shim's CPU is thereby measured apart from the lab's. The process is internal to the
lab: it takes its parameters as one JSON argument, not as a command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..shim import VMSpec
    from .procs import ProcSet

# What the worker process runs (``python -c WORKER_CODE SPEC``): SPEC is :func:`worker_main`'s.
WORKER_CODE = (
    "import sys; from offscan.lab.worker import worker_main; sys.exit(worker_main(sys.argv[1]))"
)


def worker_main(spec: str) -> int:
    """The worker process: ``spec`` is the JSON object :class:`ShimWorker` passes (the
    appliance's address, the shim's id and the first VMs as ``[name, root]`` pairs)."""
    import logging

    from ..shim import VMSpec

    d = json.loads(spec)
    vms = [VMSpec.parse(f"{name}={root}") for name, root in d["vms"]]
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return run_shim_worker(d["appliance"], vms, shim_id=d["shim_id"])


def run_shim_worker(appliance: str, vms: Sequence[VMSpec], *, shim_id: str = "lab-shim") -> int:
    """Run a shim for ``vms`` that takes more VMs on stdin (one JSON object per line: name,
    root, clone_of) and prints, per VM, when it was handed over and when ``add_vm`` returned.
    ``offscan shim`` takes its VMs on the command line only. Returns when SIGTERM/SIGINT stop it."""
    from ..shim import Shim, VMSpec

    async def main() -> None:
        shim = Shim(appliance, vms, shim_id=shim_id)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, shim.stop)
        runner = asyncio.create_task(shim.run())
        adding: set[asyncio.Task[None]] = set()

        async def add(spec: VMSpec) -> None:
            t = time.time()
            await shim.add_vm(spec)
            sys.stdout.write(
                json.dumps({"vm": spec.name, "added": t, "activated": time.time()}) + "\n"
            )
            sys.stdout.flush()

        def start(line: str) -> None:
            d = json.loads(line)
            task = loop.create_task(add(VMSpec(d["name"], d["root"], clone_of=d.get("clone_of"))))
            adding.add(task)
            task.add_done_callback(adding.discard)

        def reader() -> None:
            for line in sys.stdin:
                if line.strip():
                    loop.call_soon_threadsafe(start, line)

        threading.Thread(target=reader, name="lab-shim-stdin", daemon=True).start()
        await runner

    asyncio.run(main())
    return 0


class ShimWorker:
    """The lab's handle on a :func:`run_shim_worker` process."""

    def __init__(
        self, procs: ProcSet, label: str, sock: str, vms: Sequence[tuple[str, str]]
    ) -> None:
        spec = {"appliance": sock, "shim_id": "lab-shim", "vms": [list(vm) for vm in vms]}
        argv = ["-c", WORKER_CODE, json.dumps(spec)]
        self.proc = procs.launch(label, argv, stdin=True, stdout=True)
        self.reports: dict[str, dict[str, float]] = {}
        self._thread = threading.Thread(target=self._read, name="lab-shim-reports", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in self.proc.stdout:
                with contextlib.suppress(ValueError):
                    d = json.loads(line)
                    self.reports[d["vm"]] = d

    def add(self, name: str, root: str, clone_of: str | None) -> None:
        """Hand the worker a new VM (a clone of ``clone_of``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(
            (json.dumps({"name": name, "root": root, "clone_of": clone_of}) + "\n").encode()
        )
        self.proc.stdin.flush()
