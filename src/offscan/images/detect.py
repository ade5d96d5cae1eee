"""What a regular file holds, judged by its magic bytes (never by its name).

:func:`sniff_file` tells a tar archive (plain or compressed) from a disk image container
(QCOW2, VMDK, VHD, VHDX, VDI) and from a raw disk (a partition table, an LVM physical volume or
a bare filesystem). A file that is none of these is refused with :class:`ImageError`: reading
it as a tar stream would find no members and call an ext4 image "clean" (issue 14).
:func:`sniff_volume` names the filesystem at the start of a volume. Reads a few KiB; writes
nothing.
"""

from __future__ import annotations

import os
import stat
import struct
import tarfile
from typing import BinaryIO, Literal

from .errors import ImageError
from .helpers import os_reason

FileKind = Literal["tar", "qcow2", "vmdk", "vhd", "vhdx", "vdi", "raw"]
FsKind = Literal["ext", "xfs", "ntfs", "fat", "exfat", "lvm", "swap", "btrfs", "unknown"]

SNIFF_BYTES = 0x10100  # covers every magic below (btrfs's superblock is at 64 KiB)
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
_VDI_MAGIC = b"\x7f\x10\xda\xbe"  # at 0x40, after the "<<< ... Disk Image >>>" banner


def sniff_file(path: str) -> FileKind:
    """The kind of the regular file at ``path``; raises :class:`ImageError` when it is none."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
            size = os.fstat(f.fileno()).st_size
            footer = b""
            if size >= 512:
                f.seek(size - 512)
                footer = f.read(512)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {os_reason(exc)}") from None
    kind = sniff_bytes(head, footer)
    if kind is None:
        raise ImageError(
            f"{path}: not a tar archive, disk image (QCOW2, VMDK, VHD, VHDX, VDI, raw) or "
            "filesystem image: no known magic bytes"
        )
    return kind


def disk_kind(path: str | os.PathLike[str]) -> FileKind | None:
    """The kind of a disk image at ``path``; None for directories, tar archives and anything
    not a regular file (those are :func:`~.layout.open_image`'s to judge or refuse)."""
    spath = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(spath).st_mode):
            return None
    except OSError:
        return None
    kind = sniff_file(spath)
    return None if kind == "tar" else kind


def sniff_bytes(head: bytes, footer: bytes = b"") -> FileKind | None:
    """The kind of a file from its first bytes and its last 512 bytes (VHD's footer)."""
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:4] in (b"KDMV", b"COWD") or head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix" or footer[:8] == b"conectix":
        return "vhd"
    if head[0x40:0x44] == _VDI_MAGIC:
        return "vdi"
    if head[257:262] == b"ustar" or head.startswith(_COMPRESSED):
        return "tar"
    if _has_partition_table(head) or sniff_volume_bytes(head) != "unknown":
        return "raw"
    if _is_v7_tar(head):
        return "tar"
    return None


def _has_partition_table(head: bytes) -> bool:
    return head[512:520] == b"EFI PART" or head[510:512] == b"\x55\xaa"


def _is_v7_tar(head: bytes) -> bool:
    """A pre-POSIX tar header (no ``ustar`` magic) with a valid checksum, or an empty archive."""
    if len(head) >= 512 and not any(head[:512]):
        return len(head) <= 20 * 512 and not any(head)  # a lone end-of-archive marker
    try:
        tarfile.TarInfo.frombuf(head[:512], "utf-8", "surrogateescape")
    except (tarfile.HeaderError, ValueError):
        return False
    return True


def sniff_volume(fh: BinaryIO) -> FsKind:
    """The filesystem (or LVM physical volume) at the start of the volume ``fh``."""
    fh.seek(0)
    return sniff_volume_bytes(fh.read(SNIFF_BYTES))


def sniff_volume_bytes(head: bytes) -> FsKind:
    if head[1080:1082] == b"\x53\xef":
        return "ext"
    if head[:4] == b"XFSB":
        return "xfs"
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[3:11] == b"EXFAT   ":
        return "exfat"
    for sector in range(4):
        off = sector * 512
        if head[off : off + 8] == b"LABELONE" and head[off + 24 : off + 32] == b"LVM2 001":
            return "lvm"
    if _is_fat(head):
        return "fat"
    if head[0x10040:0x10048] == b"_BHRfS_M":
        return "btrfs"
    for page in (4096, 8192, 16384, 65536):
        if head[page - 10 : page] in (b"SWAPSPACE2", b"SWAP-SPACE"):
            return "swap"
    return "unknown"


def _is_fat(head: bytes) -> bool:
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return False
    if not (head[54:59] == b"FAT12" or head[54:59] == b"FAT16" or head[82:87] == b"FAT32"):
        return False
    bytes_per_sector, sectors_per_cluster = struct.unpack_from("<HB", head, 11)
    return bytes_per_sector in (512, 1024, 2048, 4096) and sectors_per_cluster in (
        1 << i for i in range(8)
    )
