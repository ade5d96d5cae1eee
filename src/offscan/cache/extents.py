"""Reflinked files: a content digest learnt from shared extents, with zero bytes read.

On a filesystem with reflinks (XFS ``reflink=1``, btrfs), ``cp --reflink`` and VM clones made
by copy-on-write share the *physical* extents of the original. The kernel reports them through
the FIEMAP ioctl with ``FIEMAP_EXTENT_SHARED``. A file whose every extent is shared, and whose
extent map (logical offset, physical offset, length of each) and size equal those of a file
digested before (noted then, shared or not yet), holds the same bytes: :class:`ExtentIndex` hands out that file's digest
without reading, and the verdict cache then answers for the current pattern version.

Why it is safe: a shared extent is never written in place (a write to it is copied first), and
the index entry is checked before it is used: the file it was learnt from is opened again
(confined to its root), its identity (dev, inode, size, mtime, ctime) must be unchanged — so its
content still hashes to the recorded digest — and its extent map must still be the same, so
those physical blocks still hold that content. Extents that are not plain data (delayed
allocation, unwritten, inline, encoded, encrypted, unknown) never match. Reads only extent
maps and metadata; writes nothing.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
# unknown, delalloc, encoded, encrypted, not aligned, inline, tail, unwritten: not plain data
FIEMAP_EXTENT_UNSAFE = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800

_HEADER = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
BATCH = 256  # extents asked for per ioctl
MAX_EXTENTS = 4096  # a file more fragmented than this is read instead
DEFAULT_MAX_ENTRIES = 65536

Extent = tuple[int, int, int, int]  # logical, physical, length, flags


def fiemap(fd: int, *, max_extents: int = MAX_EXTENTS) -> list[Extent] | None:
    """The extents of the open file ``fd`` (no sync: dirty data shows as delalloc), or None
    when the filesystem has no FIEMAP or the file has more than ``max_extents``."""
    out: list[Extent] = []
    start = 0
    while len(out) < max_extents:
        buf = bytearray(_HEADER.size + BATCH * _EXTENT.size)
        _HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, 0, 0, BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        except OSError:
            return None  # EOPNOTSUPP, ENOTTY, EBADR: no extent map to trust
        mapped = _HEADER.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        for i in range(mapped):
            logical, physical, length, _, _, flags, *_ = _EXTENT.unpack_from(
                buf, _HEADER.size + i * _EXTENT.size
            )
            out.append((logical, physical, length, flags))
            if flags & FIEMAP_EXTENT_LAST:
                return out
        start = out[-1][0] + out[-1][2]
    return None


def shared_key(
    st: os.stat_result, extents: list[Extent] | None, *, shared: bool = True
) -> tuple[object, ...] | None:
    """The key two reflinked copies share: device, size and physical layout. None unless the
    file is plain data laid out without holes from offset 0 to its size and, with ``shared``,
    every extent is shared (an original is noted before anything shares it)."""
    if not extents or st.st_size == 0:
        return None
    pos = 0
    for logical, _, length, flags in extents:
        if logical != pos or flags & FIEMAP_EXTENT_UNSAFE:
            return None
        if shared and not flags & FIEMAP_EXTENT_SHARED:
            return None
        pos += length
    if pos < st.st_size:
        return None
    layout = tuple((logical, physical, length) for logical, physical, length, _ in extents)
    return (st.st_dev, st.st_size, layout)


@dataclass(frozen=True, slots=True)
class _Source:
    """Where an entry was learnt: a file under ``root`` and its identity then."""

    digest: bytes
    root: str
    path: str
    ident: tuple[int, int, int, int, int]


def _ident(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ExtentIndex:
    """Shared-extent keys → the digest of a file that had them, checked before each use.

    ``opener(root, path)`` opens a file for the check (the pipeline passes ``open_confined``).
    Bounded LRU; counts ``hits`` (digests handed out unread), ``stale`` (entries dropped by
    the check) and ``notes``. Thread-safe; its methods block (run them in a pool)."""

    def __init__(
        self, opener: Callable[[str, str], int], *, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        self._open = opener
        self.max_entries = max_entries
        self._map: OrderedDict[tuple[object, ...], _Source] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.stale = self.notes = 0

    def __len__(self) -> int:
        return len(self._map)

    def note(self, fd: int, st: os.stat_result, digest: bytes, root: str, path: str) -> None:
        """Remember that the file ``fd`` (``path`` under ``root``) has ``digest``, for copies
        that will share its extents."""
        key = shared_key(st, fiemap(fd), shared=False)
        if key is None:
            return
        with self._lock:
            self._map[key] = _Source(digest, root, path, _ident(st))
            self._map.move_to_end(key)
            self.notes += 1
            while len(self._map) > self.max_entries:
                self._map.popitem(last=False)

    def lookup(self, fd: int, st: os.stat_result) -> bytes | None:
        """The digest of ``fd``'s content when its extents are all shared with a file noted
        before that is still unchanged; None otherwise (then the caller reads the file)."""
        key = shared_key(st, fiemap(fd))
        if key is None:
            return None
        with self._lock:
            src = self._map.get(key)
        if src is None:
            return None
        if not self._still_holds(src, key):
            with self._lock:
                if self._map.get(key) is src:
                    del self._map[key]
                self.stale += 1
            return None
        with self._lock:
            self.hits += 1
        return src.digest

    def _still_holds(self, src: _Source, key: tuple[object, ...]) -> bool:
        try:
            fd = self._open(src.root, src.path)
        except (OSError, ValueError):
            return False
        try:
            st = os.fstat(fd)
            return _ident(st) == src.ident and shared_key(st, fiemap(fd), shared=False) == key
        finally:
            os.close(fd)
