"""Pattern updates: bundles, signatures, the store, the update server and client, crash safety.

Real files, real Ed25519 keys, a real HTTP server on 127.0.0.1, and a real subprocess killed
with SIGKILL in the middle of an apply.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from offscan import load_database, updates
from offscan.cli.patterns import add_patterns_arguments
from offscan.cli.patterns import run as cmd_patterns
from offscan.signatures import SignatureError
from offscan.updates import (
    STEP_DELAY_ENV,
    Bundle,
    Manifest,
    PatternStore,
    UpdateClient,
    UpdateError,
    UpdateServer,
    build_delta,
    build_full,
    load_private_key,
    plan_updates,
    read_bundle,
)

EICAR_NDB = (
    "Eicar-Test-Signature:0:0:58354f2150254041505b345c505a58353428505e2937434329377d2445494341"
    "522d5354414e444152442d414e544956495255532d544553542d46494c452124482b482a"
)
EICAR_HDB = "44d88612fea8a8f36de82e1278abb02f:68:Eicar-Test-Signature"
V2_NDB = "Offscan.Test.Added-V2:0:*:6f66667363616e2d76322d74657374"  # "offscan-v2-test"
# Filler hash signatures make a full bundle much larger than a one-line delta, as in real life.
FILLER = [
    f"{hashlib.md5(str(i).encode()).hexdigest()}:{1000 + i}:Offscan.Test.Filler-{i}"
    for i in range(400)
]
REMOVED_V3 = FILLER[7]


def write_db(directory: Path, ndb: list[str], hdb: list[str], *, header: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    comment = "# offscan test database\n\n" if header else ""
    (directory / "test.ndb").write_text(comment + "\n".join(ndb) + "\n")
    (directory / "test.hdb").write_text(comment + "\r\n".join(hdb) + "\r\n")
    return directory


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="offscan patterns")
    add_patterns_arguments(parser)
    return cmd_patterns(parser.parse_args([str(a) for a in argv]))


def snapshot(directory: Path) -> dict[str, object]:
    """Everything in a store that matters: file contents and the current link."""
    out: dict[str, object] = {}
    for p in sorted(directory.rglob("*")):
        rel = str(p.relative_to(directory))
        if rel == ".lock":
            continue
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = "dir"
    return out


def db_lines(db_dir: Path) -> dict[str, set[str]]:
    return {
        p.name: {
            ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")
        }
        for p in db_dir.iterdir()
    }


def store_lines(store: PatternStore) -> dict[str, set[str]]:
    return {p.name: set(p.read_text().splitlines()) for p in store.database_paths()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Keys, four database versions and their signed full and delta bundles."""
    root = tmp_path_factory.mktemp("updates")
    w: dict[str, Path] = {"root": root}
    assert cli("keygen", "-o", root / "publisher") == 0
    assert cli("keygen", "-o", root / "other") == 0
    w["key"], w["pub"] = root / "publisher.key", root / "publisher.pub"
    w["other_key"], w["other_pub"] = root / "other.key", root / "other.pub"
    hdb = [EICAR_HDB, *FILLER]
    dirs = {
        1: write_db(root / "db1", [EICAR_NDB], hdb, header=True),
        2: write_db(root / "db2", [EICAR_NDB, V2_NDB], hdb),
        3: write_db(root / "db3", [V2_NDB, EICAR_NDB], [h for h in hdb if h != REMOVED_V3]),
        4: write_db(root / "db4", [EICAR_NDB, V2_NDB], hdb[:10]),
    }
    for v, d in dirs.items():
        w[f"db{v}"] = d
        assert cli("build", d, "--version", v, "-o", root / f"full-{v}.osb", "--key", w["key"]) == 0
        w[f"full{v}"] = root / f"full-{v}.osb"
    for p, v in [(1, 2), (2, 3), (3, 4)]:
        out = root / f"delta-{p}-{v}.osb"
        assert (
            cli(
                "diff",
                w[f"full{p}"],
                w[f"full{v}"],
                "-o",
                out,
                "--key",
                w["key"],
                "--trust",
                w["pub"],
            )
            == 0
        )
        w[f"delta{p}{v}"] = out
    return w


def fresh_store(tmp_path: Path, world: dict[str, Path], *versions: str) -> PatternStore:
    store = PatternStore(tmp_path / "store", world["pub"])
    for name in versions:
        store.apply(world[name])
    return store


# ---------------------------------------------------------------------------------------------
# Bundles and keys


def test_keygen_writes_private_key_0600_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("keygen", "-o", tmp_path / "k") == 0
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    assert (tmp_path / "k.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    load_private_key(tmp_path / "k.key")
    before = (tmp_path / "k.key").read_bytes()
    assert cli("keygen", "-o", tmp_path / "k") == 2
    assert "exists; use --force" in capsys.readouterr().err
    assert (tmp_path / "k.key").read_bytes() == before
    assert cli("keygen", "-o", tmp_path / "k", "--force") == 0
    assert (tmp_path / "k.key").read_bytes() != before


def test_full_bundle_manifest(world: dict[str, Path]) -> None:
    b = read_bundle(world["full1"])
    doc = json.loads(b.manifest_bytes)
    assert doc["format"] == "offscan-bundle" and doc["format_version"] == 1
    assert (doc["kind"], doc["version"], doc["parent"]) == ("full", 1, None)
    assert doc["created"].endswith("Z")
    assert doc["files"]["test.ndb"]["signatures"] == 1
    assert doc["files"]["test.hdb"]["signatures"] == 401
    for name, entry in doc["files"].items():
        assert hashlib.sha256(b.members[name]).hexdigest() == entry["sha256"]
    # comments, blank lines and CRLF are gone; lines sorted: the canonical form
    assert b.members["test.hdb"].decode().splitlines() == sorted([EICAR_HDB, *FILLER])
    assert zipfile.ZipFile(world["full1"]).namelist()[:2] == ["manifest.json", "manifest.sig"]


def test_build_is_reproducible(world: dict[str, Path]) -> None:
    a = build_full(world["db2"], 2, created="2024-01-01T00:00:00Z").signed(
        load_private_key(world["key"])
    )
    b = build_full(world["db2"], 2, created="2024-01-01T00:00:00Z").signed(
        load_private_key(world["key"])
    )
    assert a.to_bytes() == b.to_bytes()


def test_build_rejects_a_bad_signature_file_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_db(tmp_path / "bad", [EICAR_NDB, "Broken:0:*:41{5-2}42"], [EICAR_HDB])
    with pytest.raises(SignatureError, match=r"test\.ndb:2: .*min > max"):
        build_full(tmp_path / "bad", 1)
    assert cli("build", tmp_path / "bad", "--version", "1", "-o", tmp_path / "x.osb") == 2
    assert "test.ndb:2" in capsys.readouterr().err
    assert not (tmp_path / "x.osb").exists()


def test_delta_holds_only_the_added_line(world: dict[str, Path]) -> None:
    d = read_bundle(world["delta12"])
    assert (d.kind, d.version, d.parent) == ("delta", 2, 1)
    assert d.members == {"added/test.ndb": (V2_NDB + "\n").encode()}
    full2 = read_bundle(world["full2"]).manifest
    assert d.manifest.result == full2.files  # the delta reproduces v2 exactly
    assert os.path.getsize(world["delta12"]) < os.path.getsize(world["full2"]) / 5


def test_delta_holds_only_the_removed_line(world: dict[str, Path]) -> None:
    d = read_bundle(world["delta23"])
    assert d.members == {"removed/test.hdb": (REMOVED_V3 + "\n").encode()}


def test_diff_of_directories_needs_versions(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "d.osb"
    assert cli("diff", world["db1"], world["db2"], "-o", out) == 2
    assert "--parent" in capsys.readouterr().err
    assert (
        cli("diff", world["db1"], world["db2"], "-o", out, "--parent", "1", "--version", "2") == 0
    )
    assert read_bundle(out).members == read_bundle(world["delta12"]).members


def test_verify_and_sign_commands(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("verify", world["delta12"], "--trust", world["pub"]) == 0
    assert "OK: delta 1->2 (+1 -0 signatures)" in capsys.readouterr().out
    assert cli("verify", world["full1"], "--trust", world["other_pub"]) == 1
    assert "not trusted" in capsys.readouterr().err
    # a key rotation: trusting old and new keys accepts either
    assert (
        cli("verify", world["full1"], "--trust", world["other_pub"], "--trust", world["pub"]) == 0
    )
    unsigned = tmp_path / "u.osb"
    assert cli("build", world["db1"], "--version", "1", "-o", unsigned) == 0
    assert cli("verify", unsigned, "--trust", world["pub"]) == 1
    assert "is not signed" in capsys.readouterr().err
    assert cli("sign", unsigned, "--key", world["other_key"]) == 0
    assert cli("verify", unsigned, "--trust", world["other_pub"], "--json") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["version"] == 1


# ---------------------------------------------------------------------------------------------
# The store


def test_store_applies_full_then_deltas(world: dict[str, Path], tmp_path: Path) -> None:
    store = PatternStore(tmp_path / "store", world["pub"])
    assert store.current_version is None and store.database_paths() == []
    a1 = store.apply(world["full1"])
    assert (a1.version, a1.parent, a1.kind) == (1, None, "full")
    assert store.current_version == 1
    assert store.fetched_from == str(world["full1"].resolve())
    assert store.fetched_at is not None and abs(store.fetched_at - time.time()) < 60

    a2 = store.apply(world["delta12"], source="http://example/delta-1-2.osb")
    assert (a2.version, a2.parent, a2.kind) == (2, 1, "delta")
    assert a2.added == {"test.ndb": [V2_NDB]} and a2.removed == {} and a2.only_adds
    assert [s.name for s in a2.added_patterns().body] == ["Offscan.Test.Added-V2"]
    assert store.fetched_from == "http://example/delta-1-2.osb"

    a3 = store.apply(world["delta23"])
    assert a3.removed == {"test.hdb": [REMOVED_V3]} and not a3.only_adds
    assert store_lines(store) == db_lines(world["db3"])
    db = load_database(*store.database_paths())
    assert len(db.body) == 2 and len(db.hashes) == 400
    assert a3.database is not None and a3.database.files == tuple(map(str, store.database_paths()))
    assert store.load().version == db.version == a3.database.version
    # the previous version is kept for inspection, older ones collected
    assert sorted(p.name for p in (tmp_path / "store" / "versions").iterdir()) == ["2", "3"]
    st = store.status()
    assert st["version"] == 3 and st["kind"] == "delta" and st["signatures"] == 402


def test_full_bundle_update_reports_what_changed(world: dict[str, Path], tmp_path: Path) -> None:
    store = fresh_store(tmp_path, world, "full1")
    a = store.apply(world["full3"])
    assert (a.version, a.parent, a.kind) == (3, 1, "full")
    assert a.added == {"test.ndb": [V2_NDB]} and a.removed == {"test.hdb": [REMOVED_V3]}


def _tampered(
    bundle: Bundle,
    *,
    members: dict[str, bytes] | None = None,
    manifest: bytes | None = None,
) -> bytes:
    """A well-formed bundle whose content was changed after signing (the old signature kept)."""
    tampered = Bundle(
        manifest or bundle.manifest_bytes, members or bundle.members, bundle.signature
    )
    return tampered.to_bytes()


def _flip_member_byte(data: bytes, member: str) -> bytes:
    """Flip one byte inside a member's compressed data, leaving the zip structure intact."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(member)
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    pos = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]


def _bad_bundles(world: dict[str, Path]) -> dict[str, tuple[bytes, str]]:
    key = load_private_key(world["key"])
    d23 = read_bundle(world["delta23"])
    f3 = read_bundle(world["full3"])
    d23_bytes = world["delta23"].read_bytes()
    manifest = json.loads(d23.manifest_bytes)
    manifest["version"] = 9
    unparsable = build_full({"test.ndb": [EICAR_NDB, "Broken:0:*:41{5-2}42"]}, 3).signed(key)
    return {
        "unsigned": (Bundle(d23.manifest_bytes, d23.members).to_bytes(), "is not signed"),
        "wrong key": (
            d23.signed(load_private_key(world["other_key"])).to_bytes(),
            "which is not trusted",
        ),
        "tampered file": (
            _tampered(d23, members={"removed/test.hdb": (FILLER[8] + "\n").encode()}),
            "does not match its manifest digest",
        ),
        "tampered manifest": (
            _tampered(d23, manifest=json.dumps(manifest).encode()),
            "signature does not verify",
        ),
        "flipped byte in file": (
            _flip_member_byte(world["full3"].read_bytes(), "test.hdb"),
            "corrupt",
        ),
        "flipped byte in manifest": (_flip_member_byte(d23_bytes, "manifest.json"), "corrupt"),
        "truncated": (d23_bytes[: len(d23_bytes) // 2], "corrupt"),
        "not a bundle": (b"hello, world\n" * 10, "corrupt"),
        "wrong parent": (
            world["delta34"].read_bytes(),
            "delta 3->4 applies to version 3 only; this store is at version 2",
        ),
        "replayed older": (
            world["full1"].read_bytes(),
            "version 1 is not newer than the current version 2",
        ),
        "replayed same": (
            world["full2"].read_bytes(),
            "version 2 is not newer than the current version 2",
        ),
        "does not load": (unparsable.to_bytes(), "does not load: test.ndb:1: {5-2}: min > max"),
        "delta for another v2": (
            build_delta({"test.ndb": [EICAR_NDB]}, f3.lines(), 3, 2).signed(key).to_bytes(),
            "does not give the published",
        ),
    }


BAD_CASES = [
    "unsigned",
    "wrong key",
    "tampered file",
    "tampered manifest",
    "flipped byte in file",
    "flipped byte in manifest",
    "truncated",
    "not a bundle",
    "wrong parent",
    "replayed older",
    "replayed same",
    "does not load",
    "delta for another v2",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_rejected_bundles_leave_the_store_unchanged(
    world: dict[str, Path], tmp_path: Path, case: str
) -> None:
    store = fresh_store(tmp_path, world, "full1", "delta12")
    data, reason = _bad_bundles(world)[case]
    before = snapshot(store.directory)
    with pytest.raises(UpdateError, match=re.escape(reason)):
        store.apply(data)
    assert snapshot(store.directory) == before
    assert store.current_version == 2
    assert store_lines(store) == db_lines(world["db2"])
    # and the same reason on the command line, exit status 1
    path = tmp_path / "bad.osb"
    path.write_bytes(data)
    assert cli("apply", path, "--store", store.directory, "--trust", world["pub"]) == 1
    assert snapshot(store.directory) == before


def test_delta_needs_a_version_to_apply_to(world: dict[str, Path], tmp_path: Path) -> None:
    store = PatternStore(tmp_path / "s", world["pub"])
    with pytest.raises(UpdateError, match="holds no version yet: apply a full bundle first"):
        store.apply(world["delta12"])
    assert store.current_version is None


def test_manifest_rejects_unknown_format_version() -> None:
    doc = {"format": "offscan-bundle", "format_version": 2}
    with pytest.raises(UpdateError, match="newer than this offscan understands"):
        Manifest.parse(json.dumps(doc).encode())


def test_damaged_store_is_repaired_by_a_full_bundle(world: dict[str, Path], tmp_path: Path) -> None:
    store = fresh_store(tmp_path, world, "full1")
    store.database_paths()[0].write_text("garbage\n")
    with pytest.raises(UpdateError, match="damaged"):
        store.load()
    with pytest.raises(UpdateError, match="damaged"):
        store.apply(world["delta12"])
    store.apply(world["full2"])
    assert store_lines(store) == db_lines(world["db2"])


# ---------------------------------------------------------------------------------------------
# Update server and client


@pytest.fixture
def server_dir(tmp_path: Path) -> Path:
    d = tmp_path / "published"
    d.mkdir()
    return d


def publish(world: dict[str, Path], directory: Path, *names: str) -> None:
    for name in names:
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(world[name].read_bytes())
        os.replace(tmp, directory / world[name].name)


def test_server_index_and_conditional_requests(world: dict[str, Path], server_dir: Path) -> None:
    publish(world, server_dir, "full1", "full2", "delta12")
    (server_dir / "junk.osb").write_bytes(b"not a bundle")
    with UpdateServer(server_dir, port=0) as server:
        with urllib.request.urlopen(server.url + "latest") as resp:
            index = json.loads(resp.read())
            etag = resp.headers["ETag"]
        assert index["latest"] == 2
        entries = {e["name"]: e for e in index["bundles"]}
        assert set(entries) == {"full-1.osb", "full-2.osb", "delta-1-2.osb"}
        assert (
            entries["delta-1-2.osb"]["parent"] == 1 and entries["delta-1-2.osb"]["kind"] == "delta"
        )
        assert entries["full-2.osb"]["size"] == os.path.getsize(world["full2"])
        assert (
            entries["full-2.osb"]["sha256"]
            == hashlib.sha256(world["full2"].read_bytes()).hexdigest()
        )
        req = urllib.request.Request(server.url + "latest", headers={"If-None-Match": etag})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req)
        assert exc.value.code == 304
        exc.value.close()
        # publishing changes the index and its ETag
        publish(world, server_dir, "delta23")
        with urllib.request.urlopen(
            urllib.request.Request(server.url + "latest", headers={"If-None-Match": etag})
        ) as resp:
            assert json.loads(resp.read())["latest"] == 3
        with urllib.request.urlopen(server.url + "delta-1-2.osb") as resp:
            assert resp.read() == world["delta12"].read_bytes()
        for path in ("nope.osb", "../publisher.key", "junk.osb"):
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(server.url + path)
            assert exc.value.code == 404
            exc.value.close()


def test_client_fetches_the_delta_chain_when_cheaper(
    world: dict[str, Path], tmp_path: Path, server_dir: Path
) -> None:
    publish(world, server_dir, "full1", "full2", "full3", "delta12", "delta23")
    store = fresh_store(tmp_path, world, "full1")
    with UpdateServer(server_dir, port=0) as server:
        client = UpdateClient(server.url, store)
        assert client.check() == 3
        applied = client.update()
        assert [(a.kind, a.parent, a.version) for a in applied] == [
            ("delta", 1, 2),
            ("delta", 2, 3),
        ]
        assert store.current_version == 3 and store_lines(store) == db_lines(world["db3"])
        assert store.fetched_from == server.url + "delta-2-3.osb"
        deltas = os.path.getsize(world["delta12"]) + os.path.getsize(world["delta23"])
        assert deltas < client.bytes_received < deltas + 4096
        assert client.bytes_transferred < os.path.getsize(world["full3"])
        assert client.last_update_seconds is not None and client.last_update_seconds >= 0
        # client and server count the same bytes on the wire
        stats = server.stats
        assert client.bytes_transferred == stats["bytes_sent"] + stats["bytes_received"]


def test_client_fetches_the_full_bundle_when_cheaper(
    world: dict[str, Path], tmp_path: Path, server_dir: Path
) -> None:
    publish(world, server_dir, "full3", "full4", "delta23", "delta34")
    assert os.path.getsize(world["full4"]) < os.path.getsize(world["delta34"])
    store = fresh_store(tmp_path, world, "full1", "delta12", "delta23")
    empty = PatternStore(tmp_path / "empty", world["pub"])
    with UpdateServer(server_dir, port=0) as server:
        client = UpdateClient(server.url, store)
        applied = client.update()
        assert [(a.kind, a.version) for a in applied] == [("full", 4)]
        # v3 holds 400 hashes; v4 keeps 10 of v1's, re-adding the one v3 removed
        assert len(applied[0].removed["test.hdb"]) == 391
        assert applied[0].added == {"test.hdb": [REMOVED_V3]}
        assert client.bytes_received < os.path.getsize(world["delta34"])
        assert store_lines(store) == db_lines(world["db4"])
        # an empty store has no chain at all
        assert [(a.kind, a.version) for a in UpdateClient(server.url, empty).update()] == [
            ("full", 4)
        ]


def test_idle_poll_is_a_304_under_1kb(
    world: dict[str, Path], tmp_path: Path, server_dir: Path
) -> None:
    publish(world, server_dir, "full2")
    store = PatternStore(tmp_path / "s", world["pub"])
    with UpdateServer(server_dir, port=0) as server:
        client = UpdateClient(server.url, store)
        assert len(client.update()) == 1
        before, server_before = client.bytes_transferred, server.stats
        assert client.check() is None
        assert client.update() == []
        poll = (client.bytes_transferred - before) / 2
        assert poll < 1024, f"idle poll cost {poll} bytes"

        def wire() -> float:
            after = server.stats
            return (
                after["bytes_sent"]
                + after["bytes_received"]
                - server_before["bytes_sent"]
                - server_before["bytes_received"]
            ) / 2

        # the handler thread books its bytes just after the client has its reply: let it finish
        deadline = time.monotonic() + 5
        while wire() != poll and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stats["not_modified"] - server_before["not_modified"] == 2
        assert wire() == poll


def test_client_falls_back_to_full_when_a_delta_is_rejected(
    world: dict[str, Path], tmp_path: Path, server_dir: Path
) -> None:
    publish(world, server_dir, "full2")
    bad = read_bundle(world["delta12"]).signed(load_private_key(world["other_key"]))
    (server_dir / "delta-1-2.osb").write_bytes(bad.to_bytes())
    store = fresh_store(tmp_path, world, "full1")
    with UpdateServer(server_dir, port=0) as server:
        applied = UpdateClient(server.url, store).update()
    assert [(a.kind, a.version) for a in applied] == [("full", 2)]


def test_client_rejects_a_bad_server_and_keeps_the_store(
    world: dict[str, Path], tmp_path: Path, server_dir: Path
) -> None:
    store = fresh_store(tmp_path, world, "full1")
    bad = read_bundle(world["full2"]).signed(load_private_key(world["other_key"]))
    (server_dir / "full-2.osb").write_bytes(bad.to_bytes())
    before = snapshot(store.directory)
    with UpdateServer(server_dir, port=0) as server:
        client = UpdateClient(server.url, store)
        with pytest.raises(UpdateError, match="not trusted"):
            client.update()
        url = server.url
    assert snapshot(store.directory) == before
    with pytest.raises(UpdateError, match="cannot fetch"):
        UpdateClient(url, store, timeout=2).check()


def test_fetch_command(
    world: dict[str, Path], tmp_path: Path, server_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(world, server_dir, "full1", "delta12")
    with UpdateServer(server_dir, port=0) as server:
        assert cli("fetch", server.url, "--store", tmp_path / "s", "--trust", world["pub"]) == 0
        assert cli("fetch", server.url, "--store", tmp_path / "s", "--trust", world["pub"]) == 0
    out = capsys.readouterr().out
    assert "version (none) -> 1 (full" in out and "version 1 -> 2 (delta" in out
    assert "up to date at version 2" in out
    assert cli("status", "--store", tmp_path / "s", "--trust", world["pub"], "--json") == 0
    st = json.loads(capsys.readouterr().out)
    assert (
        st["version"] == 2
        and st["kind"] == "delta"
        and st["fetched_from"].endswith("/delta-1-2.osb")
    )


def test_plan_prefers_fewest_bytes() -> None:
    from offscan.updates import BundleEntry

    sha = "0" * 64
    full = [BundleEntry(f"f{v}", "full", v, None, 1000, sha) for v in (1, 2, 3)]
    d = [
        BundleEntry("d12", "delta", 2, 1, 100, sha),
        BundleEntry("d23", "delta", 3, 2, 100, sha),
        BundleEntry("d13", "delta", 3, 1, 150, sha),
    ]
    assert [b.name for b in plan_updates(full + d, 1, 3) or []] == ["d13"]
    assert [b.name for b in plan_updates(full + d[:2], 1, 3) or []] == ["d12", "d23"]
    assert [b.name for b in plan_updates(full + d, None, 3) or []] == ["f3"]
    assert [b.name for b in plan_updates(full[:2] + d, None, 3) or []] == ["f2", "d23"]
    assert [b.name for b in plan_updates(full + d, 1, 3, deltas=False) or []] == ["f3"]
    assert plan_updates(d, None, 3) is None


# ---------------------------------------------------------------------------------------------
# Crash safety: SIGKILL during apply


STEPS = [
    "stage",
    "write test.hdb",
    "write test.ndb",
    "write manifest.json",
    "write manifest.sig",
    "write origin.json",
    "rename",
    "link",
    "switch",
    "collect",
    "done",
]
STEP_DELAY = 0.05  # seconds the real child waits at each step, so random kills land mid-apply
APPLY_SCRIPT = "import sys; from offscan.updates import PatternStore; PatternStore(*sys.argv[1:3]).apply(sys.argv[3])"


def _fork_apply(
    store_dir: Path, world: dict[str, Path], bundle: Path, stop_at: str
) -> tuple[int, int]:
    """Fork a child that applies ``bundle`` and parks at step ``stop_at`` until killed; returns
    its pid and a pipe that says "stopped" once it got there.

    Forked rather than exec'd so that the every-step test does not pay an interpreter start
    (numpy included) per step, and parked rather than delayed so the kill lands exactly at the
    step however loaded the machine is. The random-moment test uses a real interpreter.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        code = 1
        try:
            os.close(r)

            def park(step: str) -> None:
                if step == stop_at:
                    os.write(w, b"stopped\n")
                    time.sleep(60)

            updates.store._checkpoint = park
            PatternStore(store_dir, world["pub"]).apply(bundle)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _check_after_crash(store_dir: Path, world: dict[str, Path]) -> int:
    store = PatternStore(store_dir, world["pub"])  # reopening recovers
    v = store.current_version
    assert v in (1, 2)
    assert store_lines(store) == db_lines(world[f"db{v}"])
    store.load()  # signature and digests check out
    assert load_database(*store.database_paths()).signature_count == (403 if v == 2 else 402)
    assert list((store_dir / "tmp").iterdir()) == []
    assert sorted(p.name for p in (store_dir / "versions").iterdir()) == [
        str(n) for n in range(1, v + 1)
    ]
    if v == 1:  # the update can simply be retried
        assert store.apply(world["delta12"]).version == 2
    return v


def test_sigkill_at_every_step_of_apply_leaves_old_or_new(
    world: dict[str, Path], tmp_path: Path
) -> None:
    seen = {}
    for i, step in enumerate(STEPS):
        store_dir = tmp_path / f"s{i}"
        PatternStore(store_dir, world["pub"]).apply(world["full1"])
        pid, r = _fork_apply(store_dir, world, world["delta12"], step)
        with os.fdopen(r) as pipe:
            assert pipe.readline() == "stopped\n"
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        seen[step] = _check_after_crash(store_dir, world)
    # killed before the switch: old version; after it: new
    assert seen == {s: (2 if STEPS.index(s) > STEPS.index("switch") else 1) for s in STEPS}


def test_sigkill_of_a_real_process_at_random_moments_of_apply(
    world: dict[str, Path], tmp_path: Path
) -> None:
    seed = int(os.environ.get("OFFSCAN_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    for i in range(2):
        store_dir = tmp_path / f"r{i}"
        PatternStore(store_dir, world["pub"]).apply(world["full1"])
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                APPLY_SCRIPT,
                str(store_dir),
                str(world["pub"]),
                str(world["delta12"]),
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, **{STEP_DELAY_ENV: str(STEP_DELAY)}),
        )
        assert proc.stderr is not None
        assert proc.stderr.readline().strip() == "offscan-apply-step stage"  # the apply has begun
        time.sleep(rng.uniform(0, STEP_DELAY * len(STEPS) * 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), f"seed {seed}"
        _check_after_crash(store_dir, world)


SERVE_SCRIPT = (
    "import argparse, sys; from offscan.cli.patterns import add_patterns_arguments, run as cmd_patterns; "
    "p = argparse.ArgumentParser(); add_patterns_arguments(p); "
    "sys.exit(cmd_patterns(p.parse_args(sys.argv[1:])))"
)


def test_serve_command(world: dict[str, Path], server_dir: Path) -> None:
    publish(world, server_dir, "full1", "delta12")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, "serve", str(server_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(
            r"serving 2 bundle\(s\) from .* at (http://127\.0\.0\.1:\d+/) \(latest version 2\)",
            line,
        )
        assert m, line
        with urllib.request.urlopen(m.group(1) + "latest", timeout=10) as resp:
            assert json.loads(resp.read())["latest"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
    assert proc.returncode == 0
