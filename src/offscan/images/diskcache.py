"""Per-filesystem verdict records of disk images, their cache, and the image digest memo.

A :class:`FsRecord` holds the verdict of every file of one filesystem of one disk image, with
each file's *runs* (the volume byte ranges holding its content), for one pattern version. It
is keyed by ``sha256(image chain digest, volume label, filesystem)``, where the chain digest
covers the image file and every backing file under it: a clone's overlay and its base have
different keys, and a base's record is what its clones inherit from.

:class:`DiskCache` keeps records in memory (LRU) and, with a state directory, as JSON files
under ``<state>/disk-filesystems/``; it also memoizes image digests by file identity
``(dev, ino, size, mtime_ns, ctime_ns)`` under ``<state>/disk-digests/``, so a base image
scanned once is not hashed again for each clone (hashing a 1 GiB base costs a full read). A
file replaced or modified changes its ctime, so the memo misses and the digest is recomputed.
Writes only those files, atomically; an unreadable or malformed file is a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .._fsutil import atomic_write
from .errors import ImageError
from .filesystems import Run
from .helpers import os_reason
from .results import ImageFile, Skipped

log = logging.getLogger("offscan.images")

RECORD_FORMAT = 1
DISK_CACHE_DIR = "disk-filesystems"
DIGEST_MEMO_DIR = "disk-digests"
DEFAULT_DISK_CACHE_ENTRIES = 256  # filesystem records kept in memory
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class FsRecord:
    """The verdicts of one filesystem of one disk image, for one pattern version."""

    key: str
    pattern_version: str
    max_file_size: int
    fs: str
    files: tuple[tuple[ImageFile, tuple[Run, ...] | None], ...]
    skipped: tuple[Skipped, ...] = ()
    bytes_scanned: int = 0

    @property
    def cacheable(self) -> bool:
        """Errors other than files over the size limit (read errors, timeouts) are retried."""
        return all(f.status != "error" or f.size > self.max_file_size for f, _ in self.files)

    @property
    def limited(self) -> bool:
        return any(f.status == "error" for f, _ in self.files)

    def to_json(self) -> dict[str, Any]:
        files = []
        for f, runs in self.files:
            files.append(
                {
                    "p": f.path,
                    "s": f.status,
                    "m": list(f.matches),
                    "n": f.size,
                    "d": f.digest,
                    "r": f.reason,
                    "x": None if runs is None else [list(r) for r in runs],
                }
            )
        return {
            "format": RECORD_FORMAT,
            "key": self.key,
            "pattern_version": self.pattern_version,
            "max_file_size": self.max_file_size,
            "fs": self.fs,
            "files": files,
            "skipped": [[s.path, s.reason] for s in self.skipped],
        }

    @classmethod
    def from_json(cls, data: Any) -> FsRecord:
        """Rebuild a persisted record; raises ValueError/TypeError/KeyError when malformed."""
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise ValueError("not a filesystem record of a known format")
        key, version, fs = str(data["key"]), str(data["pattern_version"]), str(data["fs"])
        files = []
        for d in data["files"]:
            if d["s"] not in ("clean", "infected", "error") or not str(d["p"]).startswith("/"):
                raise ValueError("bad file entry")
            runs = None if d["x"] is None else tuple((int(a), int(b)) for a, b in d["x"])
            f = ImageFile(
                str(d["p"]), d["s"], tuple(str(m) for m in d["m"]), int(d["n"]), d["d"], d["r"], key
            )
            files.append((f, runs))
        skipped = tuple(Skipped(str(p), str(r), key) for p, r in data["skipped"])
        return cls(key, version, int(data["max_file_size"]), fs, tuple(files), skipped)


def record_key(chain_digest: str, label: str | None, fs: str) -> str:
    text = f"offscan-disk-fs\0{chain_digest}\0{label or ''}\0{fs}"
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class DiskCache:
    """Filesystem records by ``(key, pattern version)`` and image digests by file identity.

    In memory, and under ``state_dir`` when one is given. Counts ``hits`` and ``misses`` of
    records. Safe to share between threads."""

    def __init__(
        self,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        max_entries: int = DEFAULT_DISK_CACHE_ENTRIES,
        hash_images: bool = True,
    ) -> None:
        self.max_entries = max_entries
        # Without hashing, images are named by their identity alone: for a cache that lives
        # one run (no state dir), where hashing would only cost a full read of every image.
        self.hash_images = hash_images or state_dir is not None
        self._memory: OrderedDict[tuple[str, str], FsRecord] = OrderedDict()
        self._digests: dict[tuple[int, ...], str] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.bytes_hashed = 0  # bytes read to compute image digests (memo misses)
        self.dir: str | None = None
        if state_dir is not None:
            self.dir = os.fspath(state_dir)
            try:
                os.makedirs(os.path.join(self.dir, DISK_CACHE_DIR), exist_ok=True)
                os.makedirs(os.path.join(self.dir, DIGEST_MEMO_DIR), exist_ok=True)
            except OSError as exc:
                raise ImageError(f"state directory {self.dir}: {os_reason(exc)}") from None

    # -- records ---------------------------------------------------------------------------

    def get(self, key: str, pattern_version: str) -> FsRecord | None:
        with self._lock:
            record = self._memory.get((key, pattern_version))
        if record is None and self.dir is not None:
            record = self._load(key, pattern_version)
        with self._lock:
            if record is None:
                self.misses += 1
                return None
            self.hits += 1
            self._remember(record)
        return record

    def put(self, record: FsRecord) -> None:
        if not record.cacheable:
            return
        with self._lock:
            self._remember(record)
        if self.dir is None:
            return
        path = self._path(record.key, record.pattern_version)
        try:
            # No fsync: a record lost to a power loss only costs a rescan of its filesystem.
            atomic_write(path, json.dumps(record.to_json(), separators=(",", ":")), fsync=False)
        except OSError as exc:
            log.warning("cannot persist filesystem record %s: %s", path, exc)

    def _remember(self, record: FsRecord) -> None:
        key = (record.key, record.pattern_version)
        self._memory[key] = record
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

    def _path(self, key: str, pattern_version: str) -> str:
        assert self.dir is not None
        version = hashlib.sha256(pattern_version.encode()).hexdigest()[:16]
        return os.path.join(self.dir, DISK_CACHE_DIR, f"{key.split(':', 1)[1]}.{version}.json")

    def _load(self, key: str, pattern_version: str) -> FsRecord | None:
        path = self._path(key, pattern_version)
        try:
            with open(path, "rb") as f:
                record = FsRecord.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring unreadable filesystem record %s: %s", path, exc)
            return None
        if (record.key, record.pattern_version) != (key, pattern_version):
            return None
        return record

    # -- image digests ---------------------------------------------------------------------

    def digest(self, path: str) -> str:
        """``sha256:<hex>`` of the file at ``path``, memoized by its identity (or the identity
        itself when ``hash_images`` is off)."""
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ImageError(f"{path}: {os_reason(exc)}") from None
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if not self.hash_images:
            return "identity:" + ":".join(map(str, ident))
        with self._lock:
            known = self._digests.get(ident)
        if known is not None:
            return known
        memo = None
        if self.dir is not None:
            name = hashlib.sha256(repr(ident).encode()).hexdigest()[:32]
            memo = os.path.join(self.dir, DIGEST_MEMO_DIR, name)
            try:
                with open(memo, encoding="ascii") as f:
                    known = f.read(80).strip()
                if known.startswith("sha256:") and len(known) == 71:
                    with self._lock:
                        self._digests[ident] = known
                    return known
            except OSError:
                pass
        hexdigest, nbytes = _hash_file(path)
        digest = "sha256:" + hexdigest
        with self._lock:
            self._digests[ident] = digest
            self.bytes_hashed += nbytes
        if memo is not None:
            try:
                atomic_write(memo, digest, fsync=False)  # a lost memo costs one rehash
            except OSError as exc:
                log.warning("cannot persist image digest %s: %s", memo, exc)
        return digest


def _hash_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
                n += len(chunk)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {os_reason(exc)}") from None
    return h.hexdigest(), n
