"""Disk image containers (raw, QCOW2, VMDK, VHD, VHDX, VDI) opened as one virtual-disk stream.

:func:`open_disk` picks the reader by magic bytes (:mod:`.detect`) and opens it with
``dissect.hypervisor``. A QCOW2 overlay's backing chain is opened here, link by link (each
backing file resolved against its overlay's directory, as qemu does), so that the chain's
*base* can be scanned on its own and the overlay read as base + delta: :attr:`Disk.changed`
lists the guest byte ranges the overlay itself holds (allocated or zeroed clusters), read from
its L1/L2 tables. Every byte read from the image's files is counted per file.
Reads the image files; writes nothing.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .detect import FileKind, sniff_file
from .errors import ImageError
from .filesystems import describe
from .helpers import os_reason

MAX_BACKING_DEPTH = 16  # QCOW2 backing files followed before the chain is refused

Range = tuple[int, int]  # (guest byte offset, length)


class CountingFile:
    """A read-only file that counts the bytes read through it (``name`` kept for dissect,
    which resolves extent and parent files next to it)."""

    def __init__(self, path: str) -> None:
        try:
            self._f = open(path, "rb")
        except OSError as exc:
            raise ImageError(f"{path}: cannot read: {os_reason(exc)}") from None
        self.name = path
        self.size = os.fstat(self._f.fileno()).st_size
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.bytes_read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


class BlockCache:
    """A read-only stream over ``fh`` that keeps recently read 16 KiB blocks (LRU).

    Filesystem metadata (inodes, directory blocks, extent trees, L2 tables) is read in small
    pieces scattered over the disk; without a cache each piece costs a whole cluster read
    from the container. Large reads (file content) go straight through."""

    BLOCK = 1 << 14  # 16 KiB: a directory block costs 16 KiB of storage reads, not a cluster
    BLOCKS = 2048  # 32 MiB
    DIRECT = 1 << 19  # reads this long bypass the cache

    def __init__(self, fh: Any, size: int) -> None:
        from dissect.util.stream import AlignedStream

        self._fh = fh
        self.size = size
        self._pos = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        # dissect's container streams read whole clusters (64 KiB for QCOW2) through their
        # own one-cluster buffer; their _read(offset, length) takes any sector-aligned range.
        self._raw = fh._read if isinstance(fh, AlignedStream) else None

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self._pos + n)
        if end <= self._pos:
            return b""
        first, last = self._pos // self.BLOCK, (end - 1) // self.BLOCK
        skip = self._pos - first * self.BLOCK
        if first == last:  # most metadata reads: a slice of one cached block
            data: bytes = self._block(first)[skip : skip + end - self._pos]
        elif end - self._pos >= self.DIRECT:
            self._fh.seek(self._pos)
            data = self._fh.read(end - self._pos)
        else:
            joined = b"".join([self._block(i) for i in range(first, last + 1)])
            data = joined[skip : skip + end - self._pos]
        self._pos += len(data)
        return data

    def _block(self, i: int) -> bytes:
        block = self._blocks.get(i)
        if block is not None:
            self._blocks.move_to_end(i)
            return block
        length = min(self.BLOCK, self.size - i * self.BLOCK)
        if self._raw is not None:
            block = self._raw(i * self.BLOCK, length)
        else:
            self._fh.seek(i * self.BLOCK)
            block = self._fh.read(length)
        self._blocks[i] = block
        if len(self._blocks) > self.BLOCKS:
            self._blocks.popitem(last=False)
        return block


@dataclass
class Disk:
    """A virtual disk: its format, a stream of its guest bytes, and its storage files.

    ``backing`` is the QCOW2 backing disk (itself a :class:`Disk`, opened on its own so it can
    be scanned as the base), ``changed`` the guest ranges this overlay holds over it."""

    path: str
    format: FileKind
    stream: BinaryIO
    files: list[CountingFile] = field(default_factory=list)
    backing: Disk | None = None
    changed: list[Range] | None = None
    named: bool = True  # every file the reader opened is in ``files`` (else: not cacheable)

    @property
    def size(self) -> int:
        return int(getattr(self.stream, "size", 0) or 0)

    def chain(self) -> list[Disk]:
        """This disk and its backing disks, top first."""
        out: list[Disk] = []
        d: Disk | None = self
        while d is not None:
            out.append(d)
            d = d.backing
        return out

    def bytes_read(self) -> int:
        return sum(f.bytes_read for d in self.chain() for f in d.files)

    def close(self) -> None:
        for d in self.chain():
            for f in d.files:
                f.close()


def open_disk(path: str, kind: FileKind | None = None, *, _depth: int = 0) -> Disk:
    """Open the disk image at ``path`` (of ``kind``, sniffed when None). Raises ImageError."""
    kind = kind or sniff_file(path)
    if kind == "tar":
        raise ImageError(f"{path}: a tar archive, not a disk image")
    f = CountingFile(path)
    try:
        disk = _open(path, kind, f, _depth)
    except ImageError:
        f.close()
        raise
    except Exception as exc:  # dissect on hostile bytes
        f.close()
        raise ImageError(f"{path}: corrupt {kind} image: {describe(exc)}") from None
    disk.stream = BlockCache(disk.stream, disk.size)  # type: ignore[assignment]
    return disk


def _open(path: str, kind: FileKind, f: CountingFile, depth: int) -> Disk:
    if kind == "raw":
        return Disk(path, kind, f, [f])  # type: ignore[arg-type]
    if kind == "qcow2":
        return _open_qcow2(path, f, depth)
    if kind == "vmdk":
        from dissect.hypervisor.disk.vmdk import VMDK

        return _vmdk_delta(_adopted(Disk(path, kind, VMDK(f), [f])), depth)
    if kind == "vhdx":
        from dissect.hypervisor.disk.vhdx import VHDX

        return _adopted(Disk(path, kind, VHDX(f), [f]))
    if kind == "vhd":
        from dissect.hypervisor.disk.vhd import VHD

        return Disk(path, kind, VHD(f), [f])
    if kind == "vdi":
        from dissect.hypervisor.disk.vdi import VDI

        return Disk(path, kind, VDI(f).open(), [f])
    raise ImageError(f"{path}: unsupported image kind {kind}")


def _vmdk_delta(disk: Disk, depth: int) -> Disk:
    """A sparse VMDK child of a single-file parent (``qemu-img create -f vmdk -b base.vmdk``,
    vSphere's delta disks) as base + delta: the parent opened on its own as ``backing``, the
    grains the child holds (allocated or zeroed) as ``changed``. Other layouts are read
    through their parents by dissect and scanned in full."""
    subs = getattr(disk.stream, "disks", [])
    parent = getattr(subs[0], "parent", None) if len(subs) == 1 else None
    pdisks = getattr(parent, "disks", [])
    if parent is None or len(pdisks) != 1 or not isinstance(pdisks[0].fh, CountingFile):
        return disk
    if depth + 1 >= MAX_BACKING_DEPTH:
        raise ImageError(f"{disk.path}: parent chain deeper than {MAX_BACKING_DEPTH}")
    try:
        disk.changed = _present(subs[0])
        disk.backing = open_disk(pdisks[0].fh.name, "vmdk", _depth=depth + 1)
    except BaseException:
        disk.close()
        raise
    return disk


def _present(sparse: Any) -> list[Range]:
    """The guest ranges a sparse VMDK extent holds itself (run type 0: read from the parent)."""
    out: list[Range] = []
    pos = 0
    for run_type, _off, count, _parent in sparse.get_runs(0, int(sparse.sector_count)):
        length = count * 512
        if run_type != 0:
            if out and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((pos, length))
        pos += length
    return out


def _adopted(disk: Disk) -> Disk:
    """Swap the files a VMDK or VHDX reader opened itself (descriptor extents, parents) for
    counted ones that :meth:`Disk.close` closes and the cache key covers."""
    seen: set[int] = set()
    todo: list[Any] = [disk.stream]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if hasattr(obj, "fh") and not _swap(obj, disk.files):
            disk.named = False
        todo.extend(getattr(obj, "disks", ()))
        if getattr(obj, "parent", None) is not None:
            todo.append(obj.parent)
    return disk


def _swap(holder: Any, files: list[CountingFile]) -> bool:
    fh = holder.fh
    if isinstance(fh, CountingFile):
        return True
    name = getattr(fh, "name", None)
    if not isinstance(name, str):
        return False
    counted = CountingFile(name)
    fh.close()
    holder.fh = counted
    for attr in ("read", "seek", "tell"):  # RawDisk binds its file's methods at init
        if attr in vars(holder):
            setattr(holder, attr, getattr(counted, attr))
    files.append(counted)
    return True


def _open_qcow2(path: str, f: CountingFile, depth: int) -> Disk:
    from dissect.hypervisor.disk.qcow2 import QCow2

    q = QCow2(f, allow_no_backing_file=True, allow_no_data_file=True)
    if q.needs_data_file:
        raise ImageError(f"{path}: QCOW2 with an external data file is not supported")
    backing: Disk | None = None
    if q.auto_backing_file:
        if depth + 1 >= MAX_BACKING_DEPTH:
            raise ImageError(f"{path}: backing chain deeper than {MAX_BACKING_DEPTH}")
        name = q.auto_backing_file
        bpath = name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)
        try:
            backing = open_disk(bpath, _backing_kind(bpath, q.backing_format), _depth=depth + 1)
        except ImageError as exc:
            raise ImageError(f"{path}: backing file {name!r}: {exc}") from None
        q.backing_file = backing.stream
    try:
        stream = q.open()
        disk = Disk(path, "qcow2", stream, [f], backing)
        if backing is not None:
            disk.changed = _allocated(stream, int(q.header.size))
    except BaseException:
        if backing is not None:
            backing.close()
        raise
    return disk


def _backing_kind(path: str, declared: str | None) -> FileKind:
    """A backing file must be a regular file holding a disk image by its own magic bytes, of
    the format the overlay declares: an image naming ``/etc/shadow`` or ``/dev/sda`` as its
    raw base is refused rather than read and reported as files."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ImageError("not a regular file")
    except OSError as exc:
        raise ImageError(os_reason(exc)) from None
    kind = sniff_file(path)
    fmt = (declared or "").lower()
    if kind not in ("raw", "qcow2") or (fmt and fmt != kind):
        raise ImageError(f"holds {kind}, not the {fmt or 'raw or qcow2'} disk image it should")
    return kind


def _allocated(stream: Any, size: int) -> list[Range]:
    """The guest ranges a QCOW2 overlay holds itself (data, compressed or zero clusters);
    everything else is read through to the backing file."""
    from dissect.hypervisor.disk.c_qcow2 import UNALLOCATED_SUBCLUSTER_TYPES

    out: list[Range] = []
    for sc_type, offset, _host, length in stream._yield_runs(0, size):
        if sc_type in UNALLOCATED_SUBCLUSTER_TYPES or length <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out
