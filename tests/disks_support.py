"""Builders of small disk images for the disk tests, with the real Debian tools.

``mkfs.ext4 -d`` populates ext4 from a directory without mounting; ``qemu-img convert`` turns
a raw image into QCOW2/VMDK/VHDX/VHD; ``mkfs.vfat`` + ``mcopy`` build FAT, ``mkntfs`` +
``ntfscp`` NTFS; ``sfdisk`` writes partition tables; ``qemu-io`` writes into a QCOW2 overlay
as a guest would (copy-on-write of the touched cluster only). XFS needs a loop mount to be
populated (:func:`loop_mounted`, root only), always unmounted in a ``finally``. Every builder
writes only under the paths it is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

TOOL_TIMEOUT = 120  # seconds one mkfs/qemu-img/sfdisk call may take before it is a hang


def sh(*args: str | os.PathLike[str], input: bytes | None = None) -> str:
    """Run a tool, fail the test with its output when it fails."""
    p = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        timeout=TOOL_TIMEOUT,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if p.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({p.returncode}): {p.stderr.decode()[-2000:]}")
    return p.stdout.decode(errors="replace")


def have(*tools: str) -> bool:
    return all(shutil.which(t) for t in tools)


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def ext4_image(path: Path, tree: Path, size: str = "8M", *, offset: int = 0) -> Path:
    """An ext4 filesystem with 4 KiB blocks holding ``tree`` (at byte ``offset`` of ``path``)."""
    if offset == 0:
        path.unlink(missing_ok=True)
        sh("truncate", "-s", size, path)
        sh("mkfs.ext4", "-F", "-q", "-b", "4096", "-d", tree, path)
    else:
        sh("mkfs.ext4", "-F", "-q", "-b", "4096", "-d", tree, "-E", f"offset={offset}", path, size)
    return path


def convert(raw: Path, fmt: str, out: Path, *options: str) -> Path:
    """``qemu-img convert`` to ``fmt`` (qcow2, vmdk, vhdx, vpc, vdi); ``-c`` compresses."""
    sh("qemu-img", "convert", *options, "-f", "raw", "-O", fmt, raw, out)
    return out


def fat_image(path: Path, files: dict[str, bytes], work: Path) -> Path:
    """A FAT image holding ``files`` (names as ``DIR/NAME.EXT``), written with mtools."""
    sh("mkfs.vfat", "-C", path, "4096")
    made: set[str] = set()
    for rel, data in files.items():
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in made:
                sh("mmd", "-i", path, f"::/{d}")
                made.add(d)
        src = work / f"fat-src-{len(made)}-{parts[-1]}"
        src.write_bytes(data)
        sh("mcopy", "-i", path, src, f"::/{rel}")
    return path


def ntfs_image(path: Path, files: dict[str, bytes], work: Path) -> Path:
    """An NTFS image holding ``files`` in its root, written with ntfscp (no mount)."""
    sh("truncate", "-s", "8M", path)
    sh("mkntfs", "-q", "-F", "-f", path)
    for name, data in files.items():
        src = work / f"ntfs-src-{name}"
        src.write_bytes(data)
        sh("ntfscp", "-q", path, src, name)
    return path


def gpt_disk(path: Path, size_mib: int, parts_mib: list[int]) -> list[int]:
    """A GPT disk of ``size_mib`` with partitions of the given sizes; their byte offsets."""
    path.unlink(missing_ok=True)
    sh("truncate", "-s", f"{size_mib}M", path)
    script = "label: gpt\n" + "".join(f",{m}M,L\n" for m in parts_mib)
    sh("sfdisk", "-q", path, input=script.encode())
    table = json.loads(sh("sfdisk", "-J", path))
    return [p["start"] * 512 for p in table["partitiontable"]["partitions"]]


def mbr_disk(path: Path, size_mib: int, parts_mib: list[int]) -> list[int]:
    path.unlink(missing_ok=True)
    sh("truncate", "-s", f"{size_mib}M", path)
    script = "label: dos\n" + "".join(f",{m}M,83\n" for m in parts_mib)
    sh("sfdisk", "-q", path, input=script.encode())
    table = json.loads(sh("sfdisk", "-J", path))
    return [p["start"] * 512 for p in table["partitiontable"]["partitions"]]


def block_of(raw: Path, path_in_fs: str) -> int:
    """The first physical block (4 KiB) of a file in an ext4 image, from debugfs."""
    out = sh("debugfs", "-R", f"bmap {path_in_fs} 0", raw).strip()
    return int(out.split()[-1])


def overlay(base: Path, clone: Path) -> Path:
    """``qemu-img create -b base -F qcow2 clone``: an empty copy-on-write overlay."""
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", clone)
    return clone


def guest_write(image: Path, offset: int, data: bytes, work: Path) -> None:
    """Write ``data`` at guest byte ``offset`` through qemu-io, as the VM would."""
    src = work / "guest-write.bin"
    src.write_bytes(data)
    sh("qemu-io", "-f", "qcow2", "-c", f"write -q -s {src} {offset} {len(data)}", image)


def loop_available() -> str | None:
    """Why loop mounts cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "loop mounts need root"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control (no loop devices in this kernel/container)"
    if not have("mkfs.xfs", "mount", "umount"):
        return "mkfs.xfs/mount not installed"
    return None


@contextlib.contextmanager
def loop_mounted(image: Path, mnt: Path, *opts: str) -> Iterator[Path]:
    """``mount -o loop IMAGE MNT`` for a ``with`` block; always unmounted (lazily if busy)."""
    mnt.mkdir(parents=True, exist_ok=True)
    sh("mount", "-o", ",".join(("loop", *opts)), image, mnt)
    try:
        yield mnt
    finally:
        p = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=TOOL_TIMEOUT)
        if p.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=TOOL_TIMEOUT)


def lvm_disk(
    path: Path, tree: Path, work: Path, *, size_mib: int = 32, lv_mib: int = 12
) -> tuple[str, int]:
    """An MBR disk whose partition 1 is an LVM physical volume (made by pvcreate/vgcreate on a
    loop device over the partition) with one linear logical volume ``root`` holding an ext4
    of ``tree``. The LV is added to the metadata by vgcfgrestore (no device-mapper needed: it
    is never activated). Returns the volume group's name and the LV's byte offset on the
    disk. Root only."""
    vg = f"offscan{os.getpid()}x{len(str(path)) % 97}"
    part = mbr_disk(path, size_mib, [size_mib - 2])[0]
    sh("sfdisk", "-q", "--part-type", path, "1", "8e")
    loop = sh("losetup", "-f", "--show", "-o", str(part), path).strip()
    conf = (
        f'devices{{filter=["a|^{loop}$|","r|.*|"] use_devicesfile=0 '
        "obtain_device_list_from_udev=0} activation{udev_sync=0 udev_rules=0} "
        "backup{backup=0 archive=0}"
    )
    env_cmd = ["env", "LVM_SUPPRESS_FD_WARNINGS=1"]
    try:
        sh(*env_cmd, "pvcreate", "-q", "--config", conf, loop)
        sh(*env_cmd, "vgcreate", "-q", "--config", conf, vg, loop)
        backup = work / "vg.txt"
        sh(*env_cmd, "vgcfgbackup", "-q", "--config", conf, "-f", backup, vg)
        text = backup.read_text()
        extent_sectors = int(re.search(r"extent_size = (\d+)", text).group(1))  # type: ignore[union-attr]
        pe_start = int(re.search(r"pe_start = (\d+)", text).group(1))  # type: ignore[union-attr]
        extents = lv_mib * 2048 // extent_sectors
        lv = (
            "\tlogical_volumes {\n\t\troot {\n"
            '\t\t\tid = "offsca-ntes-tlvr-oota-bcde-fghi-jklmno"\n'
            '\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]\n\t\t\tflags = []\n'
            "\t\t\tsegment_count = 1\n\t\t\tsegment1 {\n\t\t\t\tstart_extent = 0\n"
            f"\t\t\t\textent_count = {extents}\n"
            '\t\t\t\ttype = "striped"\n\t\t\t\tstripe_count = 1\n'
            '\t\t\t\tstripes = [\n\t\t\t\t\t"pv0", 0\n\t\t\t\t]\n\t\t\t}\n\t\t}\n\t}\n'
        )
        body = text.rstrip()
        assert body.endswith("}")
        text = re.sub(r"seqno = (\d+)", lambda m: f"seqno = {int(m.group(1)) + 1}", body[:-1])
        backup.write_text(text + lv + "}\n")
        sh(*env_cmd, "vgcfgrestore", "-q", "--config", conf, "-f", backup, vg)
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True, timeout=TOOL_TIMEOUT)
    ext4_image(path, tree, f"{lv_mib}M", offset=part + pe_start * 512)
    return vg, part + pe_start * 512
