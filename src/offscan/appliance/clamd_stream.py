"""INSTREAM content matched as it arrives, never spooled: a stream of unknown length.

clamd spools an INSTREAM to a temporary file and scans the file. Here the chunks go through the
engine's window loop as they arrive (memory: one window plus a bounded tail), on a worker
thread, so the event loop only copies bytes. The length is only known at the end, so what
depends on it is settled then: body signatures anchored at ``EOF-n`` are matched over the last
``n`` bytes kept aside (a match starting at or after ``size - n`` lies inside them), hash
signatures are checked against the digests of the whole stream and its final size, and the
hash allowlist is applied. Touches nothing but the bytes it is given.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..engine import Matcher, ScanResult
from ..signatures import HashSignature, PatternDB
from ..signatures.allowlist import HashAlgorithm

__all__ = ["StreamPlan", "scan_stream", "threaded_pieces"]

_UNKNOWN_SIZE = 1 << 62  # bytes: the size the window loop is told; EOF-anchored starts fall beyond
_ALGORITHMS: tuple[HashAlgorithm, ...] = ("md5", "sha1", "sha256")


@dataclass(frozen=True)
class StreamPlan:
    """What one engine needs for streams of unknown length, built once per matcher: the
    EOF-anchored body signatures as a small matcher of their own, the tail length they need,
    and the hash signatures by size."""

    matcher: Matcher
    tail_matcher: Matcher | None
    tail_len: int
    by_size: dict[int, list[HashSignature]] = field(default_factory=dict)
    any_size: list[HashSignature] = field(default_factory=list)

    @classmethod
    def build(cls, matcher: Matcher) -> StreamPlan:
        db = matcher.db
        eof = tuple(s for s in db.body if s.offset.kind == "eof")
        tail: Matcher | None = None
        if eof:
            tail_db = PatternDB(body=eof, hashes=(), version=db.version + "+eof")
            tail = Matcher(
                tail_db,
                impl="c" if matcher.native else "py",
                max_scan_time=matcher.max_scan_time,
                max_file_size=matcher.max_file_size,
            )
        plan = cls(matcher, tail, max((s.offset.n for s in eof), default=0))
        for h in db.hashes:
            if h.size is None:
                plan.any_size.append(h)
            else:
                plan.by_size.setdefault(h.size, []).append(h)
        return plan


class _Windows:
    """Pieces of any size in, the engine's overlapping windows out (plus digests and tail)."""

    def __init__(self, plan: StreamPlan, pieces: Iterator[bytes]) -> None:
        m = plan.matcher
        self.pieces = pieces
        self.overlap = m.overlap
        self.buf = np.empty(m.overlap + m.window_size, dtype=np.uint8)
        self.hashers = {a: hashlib.new(a) for a in _ALGORITHMS}
        self.tail_len = plan.tail_len
        self.tail = bytearray()
        self.total = 0

    def _account(self, piece: memoryview) -> None:
        self.total += len(piece)
        for h in self.hashers.values():
            h.update(piece)
        if self.tail_len:
            self.tail += piece
            if len(self.tail) > 2 * self.tail_len:  # trim in batches, not per piece
                del self.tail[: len(self.tail) - self.tail_len]

    def __iter__(self) -> Iterator[tuple[memoryview, int, int]]:
        buf, mv = self.buf, self.buf.data
        carried = filled = base = 0
        for chunk in self.pieces:
            piece = memoryview(chunk).cast("B")
            self._account(piece)
            while len(piece):
                take = min(len(buf) - filled, len(piece))
                mv[filled : filled + take] = piece[:take]
                filled += take
                piece = piece[take:]
                if filled == len(buf):
                    yield mv[:filled], base, carried
                    keep = min(self.overlap, filled)
                    buf[:keep] = buf[filled - keep : filled]
                    base += filled - keep
                    carried = filled = keep
        if filled > carried:
            yield mv[:filled], base, carried
        if self.tail_len and len(self.tail) > self.tail_len:
            del self.tail[: len(self.tail) - self.tail_len]


def scan_stream(plan: StreamPlan, pieces: Iterator[bytes], *, allmatch: bool = True) -> ScanResult:
    """Match a stream whose pieces ``pieces`` yields (blocking: run it on a worker thread).

    Uses the matcher's window loop with a size it cannot reach, then settles what needs the
    real size: EOF-anchored signatures over the kept tail, hash signatures, the allowlist."""
    m = plan.matcher
    windows = _Windows(plan, pieces)
    res = m._run(None, _UNKNOWN_SIZE, iter(windows), allmatch=True, digest=False)
    size = windows.total
    if res.status == "error":
        return ScanResult(None, "error", reason=res.reason, size=size, bytes_scanned=size)
    names = list(res.matches)
    if plan.tail_matcher is not None and size:
        tail = plan.tail_matcher.scan_bytes(bytes(windows.tail), allmatch=True)
        names += [n for n in tail.matches if n not in names]
    digests = {a: h.digest() for a, h in windows.hashers.items()}
    for h in plan.by_size.get(size, []) + plan.any_size:
        if digests[h.algorithm] == h.digest and h.name not in names:
            names.append(h.name)
    names = _allowed(m.db, names, digests, size)
    if not allmatch:
        names = names[:1]
    return ScanResult(
        None,
        "infected" if names else "clean",
        tuple(names),
        size=size,
        bytes_scanned=size,
        digest=digests["sha256"].hex(),
    )


def _allowed(
    db: PatternDB, names: list[str], digests: dict[HashAlgorithm, bytes], size: int
) -> list[str]:
    """The matches left once the database's allowlists (.fp/.sfp/.ign2) are applied."""
    allow = db.allowlist
    if allow is None or not names:
        return names
    return list(allow.filter(names, digests, size))


def threaded_pieces(
    queue: asyncio.Queue[bytes | None | BaseException],
    loop: asyncio.AbstractEventLoop,
    timeout: float,
) -> Iterator[bytes]:
    """Pieces put on an asyncio queue by the event loop, taken from a worker thread; ``None``
    ends the stream, an exception aborts it. A stall longer than ``timeout`` seconds raises
    TimeoutError."""
    while True:
        item = asyncio.run_coroutine_threadsafe(queue.get(), loop).result(timeout)
        if item is None:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
