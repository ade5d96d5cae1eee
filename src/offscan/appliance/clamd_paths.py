"""Where a clamd ``SCAN``-family path may lead: inside the operator's scan roots, never out.

A client names absolute paths; each must lie under one of the configured roots (lexically,
after ``.``/``..`` are folded: nothing is resolved by the kernel's path walk). The file or
directory is then reached from the root component by component with ``O_NOFOLLOW``
(:mod:`offscan.confine`), so a symlink anywhere is refused, not followed. Directories are walked
the same way, to a bounded depth, skipping symlinks and special files as clamd does by default.
Reads directories only; opens nothing for writing.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence

from ..confine import ConfinementError, check_relpath

__all__ = ["Target", "kind", "resolve", "walk"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_WALK_ENTRIES = 1_000_000  # files one SCAN may name (a bound on the reply's memory)


class Target:
    """A client path inside a root: ``root`` (real path), ``rel`` ("" for the root itself)."""

    __slots__ = ("root", "rel", "shown")

    def __init__(self, root: str, rel: str, shown: str) -> None:
        self.root, self.rel, self.shown = root, rel, shown

    def display(self, rel: str) -> str:
        """How a file under this target is named in replies: the root joined with ``rel``."""
        return self.root.rstrip("/") + "/" + rel if rel else self.root


def resolve(roots: Sequence[str], path: str) -> Target:
    """The target a client path names, or ConfinementError when it is outside every root."""
    if not roots:
        raise ConfinementError("no scan roots are configured (serve --clamd-root DIR)")
    if "\0" in path:
        raise ConfinementError("path contains a NUL byte")
    if not path.startswith("/"):
        raise ConfinementError("a full path is required")
    norm = os.path.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    for root in roots:
        if norm == root:
            return Target(root, "", path)
        if norm.startswith(root.rstrip("/") + "/"):
            rel = norm[len(root.rstrip("/")) + 1 :]
            check_relpath(rel)
            return Target(root, rel, path)
    raise ConfinementError("outside the scan roots")


def _open_dir(root: str, parts: list[str]) -> int:
    """A descriptor of ``root/parts...`` as a directory, never following a symlink."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts:
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        raise ConfinementError(f"component {name!r} is a symlink") from None
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def kind(target: Target) -> str:
    """``"dir"``, ``"file"``, ``"symlink"`` or ``"special"`` (lstat, parents walked confined);
    OSError (ENOENT...) or ConfinementError as they come."""
    if not target.rel:
        return "dir"
    parts = target.rel.split("/")
    fd = _open_dir(target.root, parts[:-1])
    try:
        mode = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode
    finally:
        os.close(fd)
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "special"


def walk(target: Target, max_depth: int) -> Iterator[tuple[str, str | None]]:
    """``(rel, None)`` for every regular file under a directory target, depth-first in name
    order, and ``(rel, reason)`` for a directory that could not be read. Symlinks and special
    files are skipped; directories deeper than ``max_depth`` are not entered."""
    count = 0

    def visit(rel: str, depth: int) -> Iterator[tuple[str, str | None]]:
        nonlocal count
        try:
            fd = _open_dir(target.root, rel.split("/") if rel else [])
        except OSError as exc:
            yield rel, exc.strerror or str(exc)
            return
        found: list[tuple[str, bool]] = []  # (name, is a directory), read while fd is open
        try:
            for e in sorted(os.scandir(fd), key=lambda e: e.name):
                try:
                    if e.is_symlink():
                        continue
                    if e.is_dir(follow_symlinks=False):
                        found.append((e.name, True))
                    elif e.is_file(follow_symlinks=False):
                        found.append((e.name, False))
                except OSError:
                    continue
        except OSError as exc:
            yield rel, exc.strerror or str(exc)
            return
        finally:
            os.close(fd)
        for name, is_dir in found:
            child = f"{rel}/{name}" if rel else name
            if is_dir:
                if depth < max_depth:
                    yield from visit(child, depth + 1)
                continue
            count += 1
            if count > MAX_WALK_ENTRIES:
                yield child, f"more than {MAX_WALK_ENTRIES} files in one scan"
                return
            yield child, None

    yield from visit(target.rel, 0)
