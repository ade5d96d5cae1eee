"""Reference twin of ``ext/_statwalk.pyx``: the identities of plain client paths, confined.

:func:`identify_many` is the cache-hit path's fast lookup (see ``confine.identify_confined_many``):
for each path it either returns the file's :class:`~offscan.cache.Identity`, learnt exactly
as the confined walk learns it (every directory opened with ``O_NOFOLLOW | O_DIRECTORY`` from
the root's descriptor, kept in ``dirs``; the file ``fstatat``-ed with ``AT_SYMLINK_NOFOLLOW``
and a regular file), or None: the path is not plain, or something on the way failed. None
means "ask the Python walk", which refuses or reports exactly what it always has; this module
never decides that a path is wrong, it only declines. The native module must give the same
answers and leave ``dirs`` the same.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import TypeVar

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_I = TypeVar("_I", bound=tuple[str, int, int, int, int, int])  # an Identity


def identify_many(
    dirs: dict[str, int], relpaths: list[str], source: str, cls: type[_I], max_dirs: int
) -> list[_I | None]:
    """``cls((source, dev, ino, size, mtime_ns, ctime_ns))`` (a tuple subclass, built with
    ``tuple.__new__``, skipping its own constructor) of each plain path's regular
    file under ``dirs[""]`` (the root's descriptor), or None. A plain path is a non-empty str,
    valid UTF-8, with no NUL, not absolute, and no empty, ``.`` or ``..`` component: what
    ``check_relpath`` passes unchanged. Directories opened on the way are added to ``dirs``
    (the caller closes them); before each path, once ``dirs`` holds more than ``max_dirs``,
    every one but the root is closed and forgotten (bounded descriptors)."""
    out: list[_I | None] = []
    for relpath in relpaths:
        if len(dirs) > max_dirs:
            for key in [k for k in dirs if k]:
                os.close(dirs.pop(key))
        out.append(_one(dirs, relpath, source, cls))
    return out


def dir_of(dirs: dict[str, int], parts: list[str], open_dir: Callable[[str, int], int]) -> int:
    """The descriptor of the directory holding ``parts[-1]`` (the normalised components of
    a path): each directory not yet in ``dirs`` (keyed by its components joined with "/",
    "" the root) opened by ``open_dir(name, parent_fd)`` and kept there. A directory already
    in ``dirs`` costs one lookup. Shared with ``confine``'s walk, which refuses what fails."""
    dirfd = dirs.get("/".join(parts[:-1]))
    if dirfd is None:
        key = ""
        dirfd = dirs[key]
        for name in parts[:-1]:
            key = f"{key}/{name}" if key else name
            nxt = dirs.get(key)
            if nxt is None:
                nxt = dirs[key] = open_dir(name, dirfd)
            dirfd = nxt
    return dirfd


def _open_dir(name: str, dirfd: int) -> int:
    return os.open(name, _DIR_FLAGS, dir_fd=dirfd)


def _one(dirs: dict[str, int], relpath: str, source: str, cls: type[_I]) -> _I | None:
    if type(relpath) is not str or not relpath or relpath[0] == "/" or "\0" in relpath:
        return None
    try:
        relpath.encode("utf-8")  # the native module reads the UTF-8 form: no lone surrogates
    except UnicodeEncodeError:
        return None
    parts = relpath.split("/")
    if "" in parts or "." in parts or ".." in parts:
        return None
    try:
        dirfd = dir_of(dirs, parts, _open_dir)
        st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return tuple.__new__(
        cls, (source, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    )
