"""Issue 14: hostile bundles (item 6) and the new user's tracebacks, as real ``offscan``
processes: each error is one line on stderr with the documented exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
from helpers import offscan_argv, run, running_appliance

from offscan.cli.main import build_parser
from offscan.updates import PatternStore, UpdateError, build_full, generate_key, load_trust
from offscan.updates.bundle import MANIFEST_NAME, FileEntry, Manifest

MiB = 1 << 20


def _one_line_error(r: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


# -- 6. a bundle is vouched for before it is inflated -------------------------------------------


def _bomb(path: Path, inflated: int) -> None:
    """An unsigned bundle whose one member inflates to ``inflated`` bytes of zeros."""
    entry = FileEntry("0" * 64, inflated, 1)
    manifest = Manifest("full", 2, None, "2026-01-01T00:00:00Z", {"daily.ndb": entry}, {})
    manifest = Manifest("full", 2, None, manifest.created, manifest.files, manifest.files)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST_NAME, manifest.to_bytes())
        with zf.open("daily.ndb", "w", force_zip64=True) as f:
            zero = bytes(MiB)
            for _ in range(inflated // MiB):
                f.write(zero)


def test_an_unsigned_bomb_is_rejected_before_it_is_inflated(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.osb"
    _bomb(bomb, 384 * MiB)
    assert bomb.stat().st_size < 2 * MiB
    generate_key(tmp_path / "k")
    # measured in a child of its own: RUSAGE_CHILDREN is the peak of every child so far,
    # so the child runs this process's verify through a fresh interpreter
    probe = (
        "import resource,subprocess,sys;"
        "r=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
        "sys.stderr.write(r.stderr);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024);"
        "sys.exit(r.returncode)"
    )
    argv = offscan_argv("patterns", "verify", bomb, "--trust", tmp_path / "k.pub")
    r = subprocess.run([argv[0], "-c", probe, *argv], capture_output=True, text=True, timeout=120)
    line = _one_line_error(r, code=1)
    assert "not signed" in line
    peak = int(r.stdout.strip())
    assert peak < 256 * MiB, f"verify peaked at {peak / MiB:.0f} MiB: the bomb was inflated"


def test_the_store_rejects_a_bomb_and_an_oversized_member_without_inflating(
    tmp_path: Path,
) -> None:
    bomb = tmp_path / "bomb.osb"
    _bomb(bomb, 64 * MiB)
    generate_key(tmp_path / "k")
    store = PatternStore(tmp_path / "store", tmp_path / "k.pub")
    with pytest.raises(UpdateError, match="not signed"):
        store.apply(bomb)
    # A signed manifest, but a zip member larger than the manifest says: refused from the
    # zip directory, before reading the member.
    from offscan.updates import load_private_key

    good = build_full({"daily.ndb": ["Sig:0:*:41424344454647"]}, 1).signed(
        load_private_key(tmp_path / "k.key")
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST_NAME, good.manifest_bytes)
        assert good.signature is not None
        zf.writestr("manifest.sig", good.signature)
        zf.writestr("daily.ndb", bytes(8 * MiB))
    with pytest.raises(UpdateError, match="its manifest says"):
        store.apply(buf.getvalue())
    assert store.current_version is None
    assert store.apply(good).version == 1
    assert load_trust(tmp_path / "k.pub")


# -- the new user's tracebacks ------------------------------------------------------------------


def test_cli_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    cases = [
        ("status", "--appliance", "app.sock"),
        ("vm", "list", "--appliance", "app.sock"),
        ("serve", "--socket", "/missing/dir/a.sock"),
        ("serve", "--socket", tmp_path / "m.sock", "--metrics", "127.0.0.1:99999"),
        (
            "serve",
            "--socket",
            tmp_path / "t.sock",
            "--state",
            tmp_path / "st",
            "--trust",
            "/missing.pub",
        ),
        ("bench", "clone-storm", "--work", "/not/there"),
        ("patterns", "status", "--store", tmp_path / "missing", "--trust", tmp_path / "k.pub"),
        ("patterns", "verify", "/missing.osb", "--trust", tmp_path / "k.pub"),
    ]
    generate_key(tmp_path / "k")
    for args in cases:
        line = _one_line_error(run(*args, cwd=tmp_path))
        assert line.startswith("offscan"), (args, line)
    assert not (tmp_path / "missing").exists(), "patterns status created a store"
    assert not list(tmp_path.glob("*.sock*")), "serve left socket files behind"
    assert not list(tmp_path.glob("offscan-*")), "bench started before checking --work"


def test_keygen_creates_the_key_directory(tmp_path: Path) -> None:
    r = run("patterns", "keygen", "-o", "keys/pub", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "keys" / "pub.key").exists() and (tmp_path / "keys" / "pub.pub").exists()


def test_status_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    with running_appliance(tmp_path) as a:
        for args in (("status", "--appliance", a.sock), ("vm", "list", "--appliance", a.sock)):
            p = subprocess.Popen(
                offscan_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            assert p.stdout is not None and p.stderr is not None
            p.stdout.close()  # `| head` that already exited
            err = p.stderr.read()
            p.stderr.close()
            assert p.wait(60) in (0, 2)
            assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_reload_with_a_failed_update_exits_2(tmp_path: Path) -> None:
    generate_key(tmp_path / "k")
    # an update server nobody listens on: every poll fails
    with running_appliance(
        tmp_path, "--updates", "http://127.0.0.1:9/", "--trust", str(tmp_path / "k.pub")
    ) as a:
        r = run("reload", "--appliance", a.sock)
        line = _one_line_error(r)
        assert "update failed" in line
        r = run("reload", "--appliance", a.sock, "--json")
        assert r.returncode == 2 and json.loads(r.stdout)["error"]


def _actions(parser: argparse.ArgumentParser, where: str = "offscan"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{where} {name}")
        else:
            yield where, action


def test_help_lists_every_subcommand_and_every_option_has_help() -> None:
    parser = build_parser()
    text = parser.format_help()
    for cmd in (
        "scan",
        "scan-image",
        "serve",
        "shim",
        "status",
        "vm",
        "policy",
        "quarantine",
        "reload",
        "agent",
        "bench",
        "patterns",
        "demo",
    ):
        assert f"\n    {cmd}" in text, cmd
    assert "agentless" in (parser.description or "")
    missing = [
        f"{where} {'/'.join(a.option_strings) or a.dest}"
        for where, a in _actions(parser)
        if a.help is None and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))
    ]
    assert missing == [], missing
