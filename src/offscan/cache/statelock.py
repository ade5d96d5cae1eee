"""The state-directory lock: one verdict cache per state directory, across processes.

``verdicts.lock`` in the state directory is held with ``flock`` for as long as a
:class:`~offscan.cache.VerdictCache` uses the directory, and holds the holder's pid so a refusal
can name it. Creates and writes that one file; closing its descriptor releases the lock.
"""

from __future__ import annotations

import fcntl
import os

from .errors import StateDirLockedError

LOCK_NAME = "verdicts.lock"


def lock_state_dir(state_dir: str) -> int:
    """Take ``state_dir``'s lock; returns the descriptor that holds it (close it to release).

    Raises :class:`StateDirLockedError` when another process, or another cache in this one,
    holds it.
    """
    lock_path = os.path.join(state_dir, LOCK_NAME)
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(lock_fd)
        raise StateDirLockedError(
            f"state directory {state_dir} is in use (pid {holder} holds {LOCK_NAME}); "
            "give each appliance its own --state directory, or stop the other one"
        ) from None
    except BaseException:
        os.close(lock_fd)
        raise
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    return lock_fd
