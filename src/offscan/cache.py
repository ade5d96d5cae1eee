"""The cache: identity memo, content digests, the verdict cache and single-flight.

The appliance's scan pipeline asks, in order: *have we seen this file identity before?*
(:class:`IdentityMemo`, no read needed), *what is its content digest?* (:func:`digest_fd`),
*do we already have a verdict for this content under the current pattern version?*
(:class:`VerdictCache`), and *is someone already scanning this content?* (:class:`SingleFlight`).
Only when all four say no does the engine run, so the same content is matched at most once per
pattern version across every VM on the host (DESIGN.md invariant 2).

Digests are SHA-256. A non-cryptographic hash (xxhash, CRC, ...) is not an option: the verdict
cache hands a verdict to *any* content with the same digest, so an attacker who can build a
collision with a known-clean file would have their malware served that clean verdict without it
ever being matched.

The verdict cache can persist to an append-only log in a state directory (see
:class:`VerdictCache`), so an appliance restarted after a crash, even ``kill -9``, serves the
verdicts it reached before the crash instead of matching that content again.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import heapq
import itertools
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgpack

if TYPE_CHECKING:
    from typing import Self  # 3.11+; pyproject still allows 3.10

__all__ = [
    "DIGEST_ALGORITHM",
    "DIGEST_SIZE",
    "CacheError",
    "CachedVerdict",
    "Identity",
    "IdentityMemo",
    "LogCorruptError",
    "SingleFlight",
    "StateDirLockedError",
    "VerdictCache",
    "content_digest",
    "digest_bytes",
    "digest_fd",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DIGEST_ALGORITHM = "sha256"
DIGEST_SIZE = 32  # bytes
MIN_DIGEST_SIZE = 16  # bytes; anything shorter is not a cryptographic digest
READ_BLOCK = 1 << 20  # bytes per pread when digesting a file

DEFAULT_MAX_ENTRIES = 1_000_000
DEFAULT_SHARDS = 16
DEFAULT_FSYNC_INTERVAL = 1.0  # seconds between fsyncs of the verdict log
DEFAULT_COMPACT_MIN_RECORDS = 4096  # never compact a log shorter than this
COMPACT_RETRY_DELAY = 60.0  # seconds to wait after a failed compaction (e.g. disk full)
COMPACT_RATIO = 2  # compact when the log holds more than this many records per live entry

LOG_NAME = "verdicts.log"
LOCK_NAME = "verdicts.lock"
LOG_MAGIC = b"OFSVLOG1"  # file header: format name and version
RECORD_HEADER = struct.Struct("<II")  # payload length (bytes), zlib.crc32 of the payload
MAX_RECORD_BYTES = 1 << 20  # a longer length field means corruption, not a real record

Status = Literal["clean", "infected"]
_CACHEABLE = ("clean", "infected")


class CacheError(RuntimeError):
    """The verdict cache cannot use its state directory."""


class StateDirLockedError(CacheError):
    """Another process (or another VerdictCache in this one) already uses the state directory."""


class LogCorruptError(CacheError):
    """The verdict log is not an offscan verdict log (wrong header), so it is left untouched."""


# ---------------------------------------------------------------------------------------------
# Identities and verdicts


@dataclass(frozen=True, slots=True)
class Identity:
    """What identifies a file's content cheaply, without reading it.

    ``source`` names where the file lives (VM or image), so equal inode numbers in different
    sources never alias. Any write changes ``mtime_ns`` or ``ctime_ns``.
    """

    source: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, source: str, st: os.stat_result) -> Identity:
        return cls(source, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @classmethod
    def from_fd(cls, source: str, fd: int) -> Identity:
        """The identity of an open file; compare before and after reading to detect changes."""
        return cls.from_stat(source, os.fstat(fd))


@dataclass(frozen=True, slots=True)
class CachedVerdict:
    """A verdict the cache may serve: content ``digest``/``size`` under ``pattern_version``.

    Only "clean" and "infected" are cacheable; an "error" (timeout, unreadable file, ...) must
    be retried, so constructing one raises ValueError.
    """

    status: Status
    matches: tuple[str, ...]
    pattern_version: str
    digest: bytes
    size: int
    scanned_at: float  # unix time

    def __post_init__(self) -> None:
        if self.status not in _CACHEABLE:
            raise ValueError(f"only clean and infected verdicts are cached, not {self.status!r}")
        if not isinstance(self.digest, bytes) or len(self.digest) < MIN_DIGEST_SIZE:
            raise ValueError(
                f"digest must be a cryptographic digest (bytes, >= {MIN_DIGEST_SIZE} long), "
                f"not {self.digest!r:.80}"
            )
        if not isinstance(self.matches, tuple):
            object.__setattr__(self, "matches", tuple(self.matches))

    @property
    def infected(self) -> bool:
        return self.status == "infected"


# ---------------------------------------------------------------------------------------------
# Content digests


def digest_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of a buffer (hashlib releases the GIL while hashing buffers over 2 KiB)."""
    return hashlib.sha256(data).digest()


def digest_fd(fd: int, size: int | None = None) -> tuple[bytes, int]:
    """SHA-256 of an open file from offset 0, read with ``pread`` in 1 MiB blocks.

    Reads ``size`` bytes, or to end of file when ``size`` is None, and returns
    ``(digest, bytes_read)``; ``bytes_read`` is short of ``size`` if the file shrank, which
    the caller should treat as "changed while read". ``pread`` leaves the fd's offset alone, so
    the same fd can be digested and scanned by different threads.
    """
    h = hashlib.sha256()
    # Most files are small: size the buffer to the file (+1 to see EOF in the same pass).
    hint = size if size is not None else os.fstat(fd).st_size + 1
    buf = bytearray(max(1, min(READ_BLOCK, hint)))
    view = memoryview(buf)
    offset = 0
    while size is None or offset < size:
        want = len(buf) if size is None else min(len(buf), size - offset)
        n = os.preadv(fd, [view[:want]], offset)
        if n == 0:
            break
        h.update(view[:n])
        offset += n
    return h.digest(), offset


def content_digest(
    data_or_fd: int | bytes | bytearray | memoryview, size: int | None = None
) -> bytes:
    """SHA-256 of a buffer, or of an open file descriptor (see :func:`digest_fd`)."""
    if isinstance(data_or_fd, int):
        return digest_fd(data_or_fd, size)[0]
    if size is not None:
        raise TypeError("size only applies to file descriptors")
    return digest_bytes(data_or_fd)


# ---------------------------------------------------------------------------------------------
# Identity memo


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

    def get(self, ident: Identity) -> bytes | None:
        with self._lock:
            digest = self._map.get(ident)
            if digest is None:
                self.misses += 1
                return None
            self._map.move_to_end(ident)
            self.hits += 1
            return digest

    def put(self, ident: Identity, digest: bytes) -> None:
        with self._lock:
            self._map[ident] = digest
            self._map.move_to_end(ident)
            if len(self._map) > self.max_entries:
                self._map.popitem(last=False)
                self.evictions += 1

    def discard(self, ident: Identity) -> None:
        """Forget an identity (e.g. the file changed while it was read)."""
        with self._lock:
            self._map.pop(ident, None)

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


# ---------------------------------------------------------------------------------------------
# Verdict cache


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


def _encode_record(v: CachedVerdict) -> bytes:
    payload = msgpack.packb(
        [v.digest, v.size, v.pattern_version, v.status, list(v.matches), v.scanned_at],
        use_bin_type=True,
    )
    return RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> CachedVerdict:
    fields = msgpack.unpackb(payload, raw=False)
    if not isinstance(fields, list) or len(fields) != 6:
        raise ValueError("record is not a 6-field array")
    digest, size, version, status, matches, scanned_at = fields
    if not (
        isinstance(size, int)
        and isinstance(version, str)
        and isinstance(matches, list)
        and all(isinstance(m, str) for m in matches)
        and isinstance(scanned_at, (int, float))
    ):
        raise ValueError("record field has the wrong type")
    return CachedVerdict(status, tuple(matches), version, digest, size, float(scanned_at))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VerdictCache:
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

        self.state_dir: str | None = None
        self.fsync_interval = fsync_interval
        self.compact_min_records = compact_min_records
        self._log_fd = -1
        self._lock_fd = -1
        self._log_size = 0  # bytes, header included
        self._log_records = 0
        self._dirty = False  # written since the last fsync
        self._replayed = 0
        self._compactions = 0
        self._persist_errors = 0
        self._compact_requested = False
        self._compact_not_before = 0.0  # monotonic time; set after a failed compaction
        # Held while the log fd is fsynced or swapped, so the two never overlap.
        self._fsync_lock = threading.Lock()
        self._compact_lock = threading.Lock()  # one compaction at a time
        self._wake = threading.Condition(threading.Lock())
        self._stop = False
        self._thread: threading.Thread | None = None
        if state_dir is not None:
            self._open_state(os.fspath(state_dir))

    # -- lookups -------------------------------------------------------------------------------

    def get(self, digest: bytes, size: int, pattern_version: str) -> CachedVerdict | None:
        key = (digest, size, pattern_version)
        shard = self._shards[digest[0] % self._nshards]
        with shard.lock:
            entry = shard.map.get(key)
            if entry is None:
                shard.misses += 1
                return None
            shard.map.move_to_end(key)
            entry.tick = next(self._ticks)
            shard.hits += 1
            return entry.verdict

    def put(self, verdict: CachedVerdict) -> None:
        """Cache a verdict (replacing any for the same key) and append it to the log."""
        if not isinstance(verdict, CachedVerdict):
            raise TypeError(f"put takes a CachedVerdict, not {type(verdict).__name__}")
        record = _encode_record(verdict) if self._log_fd >= 0 else b""
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

    def _insert(self, verdict: CachedVerdict) -> None:
        key = (verdict.digest, verdict.size, verdict.pattern_version)
        shard = self._shards[verdict.digest[0] % self._nshards]
        with shard.lock:
            m = shard.map
            m[key] = _Entry(verdict, next(self._ticks))
            m.move_to_end(key)
            shard.puts += 1
            while len(m) > shard.capacity:
                m.popitem(last=False)
                shard.evictions += 1

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

    # -- persistence ---------------------------------------------------------------------------

    @property
    def log_path(self) -> str | None:
        return None if self.state_dir is None else os.path.join(self.state_dir, LOG_NAME)

    def _open_state(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        lock_path = os.path.join(state_dir, LOCK_NAME)
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(lock_fd)
            raise StateDirLockedError(
                f"state directory {state_dir} is in use (pid {holder} holds {LOCK_NAME}); "
                "give each appliance its own --state directory, or stop the other one"
            ) from None
        except BaseException:
            os.close(lock_fd)
            raise
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = lock_fd
        self.state_dir = state_dir
        try:
            self._replay()
        except BaseException:
            self._release_state()
            raise
        self._thread = threading.Thread(
            target=self._background, name=f"offscan-verdict-log:{state_dir}", daemon=True
        )
        self._thread.start()
        self._maybe_request_compaction()

    def _replay(self) -> None:
        """Load the log into memory, cut off a torn or corrupt tail, and open it for appending."""
        path = self.log_path
        assert path is not None
        try:
            os.unlink(path + ".tmp")  # a compaction the last process did not finish
        except FileNotFoundError:
            pass
        if not os.path.exists(path):
            self._create_empty_log(path)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        try:
            file_size = os.fstat(fd).st_size
            with open(path, "rb", buffering=READ_BLOCK) as f:
                magic = f.read(len(LOG_MAGIC))
                if magic != LOG_MAGIC:
                    raise LogCorruptError(
                        f"{path} is not an offscan verdict log (header {magic[:16]!r}); "
                        "move it away to start with an empty cache"
                    )
                good, records, problem = self._replay_records(f, file_size)
            if good < file_size:
                lost = file_size - good
                if problem == "torn":
                    log.info("%s: dropping a torn last record (%d bytes)", path, lost)
                else:
                    log.warning(
                        "%s: corrupt record at offset %d (%s); kept %d records before it, "
                        "dropping the remaining %d bytes",
                        path,
                        good,
                        problem,
                        records,
                        lost,
                    )
                os.ftruncate(fd, good)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._log_fd = fd
        self._log_size = good
        self._log_records = records
        self._replayed = records
        for shard in self._shards:  # replay is not traffic
            shard.puts = shard.evictions = 0

    def _replay_records(self, f: Any, file_size: int) -> tuple[int, int, str | None]:
        """Returns (offset after the last good record, good records, why replay stopped)."""
        offset = len(LOG_MAGIC)
        records = 0
        hsize = RECORD_HEADER.size
        while offset < file_size:
            header = f.read(hsize)
            if len(header) < hsize:
                return offset, records, "torn"
            length, crc = RECORD_HEADER.unpack(header)
            end = offset + hsize + length
            if length > MAX_RECORD_BYTES:
                return offset, records, f"length {length} exceeds {MAX_RECORD_BYTES}"
            payload = f.read(length)
            if len(payload) < length:
                return offset, records, "torn"
            if zlib.crc32(payload) != crc:
                # A bad CRC on the very last record is what a crash mid-write leaves behind.
                return offset, records, "torn" if end == file_size else "CRC mismatch"
            try:
                verdict = _decode_payload(payload)
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                return offset, records, f"undecodable record: {exc}"
            self._insert(verdict)
            records += 1
            offset = end
        return offset, records, None

    def _create_empty_log(self, path: str) -> None:
        """Create the log with just its header, atomically, so it is never seen half-written."""
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, LOG_MAGIC)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))

    def _append(self, record: bytes) -> None:
        """Write one record (caller holds _write_lock); a failed write is cut back off."""
        try:
            _write_all(self._log_fd, record)
        except OSError as exc:
            self._persist_errors += 1
            try:
                os.ftruncate(self._log_fd, self._log_size)
            except OSError:
                pass
            if self._persist_errors == 1 or exc.errno != errno.ENOSPC:
                log.warning("%s: cannot persist verdict: %s", self.log_path, exc)
            return
        self._log_size += len(record)
        self._log_records += 1
        if self.fsync_interval == 0:
            os.fsync(self._log_fd)
        else:
            self._dirty = True
        self._maybe_request_compaction()

    def _needs_compaction(self) -> bool:
        threshold = max(COMPACT_RATIO * len(self), self.compact_min_records)
        return self._log_records > threshold

    def _maybe_request_compaction(self) -> None:
        if (
            not self._compact_requested
            and time.monotonic() >= self._compact_not_before
            and self._needs_compaction()
        ):
            self._compact_requested = True
            with self._wake:
                self._wake.notify()

    def flush(self) -> None:
        """Make every verdict put so far durable (fsync the log)."""
        if self._log_fd < 0:
            return
        with self._fsync_lock:
            with self._write_lock:
                self._dirty = False
                fd = self._log_fd
            if fd >= 0:
                os.fsync(fd)

    def compact(self) -> None:
        """Rewrite the log to hold only the live entries (coldest first), atomically.

        Puts go on while the snapshot is written; records appended meanwhile are copied over
        before the new log replaces the old one, so nothing put is lost.
        """
        with self._compact_lock:
            if self._log_fd >= 0:
                self._compact()

    def _compact(self) -> None:
        path = self.log_path
        assert path is not None
        with self._write_lock:
            snapshot = list(self.entries())
            start = self._log_size
            records_at_start = self._log_records
        snapshot.reverse()  # coldest first, so replay rebuilds the recency order
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            size = len(LOG_MAGIC)
            batch = [LOG_MAGIC]
            for verdict in snapshot:
                record = _encode_record(verdict)
                batch.append(record)
                size += len(record)
                if len(batch) >= 4096:
                    _write_all(fd, b"".join(batch))
                    batch.clear()
            _write_all(fd, b"".join(batch))
            os.fsync(fd)  # the bulk, before puts have to wait
            with self._fsync_lock, self._write_lock:
                # Records put since the snapshot: copy them over verbatim.
                tail_records = self._log_records - records_at_start
                pos = start
                while pos < self._log_size:
                    chunk = os.pread(self._log_fd, min(READ_BLOCK, self._log_size - pos), pos)
                    if not chunk:
                        break
                    _write_all(fd, chunk)
                    pos += len(chunk)
                size += self._log_size - start
                os.fsync(fd)
                new_fd = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.close(new_fd)
                    raise
                os.close(self._log_fd)
                self._log_fd = new_fd
                self._log_size = size
                self._log_records = len(snapshot) + tail_records
                self._dirty = False
                self._compactions += 1
                _fsync_dir(os.path.dirname(path))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        finally:
            os.close(fd)
        log.debug("%s: compacted to %d records, %d bytes", path, self._log_records, size)

    def _background(self) -> None:
        """Fsync the log every fsync_interval seconds and compact it when asked."""
        interval = self.fsync_interval if self.fsync_interval > 0 else None
        next_sync = time.monotonic() + (interval or 0)
        while True:
            with self._wake:
                timeout = None if interval is None else max(0.0, next_sync - time.monotonic())
                if not (self._stop or self._compact_requested):
                    self._wake.wait(timeout)
                stop = self._stop
                compact = self._compact_requested
            if stop:
                return
            try:
                if compact:
                    if self._needs_compaction():
                        self.compact()
                    self._compact_requested = False
                    self._maybe_request_compaction()
                if interval is not None and time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + interval
                    if self._dirty:
                        self.flush()
            except Exception:  # never let the log thread die silently
                self._compact_not_before = time.monotonic() + COMPACT_RETRY_DELAY
                self._compact_requested = False
                self._persist_errors += 1
                log.exception("%s: verdict log maintenance failed", self.log_path)

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

    def _release_state(self) -> None:
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the only fd releases the flock
            self._lock_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" state_dir={self.state_dir!r}" if self.state_dir else ""
        return f"<VerdictCache {len(self)}/{self.max_entries} entries{where}>"


# ---------------------------------------------------------------------------------------------
# Single-flight


class SingleFlight:
    """Concurrent asyncio callers asking for the same key share one execution.

    The first caller's ``fn()`` runs in its own task; later callers with the same key await
    that task, so they all get its result or its exception. A caller that is cancelled leaves
    the others waiting; the shared task is cancelled only when every caller has gone. The key
    is forgotten as the execution completes, so the next call runs ``fn`` again.
    """

    def __init__(self) -> None:
        self._calls: dict[Hashable, _Call] = {}

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._calls

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        call = self._calls.get(key)
        if call is None:
            call = _Call(asyncio.ensure_future(self._execute(key, fn)))
            # Also on completion: a task cancelled before its first step never runs _execute.
            call.task.add_done_callback(lambda t: self._forget(key, t))
            self._calls[key] = call
        task = call.task
        call.waiters += 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done() and call.waiters == 1:
                task.cancel()  # nobody else wants the result
            raise
        finally:
            call.waiters -= 1

    async def _execute(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        finally:
            # Forget the key before the task completes, so no new caller joins a finished run.
            self._forget(key, asyncio.current_task())

    def _forget(self, key: Hashable, task: asyncio.Task[Any] | None) -> None:
        call = self._calls.get(key)
        if call is not None and call.task is task:
            del self._calls[key]


class _Call:
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.waiters = 0
