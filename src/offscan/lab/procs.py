"""The child processes of a lab run: launched, measured, waited for and always stopped.

:class:`ProcSet` starts scanners (``python -m offscan ...``) in sessions of their own with their
output in per-process logs under the directory it is given, has each measured by a
:class:`~offscan.lab.measure.ProcMeter`, and stops them (SIGTERM, then SIGKILL). The ``wait_ready``
functions wait for a process's ready file. Touches its log directory and its own children only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .config import LabError
from .measure import ProcMeter

START_TIMEOUT = 60.0  # seconds for a scanner process to start listening
STOP_TIMEOUT = 10.0  # seconds a process gets after SIGTERM before SIGKILL


class ProcSet:
    """The child processes of one setup: launched in their own session (a Ctrl-C reaches
    the lab, which stops them in order), measured by a :class:`ProcMeter`, always stopped."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.launched: dict[str, float] = {}  # label -> wall time of launch
        self.meter = ProcMeter()
        self.meter.start()

    def launch(
        self, label: str, argv: Sequence[str], *, stdin: bool = False, stdout: bool = False
    ) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{label}.log", "ab") as log:  # the child keeps its own copy
            t = time.time()
            p = subprocess.Popen(
                [sys.executable, *argv],
                stdout=subprocess.PIPE if stdout else log,
                stderr=log,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[label] = p
        self.launched[label] = t
        self.meter.add(label, p.pid)
        return p

    def check(self) -> None:
        """Raise if a process died (with the tail of its log)."""
        for label, p in self.procs.items():
            if p.poll() is not None:
                raise LabError(
                    f"{label} exited with status {p.returncode}:\n{self.log_tail(label)}"
                )

    def log_tail(self, label: str, lines: int = 15) -> str:
        try:
            return "\n".join(
                (self.logs / f"{label}.log").read_text(errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return "(no log)"

    def stop(self, labels: Iterable[str] | None = None) -> None:
        """SIGTERM, wait, SIGKILL what is left."""
        todo = [(k, self.procs[k]) for k in (labels if labels is not None else list(self.procs))]
        for _, p in todo:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for _, p in todo:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.meter.stop()


def _check_starting(procs: ProcSet, label: str, deadline: float, timeout: float) -> None:
    """Raise if ``label`` exited before writing its ready file or is past ``deadline``."""
    p = procs.procs[label]
    if p.poll() is not None:
        raise LabError(
            f"{label} exited with status {p.returncode} before listening:\n{procs.log_tail(label)}"
        )
    if time.monotonic() > deadline:
        raise LabError(f"{label} did not start within {timeout:.0f} s:\n{procs.log_tail(label)}")


def wait_ready(
    procs: ProcSet, label: str, ready: Path, timeout: float = START_TIMEOUT
) -> dict[str, Any]:
    """Block until ``label`` has written its ready file; returns what it wrote there."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        _check_starting(procs, label, deadline, timeout)
        time.sleep(0.02)
    for _ in range(50):
        with contextlib.suppress(ValueError):
            ready_info: dict[str, Any] = json.loads(ready.read_text())
            return ready_info
        time.sleep(0.01)  # written but not yet complete
    raise LabError(f"{label}: unreadable ready file {ready}")


async def wait_ready_async(
    procs: ProcSet, label: str, ready: Path, timeout: float = START_TIMEOUT
) -> None:
    """Wait (without blocking the loop) until ``label`` has written its ready file."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        _check_starting(procs, label, deadline, timeout)
        await asyncio.sleep(0.02)
