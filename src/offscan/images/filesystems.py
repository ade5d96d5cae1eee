"""Filesystems inside a disk volume, read without mounting through the dissect libraries.

:func:`open_filesystem` opens ext2/3/4 (``dissect.extfs``), XFS (``dissect.xfs``), NTFS
(``dissect.ntfs``), FAT12/16/32 and exFAT (``dissect.fat``) on a volume stream, chosen by the
volume's magic bytes. :meth:`Filesystem.entries` walks the tree depth-first and yields one
:class:`FsEntry` per entry: regular files with their size, inode and *runs* (the byte ranges of
the volume that hold the content, in file order), so a clone's overlay can be mapped to the
files it changed; directories are not yielded, symlinks and special files are yielded as
``other``. Reads the volume; writes nothing.

dissect parses hostile bytes with ``struct``-level code that can raise almost anything on a
malformed image (EOFError, KeyError, IndexError, ValueError, its own Error classes...): every
call into it is fenced by ``except Exception`` and turned into an error entry or an
:class:`ImageError`, never a traceback and never a silent skip.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from .detect import FsKind, sniff_volume
from .errors import ImageError

Run = tuple[int, int]  # (byte offset in the volume, length); offset -1 is a hole (reads zeros)
EntryKind = Literal["file", "other", "error"]

MAX_DEPTH = 4096  # directory nesting followed before an entry is reported as an error
_FS_NAMES = {
    "ext": "ext2/3/4",
    "xfs": "XFS",
    "ntfs": "NTFS",
    "fat": "FAT",
    "exfat": "exFAT",
}
_NTFS_FIRST_USER_RECORD = 24  # MFT records 0-23 are the metafiles ($MFT, $LogFile, ...)


@dataclass(frozen=True, slots=True)
class FsEntry:
    """One entry of a filesystem. For a file, ``open()`` returns its content as a stream;
    ``runs`` is None when the content lives in metadata (inline/resident data), so only a read
    can tell it; ``ident`` (inode or MFT record number) links hard links."""

    path: str
    kind: EntryKind
    size: int = 0
    ident: int | None = None
    runs: tuple[Run, ...] | None = None
    open: Callable[[], BinaryIO] | None = None
    reason: str | None = None


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _blocks_to_runs(runs: Any, unit: int, base: int = 0) -> tuple[Run, ...]:
    out: list[Run] = []
    for start, count in runs:
        length = int(count) * unit
        out.append((-1, length) if start is None else (base + int(start) * unit, length))
    return tuple(out)


class Filesystem:
    """A filesystem opened on a volume stream; ``kind`` is one of ``ext xfs ntfs fat exfat``."""

    kind: FsKind
    name: str

    def entries(self) -> Iterator[FsEntry]:
        raise NotImplementedError


class _InodeFs(Filesystem):
    """ext and XFS: directories of inodes with ``filename``, ``filetype``, ``size``, ``inum``."""

    def __init__(self, kind: FsKind, fs: Any, block_size: int) -> None:
        self.kind, self.name, self._fs, self._bs = kind, _FS_NAMES[kind], fs, block_size

    def _runs(self, node: Any) -> tuple[Run, ...] | None:
        runs = node.dataruns() if callable(node.dataruns) else node.dataruns
        if not runs:
            return None if node.size else ()
        return _blocks_to_runs(runs, self._bs)

    def _file(self, path: str, node: Any) -> FsEntry:
        try:
            size = int(node.size)
            inline = self.kind == "ext" and bool(node.inode.i_flags & 0x10000000)
            if self.kind == "xfs" and int(node.inode.di_format) == 1:  # XFS_DINODE_FMT_LOCAL
                inline = True
            runs = None if inline else self._runs(node)
        except Exception as exc:  # dissect on hostile bytes, see module doc
            return FsEntry(path, "error", reason=f"unreadable inode: {describe(exc)}")
        return FsEntry(path, "file", size, int(node.inum), runs, node.open)

    def entries(self) -> Iterator[FsEntry]:
        stack: list[tuple[str, Any, int]] = [("", self._fs.root, 0)]
        seen: set[int] = set()
        while stack:
            prefix, node, depth = stack.pop()
            if int(node.inum) in seen:
                yield FsEntry(prefix or "/", "error", reason="directory loop (corrupt filesystem)")
                continue
            seen.add(int(node.inum))
            try:
                children = sorted(
                    (c for c in node.iterdir() if c.filename not in (".", "..")),
                    key=lambda c: c.filename,
                )
            except Exception as exc:  # dissect on hostile bytes
                yield FsEntry(
                    prefix or "/", "error", reason=f"unreadable directory: {describe(exc)}"
                )
                continue
            subdirs = []
            for child in children:
                path = f"{prefix}/{child.filename}"
                try:
                    ftype = stat.S_IFMT(int(child.filetype))
                except Exception as exc:  # dissect on hostile bytes
                    yield FsEntry(path, "error", reason=f"unreadable inode: {describe(exc)}")
                    continue
                if ftype == stat.S_IFDIR:
                    if depth + 1 >= MAX_DEPTH:
                        yield FsEntry(path, "error", reason=f"nested deeper than {MAX_DEPTH}")
                    else:
                        subdirs.append((path, child, depth + 1))
                elif ftype == stat.S_IFREG:
                    yield self._file(path, child)
                elif ftype == stat.S_IFLNK:
                    yield FsEntry(path, "other", reason="symbolic link, not followed")
                else:
                    yield FsEntry(path, "other", reason=f"not a regular file (mode {ftype:o})")
            stack.extend(reversed(subdirs))


class _NtfsFs(Filesystem):
    kind: FsKind = "ntfs"
    name = "NTFS"

    def __init__(self, fs: Any) -> None:
        self._fs = fs
        self._cluster = int(fs.cluster_size)

    def _streams(self, path: str, record: Any) -> Iterator[FsEntry]:
        """The default ``$DATA`` stream as ``path``, named streams (ADS) as ``path:name``."""
        names = sorted({str(a.name) for a in record.attributes.DATA})
        for name in names:
            where = f"{path}:{name}" if name else path
            try:
                attrs = record.attributes.find(name, 0x80)
                size = int(attrs.size())
                resident = any(a.resident for a in attrs)
                runs = None if resident else _blocks_to_runs(attrs.dataruns(), self._cluster)
            except Exception as exc:  # dissect on hostile bytes
                yield FsEntry(where, "error", reason=f"unreadable $DATA: {describe(exc)}")
                continue
            ident = int(record.segment) if not name else None
            yield FsEntry(where, "file", size, ident, runs, _opener(attrs))

    def entries(self) -> Iterator[FsEntry]:
        stack: list[tuple[str, Any, int]] = [("", self._fs.mft.root, 0)]
        seen: set[int] = set()
        while stack:
            prefix, record, depth = stack.pop()
            seen.add(int(record.segment))
            try:
                children = []
                for entry in record.iterdir(ignore_dos=True):
                    name = str(entry.attribute.file_name)
                    if name == ".":
                        continue
                    children.append((name, entry.dereference()))
                children.sort(key=lambda c: c[0])
            except Exception as exc:  # dissect on hostile bytes
                yield FsEntry(
                    prefix or "/", "error", reason=f"unreadable directory: {describe(exc)}"
                )
                continue
            subdirs = []
            for name, child in children:
                path = f"{prefix}/{name}"
                try:
                    segment = int(child.segment)
                    if segment < _NTFS_FIRST_USER_RECORD:
                        continue  # a metafile, not content a guest wrote
                    is_dir, is_link = child.is_dir(), child.is_reparse_point()
                except Exception as exc:  # dissect on hostile bytes
                    yield FsEntry(path, "error", reason=f"unreadable MFT record: {describe(exc)}")
                    continue
                if is_link:
                    yield FsEntry(path, "other", reason="reparse point, not followed")
                elif is_dir:
                    if segment in seen or depth + 1 >= MAX_DEPTH:
                        yield FsEntry(path, "error", reason="directory loop or nested too deep")
                    else:
                        subdirs.append((path, child, depth + 1))
                else:
                    yield from self._streams(path, child)
            stack.extend(reversed(subdirs))


def _opener(attrs: Any) -> Callable[[], BinaryIO]:
    def open_stream() -> BinaryIO:
        stream: BinaryIO = attrs.open()
        return stream

    return open_stream


class _FatFs(Filesystem):
    kind: FsKind = "fat"
    name = "FAT"

    def __init__(self, fs: Any) -> None:
        self._fs = fs
        self._cluster = int(fs.cluster_size)
        self._data = int(fs.first_data_sector) * int(fs.sector_size)

    def entries(self) -> Iterator[FsEntry]:
        stack: list[tuple[str, Any, int]] = [("", self._fs.root, 0)]
        while stack:
            prefix, node, depth = stack.pop()
            try:
                children = sorted(
                    (
                        c
                        for c in node.iterdir()
                        if c.name not in (".", "..") and not c.is_volume_id()
                    ),
                    key=lambda c: c.name,
                )
            except Exception as exc:  # dissect on hostile bytes
                yield FsEntry(
                    prefix or "/", "error", reason=f"unreadable directory: {describe(exc)}"
                )
                continue
            subdirs = []
            for child in children:
                path = f"{prefix}/{child.name}"
                if child.is_directory():
                    if depth + 1 >= MAX_DEPTH:
                        yield FsEntry(path, "error", reason=f"nested deeper than {MAX_DEPTH}")
                    else:
                        subdirs.append((path, child, depth + 1))
                    continue
                try:
                    size = int(child.size)
                    runs = _blocks_to_runs(child.dataruns(), self._cluster, self._data)
                except Exception as exc:  # dissect on hostile bytes
                    yield FsEntry(
                        path, "error", reason=f"unreadable cluster chain: {describe(exc)}"
                    )
                    continue
                yield FsEntry(path, "file", size, None, runs, child.open)
            stack.extend(reversed(subdirs))


class _ExFatFs(Filesystem):
    kind: FsKind = "exfat"
    name = "exFAT"

    def __init__(self, fs: Any, fh: BinaryIO) -> None:
        self._fs, self._fh = fs, fh
        self._sector = int(fs.sector_size)

    def _file(self, path: str, entry: Any) -> FsEntry:
        from dissect.util.stream import RunlistStream

        try:
            size = int(entry.stream.data_length)
            if size == 0:
                runlist: list[tuple[int, int]] = []
            elif entry.stream.flags.not_fragmented:
                runlist = self._fs.runlist(entry.stream.location, True, size)
            else:
                runlist = self._fs.runlist(entry.stream.location, False)
        except Exception as exc:  # dissect on hostile bytes
            return FsEntry(path, "error", reason=f"unreadable cluster chain: {describe(exc)}")
        fh, sector = self._fh, self._sector
        return FsEntry(
            path,
            "file",
            size,
            None,
            _blocks_to_runs(runlist, sector),
            lambda: RunlistStream(fh, runlist, size, sector),
        )

    def entries(self) -> Iterator[FsEntry]:
        root = self._fs.files.get("/")
        stack: list[tuple[str, Any, int]] = [("", root[1] if root else {}, 0)]
        while stack:
            prefix, children, depth = stack.pop()
            subdirs = []
            for name in sorted(children):
                entry, sub = children[name]
                path = f"{prefix}/{name.rstrip('/')}"
                if sub is not None:
                    if depth + 1 >= MAX_DEPTH:
                        yield FsEntry(path, "error", reason=f"nested deeper than {MAX_DEPTH}")
                    else:
                        subdirs.append((path, sub, depth + 1))
                else:
                    yield self._file(path, entry)
            stack.extend(reversed(subdirs))


def open_filesystem(fh: BinaryIO, where: str) -> Filesystem:
    """The filesystem at the start of volume ``fh`` (``where`` names the volume in errors).

    Raises :class:`ImageError` for an unknown or unsupported filesystem, or one dissect cannot
    parse (a corrupt superblock is an error, never an empty, clean filesystem)."""
    kind = sniff_volume(fh)
    fh.seek(0)
    try:
        if kind == "ext":
            from dissect.extfs import ExtFS

            ext = ExtFS(fh)
            return _InodeFs("ext", ext, int(ext.block_size))
        if kind == "xfs":
            from dissect.xfs import XFS

            xfs = XFS(fh)
            return _InodeFs("xfs", xfs, int(xfs.block_size))
        if kind == "ntfs":
            from dissect.ntfs import NTFS

            return _NtfsFs(NTFS(fh))
        if kind == "fat":
            from dissect.fat import FATFS

            return _FatFs(FATFS(fh))
        if kind == "exfat":
            from dissect.fat import ExFAT

            return _ExFatFs(ExFAT(fh), fh)
    except Exception as exc:  # dissect on hostile bytes, see module doc
        raise ImageError(
            f"{where}: corrupt {_FS_NAMES[kind]} filesystem: {describe(exc)}"
        ) from None
    if kind == "btrfs":
        raise ImageError(f"{where}: btrfs is not supported (cannot be read without mounting)")
    raise ImageError(f"{where}: no supported filesystem (ext2/3/4, XFS, NTFS, FAT, exFAT)")
