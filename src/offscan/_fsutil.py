"""Durable file writes, in one place so durability is a decision and not an accident.

Every state file offscan keeps (inventory, verdict-cache snapshots, quarantine metadata, pattern
store, keys, bundles, lab results) is replaced atomically: written beside its target, flushed,
renamed over it. ``fsync=True`` (the default) also syncs the file and its directory, so after a
power loss the reader sees either the old or the new content, never an empty file; callers that
write scratch output pass ``fsync=False`` and say why.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Union

StrPath = Union[str, "os.PathLike[str]"]

DEFAULT_MODE = 0o644  # a state file's permissions unless the caller narrows them


def fsync_dir(path: StrPath) -> None:
    """Make a rename or create inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written (it may write fewer than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write(
    path: StrPath, data: bytes | str, *, fsync: bool = True, mode: int = DEFAULT_MODE
) -> None:
    """Replace ``path`` with ``data`` atomically: readers see the old or the new file, whole.

    The temporary file is created beside the target with ``O_EXCL`` and permissions ``mode``
    from the start (a private key is never readable by others, not even for a moment), then
    renamed over the target. With ``fsync`` the data and the directory entry are synced first.
    A failure removes the temporary file and leaves the target as it was.
    """
    target = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            write_all(fd, payload)
            os.fchmod(fd, mode)  # the umask may have narrowed it
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(target.parent)
