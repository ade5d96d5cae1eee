"""Scanning a disk image: every filesystem of every volume, and clones as base + delta.

:func:`scan_disk` opens the image (:mod:`.containers`), finds its volumes (:mod:`.volumes`)
and filesystems (:mod:`.filesystems`), and matches every regular file; paths are reported as
``p1:/etc/passwd`` (``/etc/passwd`` when a filesystem fills the disk). Each filesystem's
verdicts are one :class:`~.diskcache.FsRecord`, cached by (image chain digest, volume,
filesystem) and pattern version, so a second scan of the same image reads nothing but its
metadata digest memo.

A QCOW2 overlay (``qemu-img create -b base.qcow2 -F qcow2 clone.qcow2``) is scanned as base +
delta: the base's record comes from the cache (or is made first, once), and a file of the
clone inherits the base's verdict without being read when a file with the same size and the
same runs exists in the base and none of its runs touches a range the overlay holds. Runs
that do touch one (a 64 KiB cluster copied-on-write around a 4 KiB change holds neighbours
too) are compared byte for byte with the base before inheriting; inline/resident files
(content in metadata) are always read. Reads the image; writes the cache.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from ..engine import Matcher
from .containers import Disk, Range, open_disk
from .detect import FileKind
from .diskcache import DiskCache, FsRecord, record_key
from .errors import ImageError
from .filesystems import FsEntry, Run, describe, open_filesystem
from .results import ImageFile, ImageReport, Skipped
from .volumes import Volume, find_volumes

READ_CHUNK = 1 << 20  # bytes per read of a file's content
COMPARE_CHUNK = 1 << 16


@dataclass
class _Run:
    """What one scan did, over all its filesystems (the base's too, when made in this run)."""

    matcher: Matcher
    cache: DiskCache
    files_read: int = 0
    files_inherited: int = 0
    bytes_scanned: int = 0
    bytes_compared: int = 0
    how: dict[str, str] = field(default_factory=dict)


@dataclass
class _Base:
    """What a clone's filesystem inherits from: the base's verdicts by (size, runs), the
    ranges of this volume the overlay holds, and the base volume to compare them with."""

    index: dict[tuple[int, tuple[Run, ...]], ImageFile]
    changed: list[Range]
    stream: BinaryIO
    clone: BinaryIO


def scan_disk(
    path: str | os.PathLike[str],
    matcher: Matcher,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    cache: DiskCache | None = None,
    kind: FileKind | None = None,
) -> ImageReport:
    """Scan every filesystem of the disk image at ``path``; raises :class:`ImageError` when
    the image, its partition table or every filesystem is unreadable."""
    t0 = time.monotonic()
    if cache is not None and state_dir is not None:
        raise ValueError("give state_dir or cache, not both")
    if cache is None:  # one run only without a state dir: no need to hash the image files
        cache = DiskCache(state_dir=state_dir, hash_images=state_dir is not None)
    spath = os.fspath(path)
    hashed0 = cache.bytes_hashed
    disk = open_disk(spath, kind)
    try:
        title = f"{disk.format} disk image"
        if disk.backing is not None:
            title += ", overlay on " + " on ".join(d.path for d in disk.chain()[1:])
        report = ImageReport(spath, title, matcher.version)
        run = _Run(matcher, cache)
        try:
            volumes = find_volumes(disk.stream, spath)
        except ImageError:
            raise
        except Exception as exc:  # dissect on hostile bytes, see filesystems
            raise ImageError(f"{spath}: unreadable disk: {describe(exc)}") from None
        for vol in volumes:
            _scan_volume(disk, vol, run, report)
        report.bytes_read = disk.bytes_read() + cache.bytes_hashed - hashed0
    finally:
        disk.close()
    report.files.sort(key=lambda f: f.path)
    report.skipped.sort(key=lambda s: s.path)
    report.bytes_scanned = run.bytes_scanned
    report.files_read = run.files_read
    report.files_inherited = run.files_inherited
    report.bytes_compared = run.bytes_compared
    report.elapsed = time.monotonic() - t0
    return report


def _scan_volume(disk: Disk, vol: Volume, run: _Run, report: ImageReport) -> None:
    prefix = f"{vol.label}:" if vol.label else ""
    where = f"{disk.path}:{vol.label}" if vol.label else disk.path
    if vol.skipped is not None:
        report.skipped.append(Skipped(prefix + "/", vol.skipped))
        return
    try:
        record, how = _record(disk, vol, run)
    except Exception as exc:  # ImageError, or dissect on hostile bytes (see filesystems)
        text = str(exc) if isinstance(exc, ImageError) else f"unreadable: {describe(exc)}"
        if vol.label is None:  # the only filesystem of the disk: the image is unreadable
            raise ImageError(text if text.startswith(where) else f"{where}: {text}") from None
        report.files.append(
            ImageFile(prefix + "/", "error", reason=text.removeprefix(f"{where}: "))
        )
        return
    report.layers.append((f"{vol.label or 'disk'} ({record.fs})", how))
    for f, _ in record.files:
        report.files.append(_at(f, prefix + f.path))
    report.skipped.extend(Skipped(prefix + s.path, s.reason, s.layer) for s in record.skipped)


def _at(f: ImageFile, path: str) -> ImageFile:
    return ImageFile(path, f.status, f.matches, f.size, f.digest, f.reason, f.layer)


def _chain_digest(disk: Disk, cache: DiskCache) -> str | None:
    """A digest over every file the disk's bytes come from (the image, extents and parents
    its reader opened, the QCOW2 backing chain); None when the reader opened a file that
    cannot be named (the record is then not cached)."""
    if not disk.named:
        return None
    parts = [cache.digest(f.name) for f in disk.files]
    if disk.backing is not None:
        below = _chain_digest(disk.backing, cache)
        if below is None:
            return None
        parts.append(below)
    if len(parts) == 1:
        return parts[0]
    return "sha256:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _record(disk: Disk, vol: Volume, run: _Run) -> tuple[FsRecord, str]:
    """The record of the filesystem on ``vol``: cached, or scanned (as a delta over the
    base's record when ``disk`` is an overlay)."""
    where = f"{disk.path}:{vol.label}" if vol.label else disk.path
    fs = open_filesystem(vol.stream, where)
    digest = _chain_digest(disk, run.cache)
    key = record_key(digest or f"uncached:{disk.path}", vol.label, fs.kind)
    matcher = run.matcher
    if digest is not None:
        record = run.cache.get(key, matcher.version)
        if record is not None and not (
            record.limited and record.max_file_size != matcher.max_file_size
        ):
            return record, "cached"
    base = _base(disk, vol, run)
    record = _scan_fs(fs.entries(), key, fs.name, run, base)
    if digest is not None:
        run.cache.put(record)
    return record, "delta" if base is not None else "scanned"


def _base(disk: Disk, vol: Volume, run: _Run) -> _Base | None:
    """The base's record for the same volume, mapped into this volume, or None when the disk
    is no overlay or the volume cannot be matched (then every file is read)."""
    backing = disk.backing
    if backing is None or disk.changed is None or vol.offset is None:
        return None
    try:
        same = [v for v in find_volumes(backing.stream, backing.path) if v.label == vol.label]
    except Exception:  # an unreadable base: every file of the clone is read instead
        return None
    if len(same) != 1 or same[0].offset != vol.offset or same[0].skipped is not None:
        return None
    record, _ = _record(backing, same[0], run)
    size = int(getattr(vol.stream, "size", 0) or 0)
    changed = _shift(disk.changed, vol.offset, size)
    index: dict[tuple[int, tuple[Run, ...]], ImageFile] = {}
    for f, runs in record.files:
        if runs is not None and f.status != "error":
            index.setdefault((f.size, runs), f)
    return _Base(index, changed, same[0].stream, vol.stream)


def _shift(ranges: list[Range], offset: int, size: int) -> list[Range]:
    """Disk ranges clipped to ``[offset, offset + size)`` and made relative to it."""
    out = []
    for start, length in ranges:
        lo, hi = max(start, offset), min(start + length, offset + size)
        if lo < hi:
            out.append((lo - offset, hi - lo))
    return out


def _scan_fs(
    entries: Iterator[FsEntry], key: str, fs: str, run: _Run, base: _Base | None
) -> FsRecord:
    matcher = run.matcher
    files: list[tuple[ImageFile, tuple[Run, ...] | None]] = []
    skipped: list[Skipped] = []
    by_ident: dict[int, ImageFile] = {}
    by_runs: dict[tuple[int, tuple[Run, ...]], ImageFile] = {}  # the same blocks, same bytes
    scanned = 0
    for e in entries:
        if e.kind == "other":
            skipped.append(Skipped(e.path, e.reason or "not scanned", key))
            continue
        if e.kind == "error":
            files.append((ImageFile(e.path, "error", reason=e.reason, layer=key), None))
            continue
        known = by_ident.get(e.ident) if e.ident is not None else None
        if known is None and e.runs and any(start >= 0 for start, _ in e.runs):
            known = by_runs.get((e.size, e.runs))
        if known is not None:  # a hard link or a reflinked copy: one read per content
            files.append((_at(known, e.path), e.runs))
            continue
        f = _inherit(e, base, run) if base is not None else None
        if f is not None:
            run.files_inherited += 1
        else:
            f = _scan_entry(e, matcher, key)
            run.files_read += 1
            if f.status != "error":
                scanned += f.size
        if e.ident is not None:
            by_ident[e.ident] = f
        if e.runs and f.status != "error":
            by_runs.setdefault((e.size, e.runs), f)
        files.append((f, e.runs))
    run.bytes_scanned += scanned
    return FsRecord(
        key, matcher.version, matcher.max_file_size, fs, tuple(files), tuple(skipped), scanned
    )


def _inherit(e: FsEntry, base: _Base, run: _Run) -> ImageFile | None:
    if e.runs is None:
        return None
    hit = base.index.get((e.size, e.runs))
    if hit is None:
        return None
    for start, length in _touching(e.runs, base.changed):
        if not _same_bytes(base, start, length, run):
            return None
    return ImageFile(e.path, hit.status, hit.matches, hit.size, hit.digest, hit.reason, hit.layer)


def _touching(runs: tuple[Run, ...], changed: list[Range]) -> Iterator[Range]:
    """The parts of ``runs`` that lie in ``changed`` (sorted, disjoint ranges)."""
    starts = [s for s, _ in changed]
    for start, length in runs:
        if start < 0:
            continue  # a hole reads zeros in both
        end = start + length
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        while i < len(changed) and changed[i][0] < end:
            lo, hi = max(start, changed[i][0]), min(end, changed[i][0] + changed[i][1])
            if lo < hi:
                yield lo, hi - lo
            i += 1


def _same_bytes(base: _Base, start: int, length: int, run: _Run) -> bool:
    """Whether the clone's volume and the base's hold the same bytes at ``start``."""
    try:
        pos = start
        while pos < start + length:
            n = min(COMPARE_CHUNK, start + length - pos)
            base.clone.seek(pos)
            a = base.clone.read(n)
            base.stream.seek(pos)
            b = base.stream.read(n)
            run.bytes_compared += len(a) + len(b)
            if a != b or len(a) != n:
                return False
            pos += n
    except Exception:  # dissect on hostile bytes: then read the file itself
        return False
    return True


def _scan_entry(e: FsEntry, matcher: Matcher, layer: str) -> ImageFile:
    if e.size > matcher.max_file_size:
        return ImageFile(
            e.path,
            "error",
            size=e.size,
            layer=layer,
            reason=f"file size {e.size} exceeds max file size {matcher.max_file_size} bytes",
        )
    assert e.open is not None
    try:
        stream = e.open()
        r = matcher.scan_chunks(_chunks(stream, e.size), e.size, path=e.path, digest=True)
    except Exception as exc:  # dissect on hostile bytes, see filesystems
        return ImageFile(
            e.path, "error", size=e.size, reason=f"unreadable: {describe(exc)}", layer=layer
        )
    return ImageFile(e.path, r.status, r.matches, r.size, r.digest, r.reason, layer)


def _chunks(stream: BinaryIO, size: int) -> Iterator[bytes]:
    left = size
    while left > 0:
        chunk = stream.read(min(READ_CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk
