"""Hot hits (appliance/hot.py): a repeated clean hit answered by one lookup, and never once
the memo/cache chain would answer differently (a changed file, a new pattern version, an
entry lost or replaced anywhere in the chain, a link nearly full)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import ApplianceProc, run, run_async, status

from offscan.appliance.hot import ROOMY, HotHits
from offscan.appliance.inventory import LocationIndex
from offscan.cache import CachedVerdict, Identity, IdentityMemo, VerdictCache
from offscan.protocol import ApplianceClient

MARKER = b"OFFSCAN-HOT-TEST-MARKER-51c2d"


def _ident(i: int) -> Identity:
    return Identity("local", 1, i, 100, i, i)


def _verdict(i: int, version: str = "v1") -> CachedVerdict:
    return CachedVerdict("clean", (), version, bytes([i]) * 32, 100, 0.0)


def test_generations_count_what_was_lost_or_replaced() -> None:
    memo = IdentityMemo(max_entries=2)
    memo.put(_ident(1), b"\1" * 32)
    memo.put(_ident(1), b"\1" * 32)  # the same answer again: nothing changed
    assert memo.generation == 0
    memo.put(_ident(1), b"\2" * 32)  # another digest for the identity
    assert memo.generation == 1
    memo.put(_ident(2), b"\2" * 32)
    assert memo.generation == 1
    memo.put(_ident(3), b"\3" * 32)  # evicts identity 1
    assert memo.generation == 2 and memo.get(_ident(1)) is None
    memo.discard(_ident(9))  # not there: nothing lost
    assert memo.generation == 2
    memo.discard(_ident(2))
    assert memo.generation == 3

    cache = VerdictCache(max_entries=2, shards=1)
    cache.put(_verdict(1))
    cache.put(_verdict(2))
    assert cache.generation == 0
    cache.put(_verdict(2))  # replaced under the same key
    assert cache.generation == 1
    cache.put_many([_verdict(3)])  # evicts verdict 1
    assert cache.generation == 2 and cache.get(b"\1" * 32, 100, "v1") is None

    locs = LocationIndex(max_entries=2)
    locs.add_many([(b"a", ("vm", "p1"), _ident(1)), (b"a", ("vm", "p1"), _ident(1))])
    locs.add(b"b", "vm", "p2", _ident(2))
    assert locs.generation == 0
    locs.add(b"c", "vm", "p3", _ident(3))  # over the bound: digest a forgotten
    assert locs.generation == 1 and locs.get(b"a") == []


def _table(max_entries: int = 100) -> tuple[HotHits, IdentityMemo, VerdictCache, LocationIndex]:
    memo, cache, locs = IdentityMemo(max_entries=10), VerdictCache(10, shards=1), LocationIndex(10)
    return HotHits(memo, IdentityMemo(10), cache, locs, max_entries), memo, cache, locs


def test_the_epoch_changes_with_every_link_and_the_version() -> None:
    hot, memo, cache, locs = _table()
    first = hot.epoch("v1")
    assert first is not None and hot.epoch("v1") is first  # nothing changed
    memo.put(_ident(1), b"\1" * 32)
    cache.put(_verdict(1))
    locs.add(b"\1" * 32, "vm", "p", _ident(1))
    assert hot.epoch("v1") is first  # additions change no answer
    seen = [first]

    def inherited_lost() -> None:
        hot.inherited.put(_ident(2), b"\2" * 32)
        hot.inherited.discard(_ident(2))

    for change in (
        lambda: memo.discard(_ident(1)),
        inherited_lost,
        lambda: cache.put(_verdict(1)),
        lambda: locs.add_many([(bytes([i]) * 32, ("vm", f"q{i}"), _ident(i)) for i in range(11)]),
    ):
        change()
        now = hot.epoch("v1")
        assert now is not None and all(now is not old for old in seen)
        seen.append(now)
    assert hot.epoch("v2") is not seen[-1]  # a new pattern version
    assert hot.epochs == 1 + len(seen)


def test_no_epoch_while_a_link_is_nearly_full() -> None:
    hot, memo, cache, _ = _table()
    for i in range(int(ROOMY * 10)):
        memo.put(_ident(i), bytes([i]) * 32)
        cache.put(_verdict(i))
    assert hot.epoch("v1") is not None
    memo.put(_ident(99), b"\x63" * 32)  # 10 of 10: recency matters now
    assert hot.epoch("v1") is None
    hot2, _, cache2, _ = _table()
    for i in range(10):
        cache2.put(_verdict(i))
    assert hot2.epoch("v1") is None


def test_the_table_is_bounded_and_counts_as_the_chain_would() -> None:
    hot, memo, cache, _ = _table(max_entries=3)
    epoch = hot.epoch("v1")
    for i in range(3):
        hot.store(_ident(i), (epoch, None, "identity", ("vm", "p"), b"", (b"", "")))
    hot.store(_ident(1), (epoch, None, "identity", ("vm", "p"), b"", (b"", "")))
    assert len(hot.map) == 3
    hot.store(_ident(7), (epoch, None, "identity", ("vm", "p"), b"", (b"", "")))
    assert list(hot.map) == [_ident(7)]  # full: started over
    hot.count(5, 2)
    assert hot.served == 5
    assert (memo.hits, memo.misses, hot.inherited.hits) == (3, 2, 2)
    assert cache.stats()["hits"] == 5


def _scan_all(sock: Path, root: Path, names: list[str], rounds: int) -> list[list[Any]]:
    async def main() -> list[list[Any]]:
        c = ApplianceClient(str(sock), shim_id="t")
        await c.connect()
        try:
            await c.register("vm", str(root))
            got = []
            for _ in range(rounds):
                got.append(await c.scan_batch([("vm", n, "access", None) for n in names]))
            return got
        finally:
            await c.close()

    return run_async(main)


def _fields(v: Any) -> dict[str, Any]:
    assert isinstance(v, dict), v
    return {k: v[k] for k in ("vm", "path", "status", "matches", "source", "digest", "action")}


def test_hot_hits_answer_as_the_chain_and_stop_when_it_would_not(tmp_path: Path) -> None:
    """Through a real appliance: the third round of the same batch is answered from the hot
    table with the very verdicts the chain gave the second; a file changed in place, and a
    pattern reload that makes a clean file infected, are answered anew."""
    db = tmp_path / "live.ndb"
    db.write_text("Some.Other.Signature:0:*:6f666673636172756e6c696b656c79\n")
    root = tmp_path / "vm"
    names = [f"d{i % 3}/f{i}.txt" for i in range(30)]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        body = b"plain file %d\n" % i * 20
        (root / name).write_bytes(body + (MARKER if i == 4 else b""))
    a = ApplianceProc(tmp_path, "-d", str(db))
    try:
        first, second, third = _scan_all(a.sock, root, names, 3)
        assert [v["source"] for v in first] == ["scan"] * 30
        assert [v["source"] for v in second] == ["identity"] * 30
        assert [_fields(v) for v in third] == [_fields(v) for v in second]
        served = status(a.sock)["hot_hits"]
        assert served == 30  # the third round, and only it

        (root / names[7]).write_bytes(b"changed in place\n")
        changed = _scan_all(a.sock, root, names, 1)[0]
        assert changed[7]["source"] == "scan" and changed[7]["digest"] != second[7]["digest"]
        assert status(a.sock)["hot_hits"] == served + 29

        db.write_text(f"Offscan.Hot.Marker:0:*:{MARKER.hex()}\n")
        out = run("reload", "--appliance", a.sock)
        assert out.returncode == 0, out.stderr
        after = _scan_all(a.sock, root, names, 3)  # revalidated, then the chain, then hot
        for got in after:
            assert got[4]["status"] == "infected", got[4]
            assert [v["status"] for i, v in enumerate(got) if i != 4] == ["clean"] * 29
            assert {v["pattern_version"] for v in got} == {status(a.sock)["pattern_version"]}
        assert [v["source"] for v in after[2]] == [v["source"] for v in after[1]]
        assert status(a.sock)["hot_hits"] == served + 29 + 29  # never the infected file
        lines = [e for e in a.events() if e.get("event") == "verdict"]
        assert len(lines) == 30 * 7  # every hot hit logged like any other verdict
    finally:
        a.stop()
