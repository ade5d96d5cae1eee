"""Images: directory trees, tar archives and OCI layouts built here with tarfile/hashlib/json;
layer semantics (whiteouts, opaque directories), the layer cache, digest checks, hostile member
names and the ``scan-image`` command line."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import EICAR, make_db

from offscan import Matcher, load_database
from offscan.cli.images import add_scan_image_arguments
from offscan.cli.images import run as cmd_scan_image
from offscan.images import (
    BlobDigestError,
    ImageError,
    LayerCache,
    open_image,
    scan_image,
)

MATCHER = Matcher(load_database())
EICAR_SIG = "Eicar-Test-Signature"

# ---------------------------------------------------------------------------------------------
# Builders


def make_tar(entries: list[tuple[Any, ...]], compression: str = "") -> bytes:
    """A tar archive in memory. Entries: ``(name, bytes)`` for a file, ``(name, "dir")``,
    ``(name, "symlink", target)``, ``(name, "hardlink", target)``, ``(name, "fifo")``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, what, *rest in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if isinstance(what, bytes):
                ti.size = len(what)
                tf.addfile(ti, io.BytesIO(what))
                continue
            ti.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[what]
            if rest:
                ti.linkname = rest[0]
            tf.addfile(ti)
    data = buf.getvalue()
    if compression == "gz":
        return gzip.compress(data, mtime=0)
    if compression == "bz2":
        import bz2

        return bz2.compress(data)
    if compression == "xz":
        import lzma

        return lzma.compress(data)
    return data


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put_blob(root: Path, data: bytes) -> dict[str, Any]:
    digest = sha256(data)
    path = root / "blobs" / "sha256" / digest.split(":")[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def make_oci(root: Path, images: dict[str, list[bytes]]) -> dict[str, list[str]]:
    """An OCI image layout with one manifest per ref name; layers are gzipped tar blobs.
    Returns each ref's layer digests, lowest first."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    manifests, digests = [], {}
    for ref, layers in images.items():
        layer_descs = [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put_blob(root, blob)}
            for blob in layers
        ]
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {
                    "type": "layers",
                    "diff_ids": [sha256(gzip.decompress(b)) for b in layers],
                },
            }
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    **put_blob(root, config),
                },
                "layers": layer_descs,
            }
        ).encode()
        manifests.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **put_blob(root, manifest),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        )
        digests[ref] = [d["digest"] for d in layer_descs]
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    return digests


LOWER = make_tar(
    [
        ("app", "dir"),
        ("app/eicar.com", EICAR),
        ("app/ok.txt", b"hello\n"),
        ("etc", "dir"),
        ("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    ],
    "gz",
)
UPPER_WHITEOUT = make_tar(
    [("app", "dir"), ("app/.wh.eicar.com", b""), ("app/new.txt", b"v2\n")], "gz"
)
UPPER_OTHER = make_tar([("srv", "dir"), ("srv/index.html", b"<html></html>\n")], "gz")


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="offscan scan-image")
    add_scan_image_arguments(parser)
    rc = cmd_scan_image(parser.parse_args(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def paths(files: list[Any]) -> list[str]:
    return [f.path for f in files]


def tree_snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---------------------------------------------------------------------------------------------
# Directory trees and tar archives


def test_directory_tree(tmp_path: Path) -> None:
    root = tmp_path / "img"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"clean")
    (root / "sub" / "deep" / "eicar.com").write_bytes(EICAR)
    (root / "link").symlink_to(root / "sub" / "deep" / "eicar.com")
    os.mkfifo(root / "fifo")
    report = scan_image(root, MATCHER)
    assert report.kind == "directory"
    assert paths(report.files) == ["/a.txt", "/sub/deep/eicar.com"]
    assert paths(report.infected) == ["/sub/deep/eicar.com"]
    assert report.infected[0].matches == (EICAR_SIG,)
    assert {s.path: s.reason for s in report.skipped} == {
        "/fifo": "not a regular file (FIFO)",
        "/link": "symbolic link, not followed",
    }
    assert report.layers == [(f"dir:{root}", "scanned")]
    assert report.bytes_scanned == len(EICAR) + 5
    assert report.exit_code == 1


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_tar_archive(tmp_path: Path, compression: str) -> None:
    data = make_tar(
        [
            ("./a", "dir"),
            ("./a/clean.txt", b"nothing to see"),
            ("./a/eicar.com", EICAR),
            ("./a/again.com", "hardlink", "./a/eicar.com"),
            ("./a/sym", "symlink", "eicar.com"),
            ("./a/pipe", "fifo"),
        ],
        compression,
    )
    tar = tmp_path / f"img.tar.{compression}"
    tar.write_bytes(data)
    report = scan_image(tar, MATCHER)
    assert report.kind == "tar"
    assert paths(report.files) == ["/a/again.com", "/a/clean.txt", "/a/eicar.com"]
    assert paths(report.infected) == ["/a/again.com", "/a/eicar.com"]
    assert {s.path for s in report.skipped} == {"/a/sym", "/a/pipe"}
    assert report.layers == [(sha256(data), "scanned")]
    # the hard link took its target's verdict: the content was matched once
    assert report.bytes_scanned == len(EICAR) + len(b"nothing to see")
    assert report.bytes_read == 2 * len(data)  # digest pass + scan pass


def test_tar_whiteout_names_are_plain_files(tmp_path: Path) -> None:
    """Outside OCI layouts a ``.wh.`` name is a file like any other (tar would extract it)."""
    tar = tmp_path / "img.tar"
    tar.write_bytes(make_tar([("x", b"a"), (".wh.x", EICAR)]))
    report = scan_image(tar, MATCHER)
    assert paths(report.files) == ["/.wh.x", "/x"]
    assert paths(report.infected) == ["/.wh.x"]


def test_hostile_member_names_are_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tar = tmp_path / "evil.tar"
    tar.write_bytes(
        make_tar(
            [
                ("../evil", EICAR),
                ("/etc/x", EICAR),
                ("a/../../../b", b"clean"),
                ("../../../../../../tmp/offscan-evil-link", "symlink", "/etc/passwd"),
            ]
        )
    )
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = tree_snapshot(tmp_path)
    etc_x = os.path.lexists("/etc/x")
    report = scan_image(tar, MATCHER)
    assert tree_snapshot(tmp_path) == before
    assert os.path.lexists("/etc/x") == etc_x
    assert not os.path.lexists("/tmp/offscan-evil-link")
    assert paths(report.files) == ["/b", "/etc/x", "/evil"]
    assert paths(report.infected) == ["/etc/x", "/evil"]  # still matched, under a safe name
    assert len(report.warnings) == 4
    assert all("points outside the image" in w for w in report.warnings)


def test_not_an_image(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01 not a tar archive " * 40)
    with pytest.raises(ImageError, match="not a (readable )?tar archive"):
        scan_image(junk, MATCHER)
    with pytest.raises(ImageError, match="No such file"):
        scan_image(tmp_path / "missing", MATCHER)
    with pytest.raises(ImageError, match="--ref"):
        open_image(tmp_path, ref="latest")


# ---------------------------------------------------------------------------------------------
# OCI layouts: layer semantics


def test_oci_whiteout_hides_lower_infected_file(tmp_path: Path) -> None:
    root = tmp_path / "oci"
    lower, upper = make_oci(root, {"v2": [LOWER, UPPER_WHITEOUT]})["v2"]
    report = scan_image(root, MATCHER)
    assert report.kind == "oci"
    assert report.exit_code == 0
    assert report.infected == []
    assert paths(report.files) == ["/app/new.txt", "/app/ok.txt", "/etc/passwd"]
    assert report.layers == [(lower, "scanned"), (upper, "scanned")]
    assert {f.path: f.layer for f in report.files}["/app/new.txt"] == upper

    alone = scan_image(root, MATCHER, layer=lower)
    assert alone.layer == lower
    assert paths(alone.infected) == ["/app/eicar.com"]
    assert alone.exit_code == 1
    upper_alone = scan_image(root, MATCHER, layer=upper[:16])  # a unique prefix will do
    assert upper_alone.whiteouts == ["/app/eicar.com"]
    assert paths(upper_alone.files) == ["/app/new.txt"]


def test_oci_opaque_directory_and_directory_whiteout(tmp_path: Path) -> None:
    lower = make_tar(
        [
            ("data/eicar.com", EICAR),
            ("data/sub/old.txt", b"old"),
            ("var/cache/eicar.com", EICAR),
            ("var/keep.txt", b"keep"),
            ("opt/tool", b"v1"),
        ],
        "gz",
    )
    upper = make_tar(
        [
            ("data", "dir"),
            ("data/.wh..wh..opq", b""),
            ("data/new.txt", b"new"),
            ("var/.wh.cache", b""),  # a whole lower directory tree goes
            ("opt/tool", EICAR),  # an upper file replaces a lower one
        ],
        "gz",
    )
    root = tmp_path / "oci"
    make_oci(root, {"latest": [lower, upper]})
    report = scan_image(root, MATCHER)
    assert paths(report.files) == ["/data/new.txt", "/opt/tool", "/var/keep.txt"]
    assert paths(report.infected) == ["/opt/tool"]


def test_oci_file_and_directory_replace_each_other(tmp_path: Path) -> None:
    lower = make_tar([("x/inner.com", EICAR), ("y", EICAR)], "gz")
    upper = make_tar([("x", b"now a file"), ("y/inside.txt", b"now a dir")], "gz")
    root = tmp_path / "oci"
    make_oci(root, {"latest": [lower, upper]})
    report = scan_image(root, MATCHER)
    assert paths(report.files) == ["/x", "/y/inside.txt"]
    assert report.infected == []


def test_oci_ref_picks_manifest(tmp_path: Path) -> None:
    root = tmp_path / "oci"
    make_oci(root, {"clean": [LOWER, UPPER_WHITEOUT], "dirty": [LOWER, UPPER_OTHER]})
    assert scan_image(root, MATCHER).exit_code == 0  # the first manifest
    assert scan_image(root, MATCHER, ref="clean").exit_code == 0
    dirty = scan_image(root, MATCHER, ref="dirty")
    assert paths(dirty.infected) == ["/app/eicar.com"]
    with pytest.raises(ImageError, match=r"no manifest has ref name 'nope' \(refs: clean, dirty\)"):
        scan_image(root, MATCHER, ref="nope")


# ---------------------------------------------------------------------------------------------
# The layer cache


def test_shared_layer_is_scanned_once(tmp_path: Path) -> None:
    lower, upper_a = make_oci(tmp_path / "a", {"latest": [LOWER, UPPER_WHITEOUT]})["latest"]
    _, upper_b = make_oci(tmp_path / "b", {"latest": [LOWER, UPPER_OTHER]})["latest"]
    cache = LayerCache()
    first = scan_image(tmp_path / "a", MATCHER, layer_cache=cache)
    second = scan_image(tmp_path / "b", MATCHER, layer_cache=cache)
    assert first.layers == [(lower, "scanned"), (upper_a, "scanned")]
    assert second.layers == [(lower, "cached"), (upper_b, "scanned")]
    assert (second.layers_scanned, second.layers_cached) == (1, 1)
    assert second.bytes_scanned == len(b"<html></html>\n")  # only the upper layer's file
    assert paths(second.infected) == ["/app/eicar.com"]  # the cached verdicts still count
    assert cache.hits == 1


def test_shared_layer_cached_across_cli_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_oci(tmp_path / "a", {"latest": [LOWER, UPPER_WHITEOUT]})
    lower, upper_b = make_oci(tmp_path / "b", {"latest": [LOWER, UPPER_OTHER]})["latest"]
    state = str(tmp_path / "state")
    rc, out, _ = run_cli([str(tmp_path / "a"), "--state", state], capsys)
    assert rc == 0
    assert "Layers: 2 (2 scanned, 0 from cache)" in out
    rc, out, _ = run_cli([str(tmp_path / "b"), "--state", state, "--json"], capsys)
    assert rc == 1
    doc = json.loads(out)
    assert doc["layers"] == [
        {"digest": lower, "source": "cached"},
        {"digest": upper_b, "source": "scanned"},
    ]
    assert doc["infected"] == ["/app/eicar.com"]
    rc, out, _ = run_cli([str(tmp_path / "b"), "--state", state], capsys)
    assert "Layers: 2 (0 scanned, 2 from cache)" in out
    assert "Data scanned: 0.00 MB" in out


def test_new_pattern_version_rescans(tmp_path: Path) -> None:
    root = tmp_path / "oci"
    make_oci(root, {"latest": [LOWER]})
    state = tmp_path / "state"
    scan_image(root, MATCHER, state_dir=state)
    assert scan_image(root, MATCHER, state_dir=state).layers_cached == 1
    # "hello\n" in /app/ok.txt is detected by the new version: a cached "clean" must not stand
    newer = Matcher(make_db("Hello-Sig:0:*:68656c6c6f0a", name="new.ndb"))
    report = scan_image(root, newer, state_dir=state)
    assert report.layers_scanned == 1
    assert [(f.path, f.matches) for f in report.infected] == [("/app/ok.txt", ("Hello-Sig",))]


def test_damaged_cache_record_is_a_miss(tmp_path: Path) -> None:
    root = tmp_path / "oci"
    make_oci(root, {"latest": [LOWER]})
    state = tmp_path / "state"
    scan_image(root, MATCHER, state_dir=state)
    (record,) = (state / "image-layers").iterdir()
    record.write_text('{"format": 1, "layer": ')
    report = scan_image(root, MATCHER, state_dir=state)
    assert report.layers_scanned == 1
    assert paths(report.infected) == ["/app/eicar.com"]


def test_size_limit_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tar = tmp_path / "img.tar"
    tar.write_bytes(make_tar([("big.bin", b"x" * 100), ("small", b"ok")]))
    rc, out, _ = run_cli([str(tar), "--max-filesize", "50", "--state", str(tmp_path / "s")], capsys)
    assert rc == 2
    assert f"{tar}:/big.bin: file size 100 exceeds max file size 50 bytes ERROR" in out
    # the limit error is cached for that limit only; a larger limit scans the file
    rc, out, _ = run_cli([str(tar), "--state", str(tmp_path / "s")], capsys)
    assert rc == 0
    assert "1 scanned, 0 from cache" in out


# ---------------------------------------------------------------------------------------------
# Digest checks


def test_corrupted_blob_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "oci"
    lower, _ = make_oci(root, {"latest": [LOWER, UPPER_WHITEOUT]})["latest"]
    state = str(tmp_path / "state")
    assert run_cli([str(root), "--state", state], capsys)[0] == 0  # now cached
    blob = root / "blobs" / "sha256" / lower.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(BlobDigestError, match="digest mismatch"):
        scan_image(root, MATCHER)
    # a cached layer is digest-checked too: its name alone is not trusted
    rc, out, err = run_cli([str(root), "--state", state], capsys)
    assert rc == 2
    assert out == ""
    assert f"content hashes to sha256:{hashlib.sha256(data).hexdigest()}, not to {lower}" in err
    assert "digest mismatch" in err


def test_corrupted_plain_tar_layer_keeps_a_digest_error(tmp_path: Path) -> None:
    """A flipped byte in file data leaves the tar readable: only the digest catches it."""
    plain = make_tar([("f.txt", b"A" * 4096)])
    root = tmp_path / "oci"
    root.mkdir()
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    layer = put_blob(root, plain)
    config = put_blob(root, b'{"rootfs": {"diff_ids": []}}')
    manifest = put_blob(
        root, json.dumps({"schemaVersion": 2, "config": config, "layers": [layer]}).encode()
    )
    (root / "index.json").write_text(json.dumps({"manifests": [manifest]}))
    assert scan_image(root, MATCHER).exit_code == 0
    blob = root / "blobs" / "sha256" / layer["digest"].split(":")[1]
    blob.write_bytes(plain.replace(b"A" * 10, b"B" * 10, 1))
    with pytest.raises(BlobDigestError):
        scan_image(root, MATCHER)


def test_corrupted_manifest_and_bad_digest(tmp_path: Path) -> None:
    root = tmp_path / "oci"
    make_oci(root, {"latest": [LOWER]})
    index = json.loads((root / "index.json").read_text())
    manifest = root / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1]
    manifest.write_bytes(manifest.read_bytes().replace(b"schemaVersion", b"schemaVersioN"))
    with pytest.raises(BlobDigestError):
        open_image(root)
    index["manifests"][0]["digest"] = "sha256:../../../../etc/passwd"
    (root / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageError, match="bad digest"):
        open_image(root)


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_lines_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "oci"
    lower, _ = make_oci(root, {"clean": [LOWER, UPPER_WHITEOUT], "dirty": [LOWER, UPPER_OTHER]})[
        "clean"
    ]
    img = str(root)

    rc, out, _ = run_cli([img], capsys)
    assert rc == 0
    assert f"{img}:/app/ok.txt: OK" in out.splitlines()
    assert "FOUND" not in out
    assert "Infected files: 0" in out

    rc, out, _ = run_cli([img, "--ref", "dirty", "-i"], capsys)
    assert rc == 1
    lines = out.splitlines()
    assert lines[0] == f"{img}:/app/eicar.com: {EICAR_SIG} FOUND"
    assert "OK" not in out.split("-----------")[0]
    assert "Infected files: 1" in out
    assert "Scanned files: 4" in out

    rc, out, _ = run_cli([img, "--layer", lower], capsys)
    assert rc == 1
    assert f"{img}:/app/eicar.com: {EICAR_SIG} FOUND" in out
    assert f"layer {lower} alone, whiteouts not applied" in out

    rc, out, err = run_cli([img, "--layer", "sha256:0000"], capsys)
    assert rc == 2
    assert "matches no layer" in err
    rc, out, err = run_cli([str(tmp_path / "nothing-here")], capsys)
    assert (rc, out) == (2, "")
    assert err.startswith("offscan: ")
    rc, out, err = run_cli([img, "-d", str(tmp_path / "missing.ndb")], capsys)
    assert rc == 2


def test_cli_escapes_control_characters_in_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tar = tmp_path / "img.tar"
    tar.write_bytes(make_tar([("x\n/fake: OK", EICAR)]))
    rc, out, _ = run_cli([str(tar)], capsys)
    assert rc == 1
    assert f"{tar}:/x\\n/fake: OK: {EICAR_SIG} FOUND" in out.splitlines()


def test_truncated_archives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_tar([("a", b"x" * 5000), ("b", EICAR)])
    tar = tmp_path / "cut.tar"
    tar.write_bytes(data[:3000])  # ends inside the first member's data
    with pytest.raises(ImageError, match="not a readable tar archive.*unexpected end of data"):
        scan_image(tar, MATCHER)
    rc, out, err = run_cli([str(tar)], capsys)
    assert (rc, out) == (2, "")
    assert "unexpected end of data" in err
    # an OCI blob cut short no longer has the size its descriptor gives
    root = tmp_path / "oci"
    lower, _ = make_oci(root, {"latest": [LOWER, UPPER_WHITEOUT]})["latest"]
    blob = root / "blobs" / "sha256" / lower.split(":")[1]
    blob.write_bytes(LOWER[:-10])
    with pytest.raises(BlobDigestError, match="its descriptor says"):
        scan_image(root, MATCHER)
