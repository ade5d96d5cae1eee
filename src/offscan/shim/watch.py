"""The watchdog side of the shim: one inotify observer per VM root, and what it may record.

:class:`_VM` owns a VM's observer (start, stop, health check); :class:`_Handler` runs on the
observer's thread and only records paths in the :class:`~offscan.shim.backlog.Backlog` (the
writer in the VM is never held up); :class:`_OverflowWatch` hears watchdog report a kernel
queue overflow and makes running shims re-walk their VMs. :func:`_skip_reason` and
:class:`Skips` say (and count) which files are not scanned. This module touches the VM roots
only through ``os.stat`` and watchdog; it never opens a file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from .backlog import ACCESS, FILE, TREE, Backlog
from .spec import VMSpec

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

log = logging.getLogger("offscan.shim")

# Only what the shim reacts to: the inotify mask is built from this list, so ordinary writes
# (IN_MODIFY), opens and reads never even wake the observer threads.
_EVENT_FILTER = [FileClosedEvent, FileCreatedEvent, FileMovedEvent, DirMovedEvent, DirCreatedEvent]


def _skip_reason(mode: int) -> str | None:
    """Why a file of this type is not scanned, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special file"


class Skips:
    """Files not scanned, counted by reason; walker threads and senders both report here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_reason: dict[str, int] = {}

    def note(self, vm: str, relpath: str, reason: str) -> None:
        with self._lock:
            self._by_reason[reason] = self._by_reason.get(reason, 0) + 1
        if reason == "vanished":
            log.debug("VM %s: %s vanished before it was scanned", vm, relpath)
        else:
            log.info("VM %s: skipped %s (%s)", vm, relpath, reason)

    def by_reason(self) -> dict[str, int]:
        """A copy of the counts, by reason."""
        with self._lock:
            return dict(self._by_reason)


class _Handler(FileSystemEventHandler):
    """Runs on a watchdog thread: turns an event into a backlog record and nothing more.

    ``connected()`` says whether the shim is online right now: what is recorded while it is
    not is marked as a replay.
    """

    def __init__(self, backlog: Backlog, vm: str, root: str, connected: Callable[[], bool]) -> None:
        self._backlog = backlog
        self._connected = connected
        self._vm = vm
        self._root = root
        self._prefix = root.rstrip(os.sep) + os.sep

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            if isinstance(event, (FileClosedEvent, FileCreatedEvent)):
                self._note(event.src_path, FILE)
            elif isinstance(event, FileMovedEvent):
                # A move inside the root scans the destination; a move out has nothing to scan.
                self._note(event.dest_path, FILE)
            elif isinstance(event, DirMovedEvent):
                self._note(event.dest_path, TREE)
            elif isinstance(event, DirCreatedEvent):
                # inotify reports a directory moved in from outside the root as a creation;
                # walking it (off this thread) catches files that raced its watch being added.
                self._note(event.src_path, TREE)
        except Exception:  # pragma: no cover - a bug here must not kill the observer
            log.exception("VM %s: failed to record %r", self._vm, event)

    def _note(self, path: bytes | str, kind: str) -> None:
        path = os.fsdecode(path)
        if not path.startswith(self._prefix):
            return  # outside the root (or the root itself)
        relpath = path[len(self._prefix) :]
        if os.sep != "/":  # pragma: no cover
            relpath = relpath.replace(os.sep, "/")
        self._backlog.record(
            self._vm, relpath, prio=ACCESS, kind=kind, replay=not self._connected()
        )


class _VM:
    """A VM the shim protects: its spec, resolved root and watcher."""

    def __init__(self, spec: VMSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.root = os.path.realpath(os.path.abspath(spec.root))
        self.observer: BaseObserver | None = None
        self.root_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the watched root
        self.watch_busy = False  # a start/stop of the observer is running in a thread
        self.missing_logged = False
        self.activating = True  # until its first activation ran; the watch keeper leaves it alone
        self.limit_hit = False  # the watch failed on inotify limits (root present, files walked)
        # relpath -> (ino, size, mtime_ns, ctime_ns) of files the appliance verdicted when it
        # registered this clone (its register reply); the activation walk skips those unchanged
        self.inherited: dict[str, tuple[int, int, int, int]] | None = None

    def start_watch(self, backlog: Backlog, connected: Callable[[], bool]) -> bool:
        """Start this VM's observer (blocking: inotify adds a watch per directory); its events
        go to ``backlog``, marked as replays while ``connected()`` is false."""
        st = os.stat(self.root)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "VM root is not a directory", self.root)
        observer = Observer()
        observer.name = f"offscan-shim-{self.name}"
        try:
            observer.schedule(
                _Handler(backlog, self.name, self.root, connected),
                self.root,
                recursive=True,
                event_filter=_EVENT_FILTER,
            )
            observer.start()
        except BaseException:
            _stop_observer(observer)
            raise
        self.observer = observer
        self.root_id = (st.st_dev, st.st_ino)
        return True

    def stop_watch(self) -> None:
        observer, self.observer = self.observer, None
        self.root_id = None
        if observer is not None:
            _stop_observer(observer)

    def watch_healthy(self) -> bool:
        """The observer runs and still watches the directory now at ``root``."""
        observer = self.observer
        if observer is None or not observer.is_alive():
            return False
        if not observer.emitters or any(not e.is_alive() for e in list(observer.emitters)):
            return False  # the emitter stops itself when the root is deleted
        try:
            st = os.stat(self.root)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.root_id


def _shutdown_race(record: logging.LogRecord) -> bool:
    """Drop watchdog's "queue_events() called when the thread is inactive": an emitter whose
    observer is being stopped (the shim stopping, or a VM unregistered) read one more event.
    Nothing is lost (the VM is no longer watched), but watchdog logs it as an error, and it
    reached the user's terminal at the end of `offscan demo` and `offscan shim`."""
    return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_shutdown_race)


def _stop_observer(observer: BaseObserver) -> None:
    try:
        observer.stop()
    except Exception:  # pragma: no cover - watchdog internals on a half-dead observer
        log.debug("stopping observer", exc_info=True)
    with contextlib.suppress(RuntimeError):  # never started
        observer.join(timeout=5.0)


class _OverflowWatch(logging.Handler):
    """Hears watchdog report an inotify queue overflow (events lost in the kernel, which
    watchdog only logs) and makes every running shim re-walk its VMs, so those writes still
    get verdicts.

    Each running shim attaches a listener (called with no arguments, on watchdog's thread)
    that owes a walk of all its VMs; the handler sits on watchdog's logger only while at least
    one listener is attached.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.listeners: set[Callable[[], None]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" not in str(record.msg):
            return
        for listener in list(self.listeners):
            log.error("inotify queue overflowed: events were lost; re-walking every VM")
            listener()

    def attach(self, listener: Callable[[], None]) -> None:
        if not self.listeners:
            logging.getLogger(_OVERFLOW_LOGGER).addHandler(self)
        self.listeners.add(listener)

    def detach(self, listener: Callable[[], None]) -> None:
        self.listeners.discard(listener)
        if not self.listeners:
            logging.getLogger(_OVERFLOW_LOGGER).removeHandler(self)


_OVERFLOW_LOGGER = "watchdog.observers.inotify_c"
_overflow_watch = _OverflowWatch()
