"""open_confined_many and stat_confined_many (the batch fast path's opener and its stat-only
lookup for cache hits) refuse what open_confined refuses."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import no_hang, open_fds

from offscan import confine
from offscan.cache import Identity
from offscan.confine import (
    ConfinementError,
    identify_confined_many,
    open_confined,
    open_confined_many,
    stat_confined_many,
)


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


PATHS = [
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
    "a/b/../../../secret",
    "a/link",
    "a/b",
    "",
]


def test_same_answers_as_open_confined(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    paths = list(PATHS)
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


def test_stat_refuses_exactly_what_open_confined_refuses(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    before = open_fds()
    with no_hang():
        got = stat_confined_many(str(root), PATHS)
    assert open_fds() == before  # nothing opened stays open; no file was opened at all
    for path, res in zip(PATHS, got, strict=True):
        try:
            fd = open_confined(str(root), path)
        except OSError as exc:
            assert isinstance(res, OSError) and type(res) is type(exc), (path, res, exc)
            continue
        try:
            assert isinstance(res, os.stat_result), (path, res)
            st = os.fstat(fd)
            assert (res.st_dev, res.st_ino, res.st_size, res.st_mtime_ns, res.st_ctime_ns) == (
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
                st.st_ctime_ns,
            )
        finally:
            os.close(fd)
    by_path = dict(zip(PATHS, got, strict=True))
    for refused in ("a/link/secret", "final", "a/fifo", "../secret", "/etc/passwd", "a/link"):
        assert isinstance(by_path[refused], ConfinementError), refused
    assert isinstance(by_path["a/b/missing"], FileNotFoundError)
    assert isinstance(by_path["a/b/ok.txt"], os.stat_result)


def test_stat_never_follows_a_symlinked_last_component(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "to_ok").symlink_to(root / "top.txt")  # pointing inside: still refused
    got = stat_confined_many(str(root), ["to_ok", "final", "top.txt"])
    assert isinstance(got[0], ConfinementError) and "symlink" in str(got[0])
    assert isinstance(got[1], ConfinementError) and "symlink" in str(got[1])
    assert isinstance(got[2], os.stat_result)
    assert got[2].st_ino == (root / "top.txt").stat().st_ino


def test_stat_walk_does_not_escape_through_a_directory_symlink(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "f").write_text("x")
    (root / "a" / "b" / "esc").symlink_to(tmp_path / "outdir")
    got = stat_confined_many(str(root), ["a/b/esc/f", "a/link/outdir/f", "a/b/ok.txt"])
    assert isinstance(got[0], ConfinementError) and "component" in str(got[0])
    assert isinstance(got[1], ConfinementError)
    assert isinstance(got[2], os.stat_result)


def _identify(root: str, paths: list[str]) -> list[Identity | OSError]:
    return identify_confined_many(root, paths, "local")


@pytest.mark.parametrize("lookup", [stat_confined_many, _identify], ids=["stat", "identify"])
def test_stat_directory_descriptors_are_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lookup: Callable[..., list[Any]]
) -> None:
    monkeypatch.setattr(confine, "MAX_DIR_FDS", 4)
    root = tmp_path / "root"
    for i in range(30):
        (root / f"d{i}" / "e").mkdir(parents=True)
        (root / f"d{i}" / "e" / "f").write_text(str(i))
    before = open_fds()
    got = lookup(str(root), [f"d{i}/e/f" for i in range(30)])
    assert all(isinstance(r, os.stat_result | Identity) for r in got)
    assert open_fds() == before
    with pytest.raises(FileNotFoundError):  # a missing root is the caller's to handle
        lookup(str(tmp_path / "gone"), ["x"])


def test_strict_root_refuses_a_root_reached_through_a_symlink(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (tmp_path / "via").symlink_to(root)
    for many in (stat_confined_many, open_confined_many):
        with pytest.raises(ConfinementError):
            many(str(tmp_path / "via"), ["top.txt"], strict_root=True)
        got = many(str(root), ["top.txt", "final"], strict_root=True)
        assert not isinstance(got[0], OSError) and isinstance(got[1], ConfinementError)
        if many is open_confined_many:
            os.close(got[0][0])  # type: ignore[index]
