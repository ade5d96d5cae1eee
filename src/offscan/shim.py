"""The shim: the GI-like thin agent that protects every VM on a host without an agent in any VM.

One :class:`Shim` per host watches each VM root with its own watchdog (inotify) observer and
streams file events to the appliance over one persistent connection. The watchdog threads only
*record* a path in the :class:`Backlog` (a lock, a dict update); everything else (coalescing,
the activation walk, opening files, talking to the appliance) happens on the asyncio loop or in
the shim's own worker threads, so a writer in a VM is never held up by scanning.

Delivery is at-least-once: a path stays in the backlog until its verdict arrives. When the
appliance is away the backlog is kept (bounded, de-duplicated by ``(vm, path)``) and replayed
after reconnecting and re-registering the VMs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import stat
import sys
import threading
import time
import json
import shlex
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

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

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

__all__ = [
    "Backlog",
    "Shim",
    "VMSpec",
    "add_shim_arguments",
    "run_shim_cli",
]

log = logging.getLogger("offscan.shim")

DEFAULT_QUIET = 0.05  # seconds without events before a file is sent (coalescing window)
DEFAULT_MAX_BACKLOG = 100_000  # entries (undelivered paths), across all VMs
DEFAULT_RECONNECT_MAX_DELAY = 2.0  # seconds, cap of the exponential reconnect backoff
DEFAULT_MAX_IN_FLIGHT = 32  # sender tasks; the appliance's credits may cap in-flight scans lower
RECONNECT_MIN_DELAY = 0.05  # seconds, first reconnect backoff step
CONNECT_TIMEOUT = 5.0  # seconds for connect + handshake
WATCH_CHECK_INTERVAL = 0.5  # seconds between checks that every VM root is still watched
DROP_LOG_INTERVAL = 5.0  # seconds between repeated "backlog full" log lines
WALK_WAIT_SLICE = 0.1  # seconds a blocked walk sleeps before re-checking for room/cancellation
WALK_WORKERS = 2  # threads walking directory trees (activation scans, moved-in directories)
ACTIVATION_HEAD = 8  # files queued at once on activation, even while big walks wait for room
MAX_REMOTE_RETRIES = 3  # unknown-vm answers tolerated per path (re-registering in between)

Prio = Literal["access", "demand"]
ACCESS: Prio = "access"  # live events: the appliance serves these first
DEMAND: Prio = "demand"  # activation walks and re-walks
FILE, TREE = "f", "t"  # entry kinds: a file to scan, a directory to walk

_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")

# Only what the shim reacts to: the inotify mask is built from this list, so ordinary writes
# (IN_MODIFY), opens and reads never even wake the observer threads.
_EVENT_FILTER = [FileClosedEvent, FileCreatedEvent, FileMovedEvent, DirMovedEvent, DirCreatedEvent]

Key = tuple[str, str, str]  # (vm, relpath, kind)


@dataclass(frozen=True)
class VMSpec:
    """A VM to protect: its name, the host directory holding its files, its lineage and policy."""

    name: str
    root: str
    clone_of: str | None = None
    policy: dict[str, Any] | None = None

    @classmethod
    def parse(cls, text: str) -> VMSpec:
        """``NAME=DIR`` as given to ``offscan shim --vm``."""
        name, sep, root = text.partition("=")
        if not sep or not name or not root:
            raise ValueError(f"expected NAME=DIR, got {text!r}")
        if not _VM_NAME.match(name):
            raise ValueError(
                f"bad VM name {name!r}: use letters, digits, '.', '_' and '-' "
                "(starting with a letter or digit, at most 128 characters)"
            )
        return cls(name=name, root=root)


class _Entry:
    """One undelivered path (or directory to walk) in the backlog."""

    __slots__ = ("dirty", "key", "last", "prio", "replay", "retries", "state")

    WAITING, READY, INFLIGHT = 0, 1, 2

    def __init__(self, key: Key, prio: Prio, now: float, replay: bool) -> None:
        self.key = key
        self.prio = prio
        self.last = now  # monotonic time of the last event
        self.state = self.WAITING
        self.dirty = False  # an event arrived while in flight: send again after the verdict
        self.replay = replay  # queued or in flight while the appliance was away
        self.retries = 0

    @property
    def vm(self) -> str:
        return self.key[0]

    @property
    def relpath(self) -> str:
        return self.key[1]

    @property
    def kind(self) -> str:
        return self.key[2]


class Backlog:
    """Bounded, de-duplicated map of undelivered work, safe to feed from watchdog threads.

    Each ``(vm, relpath, kind)`` is in one of three states: *waiting* for ``quiet`` seconds
    without new events (coalescing), *ready* to send (access before demand), or *in flight*.
    An entry leaves only when :meth:`done` is called for it (its verdict arrived), so
    everything not yet answered survives a lost connection. :meth:`record` never blocks;
    :meth:`record_walk` (for walker threads) waits for room instead of dropping.
    """

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_BACKLOG,
        *,
        quiet: float = DEFAULT_QUIET,
        on_wake: Callable[[], None] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        # Walks stop at 3/4 so live events always find room while a big activation scan waits.
        self.walk_limit = max(1, max_entries - max_entries // 4)
        self.quiet = quiet
        self.on_wake = on_wake  # called (outside the lock) when the first waiting entry arrives
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._entries: dict[Key, _Entry] = {}
        self._waiting: OrderedDict[Key, _Entry] = OrderedDict()  # by time of last event
        self._ready: dict[str, _FairQueue] = {ACCESS: _FairQueue(), DEMAND: _FairQueue()}
        self.events = 0  # live events recorded
        self.walked = 0  # files queued by directory walks
        self.coalesced = 0
        self.dropped = 0
        self.owed_walks: set[str] = set()  # VMs that lost events (full backlog, inotify overflow)
        self._last_drop_log = -1e9
        self._drops_since_log = 0

    def __len__(self) -> int:
        return len(self._entries)

    def counts(self) -> dict[str, int]:
        with self._lock:
            waiting = len(self._waiting)
            ready = sum(len(q) for q in self._ready.values())
            return {
                "waiting": waiting,
                "ready": ready,
                "in_flight": len(self._entries) - waiting - ready,
            }

    def record(
        self, vm: str, relpath: str, *, prio: Prio = ACCESS, kind: str = FILE, replay: bool = False
    ) -> bool:
        """Note an event for ``relpath`` now; False if it was dropped because the backlog is full."""
        key = (vm, relpath, kind)
        with self._lock:
            ok, wake = self._record_locked(key, prio, replay, live=True)
        if wake and self.on_wake is not None:
            self.on_wake()
        return ok

    def record_walk(
        self,
        vm: str,
        relpath: str,
        *,
        prio: Prio = DEMAND,
        kind: str = FILE,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Like :meth:`record` for walker threads: waits for room instead of dropping.

        Returns False only if ``cancelled()`` became true while waiting.
        """
        key = (vm, relpath, kind)
        with self._room:
            while key not in self._entries and len(self._entries) >= self.walk_limit:
                if cancelled():
                    return False
                self._room.wait(WALK_WAIT_SLICE)
            ok, wake = self._record_locked(key, prio, False, live=False)
        if wake and self.on_wake is not None:
            self.on_wake()
        return ok

    def record_head(self, vm: str, relpath: str) -> bool:
        """Queue a file of a VM being activated now, bounded only by ``max_entries``."""
        with self._lock:
            ok, wake = self._record_locked((vm, relpath, FILE), DEMAND, False, live=False)
        if wake and self.on_wake is not None:
            self.on_wake()
        return ok

    def _record_locked(
        self, key: Key, prio: Prio, replay: bool, *, live: bool
    ) -> tuple[bool, bool]:
        now = time.monotonic()
        if live:
            self.events += 1
        else:
            self.walked += 1
        entry = self._entries.get(key)
        if entry is not None:
            if prio == ACCESS:
                entry.prio = ACCESS
            entry.replay = entry.replay or replay
            entry.last = now
            wake = False
            if entry.state == _Entry.WAITING:
                self._waiting.move_to_end(key)
                self.coalesced += 1
            elif entry.state == _Entry.READY:
                # Written again before it was sent: restart its quiet period.
                for queue in self._ready.values():
                    queue.pop(key)
                entry.state = _Entry.WAITING
                wake = not self._waiting
                self._waiting[key] = entry
                self.coalesced += 1
            else:
                entry.dirty = True  # the scan under way may have read the old content
            return True, wake
        if len(self._entries) >= self.max_entries:
            self._note_drop(key, now)
            return False, False
        entry = _Entry(key, prio, now, replay)
        self._entries[key] = entry
        wake = not self._waiting
        self._waiting[key] = entry
        return True, wake

    def _note_drop(self, key: Key, now: float) -> None:
        self.dropped += 1
        self._drops_since_log += 1
        self.owed_walks.add(key[0])
        if now - self._last_drop_log >= DROP_LOG_INTERVAL:
            log.error(
                "backlog full (%d entries): dropped %d event(s) since last report, latest %s:%s; "
                "VMs %s will be re-walked once the backlog drains",
                self.max_entries,
                self._drops_since_log,
                key[0],
                key[1],
                ", ".join(sorted(self.owed_walks)),
            )
            self._last_drop_log = now
            self._drops_since_log = 0

    def next_due(self) -> float | None:
        """Monotonic time when the oldest waiting entry becomes due, or None."""
        with self._lock:
            for entry in self._waiting.values():
                return entry.last + self.quiet
            return None

    def promote_due(self, now: float | None = None) -> tuple[int, list[_Entry]]:
        """Move entries quiet for ``quiet`` seconds to *ready*; due directory walks are returned
        (already *in flight*) instead. Returns (files made ready, walks)."""
        now = time.monotonic() if now is None else now
        files, trees = 0, []
        with self._lock:
            while self._waiting:
                key, entry = next(iter(self._waiting.items()))
                if entry.last + self.quiet > now:
                    break
                del self._waiting[key]
                if entry.kind == TREE:
                    entry.state = _Entry.INFLIGHT
                    trees.append(entry)
                else:
                    entry.state = _Entry.READY
                    self._ready[entry.prio].add(key, entry)
                    files += 1
        return files, trees

    def take(self) -> _Entry | None:
        """The next ready entry (access before demand; VMs in turn, oldest first within a VM),
        now *in flight*."""
        with self._lock:
            for prio in (ACCESS, DEMAND):
                queue = self._ready[prio]
                if queue:
                    entry = queue.popleft()
                    entry.state = _Entry.INFLIGHT
                    return entry
            return None

    def done(self, entry: _Entry) -> None:
        """The entry's verdict arrived (or it needs none): forget it, unless it changed meanwhile."""
        wake = False
        with self._lock:
            if self._entries.get(entry.key) is not entry:
                return  # dropped with its VM
            if entry.dirty:
                entry.dirty = False
                entry.retries = 0
                entry.state = _Entry.WAITING
                entry.last = max(entry.last, time.monotonic())
                wake = not self._waiting
                self._waiting[entry.key] = entry
            else:
                del self._entries[entry.key]
                self._room.notify_all()
        if wake and self.on_wake is not None:
            self.on_wake()

    def requeue(self, entry: _Entry) -> None:
        """Delivery failed (connection lost): put the entry back at the front, marked for replay."""
        wake = False
        with self._lock:
            if self._entries.get(entry.key) is not entry or entry.state != _Entry.INFLIGHT:
                return
            entry.replay = True
            if entry.dirty or entry.kind == TREE:
                entry.dirty = False
                entry.state = _Entry.WAITING
                wake = not self._waiting
                self._waiting[entry.key] = entry
            else:
                entry.state = _Entry.READY
                self._ready[entry.prio].add(entry.key, entry, front=True)
        if wake and self.on_wake is not None:
            self.on_wake()

    def mark_replay(self) -> int:
        """Mark every entry as a replay (the connection it was meant for is gone)."""
        with self._lock:
            for entry in self._entries.values():
                entry.replay = True
            return len(self._entries)

    def count_vm(self, vm: str) -> int:
        """Entries of one VM not yet answered."""
        with self._lock:
            return sum(1 for key in self._entries if key[0] == vm)

    def drop_vm(self, vm: str) -> int:
        """Forget everything queued for ``vm`` (it was removed)."""
        with self._lock:
            keys = [k for k in self._entries if k[0] == vm]
            for key in keys:
                del self._entries[key]
                self._waiting.pop(key, None)
                for queue in self._ready.values():
                    queue.pop(key)
            self.owed_walks.discard(vm)
            self._room.notify_all()
            return len(keys)

    def owe_walk(self, vms: Iterable[str]) -> None:
        """Note that ``vms`` lost events and must be walked again once there is room."""
        with self._lock:
            self.owed_walks.update(vms)

    def take_owed_walks(self) -> set[str]:
        with self._lock:
            vms, self.owed_walks = self.owed_walks, set()
            return vms


class _FairQueue:
    """Ready entries served round-robin across VMs, oldest first within a VM, so a clone
    registered during a storm gets its first verdicts at once instead of waiting behind every
    earlier clone's activation walk (time-to-protect)."""

    def __init__(self) -> None:
        self._by_vm: OrderedDict[str, OrderedDict[Key, _Entry]] = OrderedDict()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, key: Key, entry: _Entry, *, front: bool = False) -> None:
        queue = self._by_vm.get(key[0])
        if queue is None:
            queue = self._by_vm[key[0]] = OrderedDict()
            if front:
                self._by_vm.move_to_end(key[0], last=False)
        if key not in queue:
            self._len += 1
        queue[key] = entry
        if front:
            queue.move_to_end(key, last=False)

    def pop(self, key: Key) -> None:
        queue = self._by_vm.get(key[0])
        if queue is not None and queue.pop(key, None) is not None:
            self._len -= 1
            if not queue:
                del self._by_vm[key[0]]

    def popleft(self) -> _Entry:
        vm, queue = next(iter(self._by_vm.items()))
        _, entry = queue.popitem(last=False)
        self._len -= 1
        if queue:
            self._by_vm.move_to_end(vm)  # next VM's turn
        else:
            del self._by_vm[vm]
        return entry


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


class _Handler(FileSystemEventHandler):
    """Runs on a watchdog thread: turns an event into a backlog record and nothing more."""

    def __init__(self, shim: Shim, vm: str, root: str) -> None:
        self._shim = shim
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
        self._shim._backlog.record(
            self._vm, relpath, prio=ACCESS, kind=kind, replay=not self._shim.connected
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

    def start_watch(self, shim: Shim) -> bool:
        """Start this VM's observer (blocking: inotify adds a watch per directory)."""
        st = os.stat(self.root)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "VM root is not a directory", self.root)
        observer = Observer()
        observer.name = f"offscan-shim-{self.name}"
        try:
            observer.schedule(
                _Handler(shim, self.name, self.root),
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


def _stop_observer(observer: BaseObserver) -> None:
    try:
        observer.stop()
    except Exception:  # pragma: no cover - watchdog internals on a half-dead observer
        log.debug("stopping observer", exc_info=True)
    with contextlib.suppress(RuntimeError):  # never started
        observer.join(timeout=5.0)


class Shim:
    """The GI-like thin agent for one host: watches every VM root and streams file events to the
    appliance over one connection. Never blocks the writer (watchdog threads only record the
    path), bounded memory, replays undelivered events after reconnecting.

    ``content`` says how the appliance gets file content: ``path`` (it opens the file itself,
    confined to the VM root), ``fd`` (the shim opens it and passes the descriptor), ``stream``
    (the shim sends the bytes; for TCP); ``auto`` picks ``path`` on a unix socket and
    ``stream`` on TCP. ``client_factory`` builds the appliance client (default
    :class:`offscan.protocol.ApplianceClient`); embedders and tests may substitute it.
    """

    def __init__(
        self,
        address: str,
        vms: Sequence[VMSpec],
        *,
        shim_id: str | None = None,
        secret: str | None = None,
        content: str = "auto",
        quiet: float = DEFAULT_QUIET,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY,
        on_verdict: Callable[[str, str, dict[str, Any]], None] | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        client_factory: Callable[..., Any] | None = None,
        isolation_hook: str | None = None,
        hook_timeout: float = 10.0,
    ) -> None:
        if content not in ("auto", "path", "fd", "stream"):
            raise ValueError(f"content must be auto, path, fd or stream, not {content!r}")
        if quiet < 0:
            raise ValueError("quiet must be >= 0 seconds")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.address = address
        # Stable across restarts: the appliance lets only the registering shim scan in a VM.
        self.shim_id = shim_id or f"shim-{os.uname().nodename}"
        self.secret = secret
        self.content = content
        self.quiet = quiet
        self.reconnect_max_delay = max(reconnect_max_delay, RECONNECT_MIN_DELAY)
        self.on_verdict = on_verdict
        self.max_in_flight = max_in_flight
        self._client_factory = client_factory
        self._backlog = Backlog(max_backlog, quiet=quiet, on_wake=self._wake_scheduler)
        self._vms: dict[str, _VM] = {}
        for spec in vms:
            if spec.name in self._vms:
                raise ValueError(f"VM {spec.name!r} given twice")
            self._vms[spec.name] = _VM(spec)
        self._counts = {
            "sent": 0,
            "verdicts": 0,
            "clean": 0,
            "infected": 0,
            "errors": 0,
            "replayed": 0,
            "reconnects": 0,
            "walks": 0,
        }
        self._skipped: dict[str, int] = {}
        self._skip_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._registered: set[str] = set()  # VMs registered on the current connection
        self._online = False  # connected and every VM registered: senders may send
        self._stop_requested = False
        self._walks_active = 0
        self._activating = 0
        self._walk_futures: set[asyncio.Future[int]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._walk_pool: ThreadPoolExecutor | None = None
        self._watch_pool: ThreadPoolExecutor | None = None
        self._closing = False
        self.isolation_hook = isolation_hook
        self.hook_timeout = hook_timeout
        self._policies: dict[str, dict[str, Any]] = {}  # effective policy from the appliance
        self._isolated: set[str] = set()  # fail-closed VMs currently tagged "unprotected"

    # ---------------------------------------------------------------- public API

    @property
    def connected(self) -> bool:
        """True while the shim is connected to the appliance with every VM registered."""
        return self._online

    async def run(self) -> None:
        """Protect the VMs until :meth:`stop`: connect (retrying with backoff), register, run the
        activation scans and stream events."""
        if self._loop is not None:
            raise RuntimeError("Shim.run() is already running (or has run)")
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._online_evt = asyncio.Event()
        self._lost = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._stop_requested:
            return
        self._walk_pool = ThreadPoolExecutor(WALK_WORKERS, thread_name_prefix="offscan-shim-walk")
        self._watch_pool = ThreadPoolExecutor(1, thread_name_prefix="offscan-shim-watch")
        overflow_logger = logging.getLogger(_OVERFLOW_LOGGER)
        if not _overflow_watch.shims:
            overflow_logger.addHandler(_overflow_watch)
        _overflow_watch.shims.add(self)
        try:
            self._tasks = [
                asyncio.create_task(self._connection_loop(), name="shim-connection"),
                asyncio.create_task(self._scheduler(), name="shim-scheduler"),
                asyncio.create_task(self._watch_keeper(), name="shim-watch-keeper"),
                asyncio.create_task(self._protection_keeper(), name="shim-fail-closed"),
            ]
            self._tasks += [
                asyncio.create_task(self._sender(), name=f"shim-sender-{i}")
                for i in range(self.max_in_flight)
            ]
            self._tasks += [
                asyncio.create_task(self._activate(vm), name=f"shim-activate-{vm.name}")
                for vm in list(self._vms.values())
            ]
            await self._stopped.wait()
        finally:
            _overflow_watch.shims.discard(self)
            if not _overflow_watch.shims:
                overflow_logger.removeHandler(_overflow_watch)
            await self._shutdown()

    def stop(self) -> None:
        """Ask :meth:`run` to finish (safe from any thread and from signal handlers)."""
        self._stop_requested = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._stopped.set()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._stopped.set)

    async def add_vm(self, spec: VMSpec) -> None:
        """Protect one more VM while running: register it, walk its root, watch it."""
        if spec.name in self._vms:
            raise ValueError(f"VM {spec.name!r} is already protected by this shim")
        vm = _VM(spec)
        self._vms[spec.name] = vm
        if self._loop is None:
            return  # run() will take care of it
        client = self._client
        if self._online and client is not None and spec.name not in self._registered:
            with contextlib.suppress(ConnectionError):
                await self._register(client, vm)
        await self._activate(vm)

    async def remove_vm(self, name: str) -> None:
        """Stop protecting ``name``: stop watching, forget its backlog, unregister it."""
        vm = self._vms.pop(name, None)
        if vm is None:
            raise KeyError(f"no VM named {name!r}")
        if self._watch_pool is not None:
            await self._in_thread(self._watch_pool, vm.stop_watch)
        else:
            vm.stop_watch()
        dropped = self._backlog.drop_vm(name)
        if dropped:
            log.info("VM %s removed: %d undelivered path(s) forgotten", name, dropped)
        client = self._client
        registered = name in self._registered
        self._registered.discard(name)
        if self._online and client is not None and registered:
            try:
                await client.unregister(name)
            except Exception as exc:  # noqa: BLE001 - the appliance may already have forgotten it
                log.warning("VM %s: unregister failed: %s", name, exc)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending, queued, walking or in flight; False on timeout.

        Idleness must hold for a short settling time so that events still inside the kernel or
        watchdog's queue (not yet recorded) are not mistaken for "nothing to do".
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        settle = max(2 * self.quiet, 0.1)
        idle_since: float | None = None
        while True:
            now = loop.time()
            if self._idle():
                idle_since = now if idle_since is None else idle_since
                if now - idle_since >= settle:
                    return True
            else:
                idle_since = None
            if now >= deadline:
                return False
            await asyncio.sleep(min(0.02, max(deadline - now, 0.001)))

    def stats(self) -> dict[str, Any]:
        """Counters: events seen, coalesced, sent, verdicts by status, skipped (with reasons),
        backlog size and state, replayed, reconnects, dropped."""
        with self._skip_lock:
            reasons = dict(self._skipped)
        counts = self._backlog.counts()
        return {
            "events": self._backlog.events,
            "walked": self._backlog.walked,
            "coalesced": self._backlog.coalesced,
            **{k: self._counts[k] for k in ("sent", "verdicts", "clean", "infected", "errors")},
            "skipped": sum(reasons.values()),
            "skipped_reasons": reasons,
            "backlog": len(self._backlog),
            **counts,
            "replayed": self._counts["replayed"],
            "reconnects": self._counts["reconnects"],
            "dropped": self._backlog.dropped,
            "walks": self._counts["walks"],
            "connected": self._online,
            "vms": len(self._vms),
            "watched": sum(1 for vm in self._vms.values() if vm.observer is not None),
        }

    # ---------------------------------------------------------------- internals

    def _idle(self) -> bool:
        return (
            len(self._backlog) == 0
            and self._walks_active == 0
            and self._activating == 0
            and not self._backlog.owed_walks
        )  # a re-walk is still owed

    def _wake_scheduler(self) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self._wake.set)

    async def _in_thread(self, pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(pool, fn, *args)

    def _skip(self, vm: str, relpath: str, reason: str) -> None:
        with self._skip_lock:
            self._skipped[reason] = self._skipped.get(reason, 0) + 1
        if reason == "vanished":
            log.debug("VM %s: %s vanished before it was scanned", vm, relpath)
        else:
            log.info("VM %s: skipped %s (%s)", vm, relpath, reason)

    async def _activate(self, vm: _VM) -> None:
        """Watch the VM root, then walk it so files already there get verdicts (watching first:
        a file written during the walk is then seen by one or the other)."""
        self._activating += 1
        vm.activating = True
        try:
            await self._start_watch(vm)
            # Walk even if the watch could not start (e.g. the inotify instance limit): existing
            # files still get verdicts while the watch keeps being retried.
            if self._vms.get(vm.name) is vm and os.path.isdir(vm.root) and not self._closing:
                # A clone storm can fill the backlog with earlier clones' walks; queue a few of
                # this VM's files right away so its first verdicts (time-to-protect) don't wait.
                assert self._watch_pool is not None
                await self._in_thread(self._watch_pool, self._walk_head, vm, ACTIVATION_HEAD)
                self._start_walk(vm, "", DEMAND, entry=None)
        finally:
            vm.activating = False
            self._activating -= 1

    async def _start_watch(self, vm: _VM) -> None:
        if vm.watch_busy or vm.observer is not None or self._closing:
            return
        vm.watch_busy = True
        try:
            assert self._watch_pool is not None
            await self._in_thread(self._watch_pool, vm.start_watch, self)
        except OSError as exc:
            vm.limit_hit = exc.errno in (errno.EMFILE, errno.ENOSPC)
            if vm.limit_hit and not vm.missing_logged:
                log.error(
                    "VM %s: cannot watch %s: %s; raise the inotify limits "
                    "(sysctl fs.inotify.max_user_instances / max_user_watches); retrying",
                    vm.name, vm.root, exc.strerror or exc,
                )
                vm.missing_logged = True
            elif not vm.missing_logged:
                log.warning(
                    "VM %s: cannot watch %s (%s); will retry while it is missing",
                    vm.name,
                    vm.root,
                    exc.strerror or exc,
                )
                vm.missing_logged = True
            return
        finally:
            vm.watch_busy = False
        if self._vms.get(vm.name) is not vm or self._closing:  # removed meanwhile
            assert self._watch_pool is not None
            await self._in_thread(self._watch_pool, vm.stop_watch)
            return
        if vm.missing_logged:
            log.warning("VM %s: %s is back; watching it again", vm.name, vm.root)
            vm.missing_logged = False
        log.debug("VM %s: watching %s", vm.name, vm.root)

    def _start_walk(self, vm: _VM, relpath: str, prio: Prio, entry: _Entry | None) -> None:
        """Walk ``relpath`` under the VM root in a worker thread, queueing every regular file."""
        assert self._loop is not None and self._walk_pool is not None
        self._walks_active += 1
        self._counts["walks"] += 1

        def cancelled() -> bool:
            return self._closing or self._vms.get(vm.name) is not vm

        fut = self._loop.run_in_executor(self._walk_pool, self._walk, vm, relpath, prio, cancelled)
        self._walk_futures.add(fut)

        def finished(f: asyncio.Future[int]) -> None:
            self._walks_active -= 1
            self._walk_futures.discard(f)
            if f.cancelled():
                return
            if (exc := f.exception()) is not None:
                log.error("VM %s: walking %r failed: %s", vm.name, relpath or "/", exc)
            if entry is not None:
                self._backlog.done(entry)

        fut.add_done_callback(finished)

    def _walk_head(self, vm: _VM, limit: int) -> int:
        """Queue up to ``limit`` files near the top of the VM root without waiting for room."""
        queued, queue = 0, [""]
        while queue and queued < limit:
            rel = queue.pop(0)
            try:
                with os.scandir(os.path.join(vm.root, rel) if rel else vm.root) as it:
                    for de in it:
                        child = f"{rel}/{de.name}" if rel else de.name
                        if de.is_dir(follow_symlinks=False):
                            queue.append(child)
                        elif de.is_file(follow_symlinks=False) and queued < limit:
                            queued += self._backlog.record_head(vm.name, child)
            except OSError:
                continue  # the full walk reports what it cannot list
        return queued

    def _walk(self, vm: _VM, start: str, prio: Prio, cancelled: Callable[[], bool]) -> int:
        """Queue every regular file under ``root/start`` (no symlink following); runs in a thread."""
        queued = 0
        stack = [start]
        while stack:
            if cancelled():
                return queued
            rel = stack.pop()
            path = os.path.join(vm.root, rel) if rel else vm.root
            try:
                it = os.scandir(path)
            except FileNotFoundError:
                continue  # gone since its event / since its parent was listed
            except NotADirectoryError:
                if rel == start and start:  # a directory event whose path is now a file
                    queued += self._backlog.record_walk(
                        vm.name, rel, prio=prio, cancelled=cancelled
                    )
                continue
            except OSError as exc:
                log.warning("VM %s: cannot list %s: %s", vm.name, rel or "/", exc.strerror or exc)
                continue
            with it:
                for de in it:
                    child = f"{rel}/{de.name}" if rel else de.name
                    try:
                        if de.is_dir(follow_symlinks=False):
                            stack.append(child)
                            continue
                        if de.is_file(follow_symlinks=False):
                            if not self._backlog.record_walk(
                                vm.name, child, prio=prio, cancelled=cancelled
                            ):
                                return queued
                            queued += 1
                            continue
                        reason = _skip_reason(de.stat(follow_symlinks=False).st_mode)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        reason = f"unreadable: {exc.strerror or exc}"
                    self._skip(vm.name, child, reason or "special file")
        log.debug("VM %s: walk of %s queued %d file(s)", vm.name, start or "/", queued)
        return queued

    async def _scheduler(self) -> None:
        """Move entries that went quiet to the senders; hand due directory events to walkers."""
        backlog = self._backlog
        while True:
            files, trees = backlog.promote_due()
            if files:
                self._ready.set()
            for entry in trees:
                vm = self._vms.get(entry.vm)
                if vm is None:
                    backlog.done(entry)
                else:
                    self._start_walk(vm, entry.relpath, entry.prio, entry)
            due = backlog.next_due()
            if due is None:
                self._wake.clear()
                await self._wake.wait()
            else:
                # A floor on the sleep keeps a stream of events from turning into a busy loop.
                await asyncio.sleep(max(due - time.monotonic(), 0.002))

    async def _sender(self) -> None:
        """One of a fixed pool of tasks: takes ready entries and gets their verdicts."""
        backlog = self._backlog
        while True:
            if not self._online:
                await self._online_evt.wait()
                continue
            entry = backlog.take()
            if entry is None:
                self._ready.clear()
                await self._ready.wait()
                continue
            await self._deliver(entry)

    async def _deliver(self, entry: _Entry) -> None:
        backlog = self._backlog
        vm = self._vms.get(entry.vm)
        client = self._client
        if vm is None:
            backlog.done(entry)
            return
        if client is None or not self._online:
            backlog.requeue(entry)
            return
        relpath = entry.relpath
        full = os.path.join(vm.root, relpath)
        try:
            reason = _skip_reason(os.lstat(full).st_mode)
        except FileNotFoundError:
            reason = "vanished"
        except OSError as exc:
            reason = f"unreadable: {exc.strerror or exc}"
        if reason is not None:
            # Never opened, never sent: FIFOs would block a reader, devices are not file content.
            self._skip(vm.name, relpath, reason)
            backlog.done(entry)
            return
        if entry.replay:
            entry.replay = False
            self._counts["replayed"] += 1
        self._counts["sent"] += 1
        try:
            verdict = await self._scan(client, vm, relpath, entry.prio)
        except asyncio.CancelledError:
            backlog.requeue(entry)
            raise
        except _Skip as skip:
            self._skip(vm.name, relpath, str(skip))
            backlog.done(entry)
            return
        except ConnectionError as exc:
            backlog.requeue(entry)
            self._connection_lost(client, exc)
            return
        except Exception as exc:  # noqa: BLE001 - any failure of one request becomes its verdict
            code = getattr(exc, "code", None)
            if code == "unknown-vm" and entry.retries < MAX_REMOTE_RETRIES:
                # The appliance forgot the VM (its inventory was reset): register it again.
                entry.retries += 1
                log.warning("VM %s: appliance does not know it; registering it again", vm.name)
                self._registered.discard(vm.name)
                try:
                    await self._register(client, vm)
                except ConnectionError as lost:
                    self._connection_lost(client, lost)
                backlog.requeue(entry)
                self._ready.set()
                return
            verdict = {
                "t": "verdict",
                "vm": vm.name,
                "path": relpath,
                "status": "error",
                "matches": [],
                "reason": f"{code or type(exc).__name__}: {exc}",
                "action": "allow",
                "source": "shim",
                "digest": None,
            }
        backlog.done(entry)
        self._count_verdict(vm.name, relpath, verdict)

    async def _scan(self, client: Any, vm: _VM, relpath: str, prio: Prio) -> dict[str, Any]:
        mode = self._content_mode()
        if mode == "path":
            return await client.scan_path(vm.name, relpath, prio=prio)
        from .confine import ConfinementError, open_confined

        try:
            fd = open_confined(vm.root, relpath)
        except FileNotFoundError:
            raise _Skip("vanished") from None
        except ConfinementError as exc:
            raise _Skip(str(exc)) from None
        except OSError as exc:
            raise _Skip(f"unreadable: {exc.strerror or exc}") from None
        if mode == "fd":
            try:
                return await client.scan_fd(vm.name, relpath, fd, prio=prio)
            finally:
                os.close(fd)
        with os.fdopen(fd, "rb") as f:
            return await client.scan_stream(vm.name, relpath, f, prio=prio)

    def _content_mode(self) -> str:
        if self.content != "auto":
            return self.content
        from .protocol import parse_address

        kind, _ = parse_address(self.address)
        return "path" if kind == "unix" else "stream"

    def _count_verdict(self, vm: str, relpath: str, verdict: dict[str, Any]) -> None:
        counts = self._counts
        counts["verdicts"] += 1
        status = verdict.get("status")
        if status == "clean":
            counts["clean"] += 1
        elif status == "infected":
            counts["infected"] += 1
            log.warning(
                "VM %s: %s: %s FOUND", vm, relpath, ", ".join(verdict.get("matches") or ["?"])
            )
        else:
            counts["errors"] += 1
            log.info("VM %s: %s: scan error: %s", vm, relpath, verdict.get("reason"))
        if self.on_verdict is not None:
            try:
                self.on_verdict(vm, relpath, verdict)
            except Exception:
                log.exception("on_verdict callback failed for %s:%s", vm, relpath)

    def _connection_lost(self, client: Any, exc: BaseException | None = None) -> None:
        if client is self._client and self._online:
            log.warning("connection to appliance lost%s", f" ({exc})" if exc else "")
            self._online = False
            self._online_evt.clear()
            self._lost.set()

    def _new_client(self) -> Any:
        if self._client_factory is not None:
            return self._client_factory(self.address, shim_id=self.shim_id, secret=self.secret)
        from .protocol import ApplianceClient

        return ApplianceClient(self.address, shim_id=self.shim_id, secret=self.secret)

    async def _register(self, client: Any, vm: _VM) -> None:
        spec = vm.spec
        try:
            reply = await client.register(spec.name, vm.root, policy=spec.policy, clone_of=spec.clone_of)
            if isinstance(reply, dict) and isinstance(reply.get("policy"), dict):
                self._policies[spec.name] = reply["policy"]
        except ConnectionError:
            raise
        except Exception as exc:  # noqa: BLE001 - one refused VM must not stop the others
            log.error("VM %s: appliance refused registration: %s", spec.name, exc)
            return
        self._registered.add(spec.name)

    async def _register_all(self, client: Any) -> None:
        """Register every VM on a fresh connection, bases before their clones; VMs added while
        this runs are picked up too."""
        attempted: set[str] = set()
        while True:
            todo = [vm for name, vm in self._vms.items() if name not in attempted]
            if not todo:
                return
            todo.sort(key=lambda vm: vm.spec.clone_of is not None)
            for vm in todo:
                attempted.add(vm.name)
                if self._vms.get(vm.name) is vm:
                    await self._register(client, vm)

    async def _connection_loop(self) -> None:
        delay = RECONNECT_MIN_DELAY
        ever_connected = False
        last_error = ""
        while True:
            client = self._new_client()
            try:
                await client.connect(timeout=CONNECT_TIMEOUT)
                self._registered = set()
                await self._register_all(client)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await client.close()
                raise
            except Exception as exc:  # noqa: BLE001 - whatever failed, back off and retry
                with contextlib.suppress(Exception):
                    await client.close()
                message = f"{type(exc).__name__}: {exc}"
                if message != last_error:
                    log.warning(
                        "appliance %s unavailable (%s); retrying (backlog %d)",
                        self.address,
                        message,
                        len(self._backlog),
                    )
                    last_error = message
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max_delay)
                continue
            delay = RECONNECT_MIN_DELAY
            last_error = ""
            if ever_connected:
                self._counts["reconnects"] += 1
                log.warning(
                    "reconnected to appliance %s; replaying %d undelivered path(s)",
                    self.address,
                    len(self._backlog),
                )
            else:
                log.info("connected to appliance %s", self.address)
            ever_connected = True
            self._client = client
            self._lost.clear()
            self._online = True
            self._online_evt.set()
            self._ready.set()  # replay whatever is ready
            try:
                while self._online and getattr(client, "connected", True):
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._lost.wait(), 0.2)
            finally:
                if self._online and not self._closing:
                    log.warning("connection to appliance %s lost", self.address)
                self._online = False
                self._online_evt.clear()
                self._client = None
                self._registered = set()
                self._backlog.mark_replay()
                with contextlib.suppress(Exception):
                    await client.close()

    def _fail_mode(self, vm: _VM) -> str:
        policy = self._policies.get(vm.name) or vm.spec.policy or {}
        return str(policy.get("fail_mode", "open"))

    async def _protection_keeper(self) -> None:
        """Fail-closed VMs: while the appliance is unreachable the VM is tagged ``unprotected``
        and the isolation hook runs; once the appliance is back and the VM's backlog has been
        scanned, the tag is dropped and the hook runs again. Fail-open VMs just keep queueing."""
        while True:
            await asyncio.sleep(0.1)
            for vm in list(self._vms.values()):
                if self._fail_mode(vm) != "closed":
                    continue
                if not self._online and vm.name not in self._isolated:
                    self._isolated.add(vm.name)
                    log.error("VM %s is unprotected (appliance unreachable); isolating (fail closed)", vm.name)
                    await self._run_hook(vm.name, ["unprotected"], "appliance unreachable")
                elif self._online and vm.name in self._isolated and self._backlog.count_vm(vm.name) == 0:
                    self._isolated.discard(vm.name)
                    log.warning("VM %s protected again (backlog scanned); releasing isolation", vm.name)
                    await self._run_hook(vm.name, [], "appliance back, backlog scanned")

    async def _run_hook(self, vm: str, tags: list[str], reason: str) -> None:
        if not self.isolation_hook:
            return
        payload = json.dumps({"vm": vm, "tags": tags, "reason": reason, "shim": self.shim_id}).encode()
        cmd = [*shlex.split(self.isolation_hook), vm, *tags]
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
            await asyncio.wait_for(proc.communicate(payload), self.hook_timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("isolation hook for VM %s killed after %.0f s", vm, self.hook_timeout)
        except OSError as exc:
            log.error("isolation hook %s could not run: %s", cmd[0], exc)

    def stats_isolated(self) -> list[str]:
        """Fail-closed VMs currently isolated as unprotected."""
        return sorted(self._isolated)

    async def _watch_keeper(self) -> None:
        """Notice VM roots that were deleted (their observer dies) and re-watch them when they
        come back; re-walk VMs that lost events to a full backlog."""
        while True:
            await asyncio.sleep(WATCH_CHECK_INTERVAL)
            for vm in list(self._vms.values()):
                if vm.watch_busy or vm.activating:
                    continue
                if vm.observer is not None and not vm.watch_healthy():
                    log.warning(
                        "VM %s: %s was deleted or replaced; its watch stopped", vm.name, vm.root
                    )
                    vm.missing_logged = True
                    vm.watch_busy = True
                    try:
                        assert self._watch_pool is not None
                        await self._in_thread(self._watch_pool, vm.stop_watch)
                    finally:
                        vm.watch_busy = False
                if vm.observer is None and os.path.isdir(vm.root):
                    if vm.limit_hit:  # only the watch is missing: retry it, walk once it works
                        await self._start_watch(vm)
                        if vm.observer is not None:
                            vm.limit_hit = False
                            log.warning("VM %s: watching %s at last; walking it for missed events", vm.name, vm.root)
                            self._start_walk(vm, "", DEMAND, entry=None)
                    else:
                        await self._reactivate(vm)
            if self._backlog.owed_walks and len(self._backlog) < self._backlog.max_entries // 2:
                for name in self._backlog.take_owed_walks():
                    owed = self._vms.get(name)
                    # A VM whose root is missing gets a full walk when it comes back anyway.
                    if owed is not None and owed.observer is not None:
                        log.warning("VM %s: re-walking it to recover lost events", name)
                        self._start_walk(owed, "", DEMAND, entry=None)

    async def _reactivate(self, vm: _VM) -> None:
        """A root came back: re-register it (the appliance may hold the old directory) and walk."""
        client = self._client
        if self._online and client is not None:
            with contextlib.suppress(ConnectionError):
                await self._register(client, vm)
        await self._activate(vm)

    async def _shutdown(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        vms = list(self._vms.values())

        def stop_watches() -> None:
            for vm in vms:
                vm.stop_watch()

        if self._watch_pool is not None:
            await self._in_thread(self._watch_pool, stop_watches)
        # Walkers see _closing within WALK_WAIT_SLICE; once they returned the pools are idle and
        # shutting them down only joins idle threads.
        if self._walk_futures:
            await asyncio.wait(list(self._walk_futures))
        for pool in (self._walk_pool, self._watch_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._walk_pool = self._watch_pool = None


class _OverflowWatch(logging.Handler):
    """Hears watchdog report an inotify queue overflow (events lost in the kernel, which
    watchdog only logs) and makes every running shim re-walk its VMs, so those writes still
    get verdicts."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.shims: set[Shim] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" not in str(record.msg):
            return
        for shim in list(self.shims):
            log.error("inotify queue overflowed: events were lost; re-walking every VM")
            shim._backlog.owe_walk(list(shim._vms))


_OVERFLOW_LOGGER = "watchdog.observers.inotify_c"
_overflow_watch = _OverflowWatch()


class _Skip(Exception):
    """The file is not scanned (vanished, symlink, special file); the message is the reason."""


# -------------------------------------------------------------------- command line


def _clone_of(text: str) -> tuple[str, str]:
    clone, sep, base = text.partition("=")
    if not sep or not _VM_NAME.match(clone) or not _VM_NAME.match(base):
        raise ValueError(f"expected CLONE=BASE (two VM names), got {text!r}")
    return clone, base


def add_shim_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``offscan shim`` options to ``parser``."""

    def vm_spec(text: str) -> VMSpec:
        try:
            return VMSpec.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def clone_pair(text: str) -> tuple[str, str]:
        try:
            return _clone_of(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument(
        "--appliance",
        required=True,
        metavar="SOCKET|HOST:PORT",
        help="the appliance: a unix socket path or HOST:PORT",
    )
    parser.add_argument(
        "--vm",
        action="append",
        required=True,
        type=vm_spec,
        metavar="NAME=DIR",
        dest="vms",
        help="a VM to protect and the directory holding its files (repeatable)",
    )
    parser.add_argument(
        "--clone-of",
        action="append",
        default=[],
        type=clone_pair,
        metavar="CLONE=BASE",
        help="declare VM CLONE a clone of VM BASE (repeatable)",
    )
    parser.add_argument(
        "--secret",
        default=os.environ.get("OFFSCAN_SECRET"),
        help="shared secret for a TCP appliance (default: $OFFSCAN_SECRET)",
    )
    parser.add_argument(
        "--content",
        choices=["auto", "path", "fd", "stream"],
        default="auto",
        help="how the appliance reads files (default: path on a unix socket, stream on TCP)",
    )
    parser.add_argument("--shim-id", default=None,
                        help="name of this shim (default shim-HOSTNAME; keep it stable: the "
                        "appliance lets only the registering shim scan in a VM)")
    parser.add_argument("--isolation-hook", metavar="CMD",
                        help="for fail-closed VMs: run CMD VM [unprotected] with JSON on stdin when "
                        "the VM loses and regains protection")
    parser.add_argument(
        "--quiet",
        type=float,
        default=DEFAULT_QUIET,
        metavar="SECONDS",
        help=f"silence after a file's last event before it is sent (default {DEFAULT_QUIET})",
    )
    parser.add_argument(
        "--max-backlog",
        type=int,
        default=DEFAULT_MAX_BACKLOG,
        metavar="N",
        help=f"undelivered paths kept at most (default {DEFAULT_MAX_BACKLOG})",
    )


async def run_shim_cli(args: argparse.Namespace) -> int:
    """``offscan shim``: run until SIGINT/SIGTERM; one line per infected file on stdout, a
    stats line on stderr at exit."""
    clones = dict(args.clone_of)
    specs: list[VMSpec] = []
    for spec in args.vms:
        base = clones.pop(spec.name, None)
        specs.append(VMSpec(spec.name, spec.root, clone_of=base) if base else spec)
    if clones:
        print(
            f"offscan shim: --clone-of names unknown VM(s): {', '.join(sorted(clones))}",
            file=sys.stderr,
        )
        return 2

    def report(vm: str, relpath: str, verdict: dict[str, Any]) -> None:
        if verdict.get("status") == "infected":
            for name in verdict.get("matches") or ["?"]:
                print(f"{vm}:{relpath}: {name} FOUND", flush=True)

    try:
        shim = Shim(
            args.appliance,
            specs,
            shim_id=args.shim_id,
            secret=args.secret,
            content=args.content,
            quiet=args.quiet,
            max_backlog=args.max_backlog,
            on_verdict=report,
            isolation_hook=args.isolation_hook,
        )
    except ValueError as exc:
        print(f"offscan shim: {exc}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, shim.stop)
            installed.append(sig)
    try:
        await shim.run()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    s = shim.stats()
    print(
        "offscan shim: "
        + " ".join(
            f"{k}={s[k]}"
            for k in (
                "events",
                "coalesced",
                "sent",
                "verdicts",
                "clean",
                "infected",
                "errors",
                "skipped",
                "backlog",
                "replayed",
                "reconnects",
                "dropped",
            )
        ),
        file=sys.stderr,
    )
    return 0
