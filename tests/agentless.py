"""Helpers for integration tests: real appliance and shim processes on temp sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A child process whose output goes to a log file; always killed on close."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "ab") as f:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "offscan", *args], stdout=f, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode

    def kill9(self) -> None:
        self.p.kill()
        self.p.wait()


class ApplianceProc(Proc):
    def __init__(self, work: Path, *extra: str, name: str = "appliance") -> None:
        self.work = work
        self.sock = work / "appliance.sock"
        self.state = work / "state"
        self.ready = work / f"{name}.ready"
        if self.ready.exists():
            self.ready.unlink()
        super().__init__(
            ["serve", "--socket", str(self.sock), "--state", str(self.state),
             "--ready-file", str(self.ready), *extra],
            work / f"{name}.log",
        )
        wait_for(lambda: self.ready.exists() or self.p.poll() is not None, 30, "appliance start")
        if self.p.poll() is not None:
            raise AssertionError(f"appliance exited:\n{self.output()}")
        self.info = json.loads(self.ready.read_text())

    def events(self) -> list[dict[str, Any]]:
        path = self.state / "events.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line torn by kill -9
        return out

    def verdict_paths(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {(e["vm"], e["path"]): e for e in self.events() if e.get("event") == "verdict"}


def status(sock: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "offscan", "status", "--appliance", str(sock), "--json"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
