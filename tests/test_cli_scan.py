"""``offscan scan`` as a user runs it: a real subprocess on real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import EICAR

TIMEOUT = 60  # seconds; a scan that blocks (FIFO) fails the test instead of hanging the suite


def offscan(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "offscan", "scan", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def lines(out: str) -> list[str]:
    """Result lines, without the summary."""
    return out.split("\n----------- SCAN SUMMARY", 1)[0].splitlines()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "eicar.com").write_bytes(EICAR)
    (root / "clean.txt").write_text("nothing to see here\n")
    (root / "sub" / "deeper" / "eicar2.txt").write_bytes(EICAR + b"\n")
    (root / "sub" / "empty").write_bytes(b"")
    return root


def test_recursive_scan_finds_eicar(tree: Path, impl: str) -> None:
    p = offscan("-r", "--impl", impl, tree)
    assert p.returncode == 1, p.stderr
    assert lines(p.stdout) == [
        f"{tree}/clean.txt: OK",
        f"{tree}/eicar.com: Eicar-Test-Signature FOUND",
        f"{tree}/sub/empty: OK",
        f"{tree}/sub/deeper/eicar2.txt: Eicar-Test-Signature FOUND",
    ]  # sorted, files of a directory before its subdirectories
    assert "----------- SCAN SUMMARY -----------" in p.stdout
    assert "Scanned files: 4" in p.stdout
    assert "Infected files: 2" in p.stdout
    assert ("native" if impl == "c" else "python") in p.stdout
    assert p.stderr == ""


def test_clean_files_exit_0(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("hello\n")
    p = offscan(f)
    assert p.returncode == 0, p.stderr
    assert lines(p.stdout) == [f"{f}: OK"]
    assert "Infected files: 0" in p.stdout


def test_infected_hides_ok_lines(tree: Path) -> None:
    p = offscan("-r", "--infected", tree)
    assert p.returncode == 1
    assert sorted(lines(p.stdout)) == [
        f"{tree}/eicar.com: Eicar-Test-Signature FOUND",
        f"{tree}/sub/deeper/eicar2.txt: Eicar-Test-Signature FOUND",
    ]
    assert "Scanned files: 4" in p.stdout


def test_no_summary(tree: Path) -> None:
    p = offscan("-r", "--no-summary", tree / "clean.txt")
    assert p.stdout == f"{tree}/clean.txt: OK\n"


def test_allmatch(tmp_path: Path) -> None:
    db = tmp_path / "two.ndb"
    db.write_text("First:0:*:6e6565646c65\nSecond:0:*:686179*737461636b\n")  # needle, hay*stack
    f = tmp_path / "f"
    f.write_bytes(b"hay ... stack ... needle")
    p = offscan("-d", db, f)
    assert p.returncode == 1
    assert lines(p.stdout) == [f"{f}: Second FOUND"]
    p = offscan("-d", db, "--allmatch", f)
    assert p.returncode == 1
    assert lines(p.stdout) == [f"{f}: Second FOUND", f"{f}: First FOUND"]


def test_json(tree: Path) -> None:
    p = offscan("-r", "--json", tree)
    assert p.returncode == 1
    records = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(records) == 4
    by_path = {r["path"]: r for r in records}
    assert by_path[f"{tree}/eicar.com"]["status"] == "infected"
    assert by_path[f"{tree}/eicar.com"]["matches"] == ["Eicar-Test-Signature"]
    assert by_path[f"{tree}/clean.txt"]["status"] == "clean"
    assert by_path[f"{tree}/clean.txt"]["matches"] == []
    assert by_path[f"{tree}/sub/empty"]["size"] == 0
    assert "SCAN SUMMARY" not in p.stdout


def test_json_error_record(tmp_path: Path) -> None:
    p = offscan("--json", tmp_path / "missing")
    assert p.returncode == 2
    (record,) = [json.loads(line) for line in p.stdout.splitlines()]
    assert record["status"] == "error" and record["reason"]


def test_custom_database_file_and_directory(tmp_path: Path) -> None:
    dbdir = tmp_path / "db"
    dbdir.mkdir()
    (dbdir / "a.ndb").write_text("Custom.Body:0:*:637573746f6d\n")  # "custom"
    (dbdir / "b.hdb").write_text("5d41402abc4b2a76b9719d911017c592:5:Custom.Hash\n")  # "hello"
    f1 = tmp_path / "f1"
    f1.write_bytes(b"a custom file")
    f2 = tmp_path / "f2"
    f2.write_bytes(b"hello")
    f3 = tmp_path / "f3"
    f3.write_bytes(EICAR)
    p = offscan("-d", dbdir, f1, f2, f3)
    assert p.returncode == 1, p.stderr
    assert lines(p.stdout) == [
        f"{f1}: Custom.Body FOUND",
        f"{f2}: Custom.Hash FOUND",
        f"{f3}: OK",
    ]  # -d replaces the default database
    p = offscan("-d", dbdir / "a.ndb", f1, f2)
    assert lines(p.stdout) == [f"{f1}: Custom.Body FOUND", f"{f2}: OK"]
    p = offscan("-d", dbdir / "a.ndb", "-d", dbdir / "b.hdb", f1, f2)
    assert lines(p.stdout) == [f"{f1}: Custom.Body FOUND", f"{f2}: Custom.Hash FOUND"]


def test_bad_database_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "bad.ndb"
    db.write_text("Good:0:*:aabbcc\nBad:0:*:aabb{5-2}ccdd\n")
    f = tmp_path / "f"
    f.write_bytes(EICAR)
    p = offscan("-d", db, f)
    assert p.returncode == 2
    assert "bad.ndb:2: {5-2}: min > max" in p.stderr
    assert p.stdout == ""


def test_missing_database_exit_2(tmp_path: Path) -> None:
    p = offscan("-d", tmp_path / "nope.ndb", tmp_path)
    assert p.returncode == 2
    assert "nope.ndb" in p.stderr


def test_missing_file_exit_2(tmp_path: Path) -> None:
    p = offscan(tmp_path / "missing")
    assert p.returncode == 2
    assert lines(p.stdout) == []
    assert p.stderr.splitlines() == [
        f"{tmp_path}/missing: No such file or directory",  # clamscan's words
        f"WARNING: {tmp_path}/missing: Can't access file",
    ]
    assert "Total errors: 1" in p.stdout


def test_infection_wins_over_errors(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_bytes(EICAR)
    p = offscan(good, tmp_path / "missing")
    assert p.returncode == 1  # clamscan: 1 when anything is infected, errors or not
    assert lines(p.stdout) == [f"{good}: Eicar-Test-Signature FOUND"]
    assert "missing: No such file or directory" in p.stderr


def test_directory_without_r_scans_its_top_level(tmp_path: Path) -> None:
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "e").write_bytes(EICAR)
    (d / "sub" / "deep").write_bytes(EICAR)
    (d / "clean").write_bytes(b"clean")
    os.mkfifo(d / "fifo")
    (d / "link").symlink_to(d / "clean")
    p = offscan(d)
    assert p.returncode == 1, p.stderr
    assert lines(p.stdout) == [
        f"{d}/clean: OK",
        f"{d}/e: Eicar-Test-Signature FOUND",
        f"{d}/link: Symbolic link",
    ]
    assert p.stderr == ""
    quiet = offscan("-i", d)
    assert lines(quiet.stdout) == [f"{d}/e: Eicar-Test-Signature FOUND"]


def test_fifo_in_recursive_scan_does_not_hang(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.mkfifo(d / "a-fifo")
    (d / "b-eicar").write_bytes(EICAR)
    p = offscan("-r", d)  # subprocess.run's timeout fails the test if it blocks
    assert p.returncode == 1
    assert f"{d}/b-eicar: Eicar-Test-Signature FOUND" in lines(p.stdout)
    assert not any(line.startswith(f"{d}/a-fifo: OK") for line in lines(p.stdout))


def test_fifo_named_on_command_line(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    p = offscan(fifo)
    assert p.returncode == 2
    assert lines(p.stdout) == []
    assert p.stderr.strip() == f"WARNING: {fifo}: Not supported file type"


def test_symlink_loop_in_recursive_scan(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "loop1").symlink_to(d / "loop2")
    (d / "loop2").symlink_to(d / "loop1")
    (d / "up").symlink_to(d)  # a directory cycle
    (d / "x").write_bytes(EICAR)
    p = offscan("-r", d)
    assert p.returncode == 1
    assert lines(p.stdout) == [
        f"{d}/loop1: Symbolic link",
        f"{d}/loop2: Symbolic link",
        f"{d}/up: Symbolic link",
        f"{d}/x: Eicar-Test-Signature FOUND",
    ]


def test_max_filesize_option(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(EICAR + bytes(2000))
    p = offscan("--max-filesize", "1k", f)
    assert p.returncode == 2
    assert lines(p.stdout) == [f"{f}: file size 2068 exceeds max file size 1024 bytes ERROR"]


def test_usage_errors(tmp_path: Path) -> None:
    p = offscan()
    assert p.returncode == 2 and "PATH" in p.stderr
    p = offscan("--bogus", tmp_path)
    assert p.returncode == 2


CLAMSCAN = shutil.which("clamscan")


@pytest.mark.skipif(CLAMSCAN is None, reason="clamscan is not installed")
@pytest.mark.parametrize(
    "args",
    [
        ["d"],
        ["-r", "d"],
        ["d/e", "missing"],
        ["missing"],
        ["d/link"],
        ["d/fifo"],
        ["-i", "-r", "d"],
        ["d/sub/deep", "missing", "d/clean"],
    ],
    ids=lambda a: " ".join(a),
)
def test_clamscan_parity(tmp_path: Path, args: list[str]) -> None:
    """Same lines (sorted; clamscan lists a directory in readdir order), same streams, same
    exit code as clamscan 1.4 on the same files with the same database."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "e").write_bytes(EICAR)
    (d / "sub" / "deep").write_bytes(EICAR)
    (d / "clean").write_bytes(b"clean")
    os.mkfifo(d / "fifo")
    (d / "link").symlink_to(d / "clean")
    (d / "dirlink").symlink_to(d / "sub")
    patterns = Path(__file__).resolve().parent.parent / "patterns"
    dbs = ["-d", str(patterns / "offscan.ndb"), "-d", str(patterns / "offscan.hdb")]
    assert CLAMSCAN is not None
    ref = subprocess.run(
        [CLAMSCAN, "--no-summary", *dbs, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    ours = subprocess.run(
        [sys.executable, "-m", "offscan", "scan", "--no-summary", *dbs, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )

    def norm(text: str) -> list[str]:
        return sorted(text.replace(".UNOFFICIAL FOUND", " FOUND").splitlines())

    assert (ours.returncode, norm(ours.stdout), norm(ours.stderr)) == (
        ref.returncode,
        norm(ref.stdout),
        norm(ref.stderr),
    )


def test_command_table_matches_the_full_parser() -> None:
    """main builds only the named subcommand's parser: its table must name every subcommand
    the full parser has, with the module that registers it."""
    import argparse

    from offscan.cli.main import COMMANDS, build_parser

    def subcommands(parser: argparse.ArgumentParser) -> set[str]:
        (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return set(sub.choices)

    assert subcommands(build_parser()) == set(COMMANDS)
    for command in COMMANDS:
        assert command in subcommands(build_parser(command))


def test_scan_start_up_imports_no_appliance_lab_or_updates(tmp_path: Path) -> None:
    """`offscan scan` is a short process: it must not pay for the appliance, the lab or the
    update code (their imports were most of its start-up)."""
    f = tmp_path / "f.txt"
    f.write_text("clean\n")
    code = (
        "import sys\n"
        "from offscan.cli.main import main\n"
        f"rc = main(['scan', '--no-summary', {str(f)!r}])\n"
        "heavy = [m for m in sys.modules if m.split('.')[:2] in "
        "(['offscan', 'appliance'], ['offscan', 'lab'], ['offscan', 'updates'], "
        "['offscan', 'shim'], ['offscan', 'protocol'])]\n"
        "print(rc, sorted(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout + out.stderr
