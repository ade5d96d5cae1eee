"""The scanning engine: a :class:`Matcher` compiled from a :class:`PatternDB`.

The matcher core (native or Python twin, see ``_match``) finds verified hits of signature
*parts*; this module chains parts across gaps, applies offsets, checks hash signatures and
scans files in bounded, overlapping windows so memory stays bounded for any file size.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from . import _match
from ._tables import build_tables
from .signatures import HashSignature, PatternDB
from .signatures.logic import LogicalIndex

__all__ = [
    "DEFAULT_MAX_FILE_SIZE",
    "DEFAULT_SCAN_TIMEOUT",
    "DEFAULT_WINDOW_SIZE",
    "Matcher",
    "ReadDigest",
    "ScanResult",
    "read_digest",
]

DEFAULT_WINDOW_SIZE = 1 << 20  # bytes read and matched per step
DEFAULT_MAX_FILE_SIZE = 100 << 20  # bytes, as ClamAV's MaxFileSize
DEFAULT_SCAN_TIMEOUT = 120.0  # seconds, as ClamAV's MaxScanTime

Status = Literal["clean", "infected", "error"]


@dataclass(frozen=True, slots=True)
class ScanResult:
    """The verdict for one file or buffer.

    ``matches`` lists signature names, earliest body match first, then hash matches.
    ``changed`` is set when the file's size or times changed while it was read, so a cache must
    not keep the verdict. ``digest`` is the SHA-256 hex digest when it was asked for.
    """

    path: str | None
    status: Status
    matches: tuple[str, ...] = ()
    reason: str | None = None
    size: int = 0
    bytes_scanned: int = 0
    changed: bool = False
    digest: str | None = None
    elapsed: float = field(default=0.0, compare=False)

    @property
    def infected(self) -> bool:
        return self.status == "infected"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _select_core(impl: str) -> type:
    if impl == "py":
        return _match.PyCore
    if impl == "c":
        if _match.NativeCore is None:
            raise RuntimeError(f"native matcher not available: {_match.NATIVE_IMPORT_ERROR}")
        return _match.NativeCore
    if impl == "auto":
        return _match.Core
    raise ValueError(f"impl must be 'auto', 'c' or 'py', not {impl!r}")


class _Chain:
    """Chains part hits into signature matches for one scan (state carried across windows)."""

    __slots__ = ("m", "size", "ranges", "feasible", "matched", "done", "hits")

    def __init__(self, m: Matcher, size: int, done: np.ndarray) -> None:
        self.m = m
        self.size = size
        # start ranges are computed on a signature's first hit: building them all up front
        # cost O(signatures) per scan (15 ms per tiny file at 100k signatures)
        self.ranges: dict[int, tuple[int, int] | None] = {}
        self.feasible: dict[tuple[int, int], deque[int]] = {}
        self.matched: dict[int, int] = {}  # signature index -> end offset of its first match
        self.done = done
        self.hits: dict[int, set[int]] = {}  # all_hits signature -> end offsets of every match

    def feed(self, parts: np.ndarray, starts: np.ndarray, base: int) -> None:
        if not len(parts):
            return
        m = self.m
        simple = m._simple[parts].view(np.bool_)
        if simple.any():
            self._feed_simple(parts[simple], starts[simple], base)
            if simple.all():
                return
            rest = ~simple
            parts, starts = parts[rest], starts[rest]
        order = np.lexsort((parts, starts))
        part_sig, part_index, part_len = m._part_sig, m._part_index, m._part_len
        gaps, nparts, matched, feasible = m._gaps, m._nparts, self.matched, self.feasible
        for p, s in zip(parts[order].tolist(), (starts[order] + base).tolist()):
            sig = part_sig[p]
            if sig in matched:
                continue
            k = part_index[p]
            if k == 0:
                if sig in self.ranges:
                    rng = self.ranges[sig]
                else:
                    rng = self.ranges[sig] = m.db.body[sig].offset.start_range(self.size)
                if rng is None or not rng[0] <= s <= rng[1]:
                    continue
            else:
                q = feasible.get((sig, k - 1))
                if not q:
                    continue
                gmin, gmax = gaps[sig][k - 1]
                if gmax is not None:
                    lo = s - gmax
                    while q and q[0] < lo:
                        q.popleft()
                    if not q:
                        continue
                if q[0] > s - gmin:
                    continue
            e = s + part_len[p]
            if k == nparts[sig] - 1 and sig in m._logic.all_hits:
                m._logic.record(self.hits, sig, e, self.size)  # counted: every match, bounded
            elif k == nparts[sig] - 1:
                matched[sig] = e
                self.done[m._sig_parts[sig]] = 1  # no more hits of this signature are needed
                feasible.pop((sig, k - 1), None)
            else:
                q2 = feasible.get((sig, k))
                if q2 is None:
                    feasible[(sig, k)] = deque([e])
                elif gaps[sig][k][1] is not None:
                    q2.append(e)  # after an unbounded gap only the earliest end matters

    def _feed_simple(self, parts: np.ndarray, starts: np.ndarray, base: int) -> None:
        """Hits of one-part signatures that may start anywhere and need only their first
        match (most real signatures): the earliest hit of each part is its signature's match,
        found with numpy instead of one Python step per hit (a real file can hold thousands)."""
        m, matched = self.m, self.matched
        order = np.argsort(starts, kind="stable")  # earliest first; np.unique keeps the first
        uniq, first = np.unique(parts[order], return_index=True)
        ends = starts[order][first].astype(np.int64) + (base + m._part_len_np[uniq])
        part_sig = m._part_sig
        for p, e in zip(uniq.tolist(), ends.tolist()):
            sig = part_sig[p]
            if sig not in matched:
                matched[sig] = e
        self.done[uniq] = 1  # a one-part signature's only part: no more hits of it are needed


class Matcher:
    """Body and hash signatures of one PatternDB, compiled for scanning buffers and files.

    ``impl`` picks the core: ``"c"`` (native), ``"py"`` (twin) or ``"auto"``. A Matcher is
    immutable and safe to share between threads; the native core releases the GIL.
    """

    def __init__(
        self,
        db: PatternDB,
        *,
        impl: str = "auto",
        window_size: int = DEFAULT_WINDOW_SIZE,
        max_file_size: int = DEFAULT_MAX_FILE_SIZE,
        max_scan_time: float = DEFAULT_SCAN_TIMEOUT,
    ) -> None:
        if window_size < 1:
            raise ValueError("window_size must be positive")
        self.db = db
        self.window_size = window_size
        self.max_file_size = max_file_size
        self.max_scan_time = max_scan_time
        self.tables = build_tables(db)
        core_cls = _select_core(impl)
        self.core = core_cls(self.tables)
        self.native = core_cls is _match.NativeCore
        self.overlap = self.tables.max_part_len - 1
        t = self.tables
        self._part_sig = t.part_sig.tolist()
        self._part_index = t.part_index.tolist()
        self._part_len = t.part_len.tolist()
        self._nparts = [len(s.parts) for s in db.body]
        self._gaps = [[(g.min, g.max) for g in s.gaps] for s in db.body]
        first = np.cumsum([0] + self._nparts)
        self._sig_parts = [np.arange(first[i], first[i + 1]) for i in range(len(db.body))]
        self._logic = LogicalIndex(db)
        self._part_len_np = t.part_len.astype(np.int64)
        # per part: 1 when its hit alone is its signature's match (one part, any offset, only
        # the first match needed): _Chain.feed settles those hits without a Python step each
        sig_simple = np.array(
            [len(g.parts) == 1 and g.offset.kind == "any" and not g.all_hits for g in db.body],
            dtype=np.uint8,
        )
        self._simple = np.zeros(max(1, len(t.part_sig)), dtype=np.uint8)
        self._simple[: len(t.part_sig)] = sig_simple[t.part_sig] if len(t.part_sig) else 0
        self._hash_by_size: dict[int, list[HashSignature]] = {}
        self._hash_any: list[HashSignature] = []
        for h in db.hashes:
            if h.size is None:
                self._hash_any.append(h)
            else:
                self._hash_by_size.setdefault(h.size, []).append(h)

    @property
    def version(self) -> str:
        return self.db.version

    # -- scanning -------------------------------------------------------------------------

    def scan_bytes(
        self, data: bytes | bytearray | memoryview, *, allmatch: bool = True, digest: bool = False
    ) -> ScanResult:
        """Scan an in-memory buffer (windowed exactly like a file)."""
        view = memoryview(data).cast("B")
        size = len(view)
        if size > self.max_file_size:
            return self._limit(None, size)

        return self._run(None, size, self._memory_windows(view), allmatch=allmatch, digest=digest)

    def _memory_windows(self, view: memoryview) -> Iterator[tuple[memoryview, int, int]]:
        """The windows of an in-memory buffer, overlapping as a file's windows do."""
        pos, size = 0, len(view)
        while pos < size:
            start = max(0, pos - self.overlap)
            end = min(size, pos + self.window_size)
            yield view[start:end], start, pos - start
            pos = end

    def scan_path(
        self,
        path: str | os.PathLike[str],
        *,
        allmatch: bool = False,
        follow_symlinks: bool = True,
        digest: bool = False,
    ) -> ScanResult:
        """Scan a file by path. Special files, unreadable and vanishing files give an error
        result with a reason; nothing blocks (FIFOs are never opened)."""
        spath = os.fspath(path)
        try:
            st = os.stat(spath) if follow_symlinks else os.lstat(spath)
        except OSError as exc:
            return ScanResult(spath, "error", reason=_os_reason(exc))
        kind = _special_kind(st.st_mode)
        if kind:
            return ScanResult(spath, "error", reason=f"not a regular file ({kind})")
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
        if not follow_symlinks:
            flags |= os.O_NOFOLLOW
        try:
            fd = os.open(spath, flags)
        except OSError as exc:
            return ScanResult(spath, "error", reason=_os_reason(exc))
        try:
            return self.scan_fd(fd, path=spath, allmatch=allmatch, digest=digest)
        finally:
            os.close(fd)

    def scan_fd(
        self,
        fd: int,
        *,
        path: str | None = None,
        allmatch: bool = False,
        digest: bool = False,
        preread: bytes | bytearray | None = None,
    ) -> ScanResult:
        """Scan an open file descriptor from its current start (uses pread; offset untouched).

        Each window is hashed (``digest``) in the same read that matches it. ``preread`` is the
        file's content already read (by :func:`read_digest`): when it has the file's size it is
        matched from memory, so a file is read once for its digest and its verdict."""
        try:
            st = os.fstat(fd)
        except OSError as exc:
            return ScanResult(path, "error", reason=_os_reason(exc))
        kind = _special_kind(st.st_mode)
        if kind:
            return ScanResult(path, "error", reason=f"not a regular file ({kind})")
        size = st.st_size
        if size > self.max_file_size:
            return self._limit(path, size)
        if preread is not None and len(preread) == size:
            view = memoryview(preread).cast("B")
            result = self._run(
                path, size, self._memory_windows(view), allmatch=allmatch, digest=digest
            )
            return self._check_unchanged(fd, st, result, None)
        buf = np.empty(self.overlap + self.window_size, dtype=np.uint8)
        mv = buf.data  # a memoryview of the array's buffer
        state: dict[str, Any] = {"read": 0, "error": None, "eof_at": None}

        def windows() -> Iterator[tuple[memoryview, int, int]]:
            carried = 0
            base = 0
            pos = 0
            while True:
                filled = carried
                try:
                    while filled < len(buf):
                        n = os.preadv(fd, [mv[filled:]], pos)
                        if n == 0:
                            state["eof_at"] = pos
                            break
                        pos += n
                        filled += n
                except OSError as exc:
                    state["error"] = _os_reason(exc)
                    return
                if filled == carried:
                    return
                state["read"] = pos
                if pos > self.max_file_size:
                    state["error"] = f"file grew beyond max file size ({self.max_file_size} bytes)"
                    return
                yield mv[:filled], base, carried
                keep = min(self.overlap, filled)
                buf[:keep] = buf[filled - keep : filled]
                base += filled - keep
                carried = keep

        result = self._run(path, size, windows(), allmatch=allmatch, digest=digest)
        if state["error"]:
            return ScanResult(
                path, "error", reason=state["error"], size=size, bytes_scanned=state["read"]
            )
        return self._check_unchanged(fd, st, result, state["eof_at"])

    @staticmethod
    def _check_unchanged(
        fd: int, st: os.stat_result, result: ScanResult, eof_at: int | None
    ) -> ScanResult:
        """``result`` flagged ``changed`` if the file's size or times moved while it was read
        (or it ended early)."""
        try:
            st2 = os.fstat(fd)
            changed = (st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns) != (
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
            ) or eof_at not in (None, st.st_size)
        except OSError:
            changed = True
        return _replace(result, changed=True) if changed else result

    def scan_chunks(
        self,
        chunks: Iterable[bytes | bytearray | memoryview],
        size: int,
        *,
        path: str | None = None,
        allmatch: bool = True,
        digest: bool = False,
    ) -> ScanResult:
        """Scan content arriving in pieces of any size (a network stream) whose total ``size``
        is declared up front: same windows as a file, memory bounded by one window."""
        if size > self.max_file_size:
            return self._limit(path, size)
        buf = np.empty(self.overlap + self.window_size, dtype=np.uint8)
        mv = buf.data  # a memoryview of the array's buffer
        state: dict[str, Any] = {"error": None, "total": 0}

        def windows() -> Iterator[tuple[memoryview, int, int]]:
            carried = filled = base = 0
            for chunk in chunks:
                piece = memoryview(chunk).cast("B")
                state["total"] += len(piece)
                if state["total"] > size:
                    state["error"] = f"stream longer than its declared size ({size} bytes)"
                    return
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
            if state["total"] != size:
                state["error"] = f"stream ended after {state['total']} of {size} declared bytes"
                return
            if filled > carried or size == 0:
                yield mv[:filled], base, carried

        result = self._run(path, size, windows(), allmatch=allmatch, digest=digest)
        if state["error"]:
            return ScanResult(
                path, "error", reason=state["error"], size=size, bytes_scanned=state["total"]
            )
        return result

    # -- internals ------------------------------------------------------------------------

    def _limit(self, path: str | None, size: int) -> ScanResult:
        return ScanResult(
            path,
            "error",
            size=size,
            reason=f"file size {size} exceeds max file size {self.max_file_size} bytes",
        )

    def _run(
        self,
        path: str | None,
        size: int,
        windows: Iterator[tuple[memoryview, int, int]],
        *,
        allmatch: bool,
        digest: bool,
    ) -> ScanResult:
        t0 = time.monotonic()
        deadline = t0 + self.max_scan_time
        hash_sigs = self._hash_by_size.get(size, []) + self._hash_any
        algos = {h.algorithm for h in hash_sigs}
        if digest:
            algos.add("sha256")
        allow = self.db.allowlist  # .fp/.sfp: a match is reported only if the file is not listed
        allow_algos = allow.algorithms_for(size) if allow is not None else frozenset()
        algos |= allow_algos
        hashers = {a: hashlib.new(a) for a in algos}
        done = np.zeros(max(1, self.tables.n_parts), dtype=np.uint8)
        chain = _Chain(self, size, done)
        scanned = 0
        stopped_early = False
        for view, base, carried in windows:
            new = view[carried:]
            for h in hashers.values():
                h.update(new)
            scanned += len(new)
            parts, starts = self.core.find(view, carried, done)
            chain.feed(parts, starts, base)
            if (
                chain.matched
                and not allmatch
                and not digest
                and not allow_algos
                and self._logic.named(chain.matched)
            ):
                stopped_early = True
                break
            if time.monotonic() > deadline:
                return ScanResult(
                    path,
                    "error",
                    size=size,
                    bytes_scanned=scanned,
                    reason=f"scan time limit of {self.max_scan_time:g} s exceeded",
                    elapsed=time.monotonic() - t0,
                )
        body = sorted(chain.matched.items(), key=lambda kv: (kv[1], kv[0]))
        # a dict keeps the order and dedupes in O(1) (tens of thousands of hits on real files)
        seen: dict[str, None] = dict.fromkeys(
            self.db.body[sig].name for sig, _end in body if sig not in self._logic.parts
        )
        for n in self._logic.evaluate(chain.matched, chain.hits, size):
            seen.setdefault(n)
        names = list(seen)
        if not stopped_early and scanned == size:
            digests = {a: h.digest() for a, h in hashers.items()}
            for hsig in hash_sigs:
                if digests[hsig.algorithm] == hsig.digest and hsig.name not in seen:
                    names.append(hsig.name)
                    seen.setdefault(hsig.name)
            if allow is not None and names:
                names = list(allow.filter(names, digests, size))
        if not allmatch:
            names = names[:1]
        sha = hashers["sha256"].hexdigest() if digest and not stopped_early else None
        return ScanResult(
            path,
            "infected" if names else "clean",
            tuple(names),
            size=size,
            bytes_scanned=scanned,
            digest=sha,
            elapsed=time.monotonic() - t0,
        )


@dataclass(frozen=True, slots=True)
class ReadDigest:
    """A file's SHA-256 from one read, and its bytes when small enough to keep for matching."""

    digest: bytes
    nread: int  # bytes read (short of the size if the file shrank: treat as changed)
    data: bytearray | None


PREREAD_LIMIT = 8 << 20  # bytes: files up to this size keep their content after read_digest
_HASH_BLOCK = 1 << 20  # bytes hashed per read for larger files


def read_digest(fd: int, size: int | None = None, *, keep: int = PREREAD_LIMIT) -> ReadDigest:
    """SHA-256 of an open file from offset 0, read once with ``pread`` (the GIL is released
    while reading and, for buffers over 2 KiB, while hashing). A file of at most ``keep``
    bytes keeps its content, so a cache miss can be matched without reading it again
    (``Matcher.scan_fd(fd, preread=...)``)."""
    if size is None:
        size = os.fstat(fd).st_size
    h = hashlib.sha256()
    buf = bytearray(max(1, min(size, keep if size <= keep else _HASH_BLOCK)))
    view = memoryview(buf)
    got = 0
    while got < size:
        at = got if size <= keep else 0
        want = min(len(buf) - at, size - got)
        n = os.preadv(fd, [view[at : at + want]], got)
        if n == 0:
            break
        if size > keep:
            h.update(view[:n])
        got += n
    view.release()
    if size > keep:
        return ReadDigest(h.digest(), got, None)
    del buf[got:]
    h.update(buf)
    return ReadDigest(h.digest(), got, buf)


def _replace(result: ScanResult, **changes: Any) -> ScanResult:
    d = asdict(result)
    d.update(changes)
    return ScanResult(**d)


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``64k``, ``10m``, ``1g`` (binary units), for limits on the command line."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower()
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def file_kind(mode: int) -> str:
    """A file type for messages: "regular file", "FIFO", "character device"..."""
    if stat.S_ISREG(mode):
        return "regular file"
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symbolic link"),
    ):
        if test(mode):
            return name
    return "special file"


def _special_kind(mode: int) -> str | None:
    return None if stat.S_ISREG(mode) else file_kind(mode)


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such file (vanished?)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "too many levels of symbolic links (loop, or a symlink not followed)"
    return f"{exc.strerror or exc} (errno {exc.errno})"
