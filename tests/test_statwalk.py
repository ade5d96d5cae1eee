"""The cache-hit path's confined identity lookup: ``offscan._statwalk`` (native, and its Python
twin) and ``confine.identify_confined_many`` built on it.

The native module and the twin must give the same answers and open the same directories
(Hypothesis, over a tree with symlinks, a FIFO, a directory and missing names); whatever
either declines is walked again by ``confine``, so the whole lookup must refuse exactly what
``stat_confined_many`` refuses and report the same identities.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import no_hang, open_fds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offscan import _statwalk, _statwalk_py, confine
from offscan.cache import Identity
from offscan.confine import ConfinementError, identify_confined_many, stat_confined_many

NO_EXTENSIONS = bool(os.environ.get("OFFSCAN_NO_EXTENSIONS"))
IMPLS = ("c", "py") if not NO_EXTENSIONS else ("py",)
SETTINGS = settings(
    max_examples=int(os.environ.get("OFFSCAN_TWIN_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
IdentifyMany = Callable[..., list[Any]]


def _impl(name: str) -> IdentifyMany:
    if name == "py":
        return _statwalk_py.identify_many
    assert _statwalk.native_identify_many is not None, _statwalk.NATIVE_IMPORT_ERROR
    return _statwalk.native_identify_many


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> IdentifyMany:
    """One implementation, also installed as the one ``confine`` uses."""
    fn = _impl(request.param)
    monkeypatch.setattr(confine, "identify_many", fn)
    return fn


def _tree(base: Path) -> Path:
    root = base / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "ok.txt").write_text("fine")
    (root / "a" / "é").mkdir()
    (root / "a" / "é" / "ü.txt").write_text("unicode")
    (root / "top.txt").write_text("top")
    (base / "secret").write_text("outside")
    (root / "a" / "link").symlink_to(base)  # a directory symlink leading out
    (root / "final").symlink_to(base / "secret")
    (root / "inner").symlink_to(root / "top.txt")  # pointing inside: still refused
    os.mkfifo(root / "a" / "fifo")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield _tree(tmp_path_factory.mktemp("statwalk"))


PATHS = [
    "a/b/ok.txt",
    "top.txt",
    "a/é/ü.txt",
    "a/link/secret",
    "final",
    "inner",
    "a/fifo",
    "../secret",
    "a/b/missing",
    "a/b/ok.txt/x",
    "/etc/passwd",
    "a//b/ok.txt",
    "./top.txt",
    "a/b/../../../secret",
    "a/link",
    "a/b",
    "",
    "top.txt\0x",
    "a/\udcff",
]


def _as_stat_ident(res: os.stat_result | OSError) -> Identity | tuple[type, str]:
    if isinstance(res, OSError):
        return type(res), str(res)
    return Identity.from_stat("local", res)


def _as_ident(res: Identity | OSError) -> Identity | tuple[type, str]:
    return (type(res), str(res)) if isinstance(res, OSError) else res


def test_c_extension_loaded() -> None:
    """Fails if the build silently fell back to the twin (unless pure Python was asked for)."""
    if NO_EXTENSIONS:
        assert not _statwalk.NATIVE
        pytest.skip("OFFSCAN_NO_EXTENSIONS: pure Python asked for")
    assert _statwalk.NATIVE, f"native statwalk not in use: {_statwalk.NATIVE_IMPORT_ERROR}"


def test_refuses_exactly_what_the_stat_walk_refuses(tree: Path, impl: IdentifyMany) -> None:
    before = open_fds()
    with no_hang():
        got = identify_confined_many(str(tree), PATHS, "local", strict_root=True)
        want = stat_confined_many(str(tree), PATHS, strict_root=True)
    assert open_fds() == before  # every directory descriptor closed, no file opened
    assert [_as_ident(r) for r in got] == [_as_stat_ident(r) for r in want]
    assert all(type(r) is Identity for r in got if not isinstance(r, OSError))
    by_path = dict(zip(PATHS, got, strict=True))
    for refused in ("a/link/secret", "final", "inner", "a/fifo", "../secret", "/etc/passwd"):
        assert isinstance(by_path[refused], ConfinementError), refused
    assert isinstance(by_path["a/b/missing"], FileNotFoundError)
    ok = by_path["a/b/ok.txt"]
    assert isinstance(ok, Identity) and ok.ino == (tree / "a" / "b" / "ok.txt").stat().st_ino


def test_declines_rather_than_refuses(tree: Path, impl: IdentifyMany) -> None:
    """The helper never refuses: a path that is not plain, or that fails, is None (the
    caller's walk then refuses it); a plain regular file is its identity."""
    dirs = {"": os.open(tree, os.O_RDONLY | os.O_DIRECTORY)}
    try:
        got = impl(dirs, PATHS, "vm1", Identity, 64)
    finally:
        for fd in dirs.values():
            os.close(fd)
    by_path = dict(zip(PATHS, got, strict=True))
    plain = {"a/b/ok.txt", "top.txt", "a/é/ü.txt"}
    assert {p for p, r in by_path.items() if r is not None} == plain
    assert all(type(by_path[p]) is Identity and by_path[p].source == "vm1" for p in plain)
    assert sorted(dirs) == ["", "a", "a/b", "a/é"]  # never a/link: O_NOFOLLOW refused it


COMPONENT = st.sampled_from(
    ["a", "b", "é", "ok.txt", "ü.txt", "top.txt", "link", "fifo", "final", "inner", "secret"]
    + ["missing", "..", ".", "", "\0", "\udcff", "ok.txt\0"]
)
RELPATH = st.lists(COMPONENT, min_size=1, max_size=5).map("/".join) | st.text(max_size=12)


@SETTINGS
@given(paths=st.lists(RELPATH, max_size=20), max_dirs=st.integers(1, 4))
def test_native_equals_twin(tree: Path, paths: list[str], max_dirs: int) -> None:
    if NO_EXTENSIONS:
        pytest.skip("OFFSCAN_NO_EXTENSIONS: no native module to compare")
    answers = []
    for name in IMPLS:
        dirs = {"": os.open(tree, os.O_RDONLY | os.O_DIRECTORY)}
        try:
            got = _impl(name)(dirs, paths, "local", Identity, max_dirs)
            answers.append((got, sorted(dirs)))
        finally:
            for fd in dirs.values():
                os.close(fd)
    assert answers[0] == answers[1]


@SETTINGS
@given(paths=st.lists(RELPATH, max_size=20))
def test_whole_lookup_equals_the_stat_walk(tree: Path, paths: list[str]) -> None:
    want = [_as_stat_ident(r) for r in stat_confined_many(str(tree), paths, strict_root=True)]
    for name in IMPLS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(confine, "identify_many", _impl(name))
            got = identify_confined_many(str(tree), paths, "local", strict_root=True)
        assert [_as_ident(r) for r in got] == want, name
