"""On-access prevention: the shim holds opens in protected VMs until the appliance's verdict.

:class:`Prevention` runs one :class:`~offscan.shim.prevent_guard.Guard` (a fanotify group in
``FAN_CLASS_CONTENT``) per VM whose policy says ``prevention = true`` (or every VM with
``offscan shim --prevent``). Opens of content the shim has judged before are answered from a
bounded :class:`IdentityMemo` without a round trip; the others are *held* and sent to the
appliance at ``access`` priority through the descriptor fanotify opened (no second open), and
answered allow or deny by the verdict. Every held open is answered exactly once: by its
verdict, by the VM's fail mode when ``prevention_timeout`` passes or the appliance is away,
or by the fail mode at shutdown. The shim's and the appliance's own opens are never held.

Where the kernel or the privileges do not allow it, the VM runs in watch mode (the shim's
watchdog, as without prevention) and the reason is logged once and reported in ``status``.
This module touches the guards, the appliance client of the shim's
:class:`~offscan.shim.connection.Connection` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .connection import Connection, ShimClient
from .fanotify import FanotifyError
from .prevent_guard import COUNTS, Guard, Held, Identity, Outcome, identity_of
from .watch import _VM

if TYPE_CHECKING:
    from ..protocol.messages import PreventionStats, Verdict

log = logging.getLogger("offscan.shim")

DEFAULT_PREVENTION_TIMEOUT = 5.0  # seconds a held open waits for its verdict (policy overrides)
MEMO_ENTRIES = 65_536  # identities remembered by the shim (LRU)
KEEPER_INTERVAL = 0.2  # seconds between checks of which VMs want prevention
REPORT_INTERVAL = 1.0  # seconds between reports of the counters to the appliance
STALE_CHECK_INTERVAL = 1.0  # seconds between checks that each root is still what was marked
DIR_RESCAN_INTERVAL = 1.0  # seconds between marking new directories (directory mode)
RESCAN_DUTY = 10  # a rescan waits at least this many times as long as the last one took
WATCHDOG_TICK = 0.02  # seconds between checks for held opens past their deadline
MAX_PRESCANS = 16  # post-write scans in flight at once (more are left to the watch)
GIL_SWITCH_INTERVAL = 0.0005  # seconds; see Prevention.run
TIMEOUT_LOG_INTERVAL = 5.0  # seconds between repeated "answered by the fail mode" lines


class IdentityMemo:
    """Bounded LRU ``(dev, ino, size, mtime_ns, ctime_ns) → allow`` for one pattern version.

    Thread-safe (reader threads look up, the loop stores). A verdict for another pattern
    version than the memo's empties it: nothing judged by old patterns is served as current.
    """

    def __init__(self, max_entries: int = MEMO_ENTRIES) -> None:
        self.max_entries = max_entries
        self.version: str | None = None
        self._entries: OrderedDict[Identity, bool] = OrderedDict()
        self._lock = threading.Lock()
        self.invalidations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, identity: Identity) -> bool | None:
        with self._lock:
            allow = self._entries.get(identity)
            if allow is not None:
                self._entries.move_to_end(identity)
            return allow

    def put(self, identity: Identity, allow: bool, version: str | None) -> None:
        with self._lock:
            if version != self.version:
                return  # judged by other patterns than the current ones
            self._entries[identity] = allow
            self._entries.move_to_end(identity)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def observe_version(self, version: str | None) -> bool:
        """The appliance serves ``version``; True (and the memo emptied) if it changed."""
        if version is None:
            return False
        with self._lock:
            if version == self.version:
                return False
            if self.version is not None:
                self.invalidations += 1
            self.version = version
            self._entries.clear()
            return True


def _raise_fd_limit() -> None:
    """Every held open keeps a descriptor: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rescan(guards: list[Guard]) -> int:
    return sum(guard.rescan() for guard in guards)


class Prevention:
    """The shim's blocking mode: a guard per VM that wants it, the memo, the watchdog."""

    def __init__(
        self,
        *,
        link: Connection,
        vms: Mapping[str, _VM],
        force: bool = False,
        default_timeout: float = DEFAULT_PREVENTION_TIMEOUT,
    ) -> None:
        if default_timeout <= 0:
            raise ValueError("the prevention timeout must be above 0 seconds")
        self.force = force
        self.default_timeout = default_timeout
        self.memo = IdentityMemo()
        self.guards: dict[str, Guard] = {}
        self.off: dict[str, str] = {}  # VMs that want prevention but run in watch mode: why
        self._link = link
        self._vms = vms
        self._own_pid = os.getpid()
        self._appliance_pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: dict[Identity, asyncio.Future[bool | None]] = {}
        self._prescans = 0
        self._was_on: set[str] = set()  # VMs that had a guard (reported as off after)
        self._prescan_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_timeout_log = -1e9
        self._last_stale_check = 0.0
        self._rescanning: asyncio.Future[int] | None = None
        self._rescan_started = self._next_rescan = 0.0
        self._client_seen: ShimClient | None = None
        self._unix: tuple[str, bool] | None = None  # (address, on a unix socket: fd passing)

    # ---------------------------------------------------------------- for the guards

    def exempt(self, pid: int) -> bool:
        """The shim's and the appliance's own opens are never held (they would deadlock).
        The appliance's pid is read off the connection's socket (``SO_PEERCRED``) the first
        time it is needed, so its very first open on a new connection is not held either."""
        if pid == self._own_pid or pid == self._appliance_pid:
            return True
        cred = getattr(self._link.client, "peer_cred", None)
        if cred and cred[0] != self._appliance_pid:
            self._appliance_pid = cred[0]
            return pid == cred[0]
        return False

    def vm_settings(self, vm: str) -> tuple[float, bool, Mapping[str, Any]]:
        """(timeout, fail open?, effective policy) of ``vm``."""
        policy = self._policy(vm)
        timeout = policy.get("prevention_timeout") or self.default_timeout
        return float(timeout), policy.get("fail_mode", "open") != "closed", policy

    def submit(self, guard: Guard, held: Held) -> None:
        """From a reader thread: get ``held`` its verdict on the loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            guard.answer(held, held.fail_open, "unreachable")
            return
        try:
            loop.call_soon_threadsafe(self._spawn, guard, held)
        except RuntimeError:  # the loop closed meanwhile
            guard.answer(held, held.fail_open, "unreachable")

    def prescan(self, guard: Guard, fd: int, relpath: str, identity: Identity) -> bool:
        """From a reader thread: scan a just-written file through ``fd`` (taken if True)."""
        loop = self._loop
        if loop is None or not self._link.online:
            return False
        with self._prescan_lock:
            if self._prescans >= MAX_PRESCANS:
                return False
            self._prescans += 1
        try:
            loop.call_soon_threadsafe(self._spawn_prescan, guard, fd, relpath, identity)
        except RuntimeError:
            with self._prescan_lock:
                self._prescans -= 1
            return False
        return True

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Keep a guard on every VM that wants prevention and report the counters, until
        cancelled (then :meth:`close`)."""
        self._loop = asyncio.get_running_loop()
        _raise_fd_limit()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="offscan-prevent-marks")
        self._watchdog = threading.Thread(
            target=self._watch_deadlines, name="offscan-prevent-watchdog", daemon=True
        )
        self._watchdog.start()
        last_report = 0.0
        while not self._stop.is_set():
            try:
                await self._sync_guards()
            except Exception:  # keep the other VMs' guards (and this keeper) going
                log.exception("prevention: keeping the guards failed")
            self._follow_client()
            now = time.monotonic()
            self._maybe_rescan(now)
            if now - last_report >= REPORT_INTERVAL and self._link.online:
                last_report = now
                await self._report()
            await asyncio.sleep(KEEPER_INTERVAL)

    def _maybe_rescan(self, now: float) -> None:
        """Directory mode: mark new directories in the pool thread, every second, or less
        often for trees so big that a walk takes long (at most a tenth of the time walking)."""
        if self._rescanning is not None:
            if not self._rescanning.done():
                return
            took = now - self._rescan_started
            self._next_rescan = now + max(DIR_RESCAN_INTERVAL, RESCAN_DUTY * took)
            self._rescanning = None
        dir_guards = [g for g in self.guards.values() if g.mode == "directories"]
        if dir_guards and now >= self._next_rescan:
            assert self._loop is not None
            self._rescan_started = now
            self._rescanning = self._loop.run_in_executor(self._pool, _rescan, dir_guards)

    async def close(self) -> None:
        """Stop every guard (held opens answered by their fail mode) and the watchdog."""
        self._stop.set()
        guards = list(self.guards.values())
        self.guards.clear()
        for guard in guards:
            guard.halt()  # a directory walk in the pool ends at once
        for guard in guards:
            await self._in_pool(guard.stop)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._watchdog is not None:
            self._watchdog.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def stats(self) -> dict[str, PreventionStats]:
        """Each VM's prevention, for VMs that want it (as the ``report`` carries it)."""
        out: dict[str, PreventionStats] = {}
        for name, guard in self.guards.items():
            with guard.lock:
                counts = dict(guard.counts)
                held = len(guard.pending)
            out[name] = self._stats(True, guard.mode, None, held, counts)
        for name, reason in self.off.items():
            out[name] = self._stats(False, "watch", reason, 0, dict.fromkeys(COUNTS, 0))
        for name in self._was_on - set(out):  # turned off: say so rather than go quiet
            if name in self._vms:
                out[name] = self._stats(False, "watch", None, 0, dict.fromkeys(COUNTS, 0))
        return out

    @staticmethod
    def _stats(
        enabled: bool, mode: str, reason: str | None, held: int, c: dict[str, int]
    ) -> PreventionStats:
        return {
            "enabled": enabled,
            "mode": mode,
            "reason": reason,
            "held": held,
            "allowed": c["allowed"],
            "denied": c["denied"],
            "timeouts": c["timeouts"],
            "unreachable": c["unreachable"],
            "memo_hits": c["memo_hits"],
            "exempt": c["exempt"],
        }

    # ---------------------------------------------------------------- internals

    def _policy(self, vm: str) -> Mapping[str, Any]:
        policy = self._link.policies.get(vm)
        if policy is None:
            known = self._vms.get(vm)
            policy = (known.spec.policy if known is not None else None) or {}
        return policy

    def _wanted(self) -> set[str]:
        return {
            name
            for name in self._vms
            if self.force or self._policy(name).get("prevention") in (True, "true")
        }

    async def _in_pool(self, fn: Any, *args: Any) -> Any:
        assert self._loop is not None
        if self._pool is None:
            return fn(*args)
        return await self._loop.run_in_executor(self._pool, fn, *args)

    async def _sync_guards(self) -> None:
        wanted = set() if self._stop.is_set() else self._wanted()
        now = time.monotonic()
        check = now - self._last_stale_check >= STALE_CHECK_INTERVAL
        if check:
            self._last_stale_check = now
        for name, guard in list(self.guards.items()):
            if name not in wanted:
                log.warning("VM %s: on-access prevention off", name)
            elif not guard.alive():
                log.error("VM %s: its fanotify reader stopped; starting it again", name)
            elif check and guard.stale():
                log.warning("VM %s: %s is another mount now; marking it again", name, guard.root)
            else:
                continue
            del self.guards[name]
            await self._in_pool(guard.stop)
        for name in [n for n in self.off if n not in wanted]:
            del self.off[name]
        for name in wanted:
            vm = self._vms.get(name)
            if name in self.guards or vm is None:
                continue
            if self._stop.is_set():
                return
            try:
                guard = await self._in_pool(Guard, name, vm.root, self)
                await self._in_pool(guard.start)
            except OSError as exc:
                reason = (exc.strerror if isinstance(exc, FanotifyError) else None) or str(exc)
                if self.off.get(name) != reason:
                    log.error("VM %s: prevention unavailable (%s); watch mode only", name, reason)
                self.off[name] = reason
                continue
            if self._stop.is_set():  # closed while it started
                await self._in_pool(guard.stop)
                return
            self.off.pop(name, None)
            # A reader thread answering from the memo must get the GIL quickly even while the
            # loop is busy (the default 5 ms switch interval would be a cached open's p99).
            sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))
            self.guards[name] = guard
            self._was_on.add(name)
            hint = "" if guard.mode == "mount" else "; bind-mount the root on itself for full cover"
            log.warning(
                "VM %s: on-access prevention on (%s mode: %s)%s", name, guard.mode, guard.root, hint
            )

    def _follow_client(self) -> None:
        """A new connection: its appliance's pid is exempt, its pattern version current."""
        client = self._link.client
        if client is None or client is self._client_seen:
            return
        self._client_seen = client
        cred = getattr(client, "peer_cred", None)
        if cred:
            self._appliance_pid = cred[0]
        welcome = getattr(client, "welcome", None)
        if isinstance(welcome, dict):
            self.memo.observe_version(welcome.get("pattern_version"))

    async def _report(self) -> None:
        client = self._link.client
        stats = self.stats()
        if client is None or not stats:
            return
        request = getattr(client, "request", None)
        if request is None:
            return
        try:
            reply = await asyncio.wait_for(request({"t": "report", "vms": stats}), 5.0)
        except ConnectionError:
            return
        except Exception as exc:  # an older appliance: prevention works, status lacks it
            log.debug("prevention report refused: %s", exc)
            return
        if isinstance(reply, dict):
            self.memo.observe_version(reply.get("pattern_version"))

    def _spawn(self, guard: Guard, held: Held) -> None:
        task = asyncio.ensure_future(self._resolve(guard, held))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_prescan(self, guard: Guard, fd: int, relpath: str, identity: Identity) -> None:
        """On the loop, in event order: an open right after this close finds the post-write
        scan in flight and waits for it rather than asking again."""
        if identity in self._inflight:
            with self._prescan_lock:
                self._prescans -= 1
            os.close(fd)
            return
        fut: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._inflight[identity] = fut
        task = asyncio.ensure_future(self._prescan(guard, fd, relpath, identity, fut))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prescan(
        self,
        guard: Guard,
        fd: int,
        relpath: str,
        identity: Identity,
        fut: asyncio.Future[bool | None],
    ) -> None:
        allow: bool | None = None
        try:
            client = self._link.client
            if client is not None and self._link.online:
                async with asyncio.timeout(DEFAULT_PREVENTION_TIMEOUT):
                    verdict = await self._scan(client, guard.vm, relpath, fd)
                self._remember(fd, identity, verdict)
                allow = verdict.get("action") == "allow"
        except Exception as exc:  # the watch delivers it anyway
            log.debug("VM %s: post-write scan of %s: %s", guard.vm, relpath, exc)
        finally:
            if self._inflight.get(identity) is fut:
                del self._inflight[identity]
            if not fut.done():
                fut.set_result(allow)
            with self._prescan_lock:
                self._prescans -= 1
            os.close(fd)

    async def _resolve(self, guard: Guard, held: Held) -> None:
        """Get ``held`` its answer: the verdict's, or the fail mode's."""
        outcome: Outcome = "unreachable"
        allow: bool | None = None
        try:
            allow = await self._shared_ask(guard, held)
        except asyncio.CancelledError:
            guard.answer(held, held.fail_open, None)
            raise
        except TimeoutError:
            outcome = "timeouts"
        except Exception as exc:
            client = self._link.client
            if isinstance(exc, ConnectionError) and client is not None:
                self._link.lost(client, exc)
            log.debug("VM %s: %s: no verdict: %s", held.vm, held.relpath, exc)
        if allow is None:
            if guard.answer(held, held.fail_open, outcome):
                self._log_fail_mode(held, outcome)
        else:
            guard.answer(held, allow, None)

    async def _shared_ask(self, guard: Guard, held: Held) -> bool | None:
        """Opens of one identity at once (an exec is two events; a storm of readers) share
        one request."""
        shared = self._inflight.get(held.identity)
        if shared is not None:
            result = await asyncio.shield(shared)
            if result is not None or not self._link.online:
                return result
            # That request got no verdict (e.g. a post-write scan that timed out): ask anew.
        fut: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._inflight[held.identity] = fut
        result = None
        try:
            result = await self._ask(guard, held)
            return result
        finally:
            if self._inflight.get(held.identity) is fut:
                del self._inflight[held.identity]
            fut.set_result(result)

    async def _ask(self, guard: Guard, held: Held) -> bool | None:
        """The verdict's answer for ``held`` (None: no verdict, use the fail mode)."""
        link = self._link
        client = link.client
        if client is None or not link.online:
            return None
        fd = guard.dup_pending(held)
        if fd is None:
            return None  # answered meanwhile (its deadline passed)
        try:
            # asyncio.timeout, not wait_for: no extra task per open on the hot path.
            async with asyncio.timeout(max(held.deadline - time.monotonic(), 0.001)):
                verdict = await self._scan(client, held.vm, held.relpath, fd)
            self._remember(fd, held.identity, verdict)
        finally:
            os.close(fd)
        allow = verdict.get("action") == "allow"
        if verdict.get("status") == "infected":
            what = "exec" if held.exec_ else "open"
            log.warning(
                "VM %s: %s: %s FOUND; %s %s",
                held.vm,
                held.relpath,
                ", ".join(verdict.get("matches") or ["?"]),
                what,
                "allowed (policy)" if allow else "denied",
            )
        return allow

    async def _scan(self, client: ShimClient, vm: str, relpath: str, fd: int) -> Verdict:
        """The verdict on the file behind ``fd``: passed as is on a unix socket (nothing is
        opened again), streamed on TCP. At ``access`` priority: an open is waiting."""
        address = self._link.address  # may change (failover): the answer is per address
        if self._unix is None or self._unix[0] != address:
            from ..protocol import parse_address

            self._unix = (address, parse_address(address)[0] == "unix")
        if self._unix[1]:
            return await client.scan_fd(vm, relpath, fd, prio="access")
        with os.fdopen(fd, "rb", closefd=False) as f:
            f.seek(0)
            return await client.scan_stream(vm, relpath, f, prio="access")

    def _remember(self, fd: int, identity: Identity, verdict: Verdict) -> None:
        """Memo the verdict if the file did not change while it was read."""
        version = verdict.get("pattern_version")
        self.memo.observe_version(version)
        if verdict.get("status") not in ("clean", "infected"):
            return
        try:
            unchanged = identity_of(os.fstat(fd)) == identity
        except OSError:
            return
        if unchanged:
            self.memo.put(identity, verdict.get("action") == "allow", version)

    def _log_fail_mode(self, held: Held, outcome: str) -> None:
        now = time.monotonic()
        if now - self._last_timeout_log >= TIMEOUT_LOG_INTERVAL:
            self._last_timeout_log = now
            log.warning(
                "VM %s: %s: no verdict (%s); %s by the fail mode",
                held.vm,
                held.relpath,
                "timeout" if outcome == "timeouts" else "appliance unreachable",
                "allowed" if held.fail_open else "denied",
            )

    def _watch_deadlines(self) -> None:
        """The watchdog thread: answer held opens whose deadline passed, whatever the loop
        is doing."""
        while not self._stop.wait(WATCHDOG_TICK):
            now = time.monotonic()
            for guard in list(self.guards.values()):
                for held in guard.expire(now):
                    self._log_fail_mode(held, "timeouts")
