"""The identity memo: which content digest a file identity (inode, size, times) was seen with.

Lets an unchanged file skip being read just to learn its digest. Pure memory: ``os.fstat`` of
a descriptor it is given is the only system call.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import NamedTuple

DEFAULT_MAX_ENTRIES = 1_000_000


class Identity(NamedTuple):
    """What identifies a file's content cheaply, without reading it.

    ``source`` names where the file lives (VM or image), so equal inode numbers in different
    sources never alias. Any write changes ``mtime_ns`` or ``ctime_ns``. A tuple: built once
    per stat, hashed and compared at C speed (the cache-hit path builds one per request).
    """

    source: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, source: str, st: os.stat_result) -> Identity:
        return _new(cls, (source, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))

    @classmethod
    def from_stats(cls, source: str, stats: list[os.stat_result]) -> list[Identity]:
        """:meth:`from_stat` of each (one call for a batch of lookups)."""
        return [
            _new(cls, (source, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            for st in stats
        ]

    @classmethod
    def from_fd(cls, source: str, fd: int) -> Identity:
        """The identity of an open file; compare before and after reading to detect changes."""
        return cls.from_stat(source, os.fstat(fd))


_new = tuple.__new__  # skips the NamedTuple constructor's argument handling


class IdentityMemo:
    """Bounded LRU: Identity -> digest (bytes). Thread-safe.

    Lets an unchanged file skip being read just to learn its digest. The least recently used
    identity is forgotten once ``max_entries`` is reached.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        self.max_entries = max_entries
        self._map: OrderedDict[Identity, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        # entries lost or changed (evicted, discarded, given another digest): what a memo of
        # this memo's answers (the appliance's hot hits, appliance/hot.py) must start over at
        self.generation = 0

    def get(self, ident: Identity) -> bytes | None:
        return self.get_many([ident])[0]

    def get_many(self, idents: list[Identity]) -> list[bytes | None]:
        """:meth:`get` for each identity, in order, under one lock acquisition (the
        cache-hit path's batches): the same recency and counters."""
        with self._lock:
            got = list(map(self._map.get, idents))
            move = self._map.move_to_end
            hits = 0
            for ident, digest in zip(idents, got, strict=True):
                if digest is not None:
                    move(ident)
                    hits += 1
            self.hits += hits
            self.misses += len(idents) - hits
        return got

    def put(self, ident: Identity, digest: bytes) -> None:
        with self._lock:
            old = self._map.get(ident)
            self._map[ident] = digest
            self._map.move_to_end(ident)
            if old is not None and old != digest:
                self.generation += 1
            if len(self._map) > self.max_entries:
                self._map.popitem(last=False)
                self.evictions += 1
                self.generation += 1

    def put_many(self, items: list[tuple[Identity, bytes]]) -> None:
        """:meth:`put` each (identity, digest), in order."""
        for ident, digest in items:
            self.put(ident, digest)

    def discard(self, ident: Identity) -> None:
        """Forget an identity (e.g. the file changed while it was read)."""
        with self._lock:
            if self._map.pop(ident, None) is not None:
                self.generation += 1

    def knows(self, ident: Identity) -> bool:
        """Whether ``ident`` has a digest here; no recency or counter is touched (one dict
        lookup, atomic under the GIL: the hot table's check, appliance/hot.py)."""
        return ident in self._map

    def count(self, hits: int, misses: int = 0) -> None:
        """Count lookups answered for this memo elsewhere (the appliance's hot hits)."""
        with self._lock:
            self.hits += hits
            self.misses += misses

    def roomy(self, fraction: float) -> bool:
        """Whether at most ``fraction`` of :attr:`max_entries` is in use (nothing is near
        being evicted, so LRU recency does not matter yet)."""
        return len(self._map) <= fraction * self.max_entries

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "entries": len(self._map),
            }

    def __len__(self) -> int:
        return len(self._map)
