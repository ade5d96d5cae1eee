"""Benchmarks for offscan.cache: the lookups every scan request pays for.

Run ``pytest bench/test_bench_cache.py``; ``OFFSCAN_BENCH_QUICK=1`` shrinks the caches (5k
entries instead of 100k) for a smoke run.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from offscan.cache import (
    CachedVerdict,
    Identity,
    IdentityMemo,
    VerdictCache,
    digest_bytes,
    digest_fd,
)

QUICK = os.environ.get("OFFSCAN_BENCH_QUICK") == "1"
N_ENTRIES = 5_000 if QUICK else 100_000
VERSION = "daily-1"


def _verdict(i: int) -> CachedVerdict:
    digest = hashlib.sha256(i.to_bytes(8, "little")).digest()
    status = "infected" if i % 1000 == 0 else "clean"
    matches = ("Eicar-Test-Signature",) if status == "infected" else ()
    return CachedVerdict(status, matches, VERSION, digest, 4096 + i, 1.7e9)


def _identity(i: int) -> Identity:
    return Identity("vm-017", 2049, 1_000_000 + i, 4096 + i, 1_700_000_000_000_000_000 + i, 0)


VERDICTS = [_verdict(i) for i in range(N_ENTRIES)]
NEW_VERDICTS = [_verdict(N_ENTRIES + i) for i in range(N_ENTRIES)]  # never in the cache
IDENTITIES = [_identity(i) for i in range(N_ENTRIES)]

CACHE_FULL = VerdictCache(N_ENTRIES)
for _v in VERDICTS:
    CACHE_FULL.put(_v)
MEMO_FULL = IdentityMemo(N_ENTRIES)
for _ident, _v in zip(IDENTITIES, VERDICTS):
    MEMO_FULL.put(_ident, _v.digest)

HIT_KEYS = [(v.digest, v.size, v.pattern_version) for v in VERDICTS]
MISS_KEYS = [(v.digest, v.size, v.pattern_version) for v in NEW_VERDICTS]
BUFFER_1MIB = os.urandom(1 << 20)


def _cycle_call(
    fn: Callable[..., object], args_list: list[tuple[Any, ...]]
) -> Callable[[], object]:
    """A no-argument callable that calls ``fn(*args)`` for successive args, so each round
    touches a different entry (a realistic spread over the shards, not one hot key)."""
    it = itertools.cycle(args_list)

    def call() -> object:
        return fn(*next(it))

    return call


def test_verdict_cache_get_hit_100k(benchmark: BenchmarkFixture) -> None:
    call = _cycle_call(CACHE_FULL.get, HIT_KEYS)
    assert call() is not None
    benchmark(call)


def test_verdict_cache_get_miss_100k(benchmark: BenchmarkFixture) -> None:
    call = _cycle_call(CACHE_FULL.get, MISS_KEYS)
    assert call() is None
    benchmark(call)


def test_verdict_cache_put_evicting_100k(benchmark: BenchmarkFixture) -> None:
    """Puts into a full cache: each one evicts the least recently used entry of its shard."""
    cache = VerdictCache(N_ENTRIES)
    for v in VERDICTS:
        cache.put(v)
    benchmark(_cycle_call(cache.put, [(v,) for v in NEW_VERDICTS + VERDICTS]))
    assert len(cache) <= N_ENTRIES


@pytest.fixture
def persistent_cache(tmp_path: Path) -> Iterator[VerdictCache]:
    with VerdictCache(N_ENTRIES, state_dir=tmp_path / "state") as cache:
        yield cache


def test_verdict_cache_put_persisted_100k(
    benchmark: BenchmarkFixture, persistent_cache: VerdictCache
) -> None:
    """Puts that also append to the log (one os.write each; fsync stays on its interval)."""
    benchmark(_cycle_call(persistent_cache.put, [(v,) for v in VERDICTS]))
    assert persistent_cache.stats()["persist_errors"] == 0


def test_identity_memo_get_hit_100k(benchmark: BenchmarkFixture) -> None:
    call = _cycle_call(MEMO_FULL.get, [(i,) for i in IDENTITIES])
    assert call() is not None
    benchmark(call)


def test_digest_bytes_1mib(benchmark: BenchmarkFixture) -> None:
    benchmark(digest_bytes, BUFFER_1MIB)


def test_digest_fd_1mib(benchmark: BenchmarkFixture, tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(BUFFER_1MIB)
    fd = os.open(path, os.O_RDONLY)
    try:
        benchmark(digest_fd, fd)
    finally:
        os.close(fd)
