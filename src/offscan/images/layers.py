"""Scanning one layer, and the layer cache that keeps its record per pattern version.

The per-file verdicts of a layer form a :class:`~.results.LayerRecord` cached by ``(layer
digest, pattern version)`` in a :class:`LayerCache`, in memory and optionally as JSON files
under ``<state dir>/image-layers/``, so a layer shared by several images is matched once.
Writes only those record files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict

from .._fsutil import atomic_write
from ..engine import Matcher
from .errors import ImageError
from .helpers import os_reason
from .results import ImageFile, LayerEntry, LayerRecord, Skipped
from .sources import Layer, Member, MemberUnreadable, StreamBroken, split_digest

log = logging.getLogger("offscan.images")  # the package's logger, as before the split

DEFAULT_LAYER_CACHE_ENTRIES = 1024  # layer records kept in memory
LAYER_CACHE_DIR = "image-layers"  # under the state directory


def scan_layer(layer: Layer, matcher: Matcher) -> LayerRecord:
    """Read one layer once and match every regular file in it.

    Hard links to a file earlier in the same layer take that file's verdict without a second
    read. Raises :class:`ImageError` (or :class:`BlobDigestError`) for an unreadable layer.
    """
    label = layer.digest or layer.label
    entries: list[LayerEntry] = []
    warnings: list[str] = []
    files: dict[str, ImageFile] = {}
    scanned = 0
    members = layer.members(warnings)
    for m in members:
        if m.kind == "file":
            try:
                f = _scan_member(m, matcher, label)
            except StreamBroken as exc:
                # Let the layer's reader turn it into a digest or format error.
                members.throw(exc.cause)
                raise ImageError(f"{label}: {exc}") from None
            scanned += f.size if f.status != "error" else 0
            files[m.path] = f
            entries.append(LayerEntry("file", m.path, file=f))
        elif m.kind == "error":
            entries.append(
                LayerEntry(
                    "file", m.path, file=ImageFile(m.path, "error", reason=m.reason, layer=label)
                )
            )
        elif m.kind == "hardlink":
            assert m.target is not None
            target = files.get(m.target)
            if target is not None:
                f = at_path(target, m.path)
                files[m.path] = f
                entries.append(LayerEntry("file", m.path, file=f))
            else:
                entries.append(LayerEntry("link", m.path, target=m.target))
        elif m.kind == "other":
            files.pop(m.path, None)
            entries.append(
                LayerEntry(
                    "other", m.path, skipped=Skipped(m.path, m.reason or "not scanned", label)
                )
            )
        else:
            if m.kind == "dir":
                files.pop(m.path, None)
            entries.append(LayerEntry(m.kind, m.path))
    if any(e.path == "/oci-layout" for e in entries) and any(
        e.path == "/index.json" for e in entries
    ):
        warnings.append(
            "this archive holds an OCI image layout: its layers were scanned as "
            "opaque blobs; extract it and scan the directory to scan the layers"
        )
    return LayerRecord(
        label,
        matcher.version,
        tuple(entries),
        matcher.max_file_size,
        tuple(dict.fromkeys(warnings)),
        scanned,
    )


def _scan_member(m: Member, matcher: Matcher, layer: str) -> ImageFile:
    if m.size > matcher.max_file_size:
        return ImageFile(
            m.path,
            "error",
            size=m.size,
            layer=layer,
            reason=f"file size {m.size} exceeds max file size {matcher.max_file_size} bytes",
        )
    assert m.read is not None
    chunks = m.read()
    try:
        r = matcher.scan_chunks(chunks, m.size, path=m.path, allmatch=True, digest=True)
    except MemberUnreadable as exc:
        return ImageFile(m.path, "error", size=m.size, reason=str(exc), layer=layer)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return ImageFile(m.path, r.status, r.matches, r.size, r.digest, r.reason, layer)


def at_path(f: ImageFile, path: str) -> ImageFile:
    return ImageFile(path, f.status, f.matches, f.size, f.digest, f.reason, f.layer)


class LayerCache:
    """Layer records by ``(layer digest, pattern version)``: an LRU in memory, and JSON files
    under ``state_dir/image-layers/`` when a state directory is given, so a layer shared by
    several images, in this run or a later one, is matched once per pattern version.

    Files are written atomically (``_fsutil.atomic_write``); an unreadable or malformed file is a
    miss, never an error. Counts ``hits`` and ``misses``. Safe to share between threads.
    """

    def __init__(
        self,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        max_entries: int = DEFAULT_LAYER_CACHE_ENTRIES,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._memory: OrderedDict[tuple[str, str], LayerRecord] = OrderedDict()
        self.dir: str | None = None
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        if state_dir is not None:
            self.dir = os.path.join(os.fspath(state_dir), LAYER_CACHE_DIR)
            try:
                os.makedirs(self.dir, exist_ok=True)
            except OSError as exc:
                raise ImageError(
                    f"state directory {os.fspath(state_dir)}: {os_reason(exc)}"
                ) from None

    def get(self, digest: str, pattern_version: str) -> LayerRecord | None:
        key = (digest, pattern_version)
        with self._lock:
            record = self._memory.get(key)
            if record is not None:
                self._memory.move_to_end(key)
        if record is None:
            record = self._load(digest, pattern_version)  # disk reads outside the lock
            if record is not None:
                self._remember(key, record)
        with self._lock:
            if record is None:
                self.misses += 1
            else:
                self.hits += 1
        return record

    def put(self, record: LayerRecord) -> None:
        """Keep ``record`` (when it is cacheable) in memory and, with a state dir, on disk."""
        if not record.cacheable:
            return
        self._remember((record.layer, record.pattern_version), record)
        if self.dir is None:
            return
        path = self._path(record.layer, record.pattern_version)
        data = json.dumps(record.to_json(), separators=(",", ":"))
        try:
            # No fsync: a record lost to a power loss only costs a rescan of its layer. Mode
            # 0600, as the temporary file mkstemp made before the move to atomic_write.
            atomic_write(path, data, fsync=False, mode=0o600)
        except OSError as exc:  # a full disk costs a rescan later, not this scan
            log.warning("cannot persist layer record %s: %s", path, exc)

    def _remember(self, key: tuple[str, str], record: LayerRecord) -> None:
        with self._lock:
            self._memory[key] = record
            self._memory.move_to_end(key)
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)

    def _path(self, digest: str, pattern_version: str) -> str:
        assert self.dir is not None
        alg, hexdigest = split_digest(digest)
        version_key = hashlib.sha256(pattern_version.encode()).hexdigest()[:16]
        return os.path.join(self.dir, f"{alg}-{hexdigest}.{version_key}.json")

    def _load(self, digest: str, pattern_version: str) -> LayerRecord | None:
        if self.dir is None:
            return None
        path = self._path(digest, pattern_version)
        try:
            with open(path, "rb") as f:
                data = json.load(f)
            record = LayerRecord.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring unreadable layer record %s: %s", path, exc)
            return None
        if (record.layer, record.pattern_version) != (digest, pattern_version):
            log.warning("ignoring layer record %s: it is for another layer or version", path)
            return None
        return record


def layer_record(layer: Layer, matcher: Matcher, cache: LayerCache) -> tuple[LayerRecord, str]:
    digest = layer.digest  # for a plain tar this hashes the archive
    if digest is None:
        return scan_layer(layer, matcher), "scanned"
    record = cache.get(digest, matcher.version)
    if record is not None and record.limited and record.max_file_size != matcher.max_file_size:
        record = None  # size-limit errors hold for that limit only
    if record is not None:
        layer.verify()
        return record, "cached"
    record = scan_layer(layer, matcher)
    cache.put(record)
    return record, "scanned"
