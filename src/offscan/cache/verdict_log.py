"""The verdict log: the verdict cache's persistence in ``verdicts.log`` under a state directory.

An append-only log of CRC-framed msgpack records (:mod:`offscan.cache.records`): every put
reaches the OS with ``os.write`` before it returns, so it survives ``kill -9``; a background
thread fsyncs every ``fsync_interval`` seconds and compacts the log once it holds more than
``COMPACT_RATIO`` records per live entry. Opening replays the log (last write wins) and cuts off
a torn or corrupt tail. :class:`VerdictLog` is the half of
:class:`~offscan.cache.VerdictCache` that does this; it touches only ``verdicts.log``, its
compaction temporary ``verdicts.log.tmp`` and (through :mod:`.statelock`) ``verdicts.lock``.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import zlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgpack

from .._fsutil import atomic_write, fsync_dir, write_all
from .digests import READ_BLOCK
from .errors import LogCorruptError
from .records import (
    LOG_MAGIC,
    MAX_RECORD_BYTES,
    RECORD_HEADER,
    CachedVerdict,
    decode_payload,
    encode_record,
)
from .statelock import lock_state_dir

if TYPE_CHECKING:
    from .verdicts import _Shard

log = logging.getLogger("offscan.cache")  # the package's logger, as before the split

DEFAULT_FSYNC_INTERVAL = 1.0  # seconds between fsyncs of the verdict log
DEFAULT_COMPACT_MIN_RECORDS = 4096  # never compact a log shorter than this
COMPACT_RETRY_DELAY = 60.0  # seconds to wait after a failed compaction (e.g. disk full)
COMPACT_RATIO = 2  # compact when the log holds more than this many records per live entry

LOG_NAME = "verdicts.log"


class VerdictLog:
    """The persistence half of :class:`~offscan.cache.VerdictCache` (a mixin: the cache is
    the only subclass, and provides the memory half declared below)."""

    if TYPE_CHECKING:
        _shards: list[_Shard]
        # Puts take _write_lock, then a shard lock: memory and log stay in the same order.
        _write_lock: threading.Lock

        def _insert(self, verdict: CachedVerdict) -> None: ...
        def entries(self) -> Iterator[CachedVerdict]: ...
        def __len__(self) -> int: ...

    def _init_log(self, fsync_interval: float, compact_min_records: int) -> None:
        """The log's state before :meth:`_open_state` (or without a state directory)."""
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

    @property
    def log_path(self) -> str | None:
        return None if self.state_dir is None else os.path.join(self.state_dir, LOG_NAME)

    def _open_state(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self._lock_fd = lock_state_dir(state_dir)
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
                verdict = decode_payload(payload)
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                return offset, records, f"undecodable record: {exc}"
            self._insert(verdict)
            records += 1
            offset = end
        return offset, records, None

    def _create_empty_log(self, path: str) -> None:
        """Create the log with just its header, atomically, so it is never seen half-written."""
        # Durable (fsync): the header is what later opens check; a crash must not leave an
        # empty or half-written log that would be refused as foreign.
        atomic_write(path, LOG_MAGIC, fsync=True, mode=0o600)

    def _append(self, record: bytes) -> None:
        """Write one record (caller holds _write_lock); a failed write is cut back off."""
        try:
            write_all(self._log_fd, record)
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

    def _append_many(self, records: list[bytes]) -> None:
        """Write several records with one ``write(2)`` (caller holds _write_lock): a group
        commit, durable exactly as :meth:`_append` (in the OS at once, fsynced on the
        interval); a failed write is cut back off as a whole."""
        if len(records) == 1:
            self._append(records[0])
            return
        data = b"".join(records)
        try:
            write_all(self._log_fd, data)
        except OSError as exc:
            self._persist_errors += 1
            try:
                os.ftruncate(self._log_fd, self._log_size)
            except OSError:
                pass
            if self._persist_errors == 1 or exc.errno != errno.ENOSPC:
                log.warning("%s: cannot persist %d verdicts: %s", self.log_path, len(records), exc)
            return
        self._log_size += len(data)
        self._log_records += len(records)
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
        # Not atomic_write: the snapshot is streamed in batches and the records put meanwhile are
        # spliced in under the write lock. Durable all the same: the file is fsynced before the
        # rename and the directory after it, so a power loss leaves the old log or the new one.
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            size = len(LOG_MAGIC)
            batch = [LOG_MAGIC]
            for verdict in snapshot:
                record = encode_record(verdict)
                batch.append(record)
                size += len(record)
                if len(batch) >= 4096:
                    write_all(fd, b"".join(batch))
                    batch.clear()
            write_all(fd, b"".join(batch))
            os.fsync(fd)  # the bulk, before puts have to wait
            with self._fsync_lock, self._write_lock:
                # Records put since the snapshot: copy them over verbatim.
                tail_records = self._log_records - records_at_start
                pos = start
                while pos < self._log_size:
                    chunk = os.pread(self._log_fd, min(READ_BLOCK, self._log_size - pos), pos)
                    if not chunk:
                        break
                    write_all(fd, chunk)
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
                fsync_dir(os.path.dirname(path))
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

    def _release_state(self) -> None:
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing the only fd releases the flock
            self._lock_fd = -1
