"""ClamAV containers (.cvd/.cld/.cud) and allowlists (.fp/.sfp/.ign2): loaded and verified
like ClamAV does, checked against a container ``sigtool`` built and against ``clamscan``."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from clamd_support import BUILD_TIME, build_container, signing_keys
from helpers import EICAR, EICAR_NAME, run

from offscan import Matcher, SignatureError, load_database
from offscan.signatures.containers import (
    CLAMAV_KEY,
    ContainerKeys,
    DatabaseSet,
    open_container,
    parse_header,
    verify_dsig,
)

REPO = Path(__file__).resolve().parent.parent
NDB = (REPO / "patterns" / "offscan.ndb").read_bytes()
HDB = (REPO / "patterns" / "offscan.hdb").read_bytes()
MARK = b"offscan-container-test-marker"
EXTRA_NDB = f"Container-Marker:0:*:{MARK.hex()}\n".encode()
CLAMSCAN = shutil.which("clamscan")
SIGTOOL = shutil.which("sigtool")

# A real daily.cvd header as published (version 25784, April 2020): its dsig verifies with
# ClamAV's public key, which proves the decoding here is libclamav's.
REAL_MD5 = "92baacd59fd26e6bcf03077add78d209"
REAL_DSIG = (
    "4Jp9JtGJY6nUk8JHDQQpQeBwlfXqskvhXL+vesDNqAeWCmjbudU+Hy/Nj4/BH2vl70c/R5B/VYY+eqqCQo6o7VGLqLJr"
    "/E+19gejqMp/iRcuHrtnLw6V/x3UjO3/qYVSlcJvAjtMI7FK32wjB+Sp8kaS/ZbfaFQp6trRQhisjqf"
)


def test_clamav_published_signature_verifies() -> None:
    assert verify_dsig(REAL_MD5, REAL_DSIG)
    assert not verify_dsig(REAL_MD5[:-1] + "8", REAL_DSIG)
    assert not verify_dsig(REAL_MD5, REAL_DSIG[:-1] + "g")
    assert not verify_dsig(REAL_MD5, "X")
    assert not verify_dsig(REAL_MD5, "not base64 !")


def infected(db_paths: list[Path], data: bytes, tmp: Path) -> tuple[str, ...]:
    f = tmp / "sample"
    f.write_bytes(data)
    return Matcher(load_database(*db_paths)).scan_path(f, allmatch=True).matches


@pytest.mark.parametrize("suffix", [".cud", ".cld", ".cvd"])
def test_hand_built_container_loads(tmp_path: Path, suffix: str) -> None:
    keys = signing_keys()
    files = {"t.ndb": NDB + EXTRA_NDB, "t.hdb": HDB}
    c = build_container(tmp_path / f"daily{suffix}", files, keys=keys)
    db = DatabaseSet(keys=keys.public)
    db.add(c)
    (info,) = db.build().containers
    assert (info.version, info.build_time, info.builder, info.kind) == (
        7,
        BUILD_TIME,
        "tester",
        suffix[1:],
    )
    assert (
        info.verified
        == {
            ".cud": ("md5", "info"),
            ".cld": ("info signature", "info"),
            ".cvd": ("md5", "signature", "info signature", "info"),
        }[suffix]
    )
    if suffix == ".cud":  # unsigned: anyone's; the signed ones need ClamAV's keys
        assert infected([c], EICAR, tmp_path) == (EICAR_NAME,)
        assert infected([c], b"xx" + MARK, tmp_path) == ("Container-Marker",)
        assert infected([c], b"clean", tmp_path) == ()
    else:
        with pytest.raises(SignatureError, match="digital signature does not verify"):
            load_database(c)


def test_signed_containers_verify_only_with_their_keys(tmp_path: Path) -> None:
    keys = signing_keys()
    c = build_container(tmp_path / "main.cvd", {"t.ndb": NDB}, keys=keys)
    info, members = open_container(c, keys=keys.public)
    assert [m for m, _ in members] == ["COPYING", "main.info", "t.ndb"]
    with pytest.raises(SignatureError, match="digital signature does not verify with ClamAV"):
        load_database(c)  # ClamAV's key did not sign it
    other = ContainerKeys(cvd=keys.public.cvd)  # right header key, ClamAV's .info key
    with pytest.raises(SignatureError, match="the .info digital signature does not verify"):
        open_container(c, keys=other)
    cld = build_container(tmp_path / "daily.cld", {"t.ndb": NDB})  # .info DSIG is garbage
    with pytest.raises(SignatureError, match="the .info digital signature does not verify"):
        open_container(cld, keys=keys.public)
    bare = build_container(tmp_path / "bare.cld", {"t.ndb": NDB}, info=False)
    with pytest.raises(SignatureError, match="no .info member"):
        open_container(bare, keys=keys.public)
    assert CLAMAV_KEY[1] == 100001027


def test_tampering_is_refused(tmp_path: Path) -> None:
    good = build_container(tmp_path / "x.cud", {"t.ndb": NDB})
    data = bytearray(good.read_bytes())
    data[600] ^= 0xFF
    bad = tmp_path / "bad.cud"
    bad.write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="MD5 of the archive does not match"):
        load_database(bad)
    # a .cld is not MD5-checked (as in ClamAV): its .info SHA-256s catch a changed member
    keys = signing_keys()
    cld = build_container(tmp_path / "y.cld", {"t.ndb": NDB}, keys=keys)
    raw = cld.read_bytes()
    i = raw.index(b"Eicar-Test-Signature:0:0:")
    cld.write_bytes(raw[:i] + b"Eicar-Test-Signaturf" + raw[i + 20 :])
    with pytest.raises(SignatureError, match="does not match its .info"):
        open_container(cld, keys=keys.public)
    unlisted = build_container(tmp_path / "z.cud", {"t.ndb": NDB}, info=False)
    assert open_container(unlisted)[0].verified == ("md5",)
    with pytest.raises(SignatureError, match="not a ClamAV container"):
        (tmp_path / "fake.cvd").write_bytes(b"hello".ljust(600))
        load_database(tmp_path / "fake.cvd")
    with pytest.raises(SignatureError, match="shorter than a container header"):
        (tmp_path / "short.cud").write_bytes(b"ClamAV-VDB:1:2:3:4:5:6:7:8")
        open_container(tmp_path / "short.cud")


def test_a_directory_like_var_lib_clamav(tmp_path: Path) -> None:
    d = tmp_path / "clamav"
    d.mkdir()
    build_container(d / "main.cud", {"main.ndb": NDB}, version=62)
    build_container(d / "daily.cud", {"daily.ndb": EXTRA_NDB}, version=27000)
    build_container(d / "daily.cld", {"daily.ndb": b""}, version=26999)  # older: not even read
    build_container(d / "bytecode.cud", {"bytecode.cbc": b"ClamBCaa\nxx\n", "x.mdb": b"1:a:b\n"})
    (d / "local.hdb").write_bytes(f"{hashlib.md5(b'local!').hexdigest()}:6:Local-Hash\n".encode())
    (d / "freshclam.dat").write_bytes(b"\0" * 10)  # not a database: ignored
    db = load_database(d)
    assert sorted((i.name, i.version) for i in db.containers) == [
        ("bytecode", 7),
        ("daily", 27000),
        ("main", 62),
    ]
    reasons = {n.reason for n in db.not_applied}
    assert {"format .cbc not supported", "format .mdb not supported"} <= reasons
    assert infected([d], b"x" + MARK, tmp_path) == ("Container-Marker",)
    assert infected([d], b"local!", tmp_path) == ("Local-Hash",)
    assert infected([d], EICAR, tmp_path) == (EICAR_NAME,)


@pytest.mark.skipif(SIGTOOL is None, reason="sigtool is not installed")
def test_container_built_by_sigtool(tmp_path: Path) -> None:
    (tmp_path / "t.ndb").write_bytes(NDB + EXTRA_NDB)
    (tmp_path / "t.hdb").write_bytes(HDB)
    (tmp_path / "COPYING").write_text("test\n")
    assert SIGTOOL is not None
    out = subprocess.run(
        [SIGTOOL, "--unsigned", "--build=t.cud", f"--datadir={tmp_path}"],
        cwd=tmp_path,
        input="9\ntester\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    cud = tmp_path / "t.cud"
    assert cud.exists(), out.stdout + out.stderr
    info, _ = open_container(cud)
    assert info.version == 9 and info.builder == "tester" and info.signatures == 3
    assert info.verified == ("md5", "info")
    assert parse_header(cud.read_bytes(), str(cud)).md5 == info.md5
    assert infected([cud], b"...." + MARK, tmp_path) == ("Container-Marker",)


@pytest.mark.skipif(CLAMSCAN is None, reason="clamscan is not installed")
@pytest.mark.parametrize("suffix", [".cud", ".cld", ".cvd"])
def test_clamscan_parity_on_containers(tmp_path: Path, suffix: str) -> None:
    """clamscan loads the hand-built .cud and finds the same; it refuses the .cvd and .cld that
    ClamAV did not sign, as offscan does (exit 2, no verdict)."""
    c = build_container(
        tmp_path / f"daily{suffix}", {"t.ndb": NDB + EXTRA_NDB}, keys=signing_keys()
    )
    sample = tmp_path / "files"
    sample.mkdir()
    (sample / "eicar").write_bytes(EICAR)
    (sample / "marker").write_bytes(b"x" + MARK)
    (sample / "clean").write_bytes(b"clean")
    assert CLAMSCAN is not None
    ref = subprocess.run(
        [CLAMSCAN, "--no-summary", "-d", str(c), "-r", str(sample)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    ours = run("scan", "-d", c, "-r", sample)
    if suffix != ".cud":
        assert ref.returncode == 2 and ours.returncode == 2, ref.stdout + ref.stderr
        assert "digital signature" in ours.stderr
        return
    assert ref.returncode == ours.returncode == 1, ref.stdout + ref.stderr + ours.stderr

    def found(text: str) -> set[str]:
        return {
            line.split(": ")[0].rsplit("/", 1)[-1]
            for line in text.splitlines()
            if line.endswith(" FOUND")
        }

    assert found(ref.stdout) == found(ours.stdout) == {"eicar", "marker"}


def test_allowlists(tmp_path: Path) -> None:
    clean_twin = b"an allowlisted file with " + MARK
    db = tmp_path / "db"
    db.mkdir()
    (db / "t.ndb").write_bytes(
        NDB + EXTRA_NDB + b"Ignored-Sig:0:*:" + b"ignore me".hex().encode() + b"\n"
    )
    (db / "t.hdb").write_bytes(HDB)
    (db / "a.fp").write_text(f"{hashlib.md5(clean_twin).hexdigest()}:{len(clean_twin)}:Known\n")
    twin2 = b"sha256 listed " + MARK
    (db / "b.sfp").write_text(f"{hashlib.sha256(twin2).hexdigest()}:*:Known2\n")
    (db / "c.ign2").write_text("Ignored-Sig\n")
    loaded = load_database(db)
    assert loaded.allowlist is not None
    assert "Ignored-Sig" not in {s.name for s in loaded.body}
    plain = load_database(db / "t.ndb", db / "t.hdb")
    assert loaded.version != plain.version  # the cache must not serve pre-allowlist verdicts
    for impl in ("py", "auto"):
        m = Matcher(loaded, impl=impl)
        for allmatch in (True, False):
            assert m.scan_bytes(clean_twin, allmatch=allmatch).status == "clean"
            assert m.scan_bytes(twin2, allmatch=allmatch).status == "clean"
            assert m.scan_bytes(b"ignore me", allmatch=allmatch).status == "clean"
            assert m.scan_bytes(clean_twin + b"!", allmatch=allmatch).matches == (
                "Container-Marker",
            )
            assert m.scan_bytes(EICAR, allmatch=allmatch).matches[0] == EICAR_NAME
    assert Matcher(plain).scan_bytes(b"ignore me").matches == ("Ignored-Sig",)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("x.fp", "abc:1:N", "not an MD5"),
        ("x.fp", f"{'a' * 64}:1:N", ".fp holds MD5 digests"),
        ("x.sfp", f"{'a' * 32}:1:N", ".sfp holds SHA1/SHA256"),
        ("x.sfp", f"{'a' * 40}:big:N", "is not a number"),
        ("x.fp", "only-one-field", "expected HASH:SIZE:NAME"),
    ],
)
def test_bad_allowlist_lines_name_file_and_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    (tmp_path / name).write_text("# comment\n" + text + "\n")
    with pytest.raises(SignatureError, match=f"{name}:2: .*{message}"):
        load_database(REPO / "patterns" / "offscan.ndb", tmp_path / name)


def test_container_info_is_frozen(tmp_path: Path) -> None:
    c = build_container(tmp_path / "m.cud", {"t.ndb": NDB})
    (info,) = load_database(c).containers
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.version = 1  # type: ignore[misc]
    assert "m.cud version 7" in info.describe()
