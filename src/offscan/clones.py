"""Clone a master VM image on the appliance, so clones inherit the master's verdicts unread.

The appliance makes the copy itself (reflink where the filesystem offers it, else an in-kernel
``copy_file_range``: no byte passes through the scanner), and for every copied file whose
master identity did not change during the copy it records *clone identity → master digest*.
A clone's activation scan then finds its files in that memo by ``fstat`` alone: no read, no
hash, no match. Any later write to a clone file changes its mtime/ctime (ctime cannot be set
from user space), so a changed file misses the memo and is read and matched like any other.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .cache import Identity, IdentityMemo

__all__ = ["CloneStats", "clone_tree"]

FICLONE = 0x40049409  # ioctl: share extents (btrfs, xfs, bcachefs); linux/fs.h


@dataclass
class CloneStats:
    files: int = 0
    inherited: int = 0  # files whose verdict is inherited from the master
    bytes_copied: int = 0
    reflinked: int = 0
    seconds: float = 0.0


def _copy_content(src: int, dst: int, size: int) -> bool:
    """Copy without reading into user space; True if the extents were shared (reflink)."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return True
    except OSError as exc:
        if exc.errno not in (
            errno.EOPNOTSUPP,
            errno.EXDEV,
            errno.EINVAL,
            errno.ENOTTY,
            errno.EBADF,
        ):
            raise
    offset = 0
    while offset < size:
        n = os.copy_file_range(src, dst, size - offset, offset, offset)
        if n == 0:
            break
        offset += n
    return False


def clone_tree(
    master_root: str, dest_root: str, memo: IdentityMemo, inherit: IdentityMemo
) -> CloneStats:
    """Copy ``master_root`` to the new directory ``dest_root``; seed ``inherit`` with the clone
    identities of files whose master digest ``memo`` knows."""
    t0 = time.monotonic()
    stats = CloneStats()
    dest = Path(dest_root)
    dest.mkdir(parents=True, exist_ok=False)
    for dirpath, dirnames, filenames in os.walk(master_root):
        rel = os.path.relpath(dirpath, master_root)
        target_dir = dest if rel == "." else dest / rel
        for d in dirnames:
            src = os.path.join(dirpath, d)
            if os.path.islink(src):
                os.symlink(os.readlink(src), target_dir / d)
            else:
                (target_dir / d).mkdir(mode=stat.S_IMODE(os.lstat(src).st_mode) | 0o700)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            src = os.path.join(dirpath, name)
            st = os.lstat(src)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), target_dir / name)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # FIFOs, devices and sockets are not part of an image copy
            sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                before = Identity.from_stat("local", os.fstat(sfd))
                dfd = os.open(
                    target_dir / name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    stat.S_IMODE(st.st_mode),
                )
                try:
                    if _copy_content(sfd, dfd, st.st_size):
                        stats.reflinked += 1
                    os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
                    clone_ident = Identity.from_stat("local", os.fstat(dfd))
                finally:
                    os.close(dfd)
                after = Identity.from_stat("local", os.fstat(sfd))
            finally:
                os.close(sfd)
            stats.files += 1
            stats.bytes_copied += st.st_size
            digest = memo.get(before)
            if digest is not None and after == before:
                inherit.put(clone_ident, digest)
                stats.inherited += 1
    stats.seconds = time.monotonic() - t0
    return stats
