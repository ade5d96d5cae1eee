"""The identity memo, persisted: an appliance restarted (even after ``kill -9``) still knows
which digest each file identity had, so it does not read every file again to learn it.

``identities.log`` (beside the verdict log, under the cache's locked state directory) is an
append-only file of CRC-framed msgpack records ``[source, dev, ino, size, mtime_ns, ctime_ns,
digest]`` and tombstones ``[source, dev, ino, size, mtime_ns, ctime_ns]`` (:meth:`discard`).
Every put reaches the OS with ``os.write`` before it returns; the file is never fsynced, on
purpose: the memo is only a shortcut (an entry lost to a power cut costs one re-read, never a
wrong verdict, because any write to a file changes its ``mtime_ns``/``ctime_ns``). Opening
replays the log (cutting off a torn tail) and rewrites it atomically without the dead records;
so does a put once the log holds more than twice the live entries.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from typing import Any

import msgpack

from .._fsutil import atomic_write, write_all
from .digests import MIN_DIGEST_SIZE
from .memo import DEFAULT_MAX_ENTRIES, Identity, IdentityMemo

log = logging.getLogger("offscan.cache")

MEMO_LOG_NAME = "identities.log"
MEMO_MAGIC = b"OFSIDLG1"
_HEADER = struct.Struct("<II")  # payload length (bytes), zlib.crc32 of the payload
_MAX_PAYLOAD = 1 << 16  # a longer length field means corruption
COMPACT_MIN_RECORDS = 4096  # never rewrite a log shorter than this


def _record(fields: list[Any]) -> bytes:
    payload = msgpack.packb(fields, use_bin_type=True)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _identity(fields: list[Any]) -> Identity | None:
    if len(fields) not in (6, 7) or not isinstance(fields[0], str):
        return None
    if not all(isinstance(x, int) for x in fields[1:6]):
        return None
    return Identity(fields[0], *fields[1:6])


class PersistentIdentityMemo(IdentityMemo):
    """:class:`~.memo.IdentityMemo` backed by ``identities.log`` in ``state_dir`` (which the
    caller owns and has locked: the verdict cache's directory). :meth:`close` it."""

    def __init__(
        self, state_dir: str | os.PathLike[str], max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        super().__init__(max_entries)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(os.fspath(state_dir), MEMO_LOG_NAME)
        self.replayed = 0
        self.persist_errors = 0
        self._records = 0
        self._fd = -1
        self._log_lock = threading.Lock()  # appends and rewrites, in order
        self._replay()
        self._rewrite()

    def _replay(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        if not data.startswith(MEMO_MAGIC):
            log.warning("%s is not an identity memo log; starting with an empty memo", self.path)
            return
        pos, end = len(MEMO_MAGIC), len(data)
        while pos + _HEADER.size <= end:
            length, crc = _HEADER.unpack_from(data, pos)
            body = data[pos + _HEADER.size : pos + _HEADER.size + length]
            if length > _MAX_PAYLOAD or len(body) < length or zlib.crc32(body) != crc:
                break  # a torn or corrupt tail: what follows cannot be trusted
            pos += _HEADER.size + length
            try:
                fields = msgpack.unpackb(body, raw=False)
            except (ValueError, msgpack.UnpackException):
                break
            ident = _identity(fields) if isinstance(fields, list) else None
            if ident is None:
                continue
            digest = fields[6] if len(fields) == 7 else None
            if isinstance(digest, bytes) and len(digest) >= MIN_DIGEST_SIZE:
                super().put(ident, digest)
                self.replayed += 1
            else:
                super().discard(ident)

    def _rewrite(self) -> None:
        """Replace the log with one record per live entry, atomically, and append to it."""
        with self._lock:
            items = list(self._map.items())
        body = b"".join(_record([*_fields(i), d]) for i, d in items)
        # fsync=False: see the module docstring (a lost memo costs re-reads, not verdicts).
        atomic_write(self.path, MEMO_MAGIC + body, fsync=False, mode=0o600)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._records = len(items)

    def _append(self, fields: list[Any]) -> None:
        with self._log_lock:
            self._append_locked(fields)

    def _append_locked(self, fields: list[Any], *more: list[Any]) -> None:
        if self._fd < 0:
            return
        try:
            write_all(self._fd, b"".join(_record(f) for f in (fields, *more)))
        except OSError as exc:
            self.persist_errors += 1
            if self.persist_errors == 1:
                log.warning("identity memo not persisted (%s): kept in memory only", exc)
            return
        self._records += 1 + len(more)
        if self._records > max(COMPACT_MIN_RECORDS, 2 * len(self._map)):
            try:
                self._rewrite()
            except OSError as exc:
                self.persist_errors += 1
                log.warning("identity memo log not compacted: %s", exc)

    def put(self, ident: Identity, digest: bytes) -> None:
        super().put(ident, digest)
        self._append([*_fields(ident), digest])

    def put_many(self, items: list[tuple[Identity, bytes]]) -> None:
        """:meth:`put` each (identity, digest), appended to the log in one write."""
        if not items:
            return
        for ident, digest in items:
            super().put(ident, digest)
        records = [[*_fields(i), d] for i, d in items]
        with self._log_lock:
            self._append_locked(*records)

    def discard(self, ident: Identity) -> None:
        super().discard(ident)
        self._append(_fields(ident))

    def stats(self) -> dict[str, int]:
        return {**super().stats(), "replayed": self.replayed, "persist_errors": self.persist_errors}

    def close(self) -> None:
        with self._log_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _fields(i: Identity) -> list[Any]:
    return [i.source, i.dev, i.ino, i.size, i.mtime_ns, i.ctime_ns]
