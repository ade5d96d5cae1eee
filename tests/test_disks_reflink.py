"""Reflinked copies on a live XFS (``mkfs.xfs -m reflink=1``, loop-mounted by the test) and
XFS disk images read offline.

A ``cp --reflink=always`` copy shares every extent with its original (FIEMAP reports
``FIEMAP_EXTENT_SHARED``): the appliance hands it the original's digest, and so its cached
verdict, with zero bytes read. A plain copy, a copy written to afterwards, or an original
changed since it was digested is read as usual. Offline, files of an XFS image that share
their blocks are read once. The image is always unmounted in a ``finally``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from disks_support import convert, loop_available, loop_mounted, sh
from helpers import EICAR, EICAR_NAME, run, running_appliance, status

from offscan import Matcher, load_database
from offscan.cache import digest_fd
from offscan.cache.extents import ExtentIndex, fiemap, shared_key
from offscan.confine import open_confined
from offscan.images import scan_image
from offscan.protocol import ApplianceClient

WHY_NOT = loop_available()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

MATCHER = Matcher(load_database())
BODY = os.urandom(256 * 1024)  # 256 KiB: several blocks, one or more extents


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A reflink-capable XFS mounted at ``tmp_path/mnt`` (300 MB sparse, mkfs.xfs' minimum)."""
    image = tmp_path / "xfs.img"
    sh("truncate", "-s", "300M", image)
    sh("mkfs.xfs", "-q", "-m", "reflink=1", image)
    with loop_mounted(image, tmp_path / "mnt") as mnt:
        yield mnt
    image.unlink()


def vm_area(root: Path) -> list[str]:
    """``--vm-area ROOT`` when this build's ``serve`` has the option, else nothing."""
    out = run("serve", "--help")
    return ["--vm-area", str(root)] if "--vm-area" in out.stdout else []


def reflink(src: Path, dst: Path) -> None:
    sh("cp", "--reflink=always", src, dst)


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # real extents, not delayed allocation


def test_fiemap_sees_shared_extents(xfs: Path) -> None:
    a = xfs / "a.bin"
    write_synced(a, BODY)
    fd = os.open(a, os.O_RDONLY)
    try:
        assert shared_key(os.fstat(fd), fiemap(fd)) is None  # not shared yet
        assert shared_key(os.fstat(fd), fiemap(fd), shared=False) is not None
    finally:
        os.close(fd)
    reflink(a, xfs / "b.bin")
    keys = []
    for name in ("a.bin", "b.bin"):
        fd = os.open(xfs / name, os.O_RDONLY)
        try:
            keys.append(shared_key(os.fstat(fd), fiemap(fd)))
        finally:
            os.close(fd)
    assert keys[0] is not None and keys[0] == keys[1]


def test_extent_index_hands_out_digests_only_while_they_hold(xfs: Path) -> None:
    root = str(xfs)
    write_synced(xfs / "orig.bin", BODY)
    reflink(xfs / "orig.bin", xfs / "copy1.bin")
    reflink(xfs / "orig.bin", xfs / "copy2.bin")
    shutil.copyfile(xfs / "orig.bin", xfs / "plain.bin")
    index = ExtentIndex(open_confined)

    def opened(name: str) -> tuple[int, os.stat_result]:
        fd = open_confined(root, name)
        return fd, os.fstat(fd)

    fd, st = opened("orig.bin")
    digest, _ = digest_fd(fd, st.st_size)
    index.note(fd, st, digest, root, "orig.bin")
    os.close(fd)
    fd, st = opened("copy1.bin")
    assert index.lookup(fd, st) == digest and index.hits == 1
    os.close(fd)
    fd, st = opened("plain.bin")
    assert index.lookup(fd, st) is None  # same bytes, own extents: must be read
    os.close(fd)
    # the original is rewritten in place of its first block: the entry no longer holds
    with open(xfs / "orig.bin", "r+b") as f:
        f.write(EICAR)
        f.flush()
        os.fsync(f.fileno())
    fd, st = opened("copy2.bin")
    assert index.lookup(fd, st) is None
    os.close(fd)
    assert index.stale == 1 and index.hits == 1 and len(index) == 0


def test_appliance_gives_a_reflinked_copy_its_verdict_unread(xfs: Path, tmp_path: Path) -> None:
    vm = xfs / "vm"
    vm.mkdir()
    write_synced(vm / "tool.bin", EICAR)
    write_synced(vm / "big.bin", BODY)
    work = tmp_path / "work"
    work.mkdir()
    # once `serve` confines VM roots to --vm-area (issue 14), the XFS mount is the area
    with running_appliance(work, *vm_area(xfs)) as app:

        async def scan(*names: str) -> list[dict]:
            c = ApplianceClient(str(app.sock), shim_id="t")
            await c.connect()
            try:
                await c.register("vm", str(vm))
                return [dict(await c.scan_path("vm", n)) for n in names]
            finally:
                await c.close()

        first = asyncio.run(scan("tool.bin", "big.bin"))
        assert first[0]["status"] == "infected" and first[1]["status"] == "clean"
        before = status(app.sock)
        reflink(vm / "tool.bin", vm / "tool-copy.bin")
        reflink(vm / "big.bin", vm / "big-copy.bin")
        shutil.copyfile(vm / "big.bin", vm / "big-plain.bin")
        again = asyncio.run(scan("tool-copy.bin", "big-copy.bin", "big-plain.bin"))
        after = status(app.sock)
    assert again[0]["status"] == "infected" and EICAR_NAME in again[0]["matches"]
    assert again[1]["status"] == "clean"
    assert [v["source"] for v in again[:2]] == ["clone", "clone"]
    # only the plain copy was read (to learn its digest); no content matched again
    assert after["bytes_read"] - before["bytes_read"] == len(BODY)
    assert after["contents_matched"] == before["contents_matched"]
    assert after["served_clone"] - before["served_clone"] == 2


def test_xfs_image_offline_reads_shared_blocks_once(tmp_path: Path) -> None:
    image = tmp_path / "xfs.img"
    sh("truncate", "-s", "300M", image)
    sh("mkfs.xfs", "-q", "-m", "reflink=1", image)
    with loop_mounted(image, tmp_path / "mnt") as mnt:
        (mnt / "etc").mkdir()
        (mnt / "etc" / "passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
        write_synced(mnt / "big.bin", BODY)
        reflink(mnt / "big.bin", mnt / "big-clone.bin")
        (mnt / "eicar.com").write_bytes(EICAR)
        os.symlink("etc/passwd", mnt / "link")
        subprocess.run(["sync"], check=True, timeout=60)
    qcow = convert(image, "qcow2", tmp_path / "xfs.qcow2")
    image.unlink()
    report = scan_image(qcow, MATCHER)
    assert [f.path for f in report.infected] == ["/eicar.com"]
    assert sorted(f.path for f in report.files) == [
        "/big-clone.bin",
        "/big.bin",
        "/eicar.com",
        "/etc/passwd",
    ]
    assert [s.path for s in report.skipped] == ["/link"]
    assert report.files_read == 3  # big-clone.bin shares big.bin's blocks
    assert report.bytes_scanned == len(BODY) + len(EICAR) + 26
