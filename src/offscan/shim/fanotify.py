"""A small ctypes binding of Linux fanotify: permission events for on-access prevention.

fanotify has no well-kept Python library; the two calls it needs beyond ``read``/``write``
(``fanotify_init``, ``fanotify_mark``) come from libc through :mod:`ctypes`, and the event
loop is ``select.poll`` plus ``os.read``, both of which release the GIL while they wait. No
native extension is needed (the per-event work is a ``struct.unpack``), so there is no twin.

:class:`FanotifyGroup` is one notification group in ``FAN_CLASS_CONTENT`` (permission events):
mark a mount or directories, :meth:`~FanotifyGroup.read` events, :meth:`~FanotifyGroup.respond`
``FAN_ALLOW``/``FAN_DENY`` to each permission event. It touches nothing but the group's
descriptor and the paths it is asked to mark. :func:`unavailable` says, in one line, why this
kernel or process cannot hold opens (None when it can).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
from dataclasses import dataclass

__all__ = [
    "FAN_CLOSE_WRITE",
    "FAN_EVENT_ON_CHILD",
    "FAN_ONDIR",
    "FAN_OPEN_EXEC_PERM",
    "FAN_OPEN_PERM",
    "FAN_PERM_EVENTS",
    "FanotifyError",
    "FanotifyEvent",
    "FanotifyGroup",
    "unavailable",
]

# <linux/fanotify.h>: event bits (the mask of a mark and of an event)
FAN_CLOSE_WRITE = 0x0000_0008
FAN_Q_OVERFLOW = 0x0000_4000
FAN_OPEN_PERM = 0x0001_0000
FAN_ACCESS_PERM = 0x0002_0000
FAN_OPEN_EXEC_PERM = 0x0004_0000
FAN_EVENT_ON_CHILD = 0x0800_0000
FAN_ONDIR = 0x4000_0000
FAN_PERM_EVENTS = FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_OPEN_EXEC_PERM

# fanotify_init flags
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_CONTENT = 0x04
FAN_UNLIMITED_QUEUE = 0x10  # permission events are never dropped; this keeps the rest too
FAN_UNLIMITED_MARKS = 0x20  # directory mode marks every directory of a VM tree

# fanotify_mark flags
FAN_MARK_ADD = 0x001
FAN_MARK_REMOVE = 0x002
FAN_MARK_DONT_FOLLOW = 0x004
FAN_MARK_MOUNT = 0x010

# fanotify_response.response
FAN_ALLOW = 0x01
FAN_DENY = 0x02

FAN_NOFD = -1
AT_FDCWD = -100
FANOTIFY_METADATA_VERSION = 3

# struct fanotify_event_metadata {u32 event_len; u8 vers; u8 reserved; u16 metadata_len;
# aligned_u64 mask; s32 fd; s32 pid;}: 24 bytes, native byte order.
_METADATA = struct.Struct("=IBBHQii")
# struct fanotify_response {s32 fd; u32 response;}
_RESPONSE = struct.Struct("=iI")
READ_BUFFER = 64 << 10  # bytes per read: ~2,700 events of 24 bytes


class FanotifyError(OSError):
    """fanotify cannot be used here (kernel, privileges, limits); the message says why."""


@dataclass(frozen=True, slots=True)
class FanotifyEvent:
    """One event: what happened (``mask``), the file opened for us (``fd``, ours to close;
    -1 on an overflow), and the process that caused it (``pid``, its thread group id)."""

    mask: int
    fd: int
    pid: int

    @property
    def permission(self) -> bool:
        """The kernel holds the access until we :meth:`~FanotifyGroup.respond`."""
        return bool(self.mask & FAN_PERM_EVENTS)


def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    lib.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    lib.fanotify_init.restype = ctypes.c_int
    lib.fanotify_mark.argtypes = [
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint64,
        ctypes.c_int,
        ctypes.c_char_p,
    ]
    lib.fanotify_mark.restype = ctypes.c_int
    return lib


_LIB: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        try:
            _LIB = _libc()
        except (OSError, AttributeError) as exc:
            raise FanotifyError(errno.ENOSYS, f"libc has no fanotify ({exc})") from None
    return _LIB


def _explain(err: int, what: str) -> str:
    if err == errno.EPERM:
        return (
            f"{what}: operation not permitted (permission events need CAP_SYS_ADMIN: run as root)"
        )
    if err in (errno.ENOSYS, errno.EINVAL):
        return f"{what}: not supported by this kernel ({os.strerror(err)})"
    return f"{what}: {os.strerror(err)}"


class FanotifyGroup:
    """One fanotify group in ``FAN_CLASS_CONTENT``: marks, events, responses.

    The group descriptor is non-blocking; :meth:`read` waits in ``poll`` on it and on a wake
    pipe, so :meth:`wake` (from any thread) ends a wait at once. Closing the group makes the
    kernel allow every permission event still unanswered, so an open is never left hanging.
    """

    def __init__(self) -> None:
        lib = _lib()
        flags = FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK | FAN_UNLIMITED_QUEUE
        flags |= FAN_UNLIMITED_MARKS
        event_flags = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC
        fd = lib.fanotify_init(flags, event_flags)
        if fd < 0:
            err = ctypes.get_errno()
            raise FanotifyError(err, _explain(err, "fanotify_init(FAN_CLASS_CONTENT)"))
        self.fd = fd
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._poll.register(self._wake_r, select.POLLIN)
        self.closed = False

    def mark(
        self,
        path: str | None,
        mask: int,
        *,
        mount: bool = False,
        dirfd: int = AT_FDCWD,
        follow: bool = True,
    ) -> None:
        """Add ``mask`` to the mark of ``path`` (an inode; its mount with ``mount``). With
        ``path=None`` the object ``dirfd`` refers to is marked; ``follow=False`` marks a
        symlink itself rather than what it points to."""
        lib = _lib()
        flags = FAN_MARK_ADD | (FAN_MARK_MOUNT if mount else 0)
        flags |= 0 if follow else FAN_MARK_DONT_FOLLOW
        raw = None if path is None else os.fsencode(path)
        if lib.fanotify_mark(self.fd, flags, mask, dirfd, raw) < 0:
            err = ctypes.get_errno()
            raise FanotifyError(err, _explain(err, f"fanotify_mark({path or dirfd})"))

    def read(self, timeout: float | None = None) -> list[FanotifyEvent]:
        """The events queued now, after waiting up to ``timeout`` seconds (None: until an
        event or :meth:`wake`); empty when woken or timed out. Blocks off the GIL."""
        ms = -1 if timeout is None else max(int(timeout * 1000), 0)
        ready = self._poll.poll(ms)
        if any(fd == self._wake_r for fd, _ in ready):
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        try:
            buf = os.read(self.fd, READ_BUFFER)
        except BlockingIOError:
            return []
        return list(self._parse(buf))

    @staticmethod
    def _parse(buf: bytes) -> list[FanotifyEvent]:
        events = []
        off = 0
        while off + _METADATA.size <= len(buf):
            event_len, vers, _, _, mask, fd, pid = _METADATA.unpack_from(buf, off)
            if vers != FANOTIFY_METADATA_VERSION or event_len < _METADATA.size:
                raise FanotifyError(errno.EPROTO, f"fanotify metadata version {vers} not known")
            events.append(FanotifyEvent(mask, fd, pid))
            off += event_len
        return events

    def respond(self, fd: int, allow: bool) -> None:
        """Answer the permission event of ``fd``: the held access proceeds or fails (EPERM).
        Does not close ``fd``."""
        os.write(self.fd, _RESPONSE.pack(fd, FAN_ALLOW if allow else FAN_DENY))

    def wake(self) -> None:
        """End a :meth:`read` waiting in another thread."""
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken, or closed

    def close(self) -> None:
        """Close the group: the kernel allows whatever is still held and removes the marks."""
        if self.closed:
            return
        self.closed = True
        for fd in (self.fd, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


# statx(2): the 64-bit mount id that is never reused (Linux 6.8+), to notice a root that was
# mounted again (mountinfo's ids and tmpfs device numbers are reused at once).
STATX_MNT_ID_UNIQUE = 0x4000
AT_SYMLINK_NOFOLLOW = 0x100
_STATX_SIZE = 256  # bytes of struct statx
_STATX_MNT_ID_OFFSET = 144  # struct statx.stx_mnt_id


def unique_mount_id(path: str) -> int | None:
    """The never-reused id of the mount ``path`` is on, or None where the kernel (or libc)
    has no ``STATX_MNT_ID_UNIQUE``."""
    try:
        lib = _lib()
        statx = lib.statx
    except (FanotifyError, AttributeError):
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p]
    statx.restype = ctypes.c_int
    if statx(AT_FDCWD, os.fsencode(path), AT_SYMLINK_NOFOLLOW, STATX_MNT_ID_UNIQUE, buf) != 0:
        return None
    (mask,) = struct.unpack_from("=I", buf.raw, 0)
    if not mask & STATX_MNT_ID_UNIQUE:
        return None
    mnt_id: int = struct.unpack_from("=Q", buf.raw, _STATX_MNT_ID_OFFSET)[0]
    return mnt_id


def unavailable() -> str | None:
    """Why this process cannot hold opens with fanotify permission events, or None."""
    try:
        group = FanotifyGroup()
    except FanotifyError as exc:
        return exc.strerror or str(exc)
    group.close()
    return None
