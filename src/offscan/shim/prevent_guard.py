"""One VM root under on-access prevention: its fanotify group, its marks and its reader thread.

A :class:`Guard` holds every open (and exec) of a file under its VM root until it answers.
Its reader thread answers at once what needs no verdict (the shim's and the appliance's own
opens, directories, special files, paths outside the root, policy exclusions, identity-memo
hits) and hands the rest to its :class:`~offscan.shim.prevent.Prevention` as :class:`Held`
opens, which end in :meth:`Guard.answer` exactly once: the verdict, the fail mode after the
timeout (:meth:`Guard.expire`), or the fail mode at :meth:`Guard.stop`.

The reader thread never opens a file under the root (it would wait on itself): it only
``fstat``\\ s and ``readlink``\\ s the descriptors fanotify opened for it. It touches the
group's descriptor, the event descriptors and, in directory mode, the root's directories
(to mark them).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import threading
import time
from typing import TYPE_CHECKING, Literal

from ..policy import excluded
from .fanotify import (
    FAN_CLOSE_WRITE,
    FAN_EVENT_ON_CHILD,
    FAN_ONDIR,
    FAN_OPEN_EXEC_PERM,
    FAN_OPEN_PERM,
    FAN_Q_OVERFLOW,
    FanotifyError,
    FanotifyEvent,
    FanotifyGroup,
    unique_mount_id,
)

if TYPE_CHECKING:
    from .prevent import Prevention

log = logging.getLogger("offscan.shim")

Identity = tuple[int, int, int, int, int]  # (dev, ino, size, mtime_ns, ctime_ns)
Mode = Literal["mount", "directories"]
Outcome = Literal["timeouts", "unreachable"]

MOUNT_MASK = FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM | FAN_CLOSE_WRITE
# Directory mode: events of a marked directory's children, and opens of subdirectories so a
# new one is marked when it is first listed.
DIR_MASK = MOUNT_MASK | FAN_EVENT_ON_CHILD | FAN_ONDIR
READ_WAIT = 0.5  # seconds the reader waits in poll before checking for stop
MAX_DIR_MARKS = 200_000  # directories marked per VM at most (each pins an inode)
COUNTS = ("allowed", "denied", "timeouts", "unreachable", "memo_hits", "exempt")


class Held:
    """An open the kernel holds until the guard answers it."""

    __slots__ = ("deadline", "exec_", "fail_open", "fd", "identity", "relpath", "vm")

    def __init__(
        self,
        fd: int,
        vm: str,
        relpath: str,
        identity: Identity,
        *,
        deadline: float,
        fail_open: bool,
        exec_: bool,
    ) -> None:
        self.fd = fd
        self.vm = vm
        self.relpath = relpath
        self.identity = identity
        self.deadline = deadline  # monotonic; the fail mode answers then
        self.fail_open = fail_open
        self.exec_ = exec_


def mount_id(path: str) -> int | None:
    """The id of the mount on top at ``path``: statx's unique id, else mountinfo's (which the
    kernel may reuse at once), or None. Not the device number: a tmpfs mounted again may get
    the same anonymous device."""
    unique = unique_mount_id(path)
    if unique is not None:
        return unique
    found = None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split(b" ", 5)
                if len(fields) > 4 and _unescape(fields[4]) == path:
                    found = int(fields[0])  # the last one listed is the one on top
    except (OSError, ValueError):
        return None
    return found


def _unescape(raw: bytes) -> str:
    """mountinfo writes space, tab, newline and backslash in a path as octal escapes."""
    text = os.fsdecode(raw)
    if "\\" not in text:
        return text
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def identity_of(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Guard:
    """The fanotify group of one VM root (raises :class:`FanotifyError` when there is none)."""

    def __init__(self, vm: str, root: str, owner: Prevention) -> None:
        self.vm = vm
        self.root = os.path.realpath(root)
        self.owner = owner
        self.mode: Mode = "mount" if os.path.ismount(self.root) else "directories"
        self._mount = mount_id(self.root) if self.mode == "mount" else None
        self.group = FanotifyGroup()
        self.lock = threading.Lock()  # pending, counts, closed, and every loop-side respond
        self.pending: dict[int, Held] = {}
        self.counts = dict.fromkeys(COUNTS, 0)
        self.closed = False
        self._stopping = False
        self._marked: set[tuple[int, int]] = set()
        self._mark_lock = threading.Lock()
        self._marks_full_logged = False
        self._thread = threading.Thread(
            target=self._read_loop, name=f"offscan-prevent-{vm}", daemon=True
        )

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start reading, then mark (marking a tree opens its directories, which we answer)."""
        self._thread.start()
        try:
            if self.mode == "mount":
                self.group.mark(self.root, MOUNT_MASK, mount=True)
            else:
                self.rescan()
                if not self._marked:
                    raise FanotifyError(errno.ENOENT, f"cannot mark {self.root}")
        except BaseException:
            self.stop()
            raise

    def halt(self) -> None:
        """Ask a rescan in progress to end early (any thread); :meth:`stop` follows."""
        self._stopping = True
        self.group.wake()

    def stop(self) -> None:
        """Stop reading, answer every held open by its fail mode, close the group (the
        kernel allows whatever it still holds unread)."""
        self._stopping = True
        self.group.wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        with self.lock:
            self.closed = True
            for held in list(self.pending.values()):
                self._respond_locked(held, held.fail_open, None)
            self.pending.clear()
            self.group.close()

    def alive(self) -> bool:
        """The reader thread runs (if it died, opens would wait for it: restart the guard)."""
        return self._thread.is_alive()

    def stale(self) -> bool:
        """The root is not what was marked any more (unmounted, another mount there, a
        mount over a marked directory): the guard must be started again. A directory root
        that was re-created needs no restart: the next rescan marks the new tree."""
        if os.path.ismount(self.root) != (self.mode == "mount"):
            return True
        return self.mode == "mount" and mount_id(self.root) != self._mount

    def rescan(self) -> int:
        """Directory mode: mark directories not marked yet (new ones); the number marked."""
        if self.mode != "directories" or self._stopping:
            return 0
        added = 0
        for dirpath, _dirs, _files in os.walk(self.root):
            if self._stopping:
                break
            added += self._mark_dir(dirpath)
        return added

    def _mark_dir(
        self, path: str | None, dirfd: int = -100, st: os.stat_result | None = None
    ) -> int:
        try:
            st = st or os.lstat(path or "")
        except OSError:
            return 0
        key = (st.st_dev, st.st_ino)
        with self._mark_lock:
            if key in self._marked:
                return 0
            if len(self._marked) >= MAX_DIR_MARKS:
                if not self._marks_full_logged:
                    log.error(
                        "VM %s: %d directories marked; deeper new ones are not held "
                        "(make the root a mount point for full coverage)",
                        self.vm,
                        MAX_DIR_MARKS,
                    )
                    self._marks_full_logged = True
                return 0
            try:
                self.group.mark(path, DIR_MASK, dirfd=dirfd, follow=False)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF):
                    log.warning("VM %s: cannot mark %s: %s", self.vm, path or dirfd, exc)
                return 0
            self._marked.add(key)
            return 1

    # ---------------------------------------------------------------- answers

    def answer(self, held: Held, allow: bool, outcome: Outcome | None) -> bool:
        """Answer ``held`` unless it was answered already (then False). Any thread."""
        with self.lock:
            if self.closed or self.pending.get(held.fd) is not held:
                return False
            del self.pending[held.fd]
            self._respond_locked(held, allow, outcome)
            return True

    def dup_pending(self, held: Held) -> int | None:
        """A descriptor of ``held``'s file for a scan (the caller closes it), or None if it
        was answered meanwhile (its descriptor may already be another file's)."""
        with self.lock:
            if self.closed or self.pending.get(held.fd) is not held:
                return None
            return os.dup(held.fd)

    def expire(self, now: float) -> list[Held]:
        """Answer, by their fail mode, the held opens whose deadline passed; returns them."""
        with self.lock:
            late = [h for h in self.pending.values() if h.deadline <= now]
            for held in late:
                del self.pending[held.fd]
                self._respond_locked(held, held.fail_open, "timeouts")
            return late

    def held(self) -> int:
        with self.lock:
            return len(self.pending)

    def _respond_locked(self, held: Held, allow: bool, outcome: Outcome | None) -> None:
        try:
            self.group.respond(held.fd, allow)
        except OSError as exc:  # the group is gone: the kernel allowed it already
            log.debug("VM %s: answering %s: %s", self.vm, held.relpath, exc)
        os.close(held.fd)
        self.counts["allowed" if allow else "denied"] += 1
        if outcome is not None:
            self.counts[outcome] += 1

    def _respond_now(self, fd: int, allow: bool, count: str | None) -> None:
        """Answer an event the reader decided itself, and close its descriptor."""
        try:
            self.group.respond(fd, allow)
        except OSError as exc:  # the kernel no longer waits for it (or the group is gone)
            log.debug("VM %s: answering an open: %s", self.vm, exc)
        finally:
            os.close(fd)
        if count is not None:
            with self.lock:
                self.counts[count] += 1
                if count == "memo_hits":
                    self.counts["allowed" if allow else "denied"] += 1

    # ---------------------------------------------------------------- the reader thread

    def _read_loop(self) -> None:
        while not self._stopping:
            try:
                events = self.group.read(READ_WAIT)
            except OSError as exc:
                if self._stopping or self.group.closed:
                    return
                log.error("VM %s: reading fanotify events failed: %s", self.vm, exc)
                time.sleep(0.1)
                continue
            for ev in events:
                try:
                    self._handle(ev)
                except Exception:  # this thread must live: a dead reader hangs every open
                    log.exception("VM %s: handling a fanotify event failed", self.vm)

    def _handle(self, ev: FanotifyEvent) -> None:
        if ev.fd < 0:
            if ev.mask & FAN_Q_OVERFLOW:
                log.warning("VM %s: fanotify queue overflow; the watch re-walks", self.vm)
            return
        if not ev.permission:
            self._written(ev)
            return
        try:
            decision = self._decide(ev)
        except Exception as exc:  # never leave an open pending: answer by the fail mode
            log.error("VM %s: deciding on an open failed: %s", self.vm, exc)
            decision = self.owner.vm_settings(self.vm)[1], None
        if decision is not None:
            self._respond_now(ev.fd, *decision)

    def _relpath(self, fd: int) -> str | None:
        """The path of ``fd`` relative to the root, or None if it is outside."""
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(" (deleted)"):
            path = path[: -len(" (deleted)")]
        root = self.root
        if path == root:
            return ""
        if path.startswith(root) and path[len(root) : len(root) + 1] == "/":
            return path[len(root) + 1 :]
        return None

    def _decide(self, ev: FanotifyEvent) -> tuple[bool, str | None] | None:
        """(allow, what to count) for an open answered now; None: it is held (pending)."""
        owner = self.owner
        if owner.exempt(ev.pid):
            return True, "exempt"
        st = os.fstat(ev.fd)
        if stat.S_ISDIR(st.st_mode):
            if self.mode == "directories":
                self._mark_dir(None, ev.fd, st)
            return True, None
        if not stat.S_ISREG(st.st_mode):
            return True, None
        identity = identity_of(st)
        if self.mode == "mount":
            # Fast path: every file of the mount is under the root, so a memo hit needs no
            # path (the appliance judged exclusions when it gave the verdict).
            hit = owner.memo.get(identity)
            if hit is not None:
                return hit, "memo_hits"
        relpath = self._relpath(ev.fd)
        if relpath is None:  # directory mode: a marked directory was moved out of the root
            return True, None
        if st.st_size == 0:  # nothing to judge (and every new file is opened empty first)
            return True, "allowed"
        timeout, fail_open, policy = owner.vm_settings(self.vm)
        if excluded(policy, relpath, st.st_size) is not None:
            return True, None
        if self.mode != "mount":
            hit = owner.memo.get(identity)
            if hit is not None:
                return hit, "memo_hits"
        held = Held(
            ev.fd,
            self.vm,
            relpath,
            identity,
            deadline=time.monotonic() + timeout,
            fail_open=fail_open,
            exec_=bool(ev.mask & FAN_OPEN_EXEC_PERM),
        )
        with self.lock:
            if self.closed:
                return fail_open, None
            self.pending[ev.fd] = held
        owner.submit(self, held)
        return None

    def _written(self, ev: FanotifyEvent) -> None:
        """A file was closed after writing: scan it now through this descriptor so the next
        open finds its verdict in the memo (the watch still queues it for delivery)."""
        taken = False
        try:
            if self.owner.exempt(ev.pid):
                return
            st = os.fstat(ev.fd)
            if not stat.S_ISREG(st.st_mode):
                return
            relpath = self._relpath(ev.fd)
            if relpath is None or self.owner.memo.get(identity_of(st)) is not None:
                return
            taken = self.owner.prescan(self, ev.fd, relpath, identity_of(st))
        except OSError:
            pass
        finally:
            if not taken:
                os.close(ev.fd)
