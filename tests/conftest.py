"""Shared fixtures: the implementation switch, database helpers and the leak guard."""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import pytest

from offscan import Matcher, PatternDB

# Hypothesis imports its patch writer (libcst -> mypy_extensions) only when a test fails, and
# that import warns; with filterwarnings=error the warning would hide the real failure.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # pragma: no cover - older or newer Hypothesis
        pass

from helpers import EICAR  # noqa: F401 - re-exported: tests import it from conftest

LEAK_GRACE = 2.0  # seconds a thread or child may take to finish after its test


@pytest.fixture(params=["py", "c"], ids=["py", "c"])
def impl(request: pytest.FixtureRequest) -> str:
    """The matcher core to test: the Python twin or the native extension."""
    if request.param == "c" and os.environ.get("OFFSCAN_NO_EXTENSIONS"):
        pytest.skip("OFFSCAN_NO_EXTENSIONS: pure Python build")
    return request.param


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request: pytest.FixtureRequest) -> str:
    """An event loop ``offscan serve --loop`` takes (uvloop skipped where it is missing)."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop not installed")
    return str(request.param)


def make_db(*texts: str, name: str = "t.ndb") -> PatternDB:
    """A PatternDB from database text; several texts become several files named like ``name``."""
    stem, suffix = os.path.splitext(name)
    files = [(name if i == 0 else f"{stem}{i}{suffix}", text) for i, text in enumerate(texts)]
    return PatternDB.from_text(files)


def make_matcher(text: str, impl: str, **kwargs: object) -> Matcher:
    """A Matcher for ``.ndb`` text (one signature per line)."""
    return Matcher(make_db(text), impl=impl, **kwargs)  # type: ignore[arg-type]


def _children() -> set[int]:
    """Pids of this process's live children, from /proc (no psutil)."""
    me = os.getpid()
    out: set[int] = set()
    for task in Path(f"/proc/{me}/task").iterdir():
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        out.update(int(pid) for pid in text.split())
    if not out:
        # /proc/<pid>/task/<tid>/children needs CONFIG_PROC_CHILDREN; fall back to a scan.
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == me and fields[0] != "Z":
                out.add(int(entry.name))
    return {pid for pid in out if _alive(pid)}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture(autouse=True)
def no_leaks() -> object:
    """Fail a test that leaves threads or child processes running after it."""
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        children = _children() - children_before
        if (not threads and not children) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    problems = []
    if threads:
        problems.append(f"leaked threads: {[t.name for t in threads]}")
    if children:
        problems.append(f"leaked child processes: {sorted(children)}")
    if problems:
        pytest.fail("; ".join(problems))
