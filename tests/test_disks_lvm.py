"""LVM logical volumes inside a partition, built with the real LVM tools on a loop device,
scanned without activating anything; a QCOW2 clone of such a disk is scanned as base + delta
(the linear logical volume maps the overlay's clusters to its files)."""

from __future__ import annotations

from pathlib import Path

import pytest
from disks_support import (
    block_of,
    convert,
    guest_write,
    have,
    loop_available,
    lvm_disk,
    make_tree,
    overlay,
    sh,
)
from helpers import EICAR, EICAR_NAME, run

from offscan import Matcher, load_database
from offscan.images.diskcache import DiskCache
from offscan.images.diskscan import scan_disk

WHY_NOT = loop_available() or (
    None if have("pvcreate", "vgcreate", "vgcfgrestore", "losetup") else "lvm2 not installed"
)
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
MATCHER = Matcher(load_database())


def test_lvm_in_a_partition_and_its_clone(tmp_path: Path) -> None:
    files = {f"data/f{i:02d}": (f"{i} ".encode() * 3000)[:6000] for i in range(30)}
    files["bin/eicar.com"] = EICAR
    tree = make_tree(tmp_path / "tree", files)
    raw = tmp_path / "lvm.raw"
    vg, lv_offset = lvm_disk(raw, tree, tmp_path)
    base = convert(raw, "qcow2", tmp_path / "lvm.qcow2")
    out = run("scan-image", base)
    assert out.returncode == 1, out.stderr
    assert f"{base}:p1:{vg}/root:/bin/eicar.com: {EICAR_NAME} FOUND" in out.stdout
    assert f"{base}:p1:{vg}/root:/data/f07: OK" in out.stdout
    # a clone changing one file: the base's other verdicts are inherited
    fs_image = tmp_path / "lv.raw"  # the LV's filesystem alone, to find the file's block
    sh("dd", f"if={raw}", f"of={fs_image}", "bs=4096", f"skip={lv_offset // 4096}", "status=none")
    block = block_of(fs_image, "/data/f07")
    clone = overlay(base, tmp_path / "clone.qcow2")
    guest_write(clone, lv_offset + block * 4096, EICAR.ljust(4096, b"\0"), tmp_path)
    cache = DiskCache()
    scan_disk(base, MATCHER, cache=cache)
    report = scan_disk(clone, MATCHER, cache=cache)
    assert sorted(f.path for f in report.infected) == [
        f"p1:{vg}/root:/bin/eicar.com",
        f"p1:{vg}/root:/data/f07",
    ]
    assert report.files_read == 1 and report.files_inherited == 30
