"""The quarantine vault: infected files moved out of a VM root, atomically, with their metadata.

A vault is a private directory (mode 0700) outside every VM root. Each entry is two files:
``<id>.bin``, the content (mode 0600, never executable), and ``<id>.json``, its metadata
(VM, root, original path, SHA-256 of the vault copy, size, signatures, time, mode). Both are
put in place with a rename, so a crash leaves either the old state or the new one.

Paths inside a VM root are walked one component at a time with ``openat(O_NOFOLLOW)`` (the same
rule as :mod:`offscan.confine`): a symlink on the way is refused, never followed, both when a
file is taken out of a root and when it is restored into one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._fsutil import atomic_write, fsync_dir, write_all
from .confine import ConfinementError, check_relpath

__all__ = ["QuarantineEntry", "QuarantineError", "Vault"]

BLOB_SUFFIX = ".bin"
META_SUFFIX = ".json"
META_VERSION = 1
COPY_CHUNK = 1 << 20  # bytes per read when copying or hashing
log = logging.getLogger(__name__)
_ID_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,63}")  # no '/', no '.', so no '..' either
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SRC_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class QuarantineError(Exception):
    """A quarantine, restore or delete was refused or failed; the message says why."""


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined file: where it came from, what it was, and why it was taken."""

    id: str  # time-based + random; safe as a file name
    vm: str
    root: str  # the VM root at quarantine time
    path: str  # relative to ``root``
    digest: str  # SHA-256 hex of the vault copy
    size: int
    signatures: tuple[str, ...]
    time: float  # seconds since the epoch
    mode: int  # permission bits of the original (st_mode & 0o7777)
    uid: int = -1  # owner of the original, restored when running as root (-1: unknown)
    gid: int = -1

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["signatures"] = list(self.signatures)
        d["version"] = META_VERSION
        return d

    @classmethod
    def from_json(cls, data: Any, *, id: str) -> QuarantineEntry:
        """Validate metadata read from disk (it may have been edited by hand or damaged)."""
        if not isinstance(data, dict):
            raise QuarantineError(f"quarantine entry {id}: metadata is not a JSON object")
        if not isinstance(data.get("signatures"), list):
            raise QuarantineError(f"quarantine entry {id}: malformed metadata: signatures")
        try:
            entry = cls(
                id=data["id"],
                vm=data["vm"],
                root=data["root"],
                path=data["path"],
                digest=data["digest"],
                size=data["size"],
                signatures=tuple(data["signatures"]),
                time=float(data["time"]),
                mode=data["mode"],
                uid=data.get("uid", -1),
                gid=data.get("gid", -1),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise QuarantineError(f"quarantine entry {id}: malformed metadata ({exc!r})") from None
        strs = (entry.vm, entry.root, entry.path, entry.digest)
        ints = (entry.size, entry.mode, entry.uid, entry.gid)
        checks = [
            (entry.id == id, "id does not match its file name"),
            (all(isinstance(v, str) for v in strs), "vm, root, path and digest must be strings"),
            (all(isinstance(s, str) for s in entry.signatures), "signatures must be strings"),
            (all(type(v) is int for v in ints), "size, mode, uid and gid must be integers"),
        ]
        for ok, why in checks:
            if not ok:
                raise QuarantineError(f"quarantine entry {id}: malformed metadata: {why}")
        return entry


class Vault:
    """A quarantine vault outside every VM root: files moved in atomically with metadata.

    Thread-safe: the appliance calls it from its scan pool. Refusing a vault that overlaps a
    registered VM root is the caller's job; :meth:`inside` and :meth:`overlaps` answer it.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        path = Path(directory)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise QuarantineError(f"quarantine vault {str(path)!r} is not a directory")
        if stat.S_IMODE(st.st_mode) & 0o077:  # an existing directory may have been too open
            os.chmod(path, 0o700)
        self.directory = Path(os.path.realpath(path))
        self._lock = threading.Lock()
        self._busy: set[str] = set()  # ids being restored or deleted

    def __repr__(self) -> str:
        return f"Vault({str(self.directory)!r})"

    # -- where the vault is --------------------------------------------------------------

    def inside(self, path: str | os.PathLike[str]) -> bool:
        """True if ``path`` is the vault or lies beneath it (symlinks resolved)."""
        return _within(os.path.realpath(path), str(self.directory))

    def overlaps(self, path: str | os.PathLike[str]) -> bool:
        """True if ``path`` and the vault contain one another (either way): such a VM root
        would let a guest see or reach quarantined files, or put the vault inside a VM."""
        real = os.path.realpath(path)
        return _within(real, str(self.directory)) or _within(str(self.directory), real)

    # -- taking a file out of a VM ----------------------------------------------------------

    def quarantine(
        self,
        *,
        vm: str,
        root: str,
        path: str,
        signatures: Sequence[str],
        expect_ino: int | None = None,
    ) -> QuarantineEntry:
        """Move ``root/path`` into the vault and return its entry.

        The path is walked confined (no ``..``, no symlinks); only a regular file is taken, and
        only the inode ``expect_ino`` when given, so a file swapped since its scan is not moved
        blindly. On one filesystem the move is a single rename; across filesystems (EXDEV), or
        when the file has other hard links (the vault copy must not stay reachable from the VM),
        it is copied from the checked descriptor, synced and renamed into the vault before the
        original is unlinked: the file is always in one place or the other, never in neither.
        """
        try:
            parts = check_relpath(path)
        except ConfinementError as exc:
            raise QuarantineError(f"quarantine of {vm}:{path}: {exc}") from None
        sigs = tuple(str(s) for s in signatures)
        entry_id = _new_id()
        blob = self._blob(entry_id)
        where = f"{vm}:{path}"
        try:
            parentfd = _walk(root, parts[:-1], path, create=False)
        except OSError as exc:  # ConfinementError too: _oserr gives its message
            raise QuarantineError(f"quarantine of {where}: {_oserr(exc)}") from None
        srcfd = -1
        try:
            name = parts[-1]
            srcfd, st = _open_source(parentfd, name, where)
            if expect_ino is not None and st.st_ino != expect_ino:
                raise QuarantineError(
                    f"quarantine of {where}: the file changed since it was scanned "
                    f"(inode {st.st_ino}, expected {expect_ino}); not moved"
                )
            # Reserve the id: rename() would silently replace an existing blob.
            os.close(os.open(blob, _NEW_FLAGS, 0o600))
            try:
                renamed = st.st_nlink == 1 and self._rename_in(parentfd, name, st, blob, where)
                if not renamed:
                    self._copy_in(srcfd, st, blob, where)
                    _unlink_original(parentfd, name, st, where)
            except _KeptInVault:
                raise
            except BaseException:  # the original is still in the VM: drop the vault side
                _unlink_quiet(blob)
                raise
            # Committed: the file is in the vault and nowhere else. Later failures keep it there.
            self._settle(blob, srcfd, parentfd, renamed)
            try:
                entry = self._record(entry_id, vm, root, parts, sigs, st, blob)
            except OSError as exc:  # the file is safe in the vault; say where
                raise QuarantineError(
                    f"quarantine of {where}: moved to {blob} but its metadata could not be "
                    f"written: {_oserr(exc)}"
                ) from None
            return entry
        except OSError as exc:
            raise QuarantineError(f"quarantine of {where}: {_oserr(exc)}") from None
        finally:
            if srcfd >= 0:
                os.close(srcfd)
            os.close(parentfd)

    def _record(
        self,
        entry_id: str,
        vm: str,
        root: str,
        parts: Sequence[str],
        sigs: tuple[str, ...],
        st: os.stat_result,
        blob: str,
    ) -> QuarantineEntry:
        """Digest the vault copy and write the entry's metadata next to it."""
        digest, size = _sha256_file(blob)
        entry = QuarantineEntry(
            id=entry_id,
            vm=vm,
            root=os.path.abspath(root),
            path="/".join(parts),
            digest=digest,
            size=size,
            signatures=sigs,
            time=time.time(),
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
        )
        self._write_meta(entry)
        return entry

    def _rename_in(
        self, parentfd: int, name: str, st: os.stat_result, blob: str, where: str
    ) -> bool:
        """Rename into the vault; False if the vault is on another filesystem (EXDEV)."""
        try:
            os.rename(name, blob, src_dir_fd=parentfd)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return False
            raise
        moved = os.lstat(blob)
        if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
            # Swapped between the check and the rename: put it back without replacing anything.
            try:
                os.link(blob, name, dst_dir_fd=parentfd)
            except OSError as exc:
                raise _KeptInVault(
                    f"quarantine of {where}: the file was replaced during the move and could "
                    f"not be put back ({_oserr(exc)}); it is kept in the vault as {blob}"
                ) from None
            os.unlink(blob)
            raise QuarantineError(f"quarantine of {where}: the file was replaced during the move")
        return True

    def _copy_in(self, srcfd: int, st: os.stat_result, blob: str, where: str) -> None:
        """Copy from the checked descriptor to a synced temporary file renamed over ``blob``.

        Not ``atomic_write``: the copy streams from a descriptor and the source is re-checked
        between the copy and the rename. Durable (fsync file and directory): the original is
        unlinked right after, so the vault copy must survive a power loss.
        """
        tmp = str(self.directory / f".{_new_id()}.tmp")
        tmpfd = os.open(tmp, _NEW_FLAGS, 0o600)
        try:
            try:
                _copy_fd(srcfd, tmpfd)
                os.fsync(tmpfd)
            finally:
                os.close(tmpfd)
            after = os.fstat(srcfd)
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                raise QuarantineError(
                    f"quarantine of {where}: the file was written to while it was copied; not moved"
                )
            os.replace(tmp, blob)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        fsync_dir(str(self.directory))

    def _settle(self, blob: str, srcfd: int, parentfd: int, renamed: bool) -> None:
        """After the move: owner-only, never executable, and durable; best effort (the file
        is already out of the VM, so a failure here must not undo that)."""
        try:
            if renamed:  # the open descriptor is the blob's inode
                os.fchmod(srcfd, 0o600)
            fsync_dir(str(self.directory))
            os.fsync(parentfd)
        except OSError as exc:
            log.warning("quarantine blob %s: could not finish (%s)", blob, _oserr(exc))

    # -- reading the vault -----------------------------------------------------------------

    def list(self) -> list[QuarantineEntry]:
        """Every entry whose metadata is readable, oldest first (malformed ones are skipped;
        :meth:`get` names the problem)."""
        out = []
        for child in self.directory.iterdir():
            ident = child.name[: -len(META_SUFFIX)]
            if not child.name.endswith(META_SUFFIX) or not _ID_RE.fullmatch(ident):
                continue
            try:
                out.append(self.get(ident))
            except QuarantineError:
                continue
        out.sort(key=lambda e: (e.time, e.id))
        return out

    def get(self, id: str) -> QuarantineEntry:
        """The entry ``id``; QuarantineError if it is unknown, malformed or not a valid id."""
        meta = self._meta(_check_id(id))
        try:
            with open(meta, "rb") as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            raise QuarantineError(f"no quarantine entry {id!r}") from None
        except (OSError, ValueError) as exc:
            raise QuarantineError(f"quarantine entry {id}: unreadable metadata ({exc})") from None
        return QuarantineEntry.from_json(data, id=id)

    # -- putting a file back, or dropping it -----------------------------------------------

    def restore(self, id: str, *, root: str | None = None, overwrite: bool = False) -> str:
        """Write entry ``id`` back to its original path under ``root`` (default: the root it
        came from; pass the VM's current root from the inventory) and drop it from the vault.

        Confined like the quarantine: an absolute path, ``..`` or a symlink anywhere on the
        way is refused; missing parent directories are created inside the root only; an
        existing file is kept unless ``overwrite``. The original mode comes back (permission
        bits only, never set-id), and the owner too when running as root. Returns the
        absolute path written.
        """
        entry = self.get(id)
        with self._claim(entry.id):
            target_root = os.path.abspath(root if root is not None else entry.root)
            where = f"{entry.vm}:{entry.path}"
            failed = f"restore of {entry.id} to {where}"
            try:
                parts = check_relpath(entry.path)
            except ConfinementError as exc:
                raise QuarantineError(f"{failed}: {exc}") from None
            try:
                srcfd = os.open(self._blob(entry.id), _SRC_FLAGS)
            except FileNotFoundError:
                raise QuarantineError(
                    f"quarantine entry {entry.id}: its content is missing"
                ) from None
            except OSError as exc:
                raise QuarantineError(f"quarantine entry {entry.id}: {_oserr(exc)}") from None
            try:
                parentfd = _walk(target_root, parts[:-1], entry.path, create=True)
            except OSError as exc:  # ConfinementError too: _oserr gives its message
                os.close(srcfd)
                raise QuarantineError(f"{failed}: {_oserr(exc)}") from None
            try:
                self._write_back(entry, srcfd, parentfd, parts[-1], overwrite, where)
            except OSError as exc:
                raise QuarantineError(f"{failed}: {_oserr(exc)}") from None
            finally:
                os.close(srcfd)
                os.close(parentfd)
            self._remove(entry.id)
            return os.path.join(target_root, *parts)

    def _write_back(
        self,
        entry: QuarantineEntry,
        srcfd: int,
        parentfd: int,
        name: str,
        overwrite: bool,
        where: str,
    ) -> None:
        existing = _lstat_at(parentfd, name)
        refused = f"restore of {entry.id} to {where}"
        if existing is not None:
            if stat.S_ISLNK(existing.st_mode):
                raise QuarantineError(f"{refused}: the target is a symlink")
            if not stat.S_ISREG(existing.st_mode):
                raise QuarantineError(f"{refused}: the target exists and is not a file")
            if not overwrite:
                raise QuarantineError(f"{refused}: the target exists (use overwrite)")
        # Write a temporary file next to the target, then link (no overwrite) or rename it in.
        tmp = f".offscan-restore-{secrets.token_hex(8)}"
        tmpfd = os.open(tmp, _NEW_FLAGS, 0o600, dir_fd=parentfd)
        try:
            try:
                _copy_fd(srcfd, tmpfd)
                if os.geteuid() == 0 and entry.uid >= 0:
                    os.fchown(tmpfd, entry.uid, entry.gid)
                os.fchmod(tmpfd, entry.mode & 0o777)
                os.fsync(tmpfd)
            finally:
                os.close(tmpfd)
            if overwrite:
                os.rename(tmp, name, src_dir_fd=parentfd, dst_dir_fd=parentfd)
            else:
                _link_no_replace(parentfd, tmp, name, entry, where)
        finally:
            _unlink_quiet(tmp, dir_fd=parentfd)
        os.fsync(parentfd)

    def delete(self, id: str) -> None:
        """Drop entry ``id`` (content and metadata) for good."""
        entry = self.get(id)
        with self._claim(entry.id):
            self._remove(entry.id)

    def _remove(self, id: str) -> None:
        # Content first: an interrupted delete leaves a listed entry that can be deleted again,
        # never an unlisted blob.
        try:
            _unlink_quiet(self._blob(id))
            os.unlink(self._meta(id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise QuarantineError(f"quarantine entry {id}: {_oserr(exc)}") from None
        fsync_dir(str(self.directory))

    @contextlib.contextmanager
    def _claim(self, id: str) -> Iterator[None]:
        """Only one restore or delete of an id at a time (a second one is refused, not queued)."""
        with self._lock:
            if id in self._busy:
                raise QuarantineError(f"quarantine entry {id} is being restored or deleted")
            self._busy.add(id)
        try:
            yield
        finally:
            with self._lock:
                self._busy.discard(id)

    # -- storage ---------------------------------------------------------------------------

    def _blob(self, id: str) -> str:
        return str(self.directory / f"{id}{BLOB_SUFFIX}")

    def _meta(self, id: str) -> str:
        return str(self.directory / f"{id}{META_SUFFIX}")

    def _write_meta(self, entry: QuarantineEntry) -> None:
        # Durable (fsync): the metadata is what lists the entry, and the blob is already out of
        # the VM, so after a power loss the entry must be there whole or not at all.
        data = json.dumps(entry.to_json(), sort_keys=True, indent=1)
        atomic_write(self._meta(entry.id), data, fsync=True, mode=0o600)


class _KeptInVault(QuarantineError):
    """A failure after which the file stays in the vault (it must not be unlinked)."""


def _new_id() -> str:
    """``YYYYmmddTHHMMSS-<micro>-<random>``: sorts by time, unique, safe as a file name."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}-{int(now * 1e6) % 1_000_000:06d}-{secrets.token_hex(5)}"


def _check_id(id: object) -> str:
    if not isinstance(id, str) or not _ID_RE.fullmatch(id):
        raise QuarantineError(f"malformed quarantine id {id!r}")
    return id


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _walk(root: str, dirs: Sequence[str], relpath: str, *, create: bool) -> int:
    """A descriptor of ``root/dirs...``, opened one component at a time without following
    symlinks; with ``create``, missing directories are made (inside the root only)."""
    dirfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in dirs:
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=dirfd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o755, dir_fd=dirfd)
                except FileExistsError:  # raced with someone else: judge what is there now
                    pass
                nxt = _open_dir_at(dirfd, name, relpath)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                nxt = _open_dir_at(dirfd, name, relpath)
            os.close(dirfd)
            dirfd = nxt
        return dirfd
    except BaseException:
        os.close(dirfd)
        raise


def _open_dir_at(dirfd: int, name: str, relpath: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dirfd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise ConfinementError(f"path {relpath!r}: component {name!r} is a symlink") from None
        raise ConfinementError(f"path {relpath!r}: component {name!r} is not a directory") from None


def _open_source(parentfd: int, name: str, where: str) -> tuple[int, os.stat_result]:
    """Open the file to quarantine; only a regular file, never through a symlink."""
    try:
        st = os.stat(name, dir_fd=parentfd, follow_symlinks=False)
    except FileNotFoundError:
        raise QuarantineError(f"quarantine of {where}: no such file") from None
    if stat.S_ISLNK(st.st_mode):
        raise QuarantineError(f"quarantine of {where}: it is a symlink")
    if not stat.S_ISREG(st.st_mode):
        raise QuarantineError(f"quarantine of {where}: not a regular file")
    fd = os.open(name, _SRC_FLAGS, dir_fd=parentfd)
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
        os.close(fd)
        raise QuarantineError(f"quarantine of {where}: the file was replaced while opening it")
    return fd, fst


def _unlink_original(parentfd: int, name: str, st: os.stat_result, where: str) -> None:
    now = os.stat(name, dir_fd=parentfd, follow_symlinks=False)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        raise QuarantineError(
            f"quarantine of {where}: the file was replaced while it was copied; not moved"
        )
    os.unlink(name, dir_fd=parentfd)


def _lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _link_no_replace(
    parentfd: int, tmp: str, name: str, entry: QuarantineEntry, where: str
) -> None:
    """Put ``tmp`` in place as ``name`` unless ``name`` exists, atomically (link fails with
    EEXIST); on filesystems without hard links, check then rename."""
    exists = f"restore of {entry.id} to {where}: the target exists (use overwrite)"
    try:
        os.link(tmp, name, src_dir_fd=parentfd, dst_dir_fd=parentfd, follow_symlinks=False)
        return
    except FileExistsError:
        raise QuarantineError(exists) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    if _lstat_at(parentfd, name) is not None:
        raise QuarantineError(exists)
    os.rename(tmp, name, src_dir_fd=parentfd, dst_dir_fd=parentfd)


def _copy_fd(src: int, dst: int) -> None:
    os.lseek(src, 0, os.SEEK_SET)
    while chunk := os.read(src, COPY_CHUNK):
        write_all(dst, chunk)


def _sha256_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    fd = os.open(path, _SRC_FLAGS)
    try:
        while chunk := os.read(fd, COPY_CHUNK):
            h.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest(), size


def _unlink_quiet(path: str, *, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _oserr(exc: OSError) -> str:
    """Why an OSError happened; a ConfinementError (no strerror) gives its whole message."""
    return exc.strerror or str(exc)
