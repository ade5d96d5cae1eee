"""The verdict cache: verdicts by (digest, size, pattern version), sharded LRUs in memory.

Its persistence (``verdicts.log`` under a state directory) is :class:`~.verdict_log.VerdictLog`,
which :class:`VerdictCache` extends; this module holds the memory half and the public API, and
touches the file system only through that base class.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Self

from .errors import CacheError
from .memo import DEFAULT_MAX_ENTRIES
from .records import MAX_RECORD_BYTES, RECORD_HEADER, CachedVerdict, encode_record
from .verdict_log import DEFAULT_COMPACT_MIN_RECORDS, DEFAULT_FSYNC_INTERVAL, VerdictLog

log = logging.getLogger("offscan.cache")  # the package's logger, as before the split

DEFAULT_SHARDS = 16

_Key = tuple[bytes, int, str]


class _Entry:
    """A cached verdict and when it was last used (a global tick, to merge shards by recency)."""

    __slots__ = ("tick", "verdict")

    def __init__(self, verdict: CachedVerdict, tick: int) -> None:
        self.verdict = verdict
        self.tick = tick


class _Shard:
    __slots__ = ("capacity", "evictions", "hits", "lock", "map", "misses", "puts")

    def __init__(self, capacity: int) -> None:
        self.lock = threading.Lock()
        self.map: OrderedDict[_Key, _Entry] = OrderedDict()
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self.puts = 0
        self.evictions = 0


class VerdictCache(VerdictLog):
    """Verdicts keyed by (digest, size, pattern_version); clean AND infected.

    Sharded (``shards`` LRUs chosen by the digest's first byte, each an OrderedDict with its own
    lock, so lookups from many threads rarely contend) and bounded (``max_entries`` in total;
    eviction is least-recently-used within a shard, which approximates global LRU because
    digests spread evenly). Including the pattern version in the key means a verdict reached
    under version N is never served for N+1 (invariant 3); :meth:`entries` lets revalidation
    re-key old verdicts.

    With ``state_dir`` the cache persists to ``verdicts.log`` there, an append-only log of
    CRC-framed msgpack records: every :meth:`put` reaches the OS with ``os.write`` before it
    returns, so it survives ``kill -9``; a background thread fsyncs every ``fsync_interval``
    seconds (``0`` = fsync in every put) and :meth:`flush`/:meth:`close` fsync at once, which is
    what survives power loss. Opening replays the log (last write wins), cuts off a torn or
    corrupt tail, and the background thread rewrites the log atomically once it holds more than
    twice the live entries. ``verdicts.lock`` (flock) keeps a second cache out of the directory.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        shards: int = DEFAULT_SHARDS,
        state_dir: str | os.PathLike[str] | None = None,
        fsync_interval: float = DEFAULT_FSYNC_INTERVAL,
        compact_min_records: int = DEFAULT_COMPACT_MIN_RECORDS,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        if not 1 <= shards <= 256:
            raise ValueError(f"shards must be between 1 and 256, not {shards}")
        if fsync_interval < 0:
            raise ValueError(f"fsync_interval must be >= 0 seconds, not {fsync_interval}")
        shards = min(shards, max_entries)  # every shard must hold at least one entry
        self.max_entries = max_entries
        base, extra = divmod(max_entries, shards)
        self._shards = [_Shard(base + (1 if i < extra else 0)) for i in range(shards)]
        self._nshards = shards
        self._ticks = itertools.count()
        # Puts take _write_lock, then a shard lock: memory and log stay in the same order.
        self._write_lock = threading.Lock()
        self._closed = False
        # verdicts lost or replaced (evicted, put again under the same key): what a memo of
        # this cache's answers (the appliance's hot hits, appliance/hot.py) must start over at
        self.generation = 0

        self._init_log(fsync_interval, compact_min_records)
        if state_dir is not None:
            self._open_state(os.fspath(state_dir))

    # -- lookups -------------------------------------------------------------------------------

    def get(self, digest: bytes, size: int, pattern_version: str) -> CachedVerdict | None:
        return self.get_many([(digest, size, pattern_version)])[0]

    def get_many(self, keys: list[_Key]) -> list[CachedVerdict | None]:
        """:meth:`get` for each ``(digest, size, pattern_version)``, answers in order: the
        same counters and recency (the keys of one call touched shard by shard), one call
        and one lock acquisition per shard for a batch of lookups (the cache-hit path's)."""
        nshards, ticks = self._nshards, self._ticks
        by_shard: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_shard.setdefault(key[0][0] % nshards, []).append(i)
        out: list[CachedVerdict | None] = [None] * len(keys)
        for s, idx in by_shard.items():
            shard = self._shards[s]
            get, move = shard.map.get, shard.map.move_to_end
            hits = 0
            with shard.lock:
                for i in idx:
                    entry = get(keys[i])
                    if entry is not None:
                        move(keys[i])
                        entry.tick = next(ticks)
                        out[i] = entry.verdict
                        hits += 1
                shard.hits += hits
                shard.misses += len(idx) - hits
        return out

    def put(self, verdict: CachedVerdict) -> None:
        """Cache a verdict (replacing any for the same key) and append it to the log."""
        if not isinstance(verdict, CachedVerdict):
            raise TypeError(f"put takes a CachedVerdict, not {type(verdict).__name__}")
        record = encode_record(verdict) if self._log_fd >= 0 else b""
        if len(record) > RECORD_HEADER.size + MAX_RECORD_BYTES:
            # Replay would take it for corruption and drop everything after it.
            log.warning(
                "verdict for %s too large to persist (%d bytes)", verdict.digest.hex(), len(record)
            )
            record = b""
        with self._write_lock:
            if self._closed:
                raise CacheError("VerdictCache is closed")
            self._insert(verdict)
            if record:
                self._append(record)

    def put_many(self, verdicts: list[CachedVerdict]) -> None:
        """:meth:`put` for several verdicts, their log records appended in one write."""
        records = []
        for verdict in verdicts:
            if not isinstance(verdict, CachedVerdict):
                raise TypeError(f"put takes a CachedVerdict, not {type(verdict).__name__}")
            record = encode_record(verdict) if self._log_fd >= 0 else b""
            if record and len(record) <= RECORD_HEADER.size + MAX_RECORD_BYTES:
                records.append(record)
        with self._write_lock:
            if self._closed:
                raise CacheError("VerdictCache is closed")
            for verdict in verdicts:
                self._insert(verdict)
            if records:
                self._append_many(records)

    def _insert(self, verdict: CachedVerdict) -> None:
        key = (verdict.digest, verdict.size, verdict.pattern_version)
        shard = self._shards[verdict.digest[0] % self._nshards]
        with shard.lock:
            m = shard.map
            if key in m:
                self.generation += 1
            m[key] = _Entry(verdict, next(self._ticks))
            m.move_to_end(key)
            shard.puts += 1
            while len(m) > shard.capacity:
                m.popitem(last=False)
                shard.evictions += 1
                self.generation += 1

    def count_hits(self, hits: int) -> None:
        """Count lookups answered for this cache elsewhere (the appliance's hot hits)."""
        shard = self._shards[0]
        with shard.lock:
            shard.hits += hits

    def roomy(self, fraction: float) -> bool:
        """Whether every shard holds at most ``fraction`` of its capacity (nothing is near
        being evicted, so LRU recency does not matter yet)."""
        fullest = max(len(shard.map) for shard in self._shards)
        return fullest <= fraction * self._shards[-1].capacity  # the last is the smallest

    def entries(self) -> Iterator[CachedVerdict]:
        """A snapshot of every cached verdict, most recently used first."""
        snapshot = []
        for shard in self._shards:
            with shard.lock:
                snapshot.append([(-e.tick, e.verdict) for e in reversed(shard.map.values())])
        return (v for _, v in heapq.merge(*snapshot, key=lambda item: item[0]))

    def __len__(self) -> int:
        return sum(len(s.map) for s in self._shards)

    def __contains__(self, key: object) -> bool:
        if not (isinstance(key, tuple) and len(key) == 3 and isinstance(key[0], bytes)):
            return False
        return key in self._shards[key[0][0] % self._nshards].map

    def stats(self) -> dict[str, Any]:
        out = {"hits": 0, "misses": 0, "puts": 0, "evictions": 0, "entries": 0}
        for shard in self._shards:
            with shard.lock:
                out["hits"] += shard.hits
                out["misses"] += shard.misses
                out["puts"] += shard.puts
                out["evictions"] += shard.evictions
                out["entries"] += len(shard.map)
        out.update(
            shards=self._nshards,
            max_entries=self.max_entries,
            persisted_bytes=self._log_size if self._log_fd >= 0 else 0,
            log_records=self._log_records,
            replayed=self._replayed,
            compactions=self._compactions,
            persist_errors=self._persist_errors,
        )
        return out

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the log thread, fsync and close the log and release the state directory."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is not None:
            with self._wake:
                self._stop = True
                self._wake.notify()
            self._thread.join()
            self._thread = None
        with self._compact_lock:
            if self._log_fd >= 0:
                try:
                    self.flush()
                finally:
                    self._release_state()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" state_dir={self.state_dir!r}" if self.state_dir else ""
        return f"<VerdictCache {len(self)}/{self.max_entries} entries{where}>"
