"""Hot hits (appliance/hot.py): a repeated clean hit answered by one lookup, and never once
the memo/cache chain would answer differently (a changed file, a new pattern version, an
entry lost or replaced anywhere in the chain, a link nearly full)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

from helpers import ApplianceProc, run, run_async, status
from hypothesis import example, given, settings
from hypothesis import strategies as st

from offscan.appliance import hot as hot_module
from offscan.appliance.batch import _split_hot
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


# Operations on the chain's links, as the appliance makes them: a digest learnt for an
# identity (or for a clone's identity), one forgotten, a verdict cached (clean or not, maybe
# replacing one under the same key), a new pattern version, and a batch of lookups.
# a batch asks for every identity (in a random order, some twice): a stale hot entry is
# caught at the first batch after the change that made it stale
_BATCH = st.tuples(st.just("batch"), st.permutations(list(range(5))).map(lambda p: p + p[:2]))
_OPS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["memo", "inherited"]), st.integers(0, 4), st.integers(0, 1)),
        _BATCH,
        st.tuples(st.just("verdict"), st.integers(0, 1), st.booleans(), st.integers(0, 1)),
        _BATCH,
        st.tuples(st.sampled_from(["forget", "forget-inherited"]), st.integers(0, 4)),
        st.tuples(st.just("version"), st.integers(0, 1)),
    ),
    min_size=20,
    max_size=80,
)


def _peek(hot: HotHits, ident: Identity, version: str) -> tuple[str, CachedVerdict] | None:
    """What the chain answers for ``ident`` now, read without touching recency or counters:
    (source, clean verdict), or None (a miss, or not clean: never served hot)."""
    source, digest = "identity", hot.memo._map.get(ident)
    if digest is None:
        source, digest = "clone", hot.inherited._map.get(ident)
    if digest is None:
        return None
    entry = hot.cache._shards[0].map.get((digest, 100, version))
    if entry is None or entry.verdict.status != "clean":
        return None
    return source, entry.verdict


@settings(max_examples=1000, deadline=None)
@given(ops=_OPS)
# found by this test: a clone's hot entry kept after the memo learnt its identity
@example(
    ops=[
        ("inherited", 0, 0),
        ("verdict", 0, True, 0),
        ("verdict", 1, False, 0),
        ("batch", [0]),
        ("memo", 0, 1),
        ("batch", [0]),
    ]
)
@example(
    ops=[("memo", 0, 0), ("verdict", 0, True, 0), ("batch", [0]), ("forget", 0), ("batch", [0])]
)
def test_a_hot_answer_is_always_the_chains_answer_now(ops: list[tuple[Any, ...]]) -> None:
    """Model check: batches as BatchScans.answer runs them (the epoch first, hot answers
    split off by its own ``_split_hot``, the chain asked for the rest, clean chain answers
    stored), interleaved with every change the links can make, at sizes where evictions
    happen. Every hot answer must equal what the chain would answer at that moment. Run
    twice: as configured, and with the nearly-full rule off (``ROOMY`` 1.0), under which
    only the eviction counts keep entries of evicted links from being served."""
    for roomy in (ROOMY, 1.0):
        with mock.patch.object(hot_module, "ROOMY", roomy):
            _model(ops)


def _model(ops: list[tuple[Any, ...]]) -> None:
    memo, inherited = IdentityMemo(max_entries=4), IdentityMemo(max_entries=4)
    cache, locs = VerdictCache(2, shards=1), LocationIndex(20)
    hot = HotHits(memo, inherited, cache, locs)
    version = "v0"
    for op in ops:
        kind = op[0]
        if kind in ("memo", "inherited"):
            (memo if kind == "memo" else inherited).put(_ident(op[1]), bytes([op[2]]) * 32)
        elif kind == "forget":
            memo.discard(_ident(op[1]))
        elif kind == "forget-inherited":
            inherited.discard(_ident(op[1]))
        elif kind == "verdict":
            status = "clean" if op[2] else "infected"
            matches = () if op[2] else ("Test.Sig",)
            cache.put(CachedVerdict(status, matches, f"v{op[3]}", bytes([op[1]]) * 32, 100, 0.0))
        elif kind == "version":
            version = f"v{op[1]}"
        else:
            epoch = hot.epoch(version)
            entries: list[Any] = [({}, None, None, None, _ident(i)) for i in op[1]]
            answered: list[Any] = []
            if epoch is not None:  # as BatchScans.answer splits a batch
                entries = _split_hot(entries, epoch, hot.map, memo.knows, answered)
            for entry, found in answered:
                now = _peek(hot, entry[4], version)
                assert now is not None, f"served hot, but the chain has no clean answer: {op}"
                assert (found[2], found[1]) == now, "hot answer differs from the chain's"
            rest = [entry[4] for entry in entries]
            for ident in rest:  # the chain, as answer() asks it (recency and all)
                source = "identity"
                digest = memo.get(ident)
                if digest is None:
                    source, digest = "clone", inherited.get(ident)
                if digest is None:
                    continue
                cached = cache.get(digest, 100, version)
                if cached is None or cached.status != "clean":
                    continue
                locs.add(digest, "vm", f"p{ident.ino}", ident)
                if epoch is not None:
                    where = ("vm", f"p{ident.ino}")
                    hot.store(ident, (epoch, cached, source, where, digest, (b"", "")))  # type: ignore[arg-type]


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
