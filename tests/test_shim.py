"""The shim: backlog (coalescing, bounds, delivery states) and the whole watcher → appliance path
with real directories, real watchdog observers and a stand-in appliance speaking the real
protocol over a real unix socket."""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import EICAR, StandIn
from helpers import run_async as run

from offscan.cli.shim import add_shim_arguments, run_shim_cli
from offscan.shim import (
    ACCESS,
    DEMAND,
    TREE,
    Backlog,
    Shim,
    VMSpec,
)

TEST_TIMEOUT = 20.0  # seconds for one asyncio scenario
IDLE_TIMEOUT = 10.0  # seconds to wait for the shim to drain


# -------------------------------------------------------------------- stand-in appliance


class Verdicts:
    """on_verdict collector."""

    def __init__(self) -> None:
        self.by_path: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)

    def __call__(self, vm: str, path: str, verdict: dict[str, Any]) -> None:
        self.by_path[(vm, path)].append(verdict)

    def status(self, vm: str, path: str) -> str | None:
        got = self.by_path.get((vm, path))
        return got[-1]["status"] if got else None


async def with_shim(shim: Shim, body: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``shim`` in a task around ``body()``; always stop it and surface its errors."""
    task = asyncio.create_task(shim.run())
    try:
        return await body()
    finally:
        shim.stop()
        await task


async def wait_for(cond: Callable[[], bool], timeout: float = IDLE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture()
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "appliance.sock")


def make_vm(base: Path, name: str, files: int = 0) -> VMSpec:
    root = base / name
    for i in range(files):
        p = root / f"d{i % 3}" / f"f{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"{name} file {i}\n".encode())
    root.mkdir(parents=True, exist_ok=True)
    return VMSpec(name, str(root))


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# -------------------------------------------------------------------- VMSpec


def test_vmspec_parse() -> None:
    assert VMSpec.parse("vm-1=/srv/vms/1") == VMSpec("vm-1", "/srv/vms/1")
    assert VMSpec.parse("a=b=c").root == "b=c"
    for bad in ("novalue", "=dir", "vm=", "bad name=/x", "a/b=/x", "vm:1=/x"):
        with pytest.raises(ValueError, match="NAME=DIR|bad VM name"):
            VMSpec.parse(bad)


# -------------------------------------------------------------------- Backlog


def test_backlog_coalesces_a_burst_into_one_item() -> None:
    b = Backlog(100, quiet=0.05)
    for _ in range(100):
        assert b.record("vm", "a.txt")
    assert len(b) == 1 and b.events == 100 and b.coalesced == 99
    assert b.promote_due() == (0, [])  # still inside its quiet period
    assert b.take() is None
    files, _ = b.promote_due(time.monotonic() + 0.06)
    assert files == 1
    entry = b.take()
    assert entry is not None and entry.relpath == "a.txt" and b.take() is None
    b.done(entry)
    assert len(b) == 0


def test_backlog_bound_drops_new_paths_only(caplog: pytest.LogCaptureFixture) -> None:
    b = Backlog(10, quiet=0.0)
    for i in range(15):
        b.record("vm", f"f{i}")
    assert len(b) == 10 and b.dropped == 5 and b.owed_walks == {"vm"}
    assert b.record("vm", "f3")  # de-duplicated: an existing path never needs room
    assert b.dropped == 5
    assert any("backlog full" in r.message and r.levelno == logging.ERROR for r in caplog.records)
    assert b.take_owed_walks() == {"vm"} and not b.owed_walks


def test_backlog_rewrite_while_in_flight_is_sent_again() -> None:
    b = Backlog(10, quiet=0.0)
    b.record("vm", "a")
    b.promote_due()
    entry = b.take()
    assert entry is not None
    b.record("vm", "a")  # written again while its scan runs
    b.done(entry)  # the verdict is for older content: the path must come back
    assert len(b) == 1
    b.promote_due(time.monotonic() + 1)
    again = b.take()
    assert again is entry
    b.done(again)
    assert len(b) == 0


def test_backlog_ready_entry_rewritten_waits_again() -> None:
    wakes = []
    b = Backlog(10, quiet=0.05, on_wake=lambda: wakes.append(1))
    b.record("vm", "a")
    assert len(wakes) == 1  # the scheduler is woken when the first entry starts waiting
    b.promote_due(time.monotonic() + 1)
    b.record("vm", "a")  # ready but not yet sent: restart its quiet period
    assert b.take() is None
    assert b.counts() == {"waiting": 1, "ready": 0, "in_flight": 0}
    assert len(wakes) == 2  # ...and again now, or the entry would wait forever


def test_backlog_access_before_demand_and_requeue_in_front() -> None:
    b = Backlog(10, quiet=0.0)
    b.record_walk("vm", "old1", prio=DEMAND)
    b.record_walk("vm", "old2", prio=DEMAND)
    b.record("vm", "new", prio=ACCESS)
    b.promote_due(time.monotonic() + 1)
    first = b.take()
    assert first is not None and first.relpath == "new"
    second = b.take()
    assert second is not None and second.relpath == "old1"
    b.requeue(second)  # connection lost: goes back in front, marked as a replay
    again = b.take()
    assert again is second and again.replay


def test_backlog_walk_waits_for_room_instead_of_dropping() -> None:
    b = Backlog(8, quiet=0.0)
    assert b.walk_limit == 6  # a quarter stays free for live events
    done = threading.Event()

    def walker() -> None:
        for i in range(10):
            assert b.record_walk("vm", f"w{i}")
        done.set()

    t = threading.Thread(target=walker)
    t.start()
    deadline = time.monotonic() + 5
    while len(b) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(b) == 6 and not done.is_set()
    assert b.record("vm", "live1") and b.record("vm", "live2")  # live events still fit
    while not done.is_set() and time.monotonic() < deadline:
        b.promote_due(time.monotonic() + 1)
        entry = b.take()
        if entry is not None:
            b.done(entry)
        time.sleep(0.005)
    t.join(5)
    assert done.is_set() and b.dropped == 0


def test_backlog_walk_cancelled_while_waiting() -> None:
    b = Backlog(4, quiet=0.0)
    for i in range(3):
        b.record("vm", f"f{i}")
    t0 = time.monotonic()
    assert b.record_walk("vm", "x", cancelled=lambda: time.monotonic() - t0 > 0.2) is False


def test_backlog_drop_vm() -> None:
    b = Backlog(10, quiet=0.0)
    b.record("a", "1")
    b.record("b", "1")
    b.record("a", "sub", kind=TREE)
    assert b.drop_vm("a") == 2 and len(b) == 1


# -------------------------------------------------------------------- the shim, end to end


def test_activation_scan_gives_every_file_a_verdict(
    tmp_path: Path, sock: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="offscan.shim")
    vm1 = make_vm(tmp_path / "vms", "vm1", files=60)
    vm2 = make_vm(tmp_path / "vms", "vm2", files=40)
    root1 = Path(vm1.root)
    os.mkfifo(root1 / "pipe")  # a reader opening this would hang
    os.symlink("/etc/passwd", root1 / "d0" / "link")
    verdicts = Verdicts()

    async def scenario() -> None:
        appliance = StandIn(sock)
        await appliance.start()
        shim = Shim(sock, [vm1, vm2], on_verdict=verdicts)

        async def body() -> None:
            assert await shim.wait_idle(IDLE_TIMEOUT)
            stats = shim.stats()
            assert stats["verdicts"] == 100 and stats["clean"] == 100
            assert stats["skipped_reasons"] == {"fifo": 1, "symlink": 1}
            assert stats["skipped"] == 2 and stats["backlog"] == 0 and stats["dropped"] == 0

        try:
            await with_shim(shim, body)
        finally:
            await appliance.stop()
        expected = {
            (vm, f"d{i % 3}/f{i}.txt") for vm, n in (("vm1", 60), ("vm2", 40)) for i in range(n)
        }
        assert set(verdicts.by_path) == expected
        assert set(appliance.scans) == expected
        assert ("vm1", "pipe") not in appliance.scans
        assert appliance.modes == {"path": 100}  # auto on a unix socket

    run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert any("pipe (fifo)" in m for m in messages)
    assert any("link (symlink)" in m for m in messages)


def test_burst_of_100_writes_is_scanned_once_after_the_last(tmp_path: Path, sock: str) -> None:
    vm = make_vm(tmp_path, "vm")
    target = Path(vm.root) / "busy.log"

    async def scenario() -> None:
        appliance = StandIn(sock)
        await appliance.start()
        # A generous quiet period so a slow shared CI core cannot split the burst.
        shim = Shim(sock, [vm], quiet=0.3)

        async def body() -> None:
            assert await shim.wait_idle(IDLE_TIMEOUT)
            for i in range(100):
                write(target, b"line %d\n" % i)
            assert await shim.wait_idle(IDLE_TIMEOUT)
            stats = shim.stats()
            # inotify itself merges identical unread events, so fewer than 100 may arrive.
            assert stats["events"] >= 2 and stats["coalesced"] == stats["events"] - 1
            assert stats["sent"] == 1 and stats["verdicts"] == 1

        try:
            await with_shim(shim, body)
        finally:
            await appliance.stop()
        assert appliance.scans == {("vm", "busy.log"): 1}
        assert appliance.contents[("vm", "busy.log")] == b"line 99\n"

    run(scenario())


def test_live_writes_creates_moves_and_links_get_verdicts(tmp_path: Path, sock: str) -> None:
    vm = make_vm(tmp_path / "vms", "vm")
    root = Path(vm.root)
    outside = tmp_path / "outside"
    outside.mkdir()
    verdicts = Verdicts()

    async def scenario() -> None:
        appliance = StandIn(sock)
        await appliance.start()
        shim = Shim(sock, [vm], on_verdict=verdicts)

        async def body() -> None:
            assert await shim.wait_idle(IDLE_TIMEOUT)
            write(root / "written.txt", b"hello")
            write(root / "deep" / "er" / "eicar.com", EICAR)
            (root / "empty").touch()
            write(outside / "moved-in.txt", b"from outside")
            os.rename(outside / "moved-in.txt", root / "moved-in.txt")
            write(root / "before-rename.txt", b"renamed inside")
            await asyncio.sleep(0.01)
            os.rename(root / "before-rename.txt", root / "after-rename.txt")
            write(outside / "linked.txt", b"hard link target")
            os.link(outside / "linked.txt", root / "linked.txt")
            tree = outside / "tree"
            write(tree / "a" / "one.txt", b"one")
            write(tree / "two.txt", EICAR)
            os.rename(tree, root / "tree")
            assert await shim.wait_idle(IDLE_TIMEOUT)

        try:
            await with_shim(shim, body)
        finally:
            await appliance.stop()

    run(scenario())
    for path in (
        "written.txt",
        "empty",
        "moved-in.txt",
        "after-rename.txt",
        "linked.txt",
        "tree/a/one.txt",
    ):
        assert verdicts.status("vm", path) == "clean", path
    for path in ("deep/er/eicar.com", "tree/two.txt"):
        assert verdicts.status("vm", path) == "infected", path
        assert verdicts.by_path[("vm", path)][-1]["matches"] == ["Eicar-Test-Signature"]


def test_appliance_restart_replays_every_write(tmp_path: Path, sock: str) -> None:
    vm = make_vm(tmp_path / "vms", "vm", files=5)
    root = Path(vm.root)
    verdicts = Verdicts()

    async def scenario() -> None:
        appliance = StandIn(sock)
        await appliance.start()
        shim = Shim(sock, [vm], on_verdict=verdicts, reconnect_max_delay=0.2)

        async def body() -> None:
            assert await shim.wait_idle(IDLE_TIMEOUT)
            await appliance.stop()
            await wait_for(lambda: not shim.connected)
            for i in range(200):
                write(root / "new" / f"w{i:03d}.txt", b"written while away %d" % i)
            await wait_for(lambda: shim.stats()["events"] >= 200)
            await asyncio.sleep(0.5)  # several failed reconnects
            assert not await shim.wait_idle(0.2)  # everything is still held
            assert shim.stats()["backlog"] >= 200
            fresh = StandIn(sock)
            await fresh.start()
            try:
                assert await shim.wait_idle(IDLE_TIMEOUT)
            finally:
                await fresh.stop()
            assert ("vm", None) in fresh.registers  # re-registered before replaying
            assert len([k for k in fresh.scans if k[1].startswith("new/")]) == 200
            stats = shim.stats()
            assert stats["reconnects"] >= 1 and stats["replayed"] >= 200
            assert stats["dropped"] == 0

        await with_shim(shim, body)

    run(scenario())
    for i in range(200):
        assert verdicts.status("vm", f"new/w{i:03d}.txt") == "clean"
    assert len(verdicts.by_path) == 205


def test_appliance_absent_at_start(tmp_path: Path, sock: str) -> None:
    vm = make_vm(tmp_path, "vm", files=10)
    verdicts = Verdicts()

    async def scenario() -> None:
        shim = Shim(sock, [vm], on_verdict=verdicts, reconnect_max_delay=0.1)

        async def body() -> None:
            await asyncio.sleep(0.3)
            assert shim.stats()["backlog"] == 10 and shim.stats()["verdicts"] == 0
            appliance = StandIn(sock)
            await appliance.start()
            try:
                assert await shim.wait_idle(IDLE_TIMEOUT)
            finally:
                await appliance.stop()

        await with_shim(shim, body)

    run(scenario())
    assert len(verdicts.by_path) == 10


def test_full_backlog_drops_loudly_then_rewalks(
    tmp_path: Path, sock: str, caplog: pytest.LogCaptureFixture
) -> None:
    vm = make_vm(tmp_path, "vm")
    root = Path(vm.root)
    verdicts = Verdicts()

    async def scenario() -> None:
        shim = Shim(sock, [vm], on_verdict=verdicts, max_backlog=20, reconnect_max_delay=0.1)

        async def body() -> None:
            assert await shim.wait_idle(IDLE_TIMEOUT)  # empty VM, appliance absent
            for i in range(50):
                write(root / f"f{i:02d}", b"x%d" % i)
            await wait_for(lambda: shim.stats()["dropped"] > 0)
            await asyncio.sleep(0.2)
            assert shim.stats()["backlog"] == 20  # bounded
            appliance = StandIn(sock)
            await appliance.start()
            try:
                assert await shim.wait_idle(IDLE_TIMEOUT)
            finally:
                await appliance.stop()

        await with_shim(shim, body)

    run(scenario())
    assert any("backlog full" in r.getMessage() for r in caplog.records)
    assert any("re-walking" in r.getMessage() for r in caplog.records)
    assert {p for _, p in verdicts.by_path} == {f"f{i:02d}" for i in range(50)}


def test_inotify_overflow_makes_the_shim_rewalk(tmp_path: Path, sock: str) -> None:
    vm = make_vm(tmp_path, "vm", files=5)

    async def scenario() -> None:
        appliance = StandIn(sock)
        await appliance.start()
        shim = Shim(sock, [vm])

        async def body() -> None:
            assert await shim.wait_idle(IDLE_TIMEOUT)
            walks = shim.stats()["walks"]
            # What watchdog logs (and does nothing else about) when the kernel queue overflowed.
            logging.getLogger("watchdog.observers.inotify_c").warning(
                "Inotify queue overflowed; filesystem events were lost"
            )
            assert not await shim.wait_idle(0.05)  # a walk is owed
            assert await shim.wait_idle(IDLE_TIMEOUT)
            assert shim.stats()["walks"] == walks + 1

        try:
            await with_shim(shim, body)
        finally:
            await appliance.stop()
        assert set(appliance.scans.values()) == {2}  # every file again

    run(scenario())
    assert not logging.getLogger("watchdog.observers.inotify_c").handlers


def test_deleted_vm_dir_is_survived_and_rewatched(tmp_path: Path, sock: str) -> None:
    a = make_vm(tmp_path / "vms", "a", files=3)
    b = make_vm(tmp_path / "vms", "b")
    verdicts = Verdicts()

    async def scenario() -> None:
        appliance = StandIn(sock)
        await appliance.start()
        shim = Shim(sock, [a, b], on_verdict=verdicts)

        async def body() -> None:
            assert await shim.wait_idle(IDLE_TIMEOUT)
            assert shim.stats()["watched"] == 2
            shutil.rmtree(a.root)
            await wait_for(lambda: shim.stats()["watched"] == 1)
            write(Path(b.root) / "still-protected.txt", b"b is fine")
            assert await shim.wait_idle(IDLE_TIMEOUT)
            assert verdicts.status("b", "still-protected.txt") == "clean"
            write(Path(a.root) / "back.txt", b"a came back")
            await wait_for(lambda: shim.stats()["watched"] == 2)
            assert await shim.wait_idle(IDLE_TIMEOUT)
            assert verdicts.status("a", "back.txt") == "clean"
            write(Path(a.root) / "after.txt", b"watched again")
            assert await shim.wait_idle(IDLE_TIMEOUT)
            assert verdicts.status("a", "after.txt") == "clean"

        try:
            await with_shim(shim, body)
        finally:
            await appliance.stop()

    run(scenario())


def test_missing_vm_dir_at_start_is_watched_when_it_appears(tmp_path: Path, sock: str) -> None:
    spec = VMSpec("late", str(tmp_path / "late"))
    verdicts = Verdicts()

    async def scenario() -> None:
        appliance = StandIn(sock)
        await appliance.start()
        shim = Shim(sock, [spec], on_verdict=verdicts)

        async def body() -> None:
            await asyncio.sleep(0.2)
            assert shim.stats()["watched"] == 0
            write(tmp_path / "late" / "x.txt", b"here now")
            await wait_for(lambda: verdicts.status("late", "x.txt") == "clean")

        try:
            await with_shim(shim, body)
        finally:
            await appliance.stop()

    run(scenario())


@pytest.mark.parametrize("content", ["fd", "stream"])
def test_content_by_fd_and_stream(tmp_path: Path, sock: str, content: str) -> None:
    vm = make_vm(tmp_path / "vms", "vm")
    root = Path(vm.root)
    write(root / "eicar.com", EICAR)
    os.symlink(tmp_path / "secret", root / "escape")
    write(tmp_path / "secret", EICAR)
    verdicts = Verdicts()

    async def scenario() -> None:
        appliance = StandIn(sock)
        await appliance.start()
        shim = Shim(sock, [vm], on_verdict=verdicts, content=content)

        async def body() -> None:
            write(root / "clean.txt", b"x" * 300_000)  # more than one stream chunk
            assert await shim.wait_idle(IDLE_TIMEOUT)

        try:
            await with_shim(shim, body)
        finally:
            await appliance.stop()
        assert set(appliance.modes) == {content}
        assert appliance.contents[("vm", "clean.txt")] == b"x" * 300_000
        assert ("vm", "escape") not in appliance.scans

    run(scenario())
    assert verdicts.status("vm", "eicar.com") == "infected"
    assert verdicts.status("vm", "clean.txt") == "clean"


def test_add_and_remove_vm_at_run_time(tmp_path: Path, sock: str) -> None:
    base = make_vm(tmp_path / "vms", "base", files=4)
    clone = make_vm(tmp_path / "vms", "clone", files=4)
    verdicts = Verdicts()

    async def scenario() -> None:
        appliance = StandIn(sock)
        await appliance.start()
        shim = Shim(sock, [base], on_verdict=verdicts)

        async def body() -> None:
            assert await shim.wait_idle(IDLE_TIMEOUT)
            await shim.add_vm(VMSpec("clone", clone.root, clone_of="base"))
            assert await shim.wait_idle(IDLE_TIMEOUT)
            assert ("clone", "base") in appliance.registers
            assert len([k for k in verdicts.by_path if k[0] == "clone"]) == 4
            with pytest.raises(ValueError):
                await shim.add_vm(VMSpec("clone", clone.root))
            await shim.remove_vm("clone")
            assert "clone" not in appliance.roots
            write(Path(clone.root) / "after-removal.txt", b"not watched")
            write(Path(base.root) / "still.txt", b"watched")
            assert await shim.wait_idle(IDLE_TIMEOUT)
            assert shim.stats()["vms"] == 1

        try:
            await with_shim(shim, body)
        finally:
            await appliance.stop()

    run(scenario())
    assert verdicts.status("base", "still.txt") == "clean"
    assert ("clone", "after-removal.txt") not in verdicts.by_path


def test_unknown_vm_answer_re_registers(tmp_path: Path, sock: str) -> None:
    vm = make_vm(tmp_path, "vm")
    verdicts = Verdicts()

    async def scenario() -> None:
        appliance = StandIn(sock)
        await appliance.start()
        shim = Shim(sock, [vm], on_verdict=verdicts)

        async def body() -> None:
            assert await shim.wait_idle(IDLE_TIMEOUT)
            appliance.roots.clear()  # the appliance lost its inventory
            write(Path(vm.root) / "a.txt", b"a")
            assert await shim.wait_idle(IDLE_TIMEOUT)

        try:
            await with_shim(shim, body)
        finally:
            await appliance.stop()
        assert appliance.registers.count(("vm", None)) == 2

    run(scenario())
    assert verdicts.status("vm", "a.txt") == "clean"


def test_cli_prints_infected_and_stats_and_stops_on_sigterm(
    tmp_path: Path, sock: str, capsys: pytest.CaptureFixture[str]
) -> None:
    vm = make_vm(tmp_path / "vms", "vm7")
    write(Path(vm.root) / "bad" / "eicar.com", EICAR)
    write(Path(vm.root) / "good.txt", b"fine")
    parser = argparse.ArgumentParser()
    add_shim_arguments(parser)
    args = parser.parse_args(["--appliance", sock, "--vm", f"vm7={vm.root}"])
    assert args.vms == [VMSpec("vm7", vm.root)] and args.content == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--appliance", sock, "--vm", "nodir"])

    async def scenario() -> int:
        appliance = StandIn(sock)
        await appliance.start()
        try:
            task = asyncio.create_task(run_shim_cli(args))
            await wait_for(lambda: len(appliance.scans) == 2)
            await asyncio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            return await task
        finally:
            await appliance.stop()

    assert run(scenario()) == 0
    out, err = capsys.readouterr()
    assert out == "vm7:bad/eicar.com: Eicar-Test-Signature FOUND\n"
    assert "verdicts=2" in err and "infected=1" in err


# -------------------------------------------------------------------- against the real appliance


def test_against_real_appliance(tmp_path: Path) -> None:
    sock_path = str(tmp_path / "real.sock")
    vm = make_vm(tmp_path / "vms", "vm", files=20)
    write(Path(vm.root) / "x" / "eicar.com", EICAR)
    verdicts = Verdicts()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offscan",
            "serve",
            "--socket",
            sock_path,
            "--state",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        async def scenario() -> None:
            shim = Shim(sock_path, [vm], on_verdict=verdicts, reconnect_max_delay=0.2)

            async def body() -> None:
                # The appliance loads its patterns first: slow on a busy shared CI core.
                await wait_for(lambda: shim.connected, timeout=40)
                assert await shim.wait_idle(IDLE_TIMEOUT)
                write(Path(vm.root) / "live" / "eicar2.com", EICAR)
                write(Path(vm.root) / "live" / "clean.txt", b"nothing to see")
                assert await shim.wait_idle(IDLE_TIMEOUT), repr(shim.stats())

            await with_shim(shim, body)

        run(scenario(), timeout=60)
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert len(verdicts.by_path) == 23, err.decode(errors="replace")[-2000:]
    assert verdicts.status("vm", "x/eicar.com") == "infected"
    assert verdicts.status("vm", "live/eicar2.com") == "infected"
    assert verdicts.status("vm", "live/clean.txt") == "clean"
    assert verdicts.status("vm", "d0/f0.txt") == "clean"


def test_watchdog_shutdown_race_is_not_reported(caplog: pytest.LogCaptureFixture) -> None:
    """watchdog logs an emitter reading one last event while its observer stops as an error;
    nothing is lost, so the shim keeps it off the user's terminal, and only that message."""
    import logging

    import offscan.shim.watch  # noqa: F401  (installs the filter)

    log = logging.getLogger("watchdog.observers.inotify")
    with caplog.at_level(logging.ERROR, logger="watchdog"):
        log.error("InotifyEmitter.queue_events() called when the thread is inactive")
        log.error("some other watchdog error")
    assert [r.getMessage() for r in caplog.records] == ["some other watchdog error"]
