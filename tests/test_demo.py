"""Smoke test of ``offscan demo`` (the README's first command) with small numbers: it exits 0,
detects the EICAR file, its matched/cached numbers add up, and it leaves nothing behind."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import EICAR_NAME, processes_mentioning, run

CLONES = 3
FILES = 20
BURST_PER_CLONE = 4  # the demo's burst: patch.bin, notes.txt, report-i.txt, tmp-i.dat
DEMO_TIMEOUT = 600  # seconds: a hang guard on a loaded machine, not a performance bound
# Distinct contents: the master's files (all different), then the burst: one patch and one
# notes file shared by every clone, a report and a random file per clone, and EICAR.
# No content changes while it is read (the master is built before the shim starts, clones
# are made before they are added, and the burst is written from the shim's own event loop
# without yielding to it), so each distinct content is matched exactly once.
UNIQUE = FILES + 2 + 2 * CLONES + 1


@dataclass
class DemoRun:
    returncode: int
    out: str
    rows: dict[str, list[str]]  # the summary table: label -> values (labels may repeat)
    tmpdir: Path
    leftovers: list[str]
    processes: list[tuple[int, str]]

    def row(self, label: str) -> str:
        values = self.rows.get(label)
        assert values, f"no {label!r} row in the demo's summary:\n{self.out}"
        return values[0]

    def number(self, label: str) -> int:
        m = re.match(r"\d+", self.row(label))
        assert m, f"{label!r}: {self.row(label)!r} does not start with a number"
        return int(m.group())


def parse_rows(out: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^\s*│ (.+?)\s*│ (.*?)\s*│\s*$", line)
        if m:
            rows.setdefault(m.group(1), []).append(m.group(2))
    return rows


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoRun]:
    # A private, short TMPDIR (unix socket paths are limited to ~107 bytes): the demo's work
    # directory goes there, so whatever it leaves behind is visible, and its appliance's
    # command line names it, so a process left running is found.
    tmpdir = Path(tempfile.mkdtemp(prefix="ofs-demo-", dir="/tmp"))
    try:
        p = run(
            "demo",
            "--clones",
            CLONES,
            "--files",
            FILES,
            timeout=DEMO_TIMEOUT,
            env={"TMPDIR": str(tmpdir), "COLUMNS": "220", "NO_COLOR": "1"},
        )
        out = p.stdout + p.stderr
        yield DemoRun(
            p.returncode,
            out,
            parse_rows(p.stdout),
            tmpdir,
            sorted(x.name for x in tmpdir.iterdir()),
            processes_mentioning(str(tmpdir)),
        )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_demo_exits_zero_and_prints_its_summary(demo: DemoRun) -> None:
    assert demo.returncode == 0, demo.out
    assert f"master image: {FILES} files" in demo.out
    for label in (
        "VMs protected",
        "files seen (verdicts)",
        "contents matched",
        "served from cache",
        "clone dedup",
        "dedup ratio",
    ):
        demo.row(label)


def test_demo_detects_eicar_quarantines_it_and_tags_the_vm(demo: DemoRun) -> None:
    vm = f"vm-{min(17, CLONES)}"  # the clone the demo drops EICAR into
    assert f"VM {vm}: home/user/Downloads/eicar.com: {EICAR_NAME} FOUND" in demo.out
    assert demo.rows.get("detection") == [
        f"VM {vm}: home/user/Downloads/eicar.com: {EICAR_NAME} (deny)"
    ], demo.out
    qid = demo.row("quarantine id")
    assert qid not in ("", "None"), demo.out
    tags = demo.row(f"tags of {vm}").split(", ")
    assert "virus_found" in tags and any(t.startswith("threat=") for t in tags), demo.out


def test_every_file_got_a_verdict_and_the_numbers_add_up(demo: DemoRun) -> None:
    assert demo.number("VMs protected") == CLONES + 1
    verdicts = demo.number("files seen (verdicts)")
    matched = demo.number("contents matched")
    served_row = demo.row("served from cache")
    m = re.fullmatch(
        r"(\d+) \((\d+) by clone inheritance, (\d+) by identity, (\d+) by digest\)", served_row
    )
    assert m, served_row
    served, by_clone, by_identity, by_digest = map(int, m.groups())
    # every file of the master, of each clone and of the burst (rescans may add verdicts)
    assert verdicts >= FILES * (CLONES + 1) + CLONES * BURST_PER_CLONE + 1, demo.out
    # the rest joined a match in flight for the same content (not a row of the table)
    assert verdicts >= matched + served, demo.out
    assert served == by_clone + by_identity + by_digest, demo.out
    assert by_clone == FILES * CLONES, demo.out  # every clone file inherited, none read
    assert matched <= UNIQUE, f"a content was matched twice:\n{demo.out}"
    assert matched >= UNIQUE, f"a content got a verdict without being matched:\n{demo.out}"


def test_clones_were_protected_without_reading_a_byte(demo: DemoRun) -> None:
    m = re.fullmatch(
        r"(\d+) clone files protected unread: (\d+) bytes read, (\d+) contents "
        r"matched for the clones",
        demo.row("clone dedup"),
    )
    assert m, demo.row("clone dedup")
    inherited, bytes_read, matched = map(int, m.groups())
    assert (inherited, bytes_read, matched) == (FILES * CLONES, 0, 0), demo.out


def test_demo_leaves_nothing_behind(demo: DemoRun) -> None:
    assert demo.leftovers == [], f"left in TMPDIR: {demo.leftovers}"
    assert demo.processes == [], f"still running: {demo.processes}"
