"""The :class:`Shim`: one per host, it protects every VM there without an agent in any VM.

This module is the shim's lifecycle and its VMs: starting and stopping the tasks and thread
pools, activating a VM (watch its root, then walk it), keeping the watches alive (a deleted
root is re-watched when it comes back), scheduling coalesced entries and directory walks, and
the counters. The parts live beside it: the backlog (:mod:`.backlog`), the watchdog side
(:mod:`.watch`), walks (:mod:`.walk`), the appliance connection (:mod:`.connection`), delivery
(:mod:`.sender`) and fail-closed isolation (:mod:`.isolation`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .backlog import DEFAULT_MAX_BACKLOG, DEFAULT_QUIET, DEMAND, Backlog, Prio, _Entry
from .connection import DEFAULT_RECONNECT_MAX_DELAY, ClientFactory, Connection
from .isolation import DEFAULT_HOOK_TIMEOUT, FailClosed
from .prevent import DEFAULT_PREVENTION_TIMEOUT, Prevention
from .sender import CONTENT_MODES, DEFAULT_MAX_IN_FLIGHT, Sender, VerdictCallback
from .spec import VMSpec
from .walk import walk_head, walk_tree
from .watch import _VM, Skips, _overflow_watch

log = logging.getLogger("offscan.shim")

WATCH_CHECK_INTERVAL = 0.5  # seconds between checks that every VM root is still watched
WALK_WORKERS = 2  # threads walking directory trees (activation scans, moved-in directories)
ACTIVATION_HEAD = 8  # files queued at once on activation, even while big walks wait for room

_T = TypeVar("_T")


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
        address: str | Sequence[str],  # several: an ordered failover list (shim/connection.py)
        vms: Sequence[VMSpec],
        *,
        shim_id: str | None = None,
        secret: str | None = None,
        content: str = "auto",
        quiet: float = DEFAULT_QUIET,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY,
        on_verdict: VerdictCallback | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        client_factory: ClientFactory | None = None,
        isolation_hook: str | None = None,
        hook_timeout: float = DEFAULT_HOOK_TIMEOUT,
        prevent: bool = False,
        prevent_timeout: float = DEFAULT_PREVENTION_TIMEOUT,
    ) -> None:
        _check_settings(content, quiet, max_in_flight)
        self.quiet = quiet
        self.max_in_flight = max_in_flight
        self._backlog = Backlog(max_backlog, quiet=quiet, on_wake=self._wake_scheduler)
        self._vms: dict[str, _VM] = {}
        for spec in vms:
            if spec.name in self._vms:
                raise ValueError(f"VM {spec.name!r} given twice")
            self._vms[spec.name] = _VM(spec)
        self._ready = asyncio.Event()  # entries may be ready: idle senders look again
        self._link = Connection(
            address,
            # Stable across restarts: the appliance lets only the registering shim scan in a VM.
            shim_id=shim_id or f"shim-{os.uname().nodename}",
            secret=secret,
            backlog=self._backlog,
            vms=self._vms,
            on_online=self._ready.set,
            reconnect_max_delay=reconnect_max_delay,
            client_factory=client_factory,
        )
        self._link.on_adopt = self._adopt
        self._adopting: set[asyncio.Task[None]] = set()
        self._skips = Skips()
        self._sender = Sender(
            backlog=self._backlog,
            vms=self._vms,
            link=self._link,
            skips=self._skips,
            ready=self._ready,
            content=content,
            on_verdict=on_verdict,
        )
        self._fail_closed = FailClosed(
            shim_id=self._link.shim_id,
            hook=isolation_hook,
            hook_timeout=hook_timeout,
            vms=self._vms,
            link=self._link,
            backlog=self._backlog,
        )
        # On-access prevention (docs/prevention.md): every VM with ``prevent``, else the VMs
        # whose policy says ``prevention = true``.
        self._prevention = Prevention(
            link=self._link, vms=self._vms, force=prevent, default_timeout=prevent_timeout
        )
        self._walks = 0  # directory walks started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()  # the scheduler has new waiting entries to look at
        self._stop_requested = False
        self._walks_active = 0
        self._activating = 0
        self._walk_futures: set[asyncio.Future[int]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._walk_pool: ThreadPoolExecutor | None = None
        self._watch_pool: ThreadPoolExecutor | None = None
        self._closing = False

    # ---------------------------------------------------------------- configuration

    @property
    def address(self) -> str:
        return self._link.address

    @property
    def shim_id(self) -> str:
        return self._link.shim_id

    @property
    def secret(self) -> str | None:
        return self._link.secret

    @property
    def content(self) -> str:
        return self._sender.content

    @property
    def reconnect_max_delay(self) -> float:
        return self._link.reconnect_max_delay

    @property
    def isolation_hook(self) -> str | None:
        return self._fail_closed.hook

    @property
    def hook_timeout(self) -> float:
        return self._fail_closed.hook_timeout

    @property
    def on_verdict(self) -> VerdictCallback | None:
        """Called as ``on_verdict(vm, relpath, verdict)`` for every verdict (may be replaced)."""
        return self._sender.on_verdict

    @on_verdict.setter
    def on_verdict(self, callback: VerdictCallback | None) -> None:
        self._sender.on_verdict = callback

    # ---------------------------------------------------------------- public API

    @property
    def connected(self) -> bool:
        """True while the shim is connected to the appliance with every VM registered."""
        return self._link.online

    async def run(self) -> None:
        """Protect the VMs until :meth:`stop`: connect (retrying with backoff), register, run the
        activation scans and stream events."""
        if self._loop is not None:
            raise RuntimeError("Shim.run() is already running (or has run)")
        self._loop = asyncio.get_running_loop()
        if self._stop_requested:
            return
        self._walk_pool = ThreadPoolExecutor(WALK_WORKERS, thread_name_prefix="offscan-shim-walk")
        self._watch_pool = ThreadPoolExecutor(1, thread_name_prefix="offscan-shim-watch")
        _overflow_watch.attach(self._events_lost)
        try:
            self._tasks = [
                asyncio.create_task(self._link.run(), name="shim-connection"),
                asyncio.create_task(self._scheduler(), name="shim-scheduler"),
                asyncio.create_task(self._watch_keeper(), name="shim-watch-keeper"),
                asyncio.create_task(self._fail_closed.run(), name="shim-fail-closed"),
                asyncio.create_task(self._prevention.run(), name="shim-prevention"),
            ]
            self._tasks += [
                asyncio.create_task(self._sender.run(), name=f"shim-sender-{i}")
                for i in range(self.max_in_flight)
            ]
            self._tasks += [
                asyncio.create_task(self._activate(vm), name=f"shim-activate-{vm.name}")
                for vm in list(self._vms.values())
            ]
            await self._stopped.wait()
        finally:
            _overflow_watch.detach(self._events_lost)
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
        """Protect one more VM while running: register it, walk its root, watch it. The same
        VM again (same root, master and policy: e.g. a clone the appliance already had this
        shim adopt) is a no-op; anything else under a name already protected is a ValueError."""
        known = self._vms.get(spec.name)
        if known is not None:
            same_root = os.path.realpath(known.spec.root) == os.path.realpath(spec.root)
            if same_root and (known.spec.clone_of, known.spec.policy) == (
                spec.clone_of,
                spec.policy,
            ):
                return
            raise ValueError(f"VM {spec.name!r} is already protected by this shim")
        vm = _VM(spec)
        self._vms[spec.name] = vm
        if self._loop is None:
            return  # run() will take care of it
        await self._link.register_live(vm, again=False)
        await self._activate(vm)

    def _adopt(self, name: str, root: str, clone_of: str) -> None:
        """The appliance cloned ``clone_of``: protect the clone now (``offscan vm clone``)."""
        if name in self._vms or clone_of not in self._vms:
            return
        log.info("VM %s: cloned from %s by the operator; protecting it", name, clone_of)
        task = asyncio.get_running_loop().create_task(
            self.add_vm(VMSpec(name, root, clone_of=clone_of))
        )
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

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
        await self._link.unregister(name)

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
        reasons = self._skips.by_reason()
        counts = self._backlog.counts()
        sent = self._sender.counts
        return {
            "events": self._backlog.events,
            "walked": self._backlog.walked,
            "coalesced": self._backlog.coalesced,
            **{k: sent[k] for k in ("sent", "verdicts", "clean", "infected", "errors")},
            "skipped": sum(reasons.values()),
            "skipped_reasons": reasons,
            "backlog": len(self._backlog),
            **counts,
            "replayed": sent["replayed"],
            "reconnects": self._link.reconnects,
            "appliance": self._link.in_use,  # None while offline
            "failovers": self._link.failovers,
            "failbacks": self._link.failbacks,
            "dropped": self._backlog.dropped,
            "walks": self._walks,
            "connected": self._link.online,
            "vms": len(self._vms),
            "watched": sum(1 for vm in self._vms.values() if vm.observer is not None),
            "prevention": self._prevention.stats(),
        }

    def stats_isolated(self) -> list[str]:
        """Fail-closed VMs currently isolated as unprotected."""
        return self._fail_closed.isolated()

    # ---------------------------------------------------------------- internals

    def _idle(self) -> bool:
        return (
            len(self._backlog) == 0
            and self._walks_active == 0
            and self._activating == 0
            and not self._backlog.owed_walks  # a re-walk is still owed
            # a VM whose first activation has not even started yet (a loaded machine)
            and not any(vm.activating for vm in self._vms.values())
        )

    def _wake_scheduler(self) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self._wake.set)

    def _events_lost(self) -> None:
        """Watchdog lost events (inotify overflow; called on its thread): re-walk every VM."""
        self._backlog.owe_walk(list(self._vms))

    async def _in_thread(self, pool: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
        assert self._loop is not None
        return await self._loop.run_in_executor(pool, fn, *args)

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
                await self._in_thread(
                    self._watch_pool, walk_head, self._backlog, vm, ACTIVATION_HEAD
                )
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
            await self._in_thread(
                self._watch_pool, vm.start_watch, self._backlog, self._is_connected
            )
        except OSError as exc:
            self._watch_failed(vm, exc)
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

    def _is_connected(self) -> bool:
        return self._link.online

    @staticmethod
    def _watch_failed(vm: _VM, exc: OSError) -> None:
        """Note why a watch could not start; said once until it works again."""
        vm.limit_hit = exc.errno in (errno.EMFILE, errno.ENOSPC)
        if vm.limit_hit and not vm.missing_logged:
            log.error(
                "VM %s: cannot watch %s: %s; raise the inotify limits "
                "(sysctl fs.inotify.max_user_instances / max_user_watches); retrying",
                vm.name,
                vm.root,
                exc.strerror or exc,
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

    def _start_walk(self, vm: _VM, relpath: str, prio: Prio, entry: _Entry | None) -> None:
        """Walk ``relpath`` under the VM root in a worker thread, queueing every regular file."""
        assert self._loop is not None and self._walk_pool is not None
        self._walks_active += 1
        self._walks += 1

        def cancelled() -> bool:
            return self._closing or self._vms.get(vm.name) is not vm

        loop = self._loop

        def inherited(paths: list[str]) -> None:  # on the walker thread: report on the loop
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(self._sender.inherited, vm.name, paths)

        fut = self._loop.run_in_executor(
            self._walk_pool,
            walk_tree,
            self._backlog,
            self._skips,
            vm,
            relpath,
            prio,
            cancelled,
            inherited,
        )
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
                            log.warning(
                                "VM %s: watching %s at last; walking it for missed events",
                                vm.name,
                                vm.root,
                            )
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
        await self._link.register_live(vm, again=True)
        await self._activate(vm)

    async def _shutdown(self) -> None:
        self._closing = True
        self._link.closing = True
        await self._prevention.close()  # first: held opens are answered, nothing waits on us
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


def _check_settings(content: str, quiet: float, max_in_flight: int) -> None:
    if content not in CONTENT_MODES:
        raise ValueError(f"content must be auto, path, fd or stream, not {content!r}")
    if quiet < 0:
        raise ValueError("quiet must be >= 0 seconds")
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
