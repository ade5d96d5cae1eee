"""Disk images scanned without mounting (issue 16, and issue 14's "ext4 image is a tar").

Every image is built here with the real tools (mkfs.ext4 -d, qemu-img, mkfs.vfat + mcopy,
mkntfs + ntfscp, sfdisk, qemu-io) and scanned through the dissect libraries, in process and
through ``python -m offscan scan-image``. Byte and file counts come from the scanner's own
meters: a clone's overlay changing one file of 300 must read that file and no other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from disks_support import (
    block_of,
    convert,
    ext4_image,
    fat_image,
    gpt_disk,
    guest_write,
    have,
    make_tree,
    mbr_disk,
    ntfs_image,
    overlay,
    sh,
)
from helpers import EICAR, EICAR_NAME, run

from offscan import Matcher, load_database
from offscan.images import ImageError, scan_image
from offscan.images.detect import sniff_file
from offscan.images.diskcache import DiskCache
from offscan.images.diskscan import scan_disk

pytestmark = pytest.mark.skipif(
    not have("mkfs.ext4", "qemu-img", "qemu-io", "debugfs"),
    reason="e2fsprogs and qemu-utils are needed to build test images",
)
needs_sfdisk = pytest.mark.skipif(not have("sfdisk", "mkfs.vfat"), reason="fdisk not installed")
needs_mtools = pytest.mark.skipif(not have("mkfs.vfat", "mcopy"), reason="mtools not installed")

MATCHER = Matcher(load_database())
BIG = bytes(range(256)) * 400  # 100 KiB, several extents' worth of blocks
INFECTED_TREE = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "bin/tool": BIG,
    "home/u/eicar.com": EICAR,
    "var/spool/copy.com": EICAR,
}
CLEAN_TREE = {
    "etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
    "bin/tool": BIG,
    "a/b/c.txt": b"c" * 9000,
}
FORMATS = {
    "raw": None,
    "qcow2": "qcow2",
    "vmdk": "vmdk",
    "vhdx": "vhdx",
    "vhd": "vpc",
    "vdi": "vdi",
    "qcow2-compressed": "qcow2",
}


def paths(files: list) -> list[str]:
    return [f.path for f in files]


@pytest.fixture(scope="module")
def ext4_raws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("ext4")
    infected = ext4_image(work / "infected.raw", make_tree(work / "t1", INFECTED_TREE))
    clean = ext4_image(work / "clean.raw", make_tree(work / "t2", CLEAN_TREE))
    return {"infected": infected, "clean": clean}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_ext4_in_every_container(fmt: str, ext4_raws: dict[str, Path], tmp_path: Path) -> None:
    images = {}
    options = ("-c",) if fmt.endswith("-compressed") else ()
    kind = fmt.removesuffix("-compressed")
    for name, raw in ext4_raws.items():
        target = FORMATS[fmt]
        out = tmp_path / f"{name}.img"  # the name says nothing: the magic bytes do
        images[name] = raw if target is None else convert(raw, target, out, *options)
    assert sniff_file(str(images["infected"])) == kind
    report = scan_image(images["infected"], MATCHER)
    assert report.kind == f"{kind} disk image"
    assert paths(report.infected) == ["/home/u/eicar.com", "/var/spool/copy.com"]
    assert all(f.matches == (EICAR_NAME,) for f in report.infected)
    assert sorted(paths(report.files)) == sorted("/" + p for p in INFECTED_TREE)
    assert report.exit_code == 1 and not report.errors
    clean = scan_image(images["clean"], MATCHER)
    assert clean.exit_code == 0 and not clean.infected and len(clean.files) == 3
    assert clean.bytes_scanned == sum(len(v) for v in CLEAN_TREE.values())


def test_issue_14_ext4_image_is_never_an_empty_tar(
    ext4_raws: dict[str, Path], tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(ext4_raws["infected"].read_bytes())
    out = run("scan-image", disk)
    assert out.returncode == 1, out.stderr
    assert f"{disk}:/home/u/eicar.com: {EICAR_NAME} FOUND" in out.stdout
    assert "tar archive" not in out.stdout
    # a file of no known kind is an error (exit 2), never "0 files, clean"
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 16))
    out = run("scan-image", junk)
    assert out.returncode == 2 and "no known magic bytes" in out.stderr
    assert "Traceback" not in out.stderr


def test_corrupt_images_are_errors(ext4_raws: dict[str, Path], tmp_path: Path) -> None:
    raw = ext4_raws["infected"].read_bytes()
    # ext4 magic kept, group descriptors and inode tables destroyed
    broken = bytearray(raw)
    broken[4096 : 4096 * 64] = b"\xff" * (4096 * 63)
    bad_ext = tmp_path / "bad-ext4.img"
    bad_ext.write_bytes(bytes(broken))
    qcow = convert(ext4_raws["infected"], "qcow2", tmp_path / "x.qcow2")
    data = qcow.read_bytes()
    truncated = tmp_path / "truncated.qcow2"
    truncated.write_bytes(data[: len(data) // 3])
    garbage_l1 = bytearray(data)
    garbage_l1[0x30000:0x40000] = os.urandom(0x10000)  # clusters after the header: L1/refcounts
    smashed = tmp_path / "smashed.qcow2"
    smashed.write_bytes(bytes(garbage_l1))
    for image in (bad_ext, truncated, smashed):
        try:
            report = scan_image(image, MATCHER)
        except ImageError:
            continue  # unreadable as a whole: an error
        # readable in part: whatever could not be read is an error entry, so never exit 0
        assert report.exit_code != 0, (image, [f.to_json() for f in report.files])
        out = run("scan-image", image)
        assert out.returncode in (1, 2) and "Traceback" not in out.stderr


@needs_mtools
def test_fat_image(tmp_path: Path) -> None:
    image = fat_image(
        tmp_path / "fat.img",
        {"DOCS/README.TXT": b"hello\n" * 100, "BIN/EICAR.COM": EICAR, "BIG.BIN": BIG},
        tmp_path,
    )
    report = scan_image(image, MATCHER)
    assert paths(report.infected) == ["/BIN/EICAR.COM"]
    assert sorted(paths(report.files)) == ["/BIG.BIN", "/BIN/EICAR.COM", "/DOCS/README.TXT"]
    clean = fat_image(tmp_path / "clean.img", {"A.TXT": b"a" * 10000}, tmp_path)
    assert scan_image(clean, MATCHER).exit_code == 0


@pytest.mark.skipif(not have("mkntfs", "ntfscp"), reason="ntfs-3g (mkntfs, ntfscp) not installed")
def test_ntfs_image(tmp_path: Path) -> None:
    image = ntfs_image(
        tmp_path / "ntfs.img",
        {"eicar.txt": EICAR, "big.bin": BIG, "small.txt": b"tiny"},
        tmp_path,
    )
    clean = scan_image(image, MATCHER)
    assert clean.bytes_scanned == len(EICAR) + len(BIG) + 4
    # malware in an alternate data stream of a clean file: found, as file:stream
    (tmp_path / "ads").write_bytes(EICAR)
    sh("ntfscp", "-q", "-N", "hidden", image, tmp_path / "ads", "small.txt")
    report = scan_image(image, MATCHER)
    assert paths(report.infected) == ["/eicar.txt", "/small.txt:hidden"]
    assert sorted(paths(report.files)) == [
        "/big.bin",
        "/eicar.txt",
        "/small.txt",
        "/small.txt:hidden",
    ]
    assert not any(p.startswith("/$") for p in paths(report.files))  # metafiles are not files


@needs_sfdisk
def test_gpt_and_mbr_partitions(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", INFECTED_TREE)
    gpt = tmp_path / "gpt.raw"
    offsets = gpt_disk(gpt, 16, [4, 8])
    sh("mkfs.vfat", f"--offset={offsets[0] // 512}", gpt, "4096")
    ext4_image(gpt, tree, "8M", offset=offsets[1])
    qcow = convert(gpt, "qcow2", tmp_path / "gpt.qcow2")
    out = run("scan-image", qcow)
    assert out.returncode == 1, out.stderr
    assert f"{qcow}:p2:/home/u/eicar.com: {EICAR_NAME} FOUND" in out.stdout
    assert f"{qcow}:p2:/etc/passwd: OK" in out.stdout
    assert "Filesystems: 2 (2 scanned" in out.stdout
    # an MBR disk whose second partition holds no filesystem: an error, never clean
    mbr = tmp_path / "mbr.raw"
    offsets = mbr_disk(mbr, 16, [8, 4])
    ext4_image(mbr, make_tree(tmp_path / "clean", CLEAN_TREE), "8M", offset=offsets[0])
    report = scan_image(mbr, MATCHER)
    assert [f.path for f in report.errors] == ["p2:/"]
    assert "no supported filesystem" in (report.errors[0].reason or "")
    assert sorted(paths(report.files))[:1] == ["p1:/a/b/c.txt"] and report.exit_code == 2


def test_state_reuse_reads_no_file_twice(ext4_raws: dict[str, Path], tmp_path: Path) -> None:
    image = convert(ext4_raws["infected"], "qcow2", tmp_path / "vm.qcow2")
    state = tmp_path / "state"
    first = json.loads(run("scan-image", "--json", "--state", state, image).stdout)
    assert first["files_read"] == 4 and first["layers"][0]["source"] == "scanned"
    second = json.loads(run("scan-image", "--json", "--state", state, image).stdout)
    assert second["layers"][0]["source"] == "cached"
    assert second["files_read"] == 0 and second["bytes_scanned"] == 0
    assert second["infected"] == first["infected"]
    assert second["bytes_read"] < image.stat().st_size  # no rehash: the digest memo knew it


def test_overlay_changing_one_of_300_files_reads_only_that_file(tmp_path: Path) -> None:
    files = {f"srv/f{i:03d}": (f"file {i} ".encode() * 1100)[:8192] for i in range(300)}
    raw = ext4_image(tmp_path / "base.raw", make_tree(tmp_path / "tree", files), "16M")
    base = convert(raw, "qcow2", tmp_path / "base.qcow2")
    clone = overlay(base, tmp_path / "clone.qcow2")
    block = block_of(raw, "/srv/f150")
    guest_write(clone, block * 4096, EICAR.ljust(4096, b"\0"), tmp_path)
    cache = DiskCache(state_dir=tmp_path / "state")
    base_report = scan_disk(base, MATCHER, cache=cache)
    assert base_report.files_read == 300 and not base_report.infected
    report = scan_disk(clone, MATCHER, cache=cache)
    assert paths(report.infected) == ["/srv/f150"]
    assert report.files_read == 1 and report.files_inherited == 299
    assert report.bytes_scanned == 8192  # the changed file's content, and no other file's
    assert report.layers == [("disk (ext2/3/4)", "delta")]
    # the 64 KiB cluster copied on write holds neighbours: compared with the base, not scanned
    assert 0 < report.bytes_compared <= 2 * 65536
    # metadata (inodes, directories) is read through the overlay too, but no file content
    assert report.bytes_read < base_report.bytes_read / 2
    # through the CLI, base verdicts inherited from --state
    state = tmp_path / "cli-state"
    run("scan-image", "--state", state, base)
    out = json.loads(run("scan-image", "--json", "--state", state, clone).stdout)
    assert out["infected"] == ["/srv/f150"] and out["files_read"] == 1
    assert out["bytes_scanned"] == 8192


def test_overlay_with_new_and_rewritten_files(tmp_path: Path) -> None:
    """A clone written by qemu-img convert -B (every cluster copied) with a new file: only the
    new file is read; identical files are compared with the base, never matched again."""
    files = {f"d/f{i}": os.urandom(6000) for i in range(40)}
    raw = ext4_image(tmp_path / "base.raw", make_tree(tmp_path / "tree", files), "16M")
    base = convert(raw, "qcow2", tmp_path / "base.qcow2")
    mod = tmp_path / "mod.raw"
    mod.write_bytes(raw.read_bytes())
    (tmp_path / "new.com").write_bytes(EICAR)
    sh("debugfs", "-w", "-R", f"write {tmp_path / 'new.com'} /d/new.com", mod)
    clone = tmp_path / "clone.qcow2"
    sh(
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-B",
        base.name,
        "-F",
        "qcow2",
        mod,
        clone,
    )
    cache = DiskCache()
    scan_disk(base, MATCHER, cache=cache)
    report = scan_disk(clone, MATCHER, cache=cache)
    assert paths(report.infected) == ["/d/new.com"]
    assert report.files_read == 1 and report.files_inherited == 40
    assert report.bytes_scanned == len(EICAR)


def test_overlay_without_a_cached_base_scans_the_base_once(tmp_path: Path) -> None:
    files = {f"f{i}": os.urandom(5000) for i in range(20)}
    raw = ext4_image(tmp_path / "base.raw", make_tree(tmp_path / "tree", files), "8M")
    base = convert(raw, "qcow2", tmp_path / "base.qcow2")
    clone = overlay(base, tmp_path / "clone.qcow2")
    cache = DiskCache()
    first = scan_disk(clone, MATCHER, cache=cache)
    assert first.files_read == 20 and first.files_inherited == 20  # base made, clone inherits
    clone2 = overlay(base, tmp_path / "clone2.qcow2")
    guest_write(clone2, (8 << 20) - 65536, b"\xaa" * 4096, tmp_path)  # free space: no file
    second = scan_disk(clone2, MATCHER, cache=cache)
    assert second.files_read == 0 and second.files_inherited == 20


def test_missing_backing_file_is_an_error(tmp_path: Path) -> None:
    raw = ext4_image(tmp_path / "base.raw", make_tree(tmp_path / "t", CLEAN_TREE), "8M")
    base = convert(raw, "qcow2", tmp_path / "base.qcow2")
    clone = overlay(base, tmp_path / "clone.qcow2")
    base.unlink()
    out = run("scan-image", clone)
    assert out.returncode == 2 and "backing file 'base.qcow2'" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(not have("mkfs.exfat"), reason="exfatprogs not installed")
def test_exfat_image_is_read(tmp_path: Path) -> None:
    """Only an empty exFAT: nothing here writes files into one without mounting it."""
    image = tmp_path / "exfat.img"
    sh("truncate", "-s", "4M", image)
    sh("mkfs.exfat", image)
    report = scan_image(image, MATCHER)
    assert report.layers == [("disk (exFAT)", "scanned")]
    assert report.files == [] and report.exit_code == 0
    broken = bytearray(image.read_bytes())
    broken[0x40:0x80] = b"\xff" * 0x40  # geometry fields of the boot sector
    bad = tmp_path / "bad-exfat.img"
    bad.write_bytes(bytes(broken))
    with pytest.raises(ImageError):
        scan_image(bad, MATCHER)


def test_vmdk_descriptor_and_extents_are_one_image(
    ext4_raws: dict[str, Path], tmp_path: Path
) -> None:
    """A descriptor VMDK's extent files are part of its cache key: replacing the flat extent
    under an unchanged descriptor is noticed with --state."""
    desc = tmp_path / "vm.vmdk"
    sh(
        "qemu-img",
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        ext4_raws["clean"],
        desc,
    )
    flat = tmp_path / "vm-flat.vmdk"
    assert flat.exists() and desc.stat().st_size < 4096
    sparse = tmp_path / "split.vmdk"
    sh(
        "qemu-img",
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        ext4_raws["infected"],
        sparse,
    )
    assert paths(scan_image(sparse, MATCHER).infected) == [
        "/home/u/eicar.com",
        "/var/spool/copy.com",
    ]
    state = tmp_path / "state"
    first = json.loads(run("scan-image", "--json", "--state", state, desc).stdout)
    assert first["infected"] == [] and first["bytes_read"] > flat.stat().st_size // 2
    flat.write_bytes(ext4_raws["infected"].read_bytes())  # same size, other content
    out = run("scan-image", "--json", "--state", state, desc)
    assert out.returncode == 1
    assert json.loads(out.stdout)["infected"] == ["/home/u/eicar.com", "/var/spool/copy.com"]


def test_vmdk_child_disk_is_a_delta_over_its_parent(tmp_path: Path) -> None:
    files = {f"srv/f{i:02d}": (f"vmdk {i} ".encode() * 1000)[:8192] for i in range(50)}
    raw = ext4_image(tmp_path / "base.raw", make_tree(tmp_path / "tree", files), "16M")
    base = convert(raw, "vmdk", tmp_path / "base.vmdk")
    child = tmp_path / "child.vmdk"
    sh("qemu-img", "create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child)
    src = tmp_path / "w.bin"
    src.write_bytes(EICAR.ljust(4096, b"\0"))
    offset = block_of(raw, "/srv/f20") * 4096
    sh("qemu-io", "-f", "vmdk", "-c", f"write -q -s {src} {offset} 4096", child)
    cache = DiskCache()
    assert scan_disk(base, MATCHER, cache=cache).files_read == 50
    report = scan_disk(child, MATCHER, cache=cache)
    assert report.kind == "vmdk disk image, overlay on " + str(base)
    assert paths(report.infected) == ["/srv/f20"]
    assert report.files_read == 1 and report.files_inherited == 49


def test_backing_file_must_be_a_disk_image(tmp_path: Path) -> None:
    """An image naming a host file as its raw base is refused, not read as a disk."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(EICAR + b"\n" + b"password\n" * 1000)
    clone = tmp_path / "clone.qcow2"
    sh(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        secret.name,
        "-F",
        "raw",
        clone,
        "16M",
    )
    out = run("scan-image", clone)
    assert out.returncode == 2 and "backing file 'secret.txt'" in out.stderr
    assert "FOUND" not in out.stdout
