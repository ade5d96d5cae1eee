"""scan-batch / verdict-batch through a real appliance: every scan of a batch gets the verdict
a single scan would, credits hold per scan, a verdict is logged before it is sent, bad batches
are refused, and the shim batches what is ready."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import EICAR, ApplianceProc, run_async

from offscan import protocol as P
from offscan.appliance.session import Session
from offscan.protocol import ApplianceClient, RequestError
from offscan.shim import Shim, VMSpec


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[ApplianceProc]:
    policy = tmp_path / "policy.toml"
    policy.write_text('[default]\nactions = ["quarantine", "deny"]\nexclude_ext = ["iso"]\n')
    a = ApplianceProc(tmp_path, "--policies", str(policy))
    yield a
    a.stop()


def _vm(tmp_path: Path, files: int = 40) -> Path:
    root = tmp_path / "vm"
    (root / "d").mkdir(parents=True)
    for i in range(files):
        (root / "d" / f"f{i}.txt").write_bytes(b"content %d\n" % i * 50)
    (root / "same1.bin").write_bytes(b"shared" * 100)
    (root / "same2.bin").write_bytes(b"shared" * 100)
    (root / "disk.iso").write_bytes(b"excluded by extension")
    (root / "eicar.com").write_bytes(EICAR)
    (root / "outside").symlink_to("/etc/passwd")
    return root


def _strip(v: dict[str, Any]) -> dict[str, Any]:
    return {k: v[k] for k in ("vm", "path", "status", "matches", "digest", "action")}


def test_batch_gives_each_scan_its_own_verdict(appliance: ApplianceProc, tmp_path: Path) -> None:
    root = _vm(tmp_path)
    names = [f"d/f{i}.txt" for i in range(40)] + ["same1.bin", "same2.bin"]
    odd = ["disk.iso", "eicar.com", "outside", "gone.txt", "../escape"]

    async def main() -> dict[str, Any]:
        c = ApplianceClient(str(appliance.sock), shim_id="t")
        welcome = await c.connect()
        try:
            assert welcome["batch"] and c.batch_limit == welcome["batch"]
            await c.register("vm", str(root))
            credits = c.credits
            first = await c.scan_batch([("vm", n, "access", None) for n in names + odd])
            again = await c.scan_batch([("vm", n, "demand", None) for n in names])
            singles = [await c.scan_path("vm", n) for n in names]
            other = await c.scan_batch([("ghost", "x", "access", None)])
            assert c.credits == credits  # every scan returned its credit
            return {"first": first, "again": again, "singles": singles, "other": other}
        finally:
            await c.close()

    got = run_async(main)
    first = got["first"]
    for v in first[: len(names)]:
        assert not isinstance(v, Exception) and v["status"] == "clean", v
    assert {v["source"] for v in first[:40]} == {"scan"}  # type: ignore[index]
    iso, eicar, link, gone, escape = first[len(names) :]
    assert not isinstance(iso, Exception) and iso["source"] == "excluded"
    assert not isinstance(eicar, Exception) and eicar["status"] == "infected"
    assert eicar["action"] == "deny" and eicar["quarantine_id"]
    assert isinstance(link, RequestError) and link.code == "confined"
    assert not isinstance(gone, Exception) and gone["status"] == "error"
    assert isinstance(escape, RequestError) and escape.code == "confined"
    # The second time round every file is a cache hit, answered on the fast path; the
    # verdicts are the ones single scans get.
    assert {v["source"] for v in got["again"]} == {"identity"}  # type: ignore[index]
    assert [_strip(v) for v in got["again"]] == [_strip(v) for v in got["singles"]]  # type: ignore[arg-type]
    assert [v["id"] for v in got["again"]] != [v["id"] for v in got["singles"]]  # type: ignore[index]
    (unknown,) = got["other"]
    assert isinstance(unknown, RequestError) and unknown.code == "unknown-vm"
    for v in first + got["again"]:
        if not isinstance(v, Exception):
            P.validate(v)


def test_batch_verdicts_are_logged_before_they_are_sent(
    appliance: ApplianceProc, tmp_path: Path
) -> None:
    """A verdict counts as logged when its event line reached the OS, which happens before
    the reply leaves: reading the log right after each reply finds every verdict in it, even
    when the appliance is killed at once."""
    root = _vm(tmp_path)
    names = [f"d/f{i}.txt" for i in range(40)]
    log = appliance.state / "events.jsonl"

    def logged() -> list[tuple[str, str]]:
        return [
            (e["path"], e["source"])
            for e in map(json.loads, log.read_text().splitlines())
            if e["event"] == "verdict"
        ]

    async def main() -> list[list[tuple[str, str]]]:
        c = ApplianceClient(str(appliance.sock), shim_id="t")
        await c.connect()
        seen = []
        try:
            await c.register("vm", str(root))
            for _ in range(3):
                got = await c.scan_batch([("vm", n, "access", None) for n in names])
                lines = logged()
                for v in got:
                    assert not isinstance(v, Exception)
                    assert (v["path"], v["source"]) in lines
                seen.append(lines)
        finally:
            appliance.kill9()
            await c.close()
        return seen

    seen = run_async(main)
    assert [len(s) for s in seen] == [40, 80, 120]
    assert [src for _, src in seen[-1]].count("identity") == 80
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(events) == 120  # nothing torn, nothing doubled by the group commits


def test_batch_with_descriptors(appliance: ApplianceProc, tmp_path: Path) -> None:
    root = _vm(tmp_path)

    async def main() -> list[Any]:
        c = ApplianceClient(str(appliance.sock), shim_id="t")
        await c.connect()
        fds = [os.open(root / "d" / f"f{i}.txt", os.O_RDONLY) for i in range(12)]
        try:
            await c.register("vm", str(root))
            items: list[P.BatchItem] = [
                ("vm", f"d/f{i}.txt", "access", fd) for i, fd in enumerate(fds)
            ]
            items.insert(3, ("vm", "eicar.com", "access", None))
            first = await c.scan_batch(items)
            return first + await c.scan_batch(items)
        finally:
            for fd in fds:
                os.close(fd)  # still ours: the appliance closed its copies
            await c.close()

    got = run_async(main)
    assert len(got) == 26
    for i, v in enumerate(got):
        assert not isinstance(v, Exception)
        if v["path"] == "eicar.com":  # quarantined the first time: gone the second
            assert v["status"] == ("infected" if i < 13 else "error")
        else:
            assert v["status"] == "clean"
    assert {v["source"] for v in got[13:] if v["path"] != "eicar.com"} == {"identity"}  # type: ignore[index]


def _raw(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    s.settimeout(20)
    return s


def _send(s: socket.socket, msg: dict[str, Any]) -> None:
    s.sendall(P.pack(msg))


def _recv(s: socket.socket) -> dict[str, Any]:
    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    (size,) = P.HEADER.unpack(exactly(4))
    return P.unpack(exactly(size))


def _hello(s: socket.socket, root: Path) -> dict[str, Any]:
    _send(s, {"t": "hello", "v": 1, "shim": "raw"})
    welcome = _recv(s)
    _send(s, {"t": "register", "id": 1, "vm": "vm", "root": str(root)})
    assert _recv(s)["t"] == "ok"
    return welcome


def _refused_fatally(s: socket.socket, code: str) -> None:
    """A connection-level error frame with ``code``, then the appliance closes."""
    reply = _recv(s)
    assert reply["t"] == "error" and reply["code"] == code and reply.get("id") is None
    with pytest.raises((EOFError, ConnectionError)):
        _recv(s)


def _frames_at_once(s: socket.socket, batches: list[list[dict[str, Any]]]) -> None:
    """Several scan-batch frames in one write: the appliance reads them together."""
    data = b""
    for scans in batches:
        payload = P.framing.msgpack.packb({"t": "scan-batch", "scans": scans})
        data += P.HEADER.pack(len(payload)) + payload
    s.sendall(data)


@pytest.mark.parametrize(
    "what, code",
    [("too many", "backpressure"), ("duplicate", "sequence"), ("stream", "malformed")],
)
def test_bad_batches_are_refused(
    appliance: ApplianceProc, tmp_path: Path, what: str, code: str
) -> None:
    root = _vm(tmp_path)
    s = _raw(appliance.sock)
    try:
        credits = _hello(s, root)["credits"]
        scan = {"vm": "vm", "path": "d/f1.txt", "mode": "path"}
        if what == "too many":
            scans = [{**scan, "id": 10 + i} for i in range(credits + 1)]
        elif what == "duplicate":
            scans = [{**scan, "id": 7}, {**scan, "id": 7}]
        else:
            scans = [{**scan, "id": 7, "mode": "stream", "size": 3}]
        _frames_at_once(s, [scans])
        _refused_fatally(s, code)
    finally:
        s.close()
    # the appliance keeps serving others
    assert run_async(_one_scan(appliance, root))["status"] == "clean"


def _verdicts_until(s: socket.socket, ids: set[int]) -> tuple[dict[int, dict[str, Any]], int]:
    """The verdicts for ``ids`` (each once) and how many verdict-batch frames held them."""
    got: dict[int, dict[str, Any]] = {}
    frames = 0
    while len(got) < len(ids):
        reply = _recv(s)
        assert reply["t"] == "verdict-batch", reply
        frames += 1
        for v in reply["verdicts"]:
            assert v["id"] in ids and v["id"] not in got, v["id"]
            got[v["id"]] = v
    return got, frames


def test_batches_that_arrive_together_are_answered_together(
    appliance: ApplianceProc, tmp_path: Path
) -> None:
    """Four frames of cache hits read at once are served in one pass: every scan answered
    once, with the verdict it would get alone, in fewer reply frames than request frames."""
    root = _vm(tmp_path)
    names = [f"d/f{i}.txt" for i in range(40)]
    s = _raw(appliance.sock)
    try:
        _hello(s, root)
        first = [
            {"id": 100 + i, "vm": "vm", "path": n, "mode": "path"} for i, n in enumerate(names)
        ]
        _frames_at_once(s, [first])  # learnt: from now on identity-memo hits
        primed, _ = _verdicts_until(s, {scan["id"] for scan in first})
        batches = [
            [
                {"id": 1000 * (k + 1) + i, "vm": "vm", "path": names[i % 40], "mode": "path"}
                for i in range(64)
            ]
            for k in range(4)
        ]
        _frames_at_once(s, batches)
        got, frames = _verdicts_until(s, {scan["id"] for b in batches for scan in b})
    finally:
        s.close()
    assert frames < len(batches)
    by_path = {v["path"]: v for v in primed.values()}
    for b in batches:
        for scan in b:
            v = got[scan["id"]]
            assert v["source"] == "identity" and v["status"] == "clean"
            assert (v["path"], v["digest"]) == (scan["path"], by_path[scan["path"]]["digest"])


@pytest.mark.parametrize("what, code", [("too many", "backpressure"), ("duplicate", "sequence")])
def test_credits_hold_across_batches_that_arrive_together(
    appliance: ApplianceProc, tmp_path: Path, what: str, code: str
) -> None:
    """A frame sent while the scans of the frames before it were unanswered counts them:
    together over the credits (or reusing one of their ids) is refused, fatally, after the
    cache hits of the frames before it were answered."""
    root = _vm(tmp_path)
    s = _raw(appliance.sock)
    try:
        credits = _hello(s, root)["credits"]
        scan = {"vm": "vm", "path": "d/f1.txt", "mode": "path"}
        _frames_at_once(s, [[{**scan, "id": 1}]])  # learnt: the scans below are hits
        _verdicts_until(s, {1})
        fits = [{**scan, "id": 10 + i} for i in range(credits - 4)]
        if what == "too many":
            over = [{**scan, "id": 10_000 + i} for i in range(8)]
        else:
            over = [{**scan, "id": 10}]
        _frames_at_once(s, [fits, over])
        got, _ = _verdicts_until(s, {x["id"] for x in fits})
        assert {v["status"] for v in got.values()} == {"clean"}
        _refused_fatally(s, code)
    finally:
        s.close()


def test_answered_scans_hold_no_credit() -> None:
    """A scan task that is done holds no credit even before its done callback forgot it
    (the client may already have used the credit again)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done, running = loop.create_future(), loop.create_future()
        done.set_result(None)
        session = Session.__new__(Session)  # only what over_credits reads
        session.app = SimpleNamespace(config=SimpleNamespace(credits=4))  # type: ignore[assignment]
        session.inflight = {1: done, 2: done, 3: running}  # type: ignore[dict-item]
        assert not session.over_credits(3)  # one holds a credit, 3 more: 4
        assert session.over_credits(4)
        session.inflight = {1: running}  # type: ignore[dict-item]
        assert not session.over_credits(3) and session.over_credits(4)
        running.cancel()

    asyncio.run(main())


async def _one_scan(appliance: ApplianceProc, root: Path) -> dict[str, Any]:
    c = ApplianceClient(str(appliance.sock), shim_id="after")
    await c.connect()
    try:
        await c.register("vm2", str(root))
        return dict(await c.scan_path("vm2", "d/f2.txt"))
    finally:
        await c.close()


def test_validation_of_batch_frames() -> None:
    good = {"t": "scan-batch", "scans": [{"id": 1, "vm": "v", "path": "a", "mode": "path"}]}
    P.validate(good)
    bad_items: list[Any] = [
        [],
        [{"id": 1, "vm": "v", "path": "a"}],
        [{"id": -1, "vm": "v", "path": "a", "mode": "path"}],
        [{"id": 1, "vm": "", "path": "a", "mode": "path"}],
        [{"id": 1, "vm": "v", "path": "a\x00b", "mode": "path"}],
        [{"id": 1, "vm": "v", "path": "a", "mode": "path", "prio": "urgent"}],
        [{"id": True, "vm": "v", "path": "a", "mode": "path"}],
        ["not a map"],
    ]
    for scans in bad_items:
        with pytest.raises(P.ProtocolError) as ei:
            P.validate({"t": "scan-batch", "scans": scans})
        assert ei.value.code == "malformed", scans
    with pytest.raises(P.ProtocolError) as ei:
        P.validate({"t": "scan-batch", "scans": good["scans"] * (P.MAX_BATCH + 1)})
    assert ei.value.code == "oversized"
    fd_scan = {"id": 2, "vm": "v", "path": "b", "mode": "fd"}
    with pytest.raises(P.ProtocolError):  # an fd scan without its descriptor
        P.validate({"t": "scan-batch", "scans": [fd_scan]})
    P.validate({"t": "scan-batch", "scans": [fd_scan], "fds": 1})
    with pytest.raises(P.ProtocolError):  # a descriptor nobody claims
        P.validate({**good, "fds": 1})
    verdict = {"id": 1, "vm": "v", "path": "a", "status": "clean", "action": "allow"}
    P.validate({"t": "verdict-batch", "verdicts": [verdict, {**verdict, "quarantine_id": "q"}]})
    for bad in ({**verdict, "status": "fine"}, {**verdict, "source": "shim"}, {"id": 1}):
        with pytest.raises(P.ProtocolError):
            P.validate({"t": "verdict-batch", "verdicts": [bad]})


def test_shim_batches_ready_events(appliance: ApplianceProc, tmp_path: Path) -> None:
    root = _vm(tmp_path, files=300)
    got: dict[str, str] = {}

    async def main() -> dict[str, Any]:
        shim = Shim(
            str(appliance.sock),
            [VMSpec("vm", str(root))],
            shim_id="batcher",
            quiet=0.05,
            on_verdict=lambda vm, path, v: got.__setitem__(path, v["status"]),
        )
        runner = asyncio.create_task(shim.run())
        try:
            assert await shim.wait_idle(60)
            return dict(shim._sender.counts)
        finally:
            shim.stop()
            await runner

    stats = run_async(main, timeout=90)
    files = {f"d/f{i}.txt" for i in range(300)} | {"same1.bin", "same2.bin", "eicar.com"}
    assert files <= set(got) and got["eicar.com"] == "infected"
    assert all(got[f] == "clean" for f in files - {"eicar.com"})
    assert stats["batches"] >= 1 and stats["batched"] > stats["batches"]
    assert "outside" not in got  # a symlink: never sent
    assert stats["errors"] == 0


def test_lookups_are_grouped_by_root_and_answered_in_job_order() -> None:
    """_by_root: one call per root (one root: one call, no grouping), results back in job
    order, None where a path failed or its root could not be opened."""
    from offscan.appliance.batch import _by_root

    calls: list[tuple[str, list[str]]] = []

    def many(root: str, paths: list[str], *, strict_root: bool) -> list[Any]:
        assert strict_root
        calls.append((root, paths))
        if root == "/gone":
            raise FileNotFoundError(root)
        return [OSError(p) if p.startswith("bad") else f"{root}:{p}" for p in paths]

    assert _by_root([("/a", "x"), ("/a", "bad"), ("/a", "y")], many) == ["/a:x", None, "/a:y"]
    assert calls == [("/a", ["x", "bad", "y"])]
    calls.clear()
    jobs = [("/a", "x"), ("/b", "y"), ("/gone", "z"), ("/a", "bad"), ("/b", "w")]
    assert _by_root(jobs, many) == ["/a:x", "/b:y", None, None, "/b:w"]
    assert sorted(calls) == [("/a", ["x", "bad"]), ("/b", ["y", "w"]), ("/gone", ["z"])]
    assert _by_root([("/gone", "z")], many) == [None]
