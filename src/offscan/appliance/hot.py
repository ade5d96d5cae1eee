"""Hot hits: a repeated clean cache hit answered by one lookup, keyed by the file's identity.

A clean hit of a batch (:mod:`.batch`) walks a chain: the identity memo (or, for a clone's
file, the master's inherited identities) gives the content digest, the verdict cache gives
the verdict under the current pattern version, the location index records where the content
was seen, and the codec finds the verdict's encoded fields (:class:`~.fastpath.Tail`). For an
identity the chain answered before, :class:`HotHits` keeps what it answered, keyed by the
:class:`~offscan.cache.Identity`: ``(epoch, tail, source, where, digest)`` and ``where``
encoded (:meth:`~.fastpath.VerdictCodec.where`), so a hit at the same path costs one pack.

An entry is served only while the chain would answer the same:

- **The epoch.** It is a new object whenever the engine's pattern version changed, or when
  the memo, the inherited identities, the verdict cache or the location index lost or
  replaced an entry since the batch before (each counts those events in ``generation``). Each
  link of the chain only changes its answer through one of those events (or, for a clone's
  entry, the memo learning the identity: below), so an entry stored in the current epoch is
  the chain's answer now. Entries of an older epoch are ignored and overwritten, never
  trusted.
- **Room.** A hot hit does not refresh the memo's, the cache's or the index's LRU recency, and
  recency only matters once something is about to be evicted. So the table is not used while
  any of them is more than :data:`ROOMY` full: every hit then takes the chain again, which
  refreshes the recency of what is in use before eviction starts. Known cost: the verdict
  cache never shrinks (its entries are replaced or evicted, never dropped), so once it has
  filled up the table stays off and every hit takes the chain, as before this table.
- **The memo before the inheritance.** The chain asks the memo first, and the memo learning
  an identity is neither a loss nor a replacement. So an entry the inherited identities gave
  is served only while the memo does not know that identity (one lookup per such hit,
  ``IdentityMemo.knows``).

tests/test_hot.py checks these rules against the chain itself with a model (Hypothesis).
Only clean verdicts are kept (an infected hit must run its actions). Ownership, exclusions and
size limits are checked for every scan before this table is asked, as before. A location is
recorded again when the same identity is seen at another path. Bounded by
:data:`MAX_ENTRIES`; then the table starts over. On the event loop only; the generations are
bumped under their owners' locks by pool threads too, and read here once per batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..cache import Identity, IdentityMemo, VerdictCache
    from .fastpath import Tail, Where
    from .inventory import LocationIndex
    from .pipeline import DigestSource

MAX_ENTRIES = 1 << 18  # hot identities kept (about 400 bytes each); then start over
ROOMY = 0.9  # the table is used while every link holds at most this fraction of its bound

# (epoch, encoded verdict, where the digest came from, (vm, path) recorded, digest, and that
# (vm, path) encoded for the reply and the event line)
HotEntry = tuple[object, "Tail", "DigestSource", tuple[str, str], bytes, "Where"]


class HotHits:
    """Identity -> the clean verdict the memo/cache chain gave it (see the module text)."""

    def __init__(
        self,
        memo: IdentityMemo,
        inherited: IdentityMemo,
        cache: VerdictCache,
        locations: LocationIndex,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.memo, self.inherited, self.cache, self.locations = memo, inherited, cache, locations
        self.max_entries = max_entries
        self.map: dict[Identity, HotEntry] = {}
        self._epoch: object = object()
        self._seen: tuple[int, str] = (-1, "")  # the generations' sum and the version
        self.served = 0  # hits answered from the table
        self.epochs = 0  # epochs started (the table invalidated)

    def epoch(self, version: str) -> object | None:
        """The current epoch for a batch under pattern ``version``, or None when the table
        must not be used now (a link is nearly full). Call once per batch, before looking
        anything up in the chain: an entry stored with it is stale as soon as anything the
        chain holds changes afterwards, because the next call sees that."""
        seen = (
            self.memo.generation
            + self.inherited.generation
            + self.cache.generation
            + self.locations.generation,
            version,
        )
        if seen != self._seen:
            self._seen = seen
            self._epoch = object()
            self.epochs += 1
        roomy = (
            self.memo.roomy(ROOMY)
            and self.inherited.roomy(ROOMY)
            and self.locations.roomy(ROOMY)
            and self.cache.roomy(ROOMY)
        )
        return self._epoch if roomy else None

    def store(self, ident: Identity, entry: HotEntry) -> None:
        """Keep ``entry`` (stamped with the epoch of the batch that looked it up)."""
        if len(self.map) >= self.max_entries and ident not in self.map:
            self.map.clear()
        self.map[ident] = entry

    def count(self, served: int, clones: int) -> None:
        """Count ``served`` hot hits, ``clones`` of them by inherited identity, as the
        chain's lookups would have been counted (memo, inherited memo, cache)."""
        self.served += served
        self.memo.count(served - clones, clones)
        if clones:
            self.inherited.count(clones)
        self.cache.count_hits(served)
