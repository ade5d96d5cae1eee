"""Tests for offscan.cache: identity memo, digests, verdict cache (+ its log) and single-flight."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from offscan.cache import (
    LOG_MAGIC,
    LOG_NAME,
    RECORD_HEADER,
    CachedVerdict,
    Identity,
    IdentityMemo,
    LogCorruptError,
    SingleFlight,
    StateDirLockedError,
    VerdictCache,
    content_digest,
    digest_bytes,
    digest_fd,
)

V1 = "daily-1"
V2 = "daily-2"


def dg(i: int, first: int | None = None) -> bytes:
    """A distinct digest for ``i``; ``first`` pins the first byte (which picks the shard)."""
    d = hashlib.sha256(str(i).encode()).digest()
    return d if first is None else bytes([first]) + d[1:]


def verdict(
    i: int,
    version: str = V1,
    *,
    status: str = "clean",
    matches: tuple[str, ...] = (),
    first: int | None = None,
    size: int | None = None,
) -> CachedVerdict:
    return CachedVerdict(
        status=status,  # type: ignore[arg-type]
        matches=matches,
        pattern_version=version,
        digest=dg(i, first),
        size=100 + i if size is None else size,
        scanned_at=1_700_000_000.0 + i,
    )


def key(v: CachedVerdict) -> tuple[bytes, int, str]:
    return (v.digest, v.size, v.pattern_version)


def log_file(state: Path) -> Path:
    return state / LOG_NAME


# ---------------------------------------------------------------------------------------------
# Identity, CachedVerdict, digests


def test_identity_from_stat_and_fd(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"hello")
    st = os.stat(p)
    ident = Identity.from_stat("vm1", st)
    assert ident == Identity("vm1", st.st_dev, st.st_ino, 5, st.st_mtime_ns, st.st_ctime_ns)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert Identity.from_fd("vm1", fd) == ident
    finally:
        os.close(fd)
    assert Identity.from_stat("vm2", st) != ident  # the source is part of the identity
    p.write_bytes(b"hello!")
    assert Identity.from_stat("vm1", os.stat(p)) != ident


def test_cached_verdict_validation() -> None:
    with pytest.raises(ValueError, match="only clean and infected"):
        CachedVerdict("error", (), V1, dg(1), 1, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cryptographic digest"):
        CachedVerdict("clean", (), V1, b"\x01\x02", 1, 0.0)
    v = CachedVerdict("infected", ["Eicar-Test"], V1, dg(1), 1, 0.0)  # type: ignore[arg-type]
    assert v.matches == ("Eicar-Test",) and v.infected
    with pytest.raises(AttributeError):
        v.status = "clean"  # type: ignore[misc]


def test_digest_fd_matches_sha256(tmp_path: Path) -> None:
    data = os.urandom((5 << 20) // 2 + 123)  # several 1 MiB blocks and a ragged tail
    p = tmp_path / "big"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.lseek(fd, 17, os.SEEK_SET)
        assert digest_fd(fd) == (hashlib.sha256(data).digest(), len(data))
        assert os.lseek(fd, 0, os.SEEK_CUR) == 17  # pread leaves the offset alone
        assert digest_fd(fd, 1000) == (hashlib.sha256(data[:1000]).digest(), 1000)
        # Asked for more than the file holds (it shrank): bytes_read says so.
        assert digest_fd(fd, len(data) + 10) == (hashlib.sha256(data).digest(), len(data))
        assert content_digest(fd) == hashlib.sha256(data).digest()
    finally:
        os.close(fd)
    assert digest_bytes(data) == content_digest(data) == hashlib.sha256(data).digest()
    assert content_digest(memoryview(data)[:10]) == hashlib.sha256(data[:10]).digest()


def test_digest_fd_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty"
    p.write_bytes(b"")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert digest_fd(fd) == (hashlib.sha256(b"").digest(), 0)
        assert digest_fd(fd, 0) == (hashlib.sha256(b"").digest(), 0)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# IdentityMemo


def ident(i: int) -> Identity:
    return Identity("vm", 1, i, i * 10, i * 1000, i * 1000)


def test_identity_memo_lru() -> None:
    memo = IdentityMemo(max_entries=3)
    for i in range(3):
        memo.put(ident(i), dg(i))
    assert memo.get(ident(0)) == dg(0)  # 0 is now the most recent; 1 the least
    memo.put(ident(3), dg(3))
    assert len(memo) == 3
    assert memo.get(ident(1)) is None
    assert [memo.get(ident(i)) for i in (0, 2, 3)] == [dg(0), dg(2), dg(3)]
    memo.put(ident(2), dg(22))  # replacing refreshes, does not grow
    assert len(memo) == 3 and memo.get(ident(2)) == dg(22)
    memo.discard(ident(2))
    assert memo.get(ident(2)) is None
    assert memo.stats()["evictions"] == 1
    with pytest.raises(ValueError):
        IdentityMemo(0)


def test_identity_memo_threads() -> None:
    memo = IdentityMemo(max_entries=500)

    def work(base: int) -> None:
        for i in range(2000):
            memo.put(ident(base + i), dg(i))
            memo.get(ident(base + i // 2))

    threads = [threading.Thread(target=work, args=(n * 10_000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(memo) == 500


# ---------------------------------------------------------------------------------------------
# VerdictCache in memory


def test_verdict_cache_lru_order_and_bound() -> None:
    cache = VerdictCache(max_entries=3, shards=1)
    vs = [verdict(i) for i in range(5)]
    for v in vs[:3]:
        cache.put(v)
    assert cache.get(*key(vs[0])) == vs[0]  # refresh 0; LRU order now 1, 2, 0
    cache.put(vs[3])
    assert cache.get(*key(vs[1])) is None
    cache.put(vs[4])
    assert cache.get(*key(vs[2])) is None
    assert len(cache) == 3
    assert list(cache.entries()) == [vs[4], vs[3], vs[0]]  # hottest first
    s = cache.stats()
    assert (s["hits"], s["misses"], s["puts"], s["evictions"], s["entries"]) == (1, 2, 5, 2, 3)
    assert s["persisted_bytes"] == 0


def test_verdict_cache_replace_does_not_grow() -> None:
    cache = VerdictCache(max_entries=10, shards=2)
    cache.put(verdict(1))
    newer = CachedVerdict("clean", (), V1, dg(1), 101, 2e9)
    cache.put(newer)
    assert len(cache) == 1 and cache.get(dg(1), 101, V1) == newer


def test_verdict_cache_shards_are_independent_lrus() -> None:
    cache = VerdictCache(max_entries=8, shards=4)
    assert cache.stats()["shards"] == 4
    # Shard = first digest byte % 4: fill shard 0 past its capacity of 2.
    in_shard0 = [verdict(i, first=4 * i) for i in range(4)]
    in_shard1 = [verdict(100 + i, first=4 * i + 1) for i in range(2)]
    for v in in_shard1 + in_shard0:
        cache.put(v)
    assert len(cache) == 4  # shard 0 kept its 2 newest, shard 1 untouched
    assert [cache.get(*key(v)) for v in in_shard0] == [None, None, in_shard0[2], in_shard0[3]]
    assert all(cache.get(*key(v)) == v for v in in_shard1)
    assert cache.stats()["evictions"] == 2


def test_verdict_cache_bound_over_shards() -> None:
    cache = VerdictCache(max_entries=1000, shards=16)
    for i in range(5000):
        cache.put(verdict(i))
    assert len(cache) <= 1000
    assert len(cache) > 900  # SHA-256 digests spread evenly over the shards
    tiny = VerdictCache(max_entries=3, shards=16)  # fewer entries than shards
    for i in range(10):
        tiny.put(verdict(i))
    assert len(tiny) <= 3 and tiny.stats()["shards"] == 3


def test_clean_and_infected_verdicts() -> None:
    cache = VerdictCache(max_entries=10)
    clean = verdict(1)
    bad = verdict(2, status="infected", matches=("Eicar-Test-Signature", "Other"))
    cache.put(clean)
    cache.put(bad)
    got = cache.get(*key(bad))
    assert got is not None and got.infected and got.matches == bad.matches
    got = cache.get(*key(clean))
    assert got is not None and got.status == "clean"


def test_pattern_version_and_size_are_part_of_the_key() -> None:
    cache = VerdictCache(max_entries=100)
    v = verdict(1, V1)
    cache.put(v)
    assert cache.get(v.digest, v.size, V2) is None
    assert cache.get(v.digest, v.size + 1, V1) is None
    v2 = verdict(1, V2, status="infected", matches=("New-Sig",))
    cache.put(v2)
    assert cache.get(*key(v)) == v and cache.get(*key(v2)) == v2
    assert len(cache) == 2
    assert key(v) in cache and (v.digest, v.size, "daily-3") not in cache


def test_entries_hottest_first_across_shards() -> None:
    cache = VerdictCache(max_entries=100, shards=4)
    vs = [verdict(i) for i in range(20)]
    for v in vs:
        cache.put(v)
    for v in vs[5:10]:
        cache.get(*key(v))
    expected = list(reversed(vs[5:10])) + list(reversed(vs[:5] + vs[10:]))
    assert list(cache.entries()) == expected


def test_verdict_cache_threads() -> None:
    cache = VerdictCache(max_entries=2000, shards=8)
    errors: list[AssertionError] = []

    def work(base: int) -> None:
        try:
            for i in range(3000):
                v = verdict(base + i)
                cache.put(v)
                got = cache.get(*key(v))
                assert got is None or got == v
        except AssertionError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n * 100_000,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(cache) <= 2000
    assert cache.stats()["puts"] == 12_000


def test_verdict_cache_argument_errors() -> None:
    with pytest.raises(ValueError):
        VerdictCache(0)
    with pytest.raises(ValueError):
        VerdictCache(10, shards=0)
    with pytest.raises(ValueError):
        VerdictCache(10, shards=257)
    with pytest.raises(TypeError):
        VerdictCache(10).put(("not", "a", "verdict"))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Persistence


def test_persistence_round_trip(tmp_path: Path) -> None:
    state = tmp_path / "state"
    vs = [verdict(i) for i in range(50)]
    vs.append(verdict(99, status="infected", matches=("Eicar-Test-Signature",)))
    vs.append(verdict(1, V2))
    with VerdictCache(1000, state_dir=state) as cache:
        for v in vs:
            cache.put(v)
        cache.get(*key(vs[0]))  # recency is not logged; puts order the replay
        assert cache.stats()["persisted_bytes"] == log_file(state).stat().st_size
    assert (state / "verdicts.lock").exists()
    with VerdictCache(1000, state_dir=state) as cache:
        assert len(cache) == len(vs)
        for v in vs:
            assert cache.get(*key(v)) == v
        assert list(cache.entries()) == vs[::-1]  # replayed in put order
        assert cache.stats()["replayed"] == len(vs)
        assert cache.stats()["hits"] == len(vs) and cache.stats()["puts"] == 0


def test_replay_restores_recency_order(tmp_path: Path) -> None:
    vs = [verdict(i) for i in range(10)]
    with VerdictCache(100, shards=1, state_dir=tmp_path) as cache:
        for v in vs:
            cache.put(v)
        cache.put(vs[3])  # put again: hottest
    with VerdictCache(100, shards=1, state_dir=tmp_path) as cache:
        assert list(cache.entries()) == [vs[3]] + [v for v in reversed(vs) if v is not vs[3]]


def test_last_write_wins_on_replay(tmp_path: Path) -> None:
    first = verdict(7)
    second = CachedVerdict("infected", ("Late-Sig",), V1, first.digest, first.size, 2e9)
    with VerdictCache(100, state_dir=tmp_path) as cache:
        cache.put(first)
        cache.put(second)
    with VerdictCache(100, state_dir=tmp_path) as cache:
        assert cache.get(*key(first)) == second and len(cache) == 1


def test_replay_respects_the_bound(tmp_path: Path) -> None:
    with VerdictCache(1000, shards=1, state_dir=tmp_path) as cache:
        for i in range(100):
            cache.put(verdict(i))
    with VerdictCache(10, shards=1, state_dir=tmp_path) as cache:
        assert len(cache) == 10
        assert [cache.get(*key(verdict(i))) is not None for i in (89, 90, 99)] == [
            False,
            True,
            True,
        ]


def test_torn_last_record_loses_only_that_record(tmp_path: Path) -> None:
    vs = [verdict(i) for i in range(20)]
    with VerdictCache(100, state_dir=tmp_path) as cache:
        for v in vs:
            cache.put(v)
    path = log_file(tmp_path)
    full = path.stat().st_size
    for cut in (3, RECORD_HEADER.size + 2):  # inside the payload, then inside the header too
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - cut)
        with VerdictCache(100, state_dir=tmp_path) as cache:
            lost = vs.pop()
            assert len(cache) == len(vs)
            assert cache.get(*key(lost)) is None
            assert all(cache.get(*key(v)) == v for v in vs)
        assert path.stat().st_size < full
    # The torn bytes were cut away: new records append cleanly after the good ones.
    with VerdictCache(100, state_dir=tmp_path) as cache:
        cache.put(verdict(500))
    with VerdictCache(100, state_dir=tmp_path) as cache:
        assert len(cache) == len(vs) + 1 and cache.get(*key(verdict(500))) is not None


def test_bad_crc_on_last_record_is_a_torn_write(tmp_path: Path) -> None:
    with VerdictCache(100, state_dir=tmp_path) as cache:
        for i in range(5):
            cache.put(verdict(i))
    path = log_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with VerdictCache(100, state_dir=tmp_path) as cache:
        assert len(cache) == 4


def test_corrupt_record_in_the_middle(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    vs = [verdict(i) for i in range(10)]
    with VerdictCache(100, state_dir=tmp_path) as cache:
        offsets = []
        for v in vs:
            offsets.append(cache.stats()["persisted_bytes"])
            cache.put(v)
    path = log_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[offsets[6] + RECORD_HEADER.size + 5] ^= 0x55  # inside record 6's payload
    path.write_bytes(bytes(data))
    with (
        caplog.at_level(logging.WARNING, logger="offscan.cache"),
        VerdictCache(100, state_dir=tmp_path) as cache,
    ):
        assert len(cache) == 6
        assert all(cache.get(*key(v)) == v for v in vs[:6])
    assert any("corrupt record" in r.getMessage() for r in caplog.records)
    assert path.stat().st_size == offsets[6]  # truncated at the bad record


def test_absurd_length_is_corruption(tmp_path: Path) -> None:
    with VerdictCache(100, state_dir=tmp_path) as cache:
        cache.put(verdict(1))
    path = log_file(tmp_path)
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(RECORD_HEADER.pack(0xFFFFFFF0, 0) + b"x" * 100)
    with VerdictCache(100, state_dir=tmp_path) as cache:
        assert len(cache) == 1
    assert path.stat().st_size == good


def test_foreign_log_is_left_alone(tmp_path: Path) -> None:
    path = log_file(tmp_path)
    path.write_bytes(b"something else entirely")
    with pytest.raises(LogCorruptError, match="not an offscan verdict log"):
        VerdictCache(100, state_dir=tmp_path)
    assert path.read_bytes() == b"something else entirely"
    path.unlink()
    with VerdictCache(100, state_dir=tmp_path) as cache:  # the lock was released
        assert len(cache) == 0
    assert path.read_bytes() == LOG_MAGIC


def test_stale_compaction_temp_is_removed(tmp_path: Path) -> None:
    with VerdictCache(100, state_dir=tmp_path) as cache:
        cache.put(verdict(1))
    tmp = tmp_path / (LOG_NAME + ".tmp")
    tmp.write_bytes(b"half a compaction")
    with VerdictCache(100, state_dir=tmp_path) as cache:
        assert len(cache) == 1
    assert not tmp.exists()


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, hashlib
    from offscan.cache import CachedVerdict, VerdictCache
    cache = VerdictCache(10_000, state_dir=sys.argv[1], fsync_interval=3600.0)
    for i in range(1000):
        d = hashlib.sha256(str(i).encode()).digest()
        status = "infected" if i % 100 == 0 else "clean"
        names = ("Sig-%d" % i,) if status == "infected" else ()
        cache.put(CachedVerdict(status, names, "daily-1", d, 100 + i, 1.7e9 + i))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_kill_9_survival(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(state)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with VerdictCache(10_000, state_dir=state) as cache:  # the dead process's lock is gone
        assert len(cache) == 1000
        for i in range(1000):
            got = cache.get(dg(i), 100 + i, V1)
            assert got is not None
            assert got.status == ("infected" if i % 100 == 0 else "clean")
        assert cache.get(dg(0), 100, V1).matches == ("Sig-0",)  # type: ignore[union-attr]


def test_compaction_keeps_content_and_shrinks(tmp_path: Path) -> None:
    vs = [verdict(i) for i in range(100)]
    with VerdictCache(1000, state_dir=tmp_path, compact_min_records=10**9) as cache:
        for _ in range(10):
            for v in vs:
                cache.put(v)
        path = log_file(tmp_path)
        before = path.stat().st_size
        order = list(cache.entries())
        cache.compact()
        after = path.stat().st_size
        assert after < before / 5
        assert cache.stats()["persisted_bytes"] == after
        assert cache.stats()["log_records"] == 100
        cache.put(verdict(1000))  # appends to the new log
    with VerdictCache(1000, state_dir=tmp_path) as cache:
        assert len(cache) == 101
        assert list(cache.entries()) == [verdict(1000)] + order  # recency survives too
        assert all(cache.get(*key(v)) == v for v in vs)


def test_compaction_is_automatic_and_drops_evicted(tmp_path: Path) -> None:
    with VerdictCache(50, state_dir=tmp_path, compact_min_records=20) as cache:
        for i in range(1000):
            cache.put(verdict(i))
        deadline = time.monotonic() + 10
        while cache.stats()["log_records"] > 2 * 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        cache.flush()
        s = cache.stats()
        assert s["compactions"] >= 1
        assert s["log_records"] <= 2 * 50 + 1
        live = {key(v) for v in cache.entries()}
    with VerdictCache(50, state_dir=tmp_path) as cache:
        assert {key(v) for v in cache.entries()} == live


def test_puts_during_compaction_are_kept(tmp_path: Path) -> None:
    stop = threading.Event()
    written: list[CachedVerdict] = []
    with VerdictCache(100_000, state_dir=tmp_path, compact_min_records=10**9) as cache:
        for i in range(5000):
            cache.put(verdict(i))

        def writer() -> None:
            i = 10_000
            while not stop.is_set() or i < 10_200:
                v = verdict(i)
                cache.put(v)
                written.append(v)
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(3):
                cache.compact()
        finally:
            stop.set()
            t.join()
        assert cache.stats()["compactions"] == 3
    with VerdictCache(100_000, state_dir=tmp_path) as cache:
        assert len(cache) == 5000 + len(written)
        assert all(cache.get(*key(v)) == v for v in written)


def test_state_dir_lock_refuses_a_second_opener(tmp_path: Path) -> None:
    with VerdictCache(100, state_dir=tmp_path) as cache:
        cache.put(verdict(1))
        with pytest.raises(StateDirLockedError, match=f"pid {os.getpid()}.*--state"):
            VerdictCache(100, state_dir=tmp_path)
        cache.put(verdict(2))  # the refused opener did not disturb the owner
    with VerdictCache(100, state_dir=tmp_path) as cache:
        assert len(cache) == 2


def test_state_dir_lock_across_processes(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from offscan.cache import StateDirLockedError, VerdictCache
        try:
            VerdictCache(10, state_dir=sys.argv[1])
        except StateDirLockedError as exc:
            print(exc)
            sys.exit(3)
        """
    )
    with VerdictCache(100, state_dir=tmp_path):
        proc = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path)],
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 3, proc.stderr.decode()
    assert b"in use" in proc.stdout


def test_fsync_every_put_and_flush(tmp_path: Path) -> None:
    with VerdictCache(100, state_dir=tmp_path, fsync_interval=0) as cache:
        cache.put(verdict(1))
        cache.flush()
    with VerdictCache(100, state_dir=tmp_path, fsync_interval=0.01) as cache:
        assert len(cache) == 1
        cache.put(verdict(2))
        time.sleep(0.05)  # the background fsync runs; nothing to observe but no error
        assert cache.stats()["persist_errors"] == 0


def test_closed_cache(tmp_path: Path) -> None:
    cache = VerdictCache(100, state_dir=tmp_path)
    cache.put(verdict(1))
    cache.close()
    cache.close()  # idempotent
    assert cache.get(*key(verdict(1))) == verdict(1)  # memory still answers
    with pytest.raises(RuntimeError, match="closed"):
        cache.put(verdict(2))
    cache.flush()  # harmless


# ---------------------------------------------------------------------------------------------
# SingleFlight


def test_single_flight_shares_one_execution() -> None:
    async def main() -> None:
        sf = SingleFlight()
        calls = 0
        release = asyncio.Event()

        async def scan() -> str:
            nonlocal calls
            calls += 1
            await release.wait()
            return "clean"

        tasks = [asyncio.create_task(sf.run("k", scan)) for _ in range(50)]
        await asyncio.sleep(0)
        assert sf.in_flight == 1 and "k" in sf
        release.set()
        results = await asyncio.gather(*tasks)
        assert results == ["clean"] * 50
        assert calls == 1
        assert sf.in_flight == 0  # forgotten after completion
        assert await sf.run("k", scan) == "clean"
        assert calls == 2

    asyncio.run(main())


def test_single_flight_exception_reaches_every_waiter() -> None:
    class Boom(Exception):
        pass

    async def main() -> None:
        sf = SingleFlight()
        calls = 0

        async def fail() -> None:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.01)
            raise Boom("engine failed")

        results = await asyncio.gather(
            *(sf.run("k", fail) for _ in range(20)), return_exceptions=True
        )
        assert calls == 1
        assert all(isinstance(r, Boom) for r in results)
        assert sf.in_flight == 0

    asyncio.run(main())


def test_single_flight_different_keys_run_concurrently() -> None:
    async def main() -> None:
        sf = SingleFlight()
        started = {k: asyncio.Event() for k in "abc"}

        def make(k: str) -> object:
            async def fn() -> str:
                started[k].set()
                # Each waits for all the others: only finishes if they run at the same time.
                for ev in started.values():
                    await ev.wait()
                return k

            return fn

        results = await asyncio.wait_for(
            asyncio.gather(*(sf.run(k, make(k)) for k in "abc")),  # type: ignore[arg-type]
            timeout=5,
        )
        assert results == ["a", "b", "c"]

    asyncio.run(main())


def test_single_flight_cancelling_one_waiter_keeps_the_others() -> None:
    async def main() -> None:
        sf = SingleFlight()
        release = asyncio.Event()
        calls = 0

        async def scan() -> int:
            nonlocal calls
            calls += 1
            await release.wait()
            return 42

        first = asyncio.create_task(sf.run("k", scan))
        second = asyncio.create_task(sf.run("k", scan))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        release.set()
        assert await second == 42
        assert first.cancelled() and calls == 1

    asyncio.run(main())


def test_single_flight_cancels_work_nobody_waits_for() -> None:
    async def main() -> None:
        sf = SingleFlight()
        cancelled = asyncio.Event()

        async def scan() -> int:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return 1

        only = asyncio.create_task(sf.run("k", scan))
        await asyncio.sleep(0.01)
        only.cancel()
        await asyncio.wait_for(cancelled.wait(), 1)
        await asyncio.sleep(0)
        assert sf.in_flight == 0
        # Cancelled before its first step: the key is still forgotten.
        early = asyncio.create_task(sf.run("j", scan))
        await asyncio.sleep(0)
        early.cancel()
        with pytest.raises(asyncio.CancelledError):
            await early
        await asyncio.sleep(0)
        assert sf.in_flight == 0

    asyncio.run(main())
