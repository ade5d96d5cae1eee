"""open_confined_many (the batch fast path's opener) refuses what open_confined refuses."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from helpers import no_hang, open_fds

from offscan import confine
from offscan.confine import ConfinementError, open_confined, open_confined_many


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "ok.txt").write_text("fine")
    (root / "top.txt").write_text("top")
    (tmp_path / "secret").write_text("outside")
    (root / "a" / "link").symlink_to(tmp_path)  # a directory symlink leading out
    (root / "final").symlink_to(tmp_path / "secret")
    os.mkfifo(root / "a" / "fifo")
    return root


def test_same_answers_as_open_confined(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    paths = [
        "a/b/ok.txt",
        "top.txt",
        "a/link/secret",
        "final",
        "a/fifo",
        "../secret",
        "a/b/missing",
        "a/b/ok.txt/x",
        "/etc/passwd",
        "a/b/ok.txt",
    ]
    before = open_fds()
    with no_hang():
        got = open_confined_many(str(root), paths)
    for path, res in zip(paths, got, strict=True):
        try:
            fd = open_confined(str(root), path)
        except OSError as exc:
            assert isinstance(res, OSError) and type(res) is type(exc), (path, res, exc)
            continue
        try:
            assert not isinstance(res, OSError), (path, res)
            assert os.fstat(fd).st_ino == res[1].st_ino and stat.S_ISREG(res[1].st_mode)
            assert os.read(res[0], 100) == os.read(fd, 100)
        finally:
            os.close(fd)
            if not isinstance(res, OSError):
                os.close(res[0])
    assert isinstance(got[2], ConfinementError) and isinstance(got[3], ConfinementError)
    assert isinstance(got[4], ConfinementError)  # the FIFO was never opened (no hang)
    assert open_fds() == before  # every directory descriptor closed


def test_directory_descriptors_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(confine, "MAX_DIR_FDS", 4)
    root = tmp_path / "root"
    paths = []
    for i in range(30):
        d = root / f"d{i}" / "e"
        d.mkdir(parents=True)
        (d / "f").write_text(str(i))
        paths.append(f"d{i}/e/f")
    before = open_fds()
    got = open_confined_many(str(root), paths)
    try:
        assert all(not isinstance(r, OSError) for r in got)
        # files open (ours), directories closed again
        assert len(open_fds() - before) == 30
    finally:
        for r in got:
            if not isinstance(r, OSError):
                os.close(r[0])
    assert open_fds() == before
