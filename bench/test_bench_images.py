"""Offline disk images: ``offscan scan-image`` on an ext4 QCOW2 vs loop-mounting the same
filesystem and running ``offscan scan -r`` and ``clamscan -r`` on it; and a clone's overlay.

The image holds real files (copied from /usr/lib and /usr/share until the budget is reached):
1 GiB by default, 64 MiB with ``OFFSCAN_BENCH_QUICK=1``. All three peers run as processes
with the shipped patterns, one after the other in the same session, with warm page cache
(every peer scans once untimed first). MB/s counts the files' content bytes, files/s the
regular files. The overlay case clones the base (``qemu-img create -b``), rewrites 10 files
as a guest would (``qemu-io``) and records the bytes read and files matched for the clone vs
its base (``--state`` holds the base's verdicts). Needs root for the loop mount.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

QUICK = os.environ.get("OFFSCAN_BENCH_QUICK") == "1"
BUDGET = (64 << 20) if QUICK else (1 << 30)  # bytes of file content in the image
MAX_FILE = 32 << 20  # bytes; bigger files are not copied into the image
SOURCES = ("/usr/lib", "/usr/share")
PATTERNS = Path(__file__).resolve().parent.parent / "patterns"
CHANGED = 10  # files a clone rewrites
TIMEOUT = 3600  # seconds a peer may take before it counts as a hang

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("qemu-img") or not shutil.which("clamscan"),
    reason="needs root (loop mount), qemu-utils and clamscan",
)


def sh(*args: object) -> str:
    return subprocess.run(
        [str(a) for a in args], check=True, capture_output=True, text=True, timeout=TIMEOUT
    ).stdout


def offscan(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "offscan", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def stage_tree(dst: Path) -> tuple[int, int]:
    """Real files up to BUDGET bytes under ``dst``; returns (bytes, files)."""
    total = count = 0
    for src in SOURCES:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    if not os.path.isfile(path) or os.path.islink(path):
                        continue
                    size = os.path.getsize(path)
                    if size > MAX_FILE:
                        continue
                    target = dst / os.path.relpath(path, "/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
                except OSError:
                    continue
                total += size
                count += 1
                if total >= BUDGET:
                    return total, count
    return total, count


@pytest.fixture(scope="module")
def images() -> Iterator[dict[str, object]]:
    work = Path(tempfile.mkdtemp(prefix="offscan-bench-images-"))
    try:
        tree = work / "tree"
        content, files = stage_tree(tree)
        raw = work / "disk.raw"
        size_mib = int(content * 1.4) // (1 << 20) + 64
        sh("truncate", "-s", f"{size_mib}M", raw)
        sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", tree, raw)
        shutil.rmtree(tree)
        qcow = work / "disk.qcow2"
        sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
        mnt = work / "mnt"
        mnt.mkdir()
        sh("mount", "-o", "loop,ro", raw, mnt)
        try:
            yield {
                "work": work,
                "raw": raw,
                "qcow": qcow,
                "mnt": mnt,
                "bytes": content,
                "files": files,
            }
        finally:
            subprocess.run(["umount", str(mnt)], timeout=TIMEOUT, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _record(benchmark, images: dict[str, object], peer: str) -> None:
    if benchmark.stats is None:  # --benchmark-disable (make bench-quick): results checked only
        return
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(
        peer=peer,
        content_bytes=images["bytes"],
        files=images["files"],
        mb_per_s=round(images["bytes"] / 1e6 / best, 1),  # type: ignore[operator]
        files_per_s=round(images["files"] / best, 1),  # type: ignore[operator]
        quick=QUICK,
    )


def test_bench_scan_image_qcow2(benchmark, images) -> None:
    def run() -> None:
        out = offscan("scan-image", "--json", images["qcow"])
        assert out.returncode == 0, out.stderr[-2000:]

    run()  # warm the page cache, as for the peers
    benchmark.pedantic(run, rounds=1 if not QUICK else 3, iterations=1)
    _record(benchmark, images, "offscan scan-image disk.qcow2 (dissect, no mount)")


def test_bench_loop_mount_offscan_scan(benchmark, images) -> None:
    def run() -> None:
        out = offscan("scan", "-r", "--no-summary", "--infected", images["mnt"])
        assert out.returncode == 0, out.stderr[-2000:]

    run()
    benchmark.pedantic(run, rounds=1 if not QUICK else 3, iterations=1)
    _record(benchmark, images, "offscan scan -r on the loop-mounted filesystem")


def test_bench_loop_mount_clamscan(benchmark, images) -> None:
    dbs = [a for db in ("offscan.hdb", "offscan.ndb") for a in ("-d", PATTERNS / db)]

    def run() -> None:
        out = subprocess.run(
            ["clamscan", "-r", "--infected", "--no-summary", *map(str, dbs), str(images["mnt"])],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert out.returncode == 0, out.stderr[-2000:]

    run()
    benchmark.pedantic(run, rounds=1 if not QUICK else 3, iterations=1)
    _record(benchmark, images, "clamscan -r on the loop-mounted filesystem")


def test_bench_overlay_bytes_read(benchmark, images) -> None:
    work: Path = images["work"]  # type: ignore[assignment]
    state = work / "state"
    base = offscan("scan-image", "--json", "--state", state, images["qcow"])
    assert base.returncode == 0, base.stderr[-2000:]
    base_report = json.loads(base.stdout)
    clone = work / "clone.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", clone)
    # rewrite the first block of CHANGED files spread over the image, as a guest would
    candidates = [f for f in base_report["files"] if f["size"] >= 4096]
    step = max(len(candidates) // CHANGED, 1)
    for f in candidates[::step][:CHANGED]:
        block = int(sh("debugfs", "-R", f"bmap {f['path']} 0", images["raw"]).split()[-1])
        sh("qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x5a {block * 4096} 4096", clone)

    reports: list[dict[str, object]] = []

    def run() -> None:
        out = offscan("scan-image", "--json", "--state", state, clone)
        assert out.returncode == 0, out.stderr[-2000:]
        reports.append(json.loads(out.stdout))

    benchmark.pedantic(run, rounds=1, iterations=1)
    clone_report = reports[-1]
    benchmark.extra_info.update(
        base_bytes_read=base_report["bytes_read"],
        base_bytes_scanned=base_report["bytes_scanned"],
        base_files_read=base_report["files_read"],
        clone_bytes_read=clone_report["bytes_read"],
        clone_bytes_scanned=clone_report["bytes_scanned"],
        clone_bytes_compared=clone_report["bytes_compared"],
        clone_files_read=clone_report["files_read"],
        clone_files_inherited=clone_report["files_inherited"],
        changed_files=CHANGED,
        quick=QUICK,
    )
