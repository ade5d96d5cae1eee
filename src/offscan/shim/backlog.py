"""The shim's backlog: every undelivered path, coalesced, bounded and served fairly across VMs.

Pure bookkeeping, unit-testable on its own: :class:`Backlog` (with its :class:`_Entry` records)
and :class:`_FairQueue` do no file or network I/O and start no thread or task. They only take a
lock (watchdog threads feed the backlog), read the monotonic clock, call the ``on_wake``
callback they are given, and log a rate-limited line when the backlog is full.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Literal

log = logging.getLogger("offscan.shim")

DEFAULT_QUIET = 0.05  # seconds without events before a file is sent (coalescing window)
DEFAULT_MAX_BACKLOG = 100_000  # entries (undelivered paths), across all VMs
DROP_LOG_INTERVAL = 5.0  # seconds between repeated "backlog full" log lines
WALK_WAIT_SLICE = 0.1  # seconds a blocked walk sleeps before re-checking for room/cancellation

Prio = Literal["access", "demand"]
ACCESS: Prio = "access"  # live events: the appliance serves these first
DEMAND: Prio = "demand"  # activation walks and re-walks
FILE, TREE = "f", "t"  # entry kinds: a file to scan, a directory to walk

Key = tuple[str, str, str]  # (vm, relpath, kind)


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
        """Note an event for ``relpath`` now; False if it was dropped because the backlog is
        full."""
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
        """The entry's verdict arrived (or it needs none): forget it, unless it changed
        meanwhile."""
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
