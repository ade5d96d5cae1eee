"""Shared test helpers: the EICAR bytes, the ``offscan`` CLI as a subprocess, polling with a
deadline, real appliance and shim processes, and the two stand-in appliances.

This module is imported by test modules (``from helpers import ...``; pytest puts ``tests/`` on
``sys.path`` through the root ``conftest.py``). It may start child processes and unix-socket
servers, always owned by the caller and always stopped by the helper that started them; it never
touches files outside the paths it is given. Nothing here measures time: every timeout is a hang
guard that fails a test instead of blocking the suite, never an assertion about speed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import linecache
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, Union

from offscan import protocol
from offscan.protocol import ApplianceClient, Connection

T = TypeVar("T")
StrPath = Union[str, "os.PathLike[str]"]
Arg = Union[str, int, "os.PathLike[str]"]  # an argv item; numbers are written out

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_NAME = "Eicar-Test-Signature"  # what the bundled database calls it

RUN_TIMEOUT = 60.0  # seconds one ``offscan`` command may take before it counts as a hang
WAIT_TIMEOUT = 30.0  # seconds ``wait_for`` polls unless told otherwise
ASYNC_WAIT_TIMEOUT = 10.0  # seconds ``async_wait_for`` polls unless told otherwise
ASYNC_TIMEOUT = 20.0  # seconds one ``run_async`` scenario may take
START_TIMEOUT = 30.0  # seconds a real appliance may take to load its patterns and listen
QUICK = 2.0  # seconds for something a stand-in appliance should do at once


# -- the CLI as a subprocess -------------------------------------------------------------------


def offscan_argv(*args: Arg) -> list[str]:
    """The argv of ``python -m offscan ARGS`` with this interpreter."""
    return [sys.executable, "-m", "offscan", *map(str, args)]


def run(
    *args: Arg,
    timeout: float = RUN_TIMEOUT,
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
    input: str | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m offscan ARGS`` to completion and capture its output as text.

    ``env`` entries are added to (not substituted for) this process's environment. Standard
    input is ``/dev/null`` unless ``input`` is given, so a command that would read a terminal
    fails instead of hanging; ``timeout`` (subprocess.TimeoutExpired) fails a command that
    blocks. ``check`` raises CalledProcessError on a non-zero exit, like ``subprocess.run``.
    """
    return subprocess.run(
        offscan_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=None if cwd is None else str(cwd),
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        check=check,
    )


# -- polling with a deadline -------------------------------------------------------------------


def _describe(cond: Callable[..., Any]) -> str:
    """A readable name for a predicate: its name, or for a lambda its source line."""
    name = getattr(cond, "__qualname__", None) or repr(cond)
    code = getattr(cond, "__code__", None)
    if code is None or "<lambda>" not in name:
        return name
    line = linecache.getline(code.co_filename, code.co_firstlineno).strip()
    where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    return f"{line} ({where})" if line else where


def _timed_out(what: str | None, cond: Callable[..., Any], timeout: float, last: Any) -> str:
    return (
        f"timed out after {timeout:g} s waiting for {what or _describe(cond)}"
        f" (last value: {last!r})"
    )


def wait_for(
    cond: Callable[[], T | None],
    timeout: float = WAIT_TIMEOUT,
    what: str | None = None,
    interval: float = 0.02,
) -> T:
    """Poll ``cond()`` until it returns something truthy and return that value.

    Past ``timeout`` seconds, raise AssertionError naming ``what`` (or, without it, the
    predicate's source line) and the last value seen. ``cond`` is always called at least once
    more after the deadline, so a slow machine never fails a condition that has become true.
    """
    deadline = time.monotonic() + timeout
    while True:
        expired = time.monotonic() > deadline
        value = cond()
        if value:
            return value
        if expired:
            raise AssertionError(_timed_out(what, cond, timeout, value))
        time.sleep(interval)


async def async_wait_for(
    cond: Callable[[], T | None],
    timeout: float = ASYNC_WAIT_TIMEOUT,
    what: str | None = None,
    interval: float = 0.02,
) -> T:
    """``wait_for`` for coroutines: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while True:
        expired = time.monotonic() > deadline
        value = cond()
        if value:
            return value
        if expired:
            raise AssertionError(_timed_out(what, cond, timeout, value))
        await asyncio.sleep(interval)


def run_async(main: Awaitable[T] | Callable[[], Awaitable[T]], timeout: float = ASYNC_TIMEOUT) -> T:
    """Run a coroutine (or a function returning one) in a fresh event loop, failing with
    TimeoutError after ``timeout`` seconds instead of hanging."""

    async def guarded() -> T:
        awaitable = main() if callable(main) else main
        return await asyncio.wait_for(awaitable, timeout)

    return asyncio.run(guarded())


# -- real appliance and shim processes ---------------------------------------------------------


class Proc:
    """A ``python -m offscan`` child whose output goes to a log file; ``stop`` always reaps it."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "ab") as f:
            self.p = subprocess.Popen(
                offscan_argv(*args),
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Send ``sig``, wait up to ``timeout`` seconds, then SIGKILL; the exit code."""
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
    """``offscan serve`` on ``work/appliance.sock`` with state in ``work/state``; the
    constructor returns once the appliance wrote its ready file (``info`` holds it)."""

    def __init__(self, work: Path, *extra: str, name: str = "appliance") -> None:
        self.work = work
        self.sock = work / "appliance.sock"
        self.state = work / "state"
        self.ready = work / f"{name}.ready"
        if self.ready.exists():
            self.ready.unlink()
        super().__init__(
            [
                "serve",
                "--socket",
                str(self.sock),
                "--state",
                str(self.state),
                "--ready-file",
                str(self.ready),
                *extra,
            ],
            work / f"{name}.log",
        )
        try:
            wait_for(
                lambda: self.ready.exists() or self.p.poll() is not None,
                START_TIMEOUT,
                "appliance start",
            )
        except AssertionError:
            self.kill9()  # never leave a half-started appliance behind
            raise AssertionError(f"appliance did not start:\n{self.output()}") from None
        if self.p.poll() is not None:
            raise AssertionError(f"appliance exited:\n{self.output()}")
        self.info = json.loads(self.ready.read_text())

    def events(self) -> list[dict[str, Any]]:
        """The lines of ``events.jsonl`` so far (a line torn by kill -9 is skipped)."""
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
        """The latest verdict event per (vm, path)."""
        return {(e["vm"], e["path"]): e for e in self.events() if e.get("event") == "verdict"}


@contextlib.contextmanager
def running_appliance(work: Path, *extra: str, name: str = "appliance") -> Iterator[ApplianceProc]:
    """A real appliance for the duration of a ``with`` block (or a fixture's ``yield``)."""
    a = ApplianceProc(work, *extra, name=name)
    try:
        yield a
    finally:
        a.stop()


def shim_proc(work: Path, sock: Path, roots: list[Path], *extra: str) -> Proc:
    """``offscan shim`` protecting each root as a VM named after the directory."""
    args = ["shim", "--appliance", str(sock)]
    for r in roots:
        args += ["--vm", f"{r.name}={r}"]
    return Proc([*args, *extra], work / "shim.log")


def status(sock: Path) -> dict[str, Any]:
    """``offscan status --json`` of the appliance on ``sock``."""
    out = run("status", "--appliance", sock, "--json", timeout=30)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def serve_available() -> bool:
    """Whether this build has ``offscan serve`` (asked of the CLI, not of the source layout)."""
    probe = run("serve", "--help", timeout=30)
    return probe.returncode == 0 and "--socket" in probe.stdout


# -- stand-in appliances -----------------------------------------------------------------------


class StandIn:
    """A minimal appliance speaking protocol v1 for shim tests: registers VMs, answers every
    scan by reading the content (path, fd or stream) and calling it infected if it contains
    EICAR."""

    def __init__(self, path: str, *, credits: int = 8, delay: float = 0.0) -> None:
        self.path = path
        self.credits = credits
        self.delay = delay
        self.roots: dict[str, str] = {}
        self.registers: list[tuple[str, str | None]] = []
        self.scans: collections.Counter[tuple[str, str]] = collections.Counter()
        self.modes: collections.Counter[str] = collections.Counter()
        self.contents: dict[tuple[str, str], bytes] = {}
        self.server: protocol.Server | None = None

    async def start(self) -> None:
        self.server = await protocol.start_unix_server(self.path, self._handle)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        self.server = None

    async def _handle(self, conn: Connection) -> None:
        msg, fds = await conn.recv()
        for fd in fds:
            os.close(fd)
        if msg["t"] != "hello":
            return
        await conn.send(
            {
                "t": "welcome",
                "v": 1,
                "appliance": "stand-in",
                "credits": self.credits,
                "heartbeat": 2.0,
                "pattern_version": "test-1",
            }
        )
        streams: dict[int, tuple[dict[str, Any], bytearray]] = {}
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                msg, fds = await conn.recv()
                if not await self._dispatch(conn, msg, fds, streams, tasks):
                    return
        finally:
            for task in tasks:
                task.cancel()

    async def _dispatch(
        self,
        conn: Connection,
        msg: dict[str, Any],
        fds: list[int],
        streams: dict[int, tuple[dict[str, Any], bytearray]],
        tasks: set[asyncio.Task[None]],
    ) -> bool:
        """Handle one request; False once the peer said bye."""
        t = msg["t"]
        if t == "register":
            self.roots[msg["vm"]] = msg["root"]
            self.registers.append((msg["vm"], msg.get("clone_of")))
            await conn.send({"t": "ok", "id": msg["id"]})
        elif t == "unregister":
            self.roots.pop(msg["vm"], None)
            await conn.send({"t": "ok", "id": msg["id"]})
        elif t == "ping":
            await conn.send({"t": "pong", "id": msg["id"]})
        elif t == "bye":
            return False
        elif t == "scan":
            if msg["vm"] not in self.roots:
                await conn.send(
                    {
                        "t": "error",
                        "id": msg["id"],
                        "code": "unknown-vm",
                        "message": f"no VM {msg['vm']}",
                    }
                )
                return True
            self.modes[msg["mode"]] += 1
            if msg["mode"] == "stream":
                streams[msg["id"]] = (msg, bytearray())
                return True
            if msg["mode"] == "fd":
                data = os.pread(fds[0], 1 << 20, 0)
                os.close(fds[0])
            else:
                path = os.path.join(self.roots[msg["vm"]], msg["path"])
                with open(path, "rb") as f:  # blocking, but a test peer reading tiny files
                    data = f.read()
            task = asyncio.create_task(self._answer(conn, msg, data))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif t == "chunk":
            scan, buf = streams[msg["id"]]
            buf += msg["data"]
            if msg["end"]:
                del streams[msg["id"]]
                await self._answer(conn, scan, bytes(buf))
        return True

    async def _answer(self, conn: Connection, msg: dict[str, Any], data: bytes) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        key = (msg["vm"], msg["path"])
        self.scans[key] += 1
        self.contents[key] = data
        infected = EICAR in data
        await conn.send(
            {
                "t": "verdict",
                "id": msg["id"],
                "vm": msg["vm"],
                "path": msg["path"],
                "status": "infected" if infected else "clean",
                "matches": [EICAR_NAME] if infected else [],
                "reason": None,
                "action": "deny" if infected else "allow",
                "source": "scan",
                "digest": None,
                "pattern_version": "test-1",
            }
        )


class FakeAppliance:
    """Just enough appliance to drive ApplianceClient: handshake, then every request lands
    in ``received`` for the test to answer (in any order) through ``conn``."""

    def __init__(
        self,
        *,
        credits: int = 4,
        heartbeat: float = 5.0,
        secret: str | None = None,
        answer_pings: bool = True,
        quick: float = QUICK,
    ) -> None:
        self.credits = credits
        self.heartbeat = heartbeat
        self.secret = secret
        self.answer_pings = answer_pings
        self.quick = quick
        self.hello: dict[str, Any] | None = None
        self.conn: Connection | None = None
        self.ready = asyncio.Event()
        self.received: asyncio.Queue[tuple[dict[str, Any], list[int]]] = asyncio.Queue()
        self.pings = 0

    async def handler(self, conn: Connection) -> None:
        hello, _ = await conn.recv()
        self.hello = hello
        if not conn.is_unix and hello.get("secret") != self.secret:
            await conn.send(
                {"t": "error", "code": "auth", "message": "bad or missing shared secret"}
            )
            return
        await conn.send(
            {
                "t": "welcome",
                "v": 1,
                "appliance": "fake",
                "credits": self.credits,
                "heartbeat": self.heartbeat,
                "pattern_version": "test:1",
            }
        )
        self.conn = conn
        self.ready.set()
        while True:
            msg, fds = await conn.recv()
            if msg["t"] == "ping":
                self.pings += 1
                if self.answer_pings:
                    await conn.send({"t": "pong", "id": msg["id"]})
            elif msg["t"] == "bye":
                return
            else:
                await self.received.put((msg, fds))

    async def next(self) -> dict[str, Any]:
        """The next request (not a ping); fails if none comes within ``quick`` seconds."""
        msg, fds = await asyncio.wait_for(self.received.get(), self.quick)
        assert not fds
        return msg

    async def reply(self, msg: dict[str, Any]) -> None:
        assert self.conn is not None
        await self.conn.send(msg)

    def verdict(self, req: dict[str, Any], status: str = "clean") -> dict[str, Any]:
        """A verdict answering scan request ``req``."""
        return {
            "t": "verdict",
            "id": req["id"],
            "vm": req["vm"],
            "path": req["path"],
            "status": status,
            "matches": [],
            "reason": None,
            "action": "deny" if status == "infected" else "allow",
            "source": "scan",
            "digest": None,
            "pattern_version": "test:1",
        }


@contextlib.asynccontextmanager
async def fake_appliance(
    sockdir: str, **kwargs: Any
) -> AsyncIterator[tuple[FakeAppliance, ApplianceClient]]:
    """A FakeAppliance on ``sockdir/dsva.sock`` and an ApplianceClient connected to it."""
    fake = FakeAppliance(**kwargs)
    server = await protocol.start_unix_server(os.path.join(sockdir, "dsva.sock"), fake.handler)
    client = ApplianceClient(server.path or "", shim_id="test-shim")
    try:
        await client.connect(timeout=fake.quick)
        await asyncio.wait_for(fake.ready.wait(), fake.quick)
        yield fake, client
    finally:
        await client.close(timeout=0.5)
        server.close()
        await server.wait_closed()
        while not fake.received.empty():
            for fd in fake.received.get_nowait()[1]:
                os.close(fd)


# -- processes, descriptors and hangs ----------------------------------------------------------


@contextlib.contextmanager
def no_hang(seconds: float = 10.0, what: str = "a FIFO or device was opened?") -> Iterator[None]:
    """Turn a call that blocks in the main thread (e.g. opening a FIFO for reading without
    O_NONBLOCK) into an AssertionError after ``seconds`` instead of a hung suite."""

    def expired(signum: int, frame: object) -> None:
        raise AssertionError(f"blocked for {seconds:g} s ({what})")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def open_fds() -> set[int]:
    """This process's open file descriptors (from /proc/self/fd)."""
    return {int(n) for n in os.listdir("/proc/self/fd")}


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains ``text``, this
    process excepted: how a test proves that nothing it started is still running."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # exited while we looked
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if text in cmdline and state not in ("Z", "X"):
            found.append((int(entry.name), cmdline))
    return found
