"""The event path's parts: fast-path encodings equal the slow path's, the appliance under
uvloop and under the stdlib loop, new content in bulk matched once per content, the
inventory's change log (and its compaction), the verdict log's group commit, batch lookups
equal single ones, and the client's check of the scans it packs."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import EICAR, ApplianceProc, run, run_async

from offscan import eventloop
from offscan.appliance import inventory as inv
from offscan.appliance.fastpath import VerdictCodec, batch_frame, encode_item
from offscan.appliance.inventory import Inventory
from offscan.appliance.registry import Registry
from offscan.cache import CachedVerdict, Identity, IdentityMemo, VerdictCache
from offscan.protocol import ApplianceClient, ProtocolError, admin_socket_for, unpack, validate
from offscan.protocol.validation import check_scan_items

DIGEST = bytes(range(32))


def test_fast_path_encodings_equal_the_slow_ones() -> None:
    codec = VerdictCodec()
    cached = CachedVerdict("clean", (), "sha256:v1", DIGEST, 4096, 0.0)
    for source in ("identity", "clone"):
        tail = codec.tail(cached, source)  # type: ignore[arg-type]
        record = {
            "vm": "vm-ü",
            "path": 'dir/"quoted" ünïcode\n.txt',
            "status": "clean",
            "matches": [],
            "reason": None,
            "action": "allow",
            "source": source,
            "digest": DIGEST.hex(),
            "pattern_version": "sha256:v1",
        }
        item = codec.item(12345678901, record["vm"], record["path"], tail)
        assert msgpack.unpackb(item) == {"id": 12345678901, **record}
        assert item == msgpack.packb({"id": 12345678901, **record}, use_bin_type=True)
        line = codec.event_line(1.5e9, record["vm"], record["path"], tail, 0.0012345)
        event = {"time": 1.5e9, "event": "verdict", **record, "latency_ms": 1.234}
        assert line == json.dumps(event, separators=(",", ":")) + "\n"
        assert codec.lines(1.5e9, 0.0012345)(record["vm"], record["path"], tail) == line
        single = codec.frame(7, record["vm"], record["path"], tail)
        assert single == msgpack.packb({"t": "verdict", "id": 7, **record}, use_bin_type=True)
        frame = batch_frame([item] * 20)
        assert unpack(frame)["verdicts"] == [{"id": 12345678901, **record}] * 20
        # a batch of hits in one call: the same bytes and lines, fresh codec or not
        for fresh in (VerdictCodec(), codec):
            mine = fresh.tail(cached, source)
            row = (12345678901, mine, fresh.where(record["vm"], record["path"]))
            other = (7, mine, fresh.where("vm2", "f"))
            out: list[bytes] = []
            lines: list[str] = []
            fresh.hits([row, other, row], out, lines, 1.5e9, 0.0012345)
            line2 = codec.event_line(1.5e9, "vm2", "f", tail, 0.0012345)
            assert out == [item, codec.item(7, "vm2", "f", tail), item]
            assert lines == [line, line2, line]
            frames: list[bytes] = []
            fresh.hits([other, row], frames, None, 0.0, 0.0, frames=True)
            assert frames == [
                codec.frame(7, "vm2", "f", tail),
                codec.frame(12345678901, record["vm"], record["path"], tail),
            ]
    assert unpack(batch_frame([encode_item({"id": 1, **record})]))["t"] == "verdict-batch"  # type: ignore[typeddict-item]


def test_appliance_serves_under_each_event_loop(tmp_path: Path, loop: str) -> None:
    root = tmp_path / "vm"
    root.mkdir()
    for i in range(30):
        (root / f"f{i}").write_bytes(b"file %d\n" % i * 100)
    (root / "eicar.com").write_bytes(EICAR)
    a = ApplianceProc(tmp_path, "--loop", loop)
    try:

        async def main() -> list[Any]:
            c = ApplianceClient(str(a.sock), shim_id="loops")
            await c.connect()
            try:
                await c.register("vm", str(root))
                batch = await c.scan_batch([("vm", f"f{i}", "access", None) for i in range(30)])
                again = await c.scan_batch([("vm", f"f{i}", "access", None) for i in range(30)])
                one = await c.scan_path("vm", "eicar.com")
                with (root / "f1").open("rb") as f:
                    streamed = await c.scan_stream("vm", "f1", f)
                return [batch, again, one, streamed]
            finally:
                await c.close()

        batch, again, one, streamed = run_async(main)
    finally:
        a.stop()
    assert f"event loop {loop}" in a.output()
    assert [v["source"] for v in batch] == ["scan"] * 30
    assert [v["source"] for v in again] == ["identity"] * 30
    assert one["status"] == "infected" and streamed["status"] == "clean"


def test_unknown_event_loop_is_a_one_line_error() -> None:
    with pytest.raises(eventloop.EventLoopError):
        eventloop.loop_factory("tokio")
    assert eventloop.loop_factory("asyncio") is None
    out = run("serve", "--socket", "/nonexistent/x.sock", "--loop", "tokio")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    assert "Traceback" not in out.stderr


def test_new_content_of_a_batch_is_matched_once_per_content(tmp_path: Path) -> None:
    root = tmp_path / "vm"
    root.mkdir()
    for i in range(40):  # 40 files, 4 contents
        (root / f"f{i}").write_bytes(b"content %d\n" % (i % 4) * 300)
    a = ApplianceProc(tmp_path)
    try:

        async def main() -> tuple[list[Any], dict[str, Any]]:
            c = ApplianceClient(str(a.sock), shim_id="bulk")
            await c.connect()
            try:
                await c.register("vm", str(root))
                got = await c.scan_batch([("vm", f"f{i}", "demand", None) for i in range(40)])
                return got, dict(await c.status())
            finally:
                await c.close()

        got, st = run_async(main)
    finally:
        a.stop()
    assert all(not isinstance(v, Exception) and v["status"] == "clean" for v in got)
    assert st["contents_matched"] == 4
    assert st["served_digest"] + st["joined_in_flight"] == 36
    assert st["verdicts"] == 40
    assert len({v["digest"] for v in got}) == 4  # type: ignore[index]


def _registry(path: Path) -> Registry:
    return Registry(Inventory(path))


def test_inventory_appends_one_line_per_registration(tmp_path: Path) -> None:
    path = tmp_path / "inventory.json"
    reg = _registry(path)
    for i in range(50):
        (tmp_path / f"r{i}").mkdir()
        reg.register("shim", f"vm{i}", str(tmp_path / f"r{i}"), {}, None)
    reg.register("shim", "clone", str(tmp_path / "r1"), {}, "vm0")
    reg.unregister("shim", "vm3")
    log = path.with_name("inventory.log")
    assert not path.exists()  # no snapshot rewritten per registration
    assert len(log.read_text().splitlines()) == 52
    again = Inventory(path)
    assert set(again.vms) == set(reg.vms) and "vm3" not in again.vms
    assert again.vms["clone"].clone_of == "vm0"
    reg.inventory.close()
    # a crash in mid-append leaves a torn last line: it is dropped, the rest kept
    with log.open("a") as f:
        f.write('{"op": "put", "vm": {"name": "torn"')
    torn = Inventory(path)
    assert set(torn.vms) == set(reg.vms)
    torn.close()


def test_inventory_compacts_and_replay_is_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inv, "COMPACT_MIN_LINES", 10)
    path = tmp_path / "inventory.json"
    reg = _registry(path)
    root = tmp_path / "r"
    root.mkdir()
    for i in range(30):
        reg.register("shim", f"vm{i % 3}", str(root), {"max_size": 1000 + i}, None)
    assert reg.inventory.compactions >= 1 and path.exists()
    lines = path.with_name("inventory.log").read_text().splitlines()
    assert len(lines) <= 12
    state = {n: v.policy for n, v in reg.vms.items()}
    assert {n: v.policy for n, v in Inventory(path).vms.items()} == state
    # the snapshot written but the log not yet emptied (a crash between the two): same state
    log_before = path.with_name("inventory.log").read_bytes()
    reg.inventory.compact()
    path.with_name("inventory.log").write_bytes(log_before)
    assert {n: v.policy for n, v in Inventory(path).vms.items()} == state
    # a change made outside register() (an operator command) is found by save() with no names
    reg.vms["vm1"].tags = ["virus_found"]
    reg.inventory.save()
    assert Inventory(path).vms["vm1"].tags == ["virus_found"]
    reg.inventory.close()


def test_verdict_log_group_commit_survives_reopen(tmp_path: Path) -> None:
    verdicts = [CachedVerdict("clean", (), "v1", os.urandom(32), 100 + i, 0.0) for i in range(500)]
    with VerdictCache(state_dir=tmp_path) as cache:
        cache.put_many(verdicts[:1])
        cache.put_many(verdicts[1:])
        assert len(cache) == 500
    with VerdictCache(state_dir=tmp_path) as again:
        assert len(again) == 500
        assert all(again.get(v.digest, v.size, "v1") == v for v in verdicts)


def test_event_log_group_commit_without_a_loop(tmp_path: Path) -> None:
    from offscan.appliance.verdicts import EventLog

    events = EventLog(tmp_path / "events.jsonl")
    events.write({"event": "x", "n": 1})  # no running loop: written at once
    assert (tmp_path / "events.jsonl").read_text() == '{"event":"x","n":1}\n'

    async def main() -> str:
        events.write({"event": "y"})
        events.write({"event": "z"})
        before = (tmp_path / "events.jsonl").read_text()
        await asyncio.sleep(0)  # the group is committed at the end of the iteration
        await asyncio.sleep(0)
        assert events.writes == 2
        return before

    assert run_async(main).count("\n") == 1
    assert (tmp_path / "events.jsonl").read_text().count("\n") == 3
    events.close()


def test_clone_activation_is_one_step_per_clone(tmp_path: Path) -> None:
    """A clone's inherited verdicts are recorded and reported with its registration: the
    shim sends no scan for an unchanged inherited file, and a file changed since the copy is
    scanned as usual."""
    from offscan.shim import Shim, VMSpec

    master = tmp_path / "vms" / "master"
    for i in range(60):
        (master / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (master / f"d{i % 4}" / f"f{i}.txt").write_bytes(b"master file %d\n" % i * 40)
    a = ApplianceProc(tmp_path)
    got: dict[tuple[str, str], dict[str, Any]] = {}

    async def main() -> dict[str, int]:
        shim = Shim(
            str(a.sock),
            [VMSpec("master", str(master))],
            shim_id="clones",
            quiet=0.05,
            on_verdict=lambda vm, path, v: got.__setitem__((vm, path), dict(v)),
        )
        runner = asyncio.create_task(shim.run())
        try:
            assert await shim.wait_idle(60)
            op = ApplianceClient(admin_socket_for(str(a.sock)), shim_id="operator")
            await op.connect()
            try:
                made = await op.control(
                    "vm-clone", base="master", count=3, into=str(tmp_path / "vms"), prefix="c-"
                )
            finally:
                await op.close()
            changed = Path(made["clones"][1]["root"]) / "d1" / "f1.txt"
            changed.write_bytes(b"written in the clone after the copy\n")
            for c in made["clones"]:
                await shim.add_vm(VMSpec(c["name"], c["root"], clone_of="master"))
            assert await shim.wait_idle(60)
            return dict(shim._sender.counts)
        finally:
            shim.stop()
            await runner

    try:
        counts = run_async(main, timeout=120)
    finally:
        a.stop()
    names = [f"d{i % 4}/f{i}.txt" for i in range(60)]
    for clone in ("c-1", "c-2", "c-3"):
        assert all((clone, n) in got for n in names), clone
    assert got[("c-2", "d1/f1.txt")]["source"] == "scan"
    assert got[("c-1", "d1/f1.txt")]["source"] == "clone"
    # Only the changed file went as a scan (and the master's files before the clones).
    # 179, or 180 when the adopted clone's walk ran before the test changed the file (the
    # change is then seen by the watch and sent: "sent" stays 61 either way)
    assert counts["inherited"] in (3 * 60 - 1, 3 * 60)
    assert counts["sent"] == 60 + 1
    logged = {(e["vm"], e["path"]) for e in a.events() if e.get("source") == "clone"}
    assert {("c-3", n) for n in names} <= logged
    # The running shim adopts the clones as soon as they are made (issue 14), so the file
    # changed after the copy may first be logged as inherited; its last verdict is a scan.
    last = [e for e in a.events() if (e.get("vm"), e.get("path")) == ("c-2", "d1/f1.txt")]
    assert last and last[-1]["source"] == "scan"


def _ident(i: int) -> Identity:
    return Identity("local", 1, i, 100, i, i)


def test_batch_lookups_equal_one_at_a_time() -> None:
    """The hit path's batch lookups (identity memo, verdict cache, location index) give
    what lookups one at a time give: the same answers, counters and recency (an entry a
    batch touched outlives one it did not)."""
    memo, twin = IdentityMemo(max_entries=4), IdentityMemo(max_entries=4)
    for m in (memo, twin):
        for i in range(4):
            m.put(_ident(i), bytes([i]) * 32)
    asked = [_ident(0), _ident(9), _ident(2), _ident(0)]
    assert memo.get_many(asked) == [twin.get(x) for x in asked]
    assert memo.stats() == twin.stats()
    for m in (memo, twin):
        m.put(_ident(5), b"\5" * 32)  # evicts the least recently used: 1, not 0 or 2
        assert m.get(_ident(1)) is None and m.get(_ident(0)) is not None

    vs = [CachedVerdict("clean", (), "v1", bytes([i]) * 32, 10 + i, 0.0) for i in range(3)]
    cache, one = VerdictCache(max_entries=3, shards=1), VerdictCache(max_entries=3, shards=1)
    for c in (cache, one):
        for v in vs:
            c.put(v)
    keys = [(v.digest, v.size, "v1") for v in vs[:1]] + [(vs[1].digest, 99, "v1")]
    assert cache.get_many(keys) == [one.get(*k) for k in keys] == [vs[0], None]
    assert cache.stats() == one.stats()
    for c in (cache, one):
        c.put(CachedVerdict("clean", (), "v1", b"\7" * 32, 7, 0.0))  # evicts vs[1], not vs[0]
        assert c.get(vs[1].digest, vs[1].size, "v1") is None and c.get(*keys[0]) == vs[0]
    assert list(cache.entries()) == list(one.entries())

    locs, single = inv.LocationIndex(max_entries=3), inv.LocationIndex(max_entries=3)
    seen = [(b"a", ("vm", "p1"), _ident(1)), (b"b", ("vm", "p2"), _ident(2))]
    seen += [(b"a", ("vm", "p3"), _ident(3)), (b"a", ("vm", "p1"), _ident(4))]
    locs.add_many(seen)
    for digest, (vm, path), ident in seen:
        single.add(digest, vm, path, ident)
    assert len(locs) == len(single) == 3
    for digest in (b"a", b"b"):
        assert locs.get(digest) == single.get(digest)
    locs.add_many([(b"c", ("vm", "p4"), _ident(5))])  # over the bound: the oldest digest, b
    assert locs.get(b"b") == [] and len(locs.get(b"a")) == 2


@pytest.mark.parametrize(
    "item, needle",
    [
        (("", "p", "access", None), "vm"),
        (("vm", "a\0b", "access", None), "NUL"),
        (("vm", 7, "access", None), "path"),
        (("vm", "p", "urgent", None), "prio"),
        ((["vm"], "p", "access", None), "vm"),
    ],
)
def test_scan_items_are_checked_as_the_frame_would_be(
    item: tuple[Any, Any, Any, Any], needle: str
) -> None:
    """The client packs a scan-batch without validating the frame: its items' check
    refuses what validating the frame refuses, naming the field, even after good items
    with the same vm and prio; and passes what it passes."""
    good = ("vm", "dir/f.txt", "access", None)
    with pytest.raises(ProtocolError, match=needle) as exc:
        check_scan_items([good, good, item])
    assert exc.value.code == "malformed" and "scans[2]" in str(exc.value)
    scans = [{"id": 1, "vm": item[0], "path": item[1], "mode": "path", "prio": item[2]}]
    with pytest.raises(ProtocolError, match=needle):
        validate({"t": "scan-batch", "scans": scans})
    check_scan_items([good, ("vm", "other", "demand", 3), good])
