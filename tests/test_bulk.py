"""New content in bulk (offscan.appliance.bulk): one pool job per group, descriptors closed by
the job that read them (none leaks, whatever fails), single-flight across jobs and the event
loop, and the clean verdicts' encodings byte-identical to the slow path's."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import EICAR, ApplianceProc, run_async
from test_pipeline import (
    EICAR_SIG,
    NEW_MARKER,
    NEW_SIG,
    OLD_SIG,
    SHIM,
    VM,
    CountingMatcher,
    Rig,
    make_db,
)

from offscan import ScanResult
from offscan.appliance import Engine, Revalidation, bulk
from offscan.appliance.bulk import NewFile, judge_new
from offscan.appliance.fastpath import Tail, VerdictCodec
from offscan.protocol import ApplianceClient


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _open_new(rig: Rig, name: str, data: bytes | None = None) -> NewFile:
    if data is not None:
        rig.write(name, data)
    fd = os.open(rig.root / name, os.O_RDONLY)
    return NewFile(rig.registry.owned(SHIM, VM), name, fd, os.fstat(fd), 0)


class GatedMatcher(CountingMatcher):
    """Holds every scan until ``go`` is set (to keep a bulk job busy); counts them."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.go = threading.Event()
        self.started = threading.Event()

    def scan_fd(self, fd: int, **kwargs: Any) -> ScanResult:
        self.started.set()
        assert self.go.wait(10)
        return super().scan_fd(fd, **kwargs)

    def scan_bytes(self, data: Any, **kwargs: Any) -> ScanResult:
        self.started.set()
        assert self.go.wait(10)
        self.read_inodes.append(-1)  # matched from the bytes the digest read
        return super().scan_bytes(data, **kwargs)


def test_clean_scan_tail_encodes_as_tail(tmp_path: Path) -> None:
    res = ScanResult("p", "clean", (), size=3)
    digest = bytes(range(32))
    fast = bulk._scan_tail(res, digest, 'v1 "q"')
    assert type(fast) is bulk._CleanScanTail
    slow = Tail(dict(fast.record))
    for name in ("fields", "msgpack", "json", "item_head", "frame_head", "record"):
        assert getattr(fast, name) == getattr(slow, name), name
    codec = VerdictCodec()
    item = msgpack.unpackb(codec.item(7, "vm", "a/b", fast))
    assert item == {"id": 7, "vm": "vm", "path": "a/b", **slow.record}
    line = json.loads(codec.event_line(1.5, "vm", "a/b", fast, 0.25))
    assert line["digest"] == digest.hex() and line["pattern_version"] == 'v1 "q"'
    # anything else (a reason, a match) takes the generic Tail
    assert type(bulk._scan_tail(ScanResult("p", "clean", reason="x"), digest, "v1")) is Tail


def test_no_descriptor_leaks_whatever_fails(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = Rig(tmp_path, CountingMatcher(make_db(EICAR_SIG)))
    rigs.append(rig)
    fifo = rig.root / "fifo"
    os.mkfifo(fifo)
    (rig.root / "dir").mkdir()
    before = _fds()
    files = [_open_new(rig, f"f{i}", b"content %d" % (i % 3) * 100) for i in range(20)]
    files.append(_open_new(rig, "eicar", EICAR))
    gone = _open_new(rig, "gone", b"vanishing")
    os.unlink(rig.root / "gone")  # vanished after it was opened: still read through the fd
    files.append(gone)
    pipe = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    files.append(NewFile(files[0].vm, "fifo", pipe, os.fstat(pipe), 0))
    d = os.open(rig.root / "dir", os.O_RDONLY)
    files.append(NewFile(files[0].vm, "dir", d, os.fstat(files[1].fd), 0))  # read: EISDIR
    wonly = os.open(rig.root / "f1", os.O_WRONLY)  # not readable: EBADF on read
    files.append(NewFile(files[0].vm, "wonly", wonly, os.fstat(wonly), 0))
    assert len(_fds() - before) == len(files)
    results = asyncio.run(judge_new(rig.pipeline, files, 0.0, VerdictCodec()))
    assert _fds() == before  # every descriptor closed, by the job that read it
    assert all(f.fd == -1 for f in files)
    assert [type(r) for r in results[:20]] == [bulk._CleanScanTail] * 20
    assert isinstance(results[20], dict) and results[20]["status"] == "infected"
    assert isinstance(results[21], Tail)  # the unlinked file's content was read
    for r in results[22:]:
        assert isinstance(r, dict) and r["status"] == "error", r
    assert rig.counters.contents_matched == 5  # 3 contents, EICAR, the unlinked one
    assert rig.counters.verdicts == len(files)


def test_pending_revalidation_hands_the_descriptor_back(tmp_path: Path, rigs: list[Rig]) -> None:
    rig = Rig(tmp_path, CountingMatcher(make_db(OLD_SIG)), version="v1")
    rigs.append(rig)
    rig.write("carrier", b"prefix " + NEW_MARKER + b" suffix" * 100)
    asyncio.run(rig.scan("carrier"))  # cached under v1
    full = CountingMatcher(make_db(OLD_SIG, NEW_SIG))
    delta = CountingMatcher(make_db(NEW_SIG))
    rig.patterns.engine = Engine(full, "v2", full.db, Revalidation("v1", delta, frozenset()))
    os.utime(rig.root / "carrier", ns=(1, 1))  # a new identity, the same content
    before = _fds()
    files = [_open_new(rig, "carrier")]
    results = asyncio.run(judge_new(rig.pipeline, files, 0.0, VerdictCodec()))
    assert files[0].fd >= 0  # handed back for Pipeline.judge: the caller closes it
    os.close(files[0].fd)
    assert _fds() == before
    got = results[0]
    assert isinstance(got, dict) and got["status"] == "infected", got
    assert got["source"] == "revalidated" and full.read_inodes == []  # by the delta only
    assert len(delta.read_inodes) == 1


def test_cancelled_while_the_job_runs_closes_every_descriptor(
    tmp_path: Path, rigs: list[Rig]
) -> None:
    matcher = GatedMatcher(make_db(EICAR_SIG))
    rig = Rig(tmp_path, matcher)
    rigs.append(rig)
    before = _fds()

    async def main() -> None:
        files = [_open_new(rig, f"f{i}", b"x%d" % i * 50) for i in range(10)]
        task = asyncio.create_task(judge_new(rig.pipeline, files, 0.0, VerdictCodec()))
        while not matcher.started.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert all(f.fd == -1 for f in files)  # the job owns them now
        matcher.go.set()

    asyncio.run(main())
    rig.pool.shutdown(wait=True)  # the job finished: it closed what it read
    assert _fds() == before


def test_a_content_matched_in_a_job_is_joined_by_a_single_scan(
    tmp_path: Path, rigs: list[Rig]
) -> None:
    matcher = GatedMatcher(make_db(EICAR_SIG))
    rig = Rig(tmp_path, matcher)
    rigs.append(rig)
    shared = os.urandom(5000)
    rig.write("copy", shared)

    async def main() -> tuple[list[Any], dict[str, Any]]:
        files = [_open_new(rig, "a", shared)]
        bulk_task = asyncio.create_task(judge_new(rig.pipeline, files, 0.0, VerdictCodec()))
        while not matcher.started.is_set():
            await asyncio.sleep(0.001)
        single = asyncio.create_task(rig.scan("copy"))  # same content, while the job matches
        for _ in range(50):
            await asyncio.sleep(0.002)
        matcher.go.set()
        return await bulk_task, await single

    results, single = asyncio.run(main())
    assert isinstance(results[0], Tail) and single["status"] == "clean"
    assert len(matcher.read_inodes) == 1  # matched once, by the job
    assert rig.counters.contents_matched == 1
    assert rig.counters.joined_in_flight == 1


def test_the_same_content_in_two_jobs_is_matched_once(tmp_path: Path, rigs: list[Rig]) -> None:
    matcher = GatedMatcher(make_db(EICAR_SIG))
    rig = Rig(tmp_path, matcher)  # a gate of 2: two groups run at once
    rigs.append(rig)
    shared = os.urandom(5000)
    files = [_open_new(rig, f"c{i}", shared) for i in range(2 * bulk.GROUP_FILES)]

    async def main() -> list[Any]:
        task = asyncio.create_task(judge_new(rig.pipeline, files, 0.0, VerdictCodec()))
        while not matcher.started.is_set():
            await asyncio.sleep(0.001)
        for _ in range(50):
            await asyncio.sleep(0.002)
        matcher.go.set()
        return await task

    results = asyncio.run(main())
    assert all(not isinstance(r, BaseException) for r in results)
    assert rig.counters.contents_matched == 1
    assert rig.counters.joined_in_flight == len(files) - 1
    assert rig.counters.verdicts == len(files)


def test_serve_leaks_no_descriptor_on_a_mixed_batch(tmp_path: Path) -> None:
    root = tmp_path / "vm"
    root.mkdir()
    for i in range(60):
        (root / f"f{i}").write_bytes(b"body %d\n" % i * 100)
    os.mkfifo(root / "fifo")
    (root / "locked").write_bytes(b"locked")
    os.chmod(root / "locked", 0)
    (root / "eicar").write_bytes(EICAR)
    a = ApplianceProc(tmp_path)
    proc_fd = Path(f"/proc/{a.p.pid}/fd")
    try:

        async def main() -> tuple[list[Any], int, int]:
            c = ApplianceClient(str(a.sock), shim_id="leak")
            await c.connect()
            try:
                await c.register("vm", str(root))
                await c.scan_batch([("vm", "f0", "access", None)])  # warm: logs opened
                n0 = len(os.listdir(proc_fd))
                names = [f"f{i}" for i in range(1, 60)] + ["fifo", "locked", "gone", "eicar"]
                got = await c.scan_batch([("vm", n, "access", None) for n in names])
                return got, n0, len(os.listdir(proc_fd))
            finally:
                await c.close()

        got, n0, n1 = run_async(main)
    finally:
        os.chmod(root / "locked", stat.S_IRUSR)
        a.stop()
    assert n1 == n0
    assert all(not isinstance(v, Exception) and v["status"] == "clean" for v in got[:59])
    assert not isinstance(got[-1], Exception) and got[-1]["status"] == "infected"


def test_a_failed_job_answers_each_scan_and_closes_everything(
    tmp_path: Path, rigs: list[Rig]
) -> None:
    rig = Rig(tmp_path, CountingMatcher(make_db(EICAR_SIG)))
    rigs.append(rig)
    rig.cache.close()  # puts now fail: the job raises after matching
    before = _fds()
    files = [_open_new(rig, f"f{i}", b"y%d" % i * 40) for i in range(5)]
    results = asyncio.run(judge_new(rig.pipeline, files, 0.0, VerdictCodec()))
    assert _fds() == before
    assert all(isinstance(r, RuntimeError) and "closed" in str(r) for r in results), results
