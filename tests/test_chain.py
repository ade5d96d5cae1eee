"""The chain's one-part fast path (``_Chain._feed_simple``) against its general loop.

Most real signatures are one literal that may start anywhere; their hits are settled with
numpy in a batch. Turning the fast path off (every part through the general loop) must give
the same matches, in the same order, with the same end offsets, across window boundaries and
with other kinds of signatures (offsets, several parts, counted subsignatures) mixed in.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offscan import Matcher, PatternDB
from offscan.engine import _Chain

ALPHABET = b"ab\x00"  # a tiny alphabet: many overlapping hits per window


def _db(bodies: list[bytes]) -> PatternDB:
    lines = []
    for i, b in enumerate(bodies):
        offset = ("*", "0", "EOF-8")[i % 5 % 3] if i % 5 >= 3 else "*"
        hexed = b.hex()
        if i % 4 == 3 and len(b) >= 4:  # a two-part signature
            hexed = b[:2].hex() + "{0-3}" + b[2:].hex()
        lines.append(f"Chain.Sig-{i}:0:{offset}:{hexed}")
    lines.append("Chain.Ldb;Target:0;0>2;6161")  # a counted subsignature (every hit)
    return PatternDB.from_text(
        [("c.ndb", "\n".join(lines[:-1]) + "\n"), ("c.ldb", lines[-1] + "\n")]
    )


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # impl: a plain string
)
@given(
    bodies=st.lists(
        st.binary(min_size=2, max_size=6).map(lambda b: bytes(ALPHABET[x % 3] for x in b)),
        min_size=1,
        max_size=12,
    ),
    data=st.binary(min_size=0, max_size=600).map(lambda b: bytes(ALPHABET[x % 3] for x in b)),
    window=st.sampled_from([16, 64, 4096]),
)
def test_fast_path_matches_the_general_loop(
    bodies: list[bytes], data: bytes, window: int, impl: str
) -> None:
    db = _db(bodies)
    fast = Matcher(db, impl=impl, window_size=window)
    slow = Matcher(db, impl=impl, window_size=window)
    assert fast._simple.any() or not any(s.offset.kind == "any" for s in db.body)
    slow._simple = np.zeros_like(slow._simple)  # every hit through the general loop
    a, b = fast.scan_bytes(data), slow.scan_bytes(data)
    assert a.matches == b.matches
    assert a.status == b.status
    assert _ends(fast, data) == _ends(slow, data)  # each signature's first match, its end


def _ends(m: Matcher, data: bytes) -> tuple[dict[int, int], dict[int, set[int]]]:
    """The chain's matched signatures with their end offsets, windowed as scan_bytes does."""
    done = np.zeros(max(1, m.tables.n_parts), dtype=np.uint8)
    chain = _Chain(m, len(data), done)
    for view, base, carried in m._memory_windows(memoryview(data)):
        parts, starts = m.core.find(view, carried, done)
        chain.feed(parts, starts, base)
    return chain.matched, chain.hits
