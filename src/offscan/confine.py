"""Open a file named by a client strictly inside a VM root (no ``..``, no symlink escapes).

The appliance never resolves a client path with the kernel's full path walk: it opens the root,
then every component with ``openat(dirfd, name, O_NOFOLLOW)``, so a symlink anywhere on the
way (``a/link/b`` or a final ``link``) is refused instead of followed out of the root.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import TypeVar

from ._statwalk import dir_of, identify_many
from .cache.memo import Identity

__all__ = [
    "ConfinementError",
    "check_relpath",
    "identify_confined_many",
    "open_confined",
    "open_confined_many",
    "open_root",
    "stat_confined_many",
]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_DIR_FDS = 64  # directory descriptors open_confined_many keeps open at once
_T = TypeVar("_T")
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class ConfinementError(PermissionError):
    """The requested path would leave the VM root (or names something that is not a file)."""


def check_relpath(relpath: str) -> list[str]:
    """The components of a client path, or ConfinementError if it is absolute or escapes."""
    if not isinstance(relpath, str) or not relpath:
        raise ConfinementError("empty path")
    if "\0" in relpath:
        raise ConfinementError("path contains a NUL byte")
    if relpath.startswith("/"):
        raise ConfinementError(f"absolute path {relpath!r} (paths are relative to the VM root)")
    parts = relpath.split("/")
    if "" in parts or "." in parts or ".." in parts:  # else nothing to drop (the common case)
        parts = [p for p in parts if p not in ("", ".")]
        if ".." in parts:
            raise ConfinementError(f"path {relpath!r} contains '..'")
        if not parts:
            raise ConfinementError(f"path {relpath!r} names the root itself")
    return parts


def open_root(root: str) -> int:
    """A directory descriptor of the (resolved, absolute) VM root, opened from ``/`` one
    component at a time with ``O_NOFOLLOW``: a root, or a directory above it, swapped for a
    symlink after registration is refused instead of followed (ConfinementError)."""
    if not os.path.isabs(root):
        raise ConfinementError(f"VM root {root!r} is not absolute")
    dirfd = os.open("/", _DIR_FLAGS)
    try:
        for name in [p for p in root.split("/") if p]:
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ConfinementError(
                        f"VM root {root!r}: {name!r} is a symlink or not a directory"
                    ) from None
                raise
            os.close(dirfd)
            dirfd = nxt
    except BaseException:
        os.close(dirfd)
        raise
    return dirfd


def open_confined(root: str, relpath: str, *, strict_root: bool = False) -> int:
    """Open ``root/relpath`` read-only as a regular file, never leaving ``root``.

    With ``strict_root`` (the appliance: a root a client registered) the root itself is
    opened by :func:`open_root`, so no symlink on its own path is followed either.
    Raises ConfinementError for escapes, symlinks and special files (FIFOs are never opened),
    FileNotFoundError when it vanished, other OSErrors as they come.
    """
    parts = check_relpath(relpath)
    if strict_root:
        dirfd = open_root(root)
    else:  # a root the caller trusts (the shim's own --vm): resolved by the kernel
        dirfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in parts[:-1]:
            nxt = _open_dir(name, dirfd, relpath)
            os.close(dirfd)
            dirfd = nxt
        name = parts[-1]
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise ConfinementError(f"path {relpath!r} is a symlink")
        if not stat.S_ISREG(st.st_mode):
            raise ConfinementError(f"path {relpath!r} is not a regular file")
        fd = os.open(name, _FILE_FLAGS, dir_fd=dirfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between stat and open
            os.close(fd)
            raise ConfinementError(f"path {relpath!r} is not a regular file")
        return fd
    finally:
        os.close(dirfd)


def open_confined_many(
    root: str, relpaths: list[str], *, strict_root: bool = False
) -> list[tuple[int, os.stat_result] | OSError]:
    """:func:`open_confined` for many paths under one root, each with its ``fstat``: the
    same checks component by component, but every directory on the way is opened once per
    call, not once per path (a batch of files in a few directories costs about one
    ``openat`` and one ``fstat`` per file). A path that cannot be opened gets its exception
    (ConfinementError, FileNotFoundError...) in its place in the list; ``strict_root`` as
    for :func:`open_confined` (an error opening the root itself is raised)."""
    return _walk_many(root, relpaths, _open_last, strict_root)


def stat_confined_many(
    root: str, relpaths: list[str], *, strict_root: bool = False
) -> list[os.stat_result | OSError]:
    """What :func:`open_confined_many` would ``fstat``, without opening the files: the same
    walk (every directory opened with ``O_NOFOLLOW``, once per call), then ``fstatat`` of the
    last component with ``AT_SYMLINK_NOFOLLOW``. Refuses exactly what it refuses, the same
    way (ConfinementError for a symlink anywhere, a special file, ``..``, an absolute path),
    and costs one ``fstatat`` per file: the cache-hit path learns a file's identity with it
    and opens the file (:func:`open_confined_many`) only when the identity is unknown."""
    return _walk_many(root, relpaths, _stat_last, strict_root)


def identify_confined_many(
    root: str, relpaths: list[str], source: str, *, strict_root: bool = False
) -> list[Identity | OSError]:
    """The :class:`~.cache.Identity` (under ``source``) of what :func:`stat_confined_many`
    would stat, or its exception: the same walk, the same refusals. The cache-hit path's
    lookup: plain paths go through :func:`~._statwalk.identify_many` (native when built: one
    ``fstatat`` and a tuple, no ``os.stat_result``); a path it declines (not plain, or
    anything failed) is walked again here, which refuses or reports it as always."""
    dirs: dict[str, int] = {}
    try:
        dirs[""] = _open_root_fd(root, strict_root)
        out: list[Identity | OSError | None] = list(
            identify_many(dirs, relpaths, source, Identity, MAX_DIR_FDS)
        )
        for i, ident in enumerate(out):
            if ident is None:
                relpath = relpaths[i]
                try:
                    name, dirfd = _walk(dirs, relpath)
                    out[i] = Identity.from_stat(source, _stat_last(dirfd, name, relpath))
                except OSError as exc:
                    out[i] = exc
    finally:
        for fd in dirs.values():
            os.close(fd)
    return out  # type: ignore[return-value]  # every None was replaced


def _open_root_fd(root: str, strict_root: bool) -> int:
    if strict_root:
        return open_root(root)
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _walk_many(
    root: str, relpaths: list[str], last: Callable[[int, str, str], _T], strict_root: bool
) -> list[_T | OSError]:
    out: list[_T | OSError] = []
    dirs: dict[str, int] = {}  # "a/b" (normalised components) -> its descriptor; "" the root
    try:
        dirs[""] = _open_root_fd(root, strict_root)
        for relpath in relpaths:
            if len(dirs) > MAX_DIR_FDS:  # bounded: deep trees must not exhaust descriptors
                for key in [k for k in dirs if k]:
                    os.close(dirs.pop(key))
            try:
                name, dirfd = _walk(dirs, relpath)
                out.append(last(dirfd, name, relpath))
            except OSError as exc:
                out.append(exc)
    finally:
        for fd in dirs.values():
            os.close(fd)
    return out


def _walk(dirs: dict[str, int], relpath: str) -> tuple[str, int]:
    """The last component of ``relpath`` and the descriptor of its directory (opened, and
    kept in ``dirs``, one component at a time, never through a symlink). A directory
    already in ``dirs`` costs one lookup of its normalised name."""
    parts = check_relpath(relpath)
    return parts[-1], dir_of(dirs, parts, lambda name, dirfd: _open_dir(name, dirfd, relpath))


def _stat_last(dirfd: int, name: str, relpath: str) -> os.stat_result:
    # As open_confined: a symlink or a special file is refused, never followed.
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise ConfinementError(f"path {relpath!r} is a symlink")
    if not stat.S_ISREG(st.st_mode):
        raise ConfinementError(f"path {relpath!r} is not a regular file")
    return st


def _open_last(dirfd: int, name: str, relpath: str) -> tuple[int, os.stat_result]:
    _stat_last(dirfd, name, relpath)  # never open a symlink or a special file (a device's
    fd = os.open(name, _FILE_FLAGS, dir_fd=dirfd)  # open may act)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):  # swapped between stat and open
        os.close(fd)
        raise ConfinementError(f"path {relpath!r} is not a regular file")
    return fd, st


def _open_dir(name: str, dirfd: int, relpath: str) -> int:
    """One directory component under ``dirfd``, never through a symlink (ConfinementError)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise ConfinementError(
                    f"path {relpath!r}: component {name!r} is a symlink"
                ) from None
        raise
