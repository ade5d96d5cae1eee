"""Scan-time side of logical signatures: which body signatures stand for subsignatures, and the
evaluation of each logical signature's expression from one scan's matches (used by the engine).
"""

from __future__ import annotations

from collections.abc import Mapping, Set

from .database import PatternDB


class LogicalIndex:
    """Lookups built once per Matcher so a scan touches only the logical signatures that some
    match concerns (plus those true when nothing matches, e.g. ``0=0``)."""

    __slots__ = ("db", "parts", "all_hits", "owner", "always", "at_eof", "cap")

    def __init__(self, db: PatternDB) -> None:
        self.db = db
        self.owner: dict[int, tuple[int, int]] = {}  # body index -> (logical index, subsig)
        at_eof = []
        self.cap: dict[int, int] = {}  # body index -> match ends worth keeping
        for li, lg in enumerate(db.logical):
            cap = lg.count_cap()
            for body, sub, eof in lg.bodies:
                self.owner[body] = (li, sub)
                self.cap[body] = cap
                if eof:
                    at_eof.append(body)
        self.at_eof = frozenset(at_eof)  # only a match ending at EOF counts
        self.parts = frozenset(self.owner)
        self.all_hits = frozenset(i for i in self.parts if db.body[i].all_hits)
        self.always = tuple(
            li for li, lg in enumerate(db.logical) if lg.evaluate([0] * lg.subsigs, 0, sized=False)
        )

    def record(self, hits: dict[int, set[int]], body: int, end: int, size: int) -> None:
        """Note a match of a counted body signature ending at ``end``. Memory stays bounded
        whatever a file holds: past the largest count the expression compares with, more
        matches change nothing, and a fullword-at-EOF variant only needs the match at EOF."""
        if body in self.at_eof and end != size:
            return
        ends = hits.get(body)
        if ends is None:
            hits[body] = {end}
        elif len(ends) < self.cap[body]:
            ends.add(end)

    def named(self, matched: Mapping[int, int]) -> bool:
        """Whether a body signature reported under its own name matched."""
        return any(sig not in self.parts for sig in matched)

    def evaluate(
        self, matched: Mapping[int, int], hits: Mapping[int, Set[int]], size: int
    ) -> list[str]:
        """Names of the logical signatures that match, in database order.

        ``matched`` holds body signatures that matched at least once, ``hits`` every match end
        of the counted (``all_hits``) ones; a subsignature's count is the sum over its bodies.
        """
        if not self.db.logical:
            return []
        counts: dict[int, list[int]] = {li: [0] * self.db.logical[li].subsigs for li in self.always}
        for body in matched:
            owner = self.owner.get(body)
            if owner is not None:
                counts.setdefault(owner[0], [0] * self.db.logical[owner[0]].subsigs)[owner[1]] += 1
        for body, ends in hits.items():
            li, sub = self.owner[body]
            n = len(ends)
            counts.setdefault(li, [0] * self.db.logical[li].subsigs)[sub] += n
        return [
            self.db.logical[li].name
            for li in sorted(counts)
            if self.db.logical[li].evaluate(counts[li], size)
        ]
