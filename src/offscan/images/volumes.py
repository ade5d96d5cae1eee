"""The volumes of a virtual disk: a bare filesystem, MBR/GPT partitions, LVM logical volumes.

:func:`find_volumes` labels each volume as it appears in reported paths: ``p1`` for the first
partition, ``p2:vg0/root`` for a logical volume on partition 2, ``vg0/root`` for LVM on the
whole disk, and no label for a filesystem that fills the disk. A partition is a linear range of
the disk (``offset`` is known), so a QCOW2 overlay's changed ranges map into it; a logical
volume that is one linear run of its physical volume has an offset too; any other mapping is
not followed (``offset`` None: every file in it counts as possibly changed, which costs reads,
never a missed change). Partitions known to hold no files (extended-
partition containers, BIOS boot, swap) are listed as skipped; any other partition without a
supported filesystem becomes an error in the report. Uses ``dissect.volume``; reads the disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, BinaryIO
from uuid import UUID

from .detect import sniff_volume
from .errors import ImageError
from .filesystems import describe

_EXTENDED_MBR = (0x05, 0x0F, 0x85)
_PROTECTIVE_MBR = 0xEE
_BIOS_BOOT = UUID("21686148-6449-6e6f-744e-656564454649")
_SWAP_TYPES = (0x82, UUID("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"))


@dataclass(frozen=True, slots=True)
class Volume:
    """A volume to look for a filesystem in; ``skipped`` says why it holds none."""

    label: str | None
    stream: BinaryIO
    offset: int | None
    skipped: str | None = None


def find_volumes(disk: BinaryIO, where: str) -> list[Volume]:
    """Every volume of ``disk``; raises ImageError when it has neither a partition table nor
    a filesystem nor an LVM label at its start."""
    kind = sniff_volume(disk)
    if kind == "lvm":
        return _lvm(disk, None, where)
    if kind not in ("unknown", "swap"):
        return [Volume(None, disk, 0)]
    from dissect.volume.disk import Disk

    disk.seek(0)
    try:
        table = Disk(disk)
    except Exception as exc:  # dissect on hostile bytes
        raise ImageError(
            f"{where}: no partition table (MBR, GPT), LVM label or filesystem found: "
            f"{describe(exc).splitlines()[0]}"
        ) from None
    gpt = type(table.scheme).__name__ == "GPT"
    volumes: list[Volume] = []
    for part in table.partitions:
        volumes.extend(_partition(disk, part, gpt, where))
    if not volumes:
        raise ImageError(f"{where}: the partition table lists no partitions")
    return volumes


def _partition(disk: BinaryIO, part: Any, gpt: bool, where: str) -> list[Volume]:
    from dissect.util.stream import RangeStream

    label = f"p{part.number}"
    size = int(part.size)
    raw = getattr(part, "raw", None)
    if gpt and raw is not None and hasattr(raw, "last_lba"):
        size += int(part.disk.sector_size)  # dissect's size drops GPT's inclusive last sector
    stream = RangeStream(disk, int(part.offset), size)
    if part.type in _EXTENDED_MBR or part.type == _PROTECTIVE_MBR:
        return []  # the extended partition's logical partitions are listed on their own
    if part.type == _BIOS_BOOT:
        return [Volume(label, stream, int(part.offset), "BIOS boot partition (no filesystem)")]
    kind = sniff_volume(stream)
    if kind == "lvm":
        return _lvm(stream, label, f"{where}:{label}", int(part.offset))
    if kind == "swap" or part.type in _SWAP_TYPES:
        return [Volume(label, stream, int(part.offset), "swap space (no files)")]
    return [Volume(label, stream, int(part.offset))]


def _lvm(stream: BinaryIO, label: str | None, where: str, base: int = 0) -> list[Volume]:
    from dissect.volume.lvm import LVM2

    stream.seek(0)
    try:
        lvm = LVM2(stream)
        lvs = [lv for lv in lvm.vg.lv if lv.is_visible]
        out = [
            Volume(
                f"{label}:{lvm.vg.name}/{lv.name}" if label else f"{lvm.vg.name}/{lv.name}",
                lv.open(),
                _linear_offset(lv, base),
            )
            for lv in lvs
        ]
    except Exception as exc:  # dissect on hostile bytes
        raise ImageError(f"{where}: unreadable LVM physical volume: {describe(exc)}") from None
    if not out:
        raise ImageError(f"{where}: LVM volume group lists no logical volumes")
    return out


def _linear_offset(lv: Any, base: int) -> int | None:
    """The disk offset of a logical volume that is one linear run of one physical volume
    (one segment, one stripe, from extent 0), else None. ``base`` is the PV's disk offset."""
    segments = lv.segments
    if len(segments) != 1 or getattr(segments[0], "type", None) != "striped":
        return None
    seg = segments[0]
    if int(seg.stripe_count) != 1 or int(seg.start_extent) != 0 or len(seg.stripes) != 1:
        return None
    pv_name, extent_offset = seg.stripes[0]
    pv = lv.vg.physical_volumes[pv_name]
    extent_size = int(lv.vg.extent_size) * 512  # LVM counts in 512-byte sectors
    return base + int(pv.pe_start) * 512 + int(extent_offset) * extent_size
