"""Helpers for the on-access prevention tests: a private tmpfs, openers in other processes, and
a real appliance plus a real preventing shim.

fanotify marks are global: everything here marks only a tmpfs mounted for the test (or a temp
directory) and the groups live in the shim child, so stopping or killing it (always done, in
``finally``) releases every held open. Nothing here measures time; timeouts are hang guards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ApplianceProc, Proc, shim_proc, status, wait_for

from offscan.shim.fanotify import unavailable

OPEN_TIMEOUT = 60.0  # seconds an opener may take before it counts as a hang
EPERM_EXIT = 13  # what an opener exits with when its open() fails with EPERM

# Opens each path given; prints one line per path: OK, EPERM or ENOENT (any other error is a
# traceback and exit 1). With -j N it opens from N threads at once.
OPENER = r"""
import errno, os, sys
from concurrent.futures import ThreadPoolExecutor
args = sys.argv[1:]
jobs = 1
if args[:1] == ["-j"]:
    jobs, args = int(args[1]), args[2:]
def one(path):
    try:
        with open(path, "rb") as f:
            f.read(16)
        return "OK"
    except PermissionError as exc:
        assert exc.errno == errno.EPERM, exc
        return "EPERM"
    except FileNotFoundError:
        return "ENOENT"
with ThreadPoolExecutor(jobs) as pool:
    results = list(pool.map(one, args))
print("\n".join(results), flush=True)
sys.exit(EPERM_EXIT if "EPERM" in results else 0)
""".replace("EPERM_EXIT", str(EPERM_EXIT))


def require_fanotify() -> None:
    """Skip when this kernel or process cannot hold opens (the feature is truly absent)."""
    if os.geteuid() != 0:
        pytest.skip("fanotify permission events need root")
    why = unavailable()
    if why:
        pytest.skip(f"fanotify permission events unavailable: {why}")


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "256m") -> Iterator[Path]:
    """A tmpfs of our own at ``path`` (a VM root that is a mount point: mount mode)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "offscan-prevent", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def open_in_child(*paths: Path, jobs: int = 1) -> list[str]:
    """Open every path from another process; "OK" or "EPERM" for each, in order."""
    args = [str(p) for p in paths]
    if jobs > 1:
        args = ["-j", str(jobs), *args]
    done = subprocess.run(
        [sys.executable, "-c", OPENER, *args], capture_output=True, text=True, timeout=OPEN_TIMEOUT
    )
    assert done.returncode in (0, EPERM_EXIT), done.stderr
    return done.stdout.split()


def start_openers(paths: list[Path], *, jobs: int = 1) -> subprocess.Popen[str]:
    """An opener process working on ``paths`` in the background (see :func:`results`)."""
    args = [str(p) for p in paths]
    if jobs > 1:
        args = ["-j", str(jobs), *args]
    return subprocess.Popen(
        [sys.executable, "-c", OPENER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


OPENAT = {"x86_64": 257, "aarch64": 56}.get(os.uname().machine)


def blocked_in_open(proc: subprocess.Popen[str], count: int = 1) -> bool:
    """At least ``count`` threads of ``proc`` sit in openat(2) right now: held by fanotify
    (read from /proc/PID/task/*/syscall; the kernel holds the open inside that call)."""
    if OPENAT is None:
        pytest.skip(f"openat's syscall number on {os.uname().machine} is not known here")
    waiting = 0
    for task in Path(f"/proc/{proc.pid}/task").glob("*"):
        try:
            nr = (task / "syscall").read_text().split(" ", 1)[0]
        except OSError:
            continue
        waiting += nr == str(OPENAT)
    return waiting >= count


def results(proc: subprocess.Popen[str]) -> list[str]:
    out, err = proc.communicate(timeout=OPEN_TIMEOUT)
    assert proc.returncode in (0, EPERM_EXIT), err
    return out.split()


def write_in_child(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` from another process (as a guest program would)."""
    code = "import sys; open(sys.argv[1], 'wb').write(bytes.fromhex(sys.argv[2]))"
    subprocess.run([sys.executable, "-c", code, str(path), data.hex()], check=True, timeout=60)


def prevention_of(sock: Path, vm: str) -> dict[str, Any] | None:
    """The VM's ``prevention`` entry in ``offscan status`` (None until the shim reported)."""
    for info in status(sock)["vms"]:
        if info["name"] == vm:
            found: dict[str, Any] | None = info.get("prevention")
            return found
    return None


def wait_prevention(sock: Path, vm: str, **want: Any) -> dict[str, Any]:
    """Poll status until the VM's prevention entry has every ``want`` key (a callable is a
    predicate on the value); returns the entry."""

    def ok() -> dict[str, Any] | None:
        p = prevention_of(sock, vm)
        if p is None:
            return None
        for key, value in want.items():
            if not (value(p[key]) if callable(value) else p[key] == value):
                return None
        return p

    return wait_for(ok, 60, f"prevention of {vm} with {want}", interval=0.2)


@contextlib.contextmanager
def prevented(
    work: Path, root: Path, *shim_args: str, appliance_args: tuple[str, ...] = ()
) -> Iterator[tuple[ApplianceProc, Proc]]:
    """A real appliance and a real ``offscan shim --prevent`` on ``root`` (VM ``root.name``),
    yielded once the shim reports prevention on; both stopped afterwards, whatever happens."""
    appliance = ApplianceProc(work, *appliance_args)
    shim: Proc | None = None
    try:
        shim = shim_proc(work, appliance.sock, [root], "--prevent", *shim_args)
        wait_prevention(appliance.sock, root.name, enabled=True)
        yield appliance, shim
    finally:
        if shim is not None:
            shim.stop()
        appliance.stop()
