"""The scan pipeline: how one request for one file's content becomes a verdict. Admission
(on-access before on-demand, bounded concurrency) → identity memo (stat only) → content digest
(SHA-256) → verdict cache keyed by (digest, size, pattern version), or revalidation of the
previous version's verdict by the added signatures only → single-flight → the matcher in a
thread pool → :meth:`Verdicts.finish <.verdicts.Verdicts.finish>`; nothing blocking runs on the
event loop. An in-process seam: :class:`Pipeline` gets every collaborator from its constructor
(the current engine as a callable, the cache, the memos, the registry, the verdict recorder with
its actions and vault, the pools and the clock), so it can be driven without sockets or
subprocesses. It reads VM files only through descriptors (opened confined to the VM root, or
passed by the shim) and writes only through the verdict cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import heapq
import itertools
import os
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .. import policy as policies
from .. import protocol
from ..cache import CachedVerdict, Identity, IdentityMemo, SingleFlight, VerdictCache
from ..cache.extents import ExtentIndex
from ..confine import ConfinementError, check_relpath, open_confined
from ..engine import ScanResult, read_digest
from .common import SYSTEM_CLOCK, Clock, RequestFailed, close_fds
from .hot import HotHits
from .inventory import LocationIndex, VMRecord
from .limits import StreamAborted, StreamItem
from .registry import Registry
from .status import Counters
from .verdicts import Judged, Verdicts

if TYPE_CHECKING:
    from ..cache.redis_tier import SharedTier
    from ..protocol.messages import ApplianceVerdictSource, VerdictRecord
    from .patterns import Engine

# Where a known content's digest came from (the verdict's ``source`` when the cache answers).
DigestSource = Literal["identity", "clone", "digest"]

PRIORITIES = {"access": 0, "demand": 1}
BULK_JOBS = 2  # bulk jobs in the pool at once (1, 2 and 4 measured: bench/RESULTS.md)
T = TypeVar("T")


class _StreamStalled(Exception):
    """No chunk arrived within the chunk timeout."""


class PriorityGate:
    """At most ``limit`` holders; waiters are admitted by priority, then arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self, prio: int) -> AsyncIterator[None]:
        await self._acquire(prio)
        try:
            yield
        finally:
            self._release()

    @contextlib.asynccontextmanager
    async def released(self, prio: int) -> AsyncIterator[None]:
        """Inside :meth:`slot`: give the slot up while waiting on something that neither
        reads nor matches (a round trip to the fleet's tier), then take one again."""
        self._release()
        try:
            yield
        finally:
            try:
                await self._acquire(prio)
            except asyncio.CancelledError:
                self.active += 1  # the enclosing slot() gives it back on the way out
                raise

    async def _acquire(self, prio: int) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (prio, next(self._seq), fut))
        try:
            await fut  # the releaser hands its slot over (active stays counted)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()
            else:
                self._waiters = [w for w in self._waiters if w[2] is not fut]
                heapq.heapify(self._waiters)
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self.active -= 1


class ThreadFlights:
    """Single-flight for contents matched on pool threads (:mod:`.bulk` jobs), which learn a
    content's digest and match it in the same job, with no event-loop step in between to
    claim it in :class:`~offscan.cache.SingleFlight`. A job claims a key here (or finds it
    claimed, by another job, or on the loop) under one lock; :meth:`Pipeline._match` checks
    here after registering its own flight, so a content is matched once either way. A claim
    is a dict entry; the future a waiter needs is made only when someone waits (rare)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, list[concurrent.futures.Future[Any]]] = {}

    def claim(
        self, key: Hashable, on_loop: SingleFlight
    ) -> tuple[bool, concurrent.futures.Future[Any] | None]:
        """(claimed, future): (True, None): mine, to end with :meth:`done`; (False, future):
        another job's, whose result the future gets; (False, None): the event loop is
        matching it (join it there)."""
        with self._lock:
            if key in on_loop:
                return False, None
            waiters = self._calls.get(key)
            if waiters is None:
                self._calls[key] = []
                return True, None
            fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
            waiters.append(fut)
            return False, fut

    def waiting(self, key: Hashable) -> concurrent.futures.Future[Any] | None:
        """A future for the result of a bulk job matching ``key`` now, or None."""
        with self._lock:
            waiters = self._calls.get(key)
            if waiters is None:
                return None
            fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
            waiters.append(fut)
            return fut

    def done(self, key: Hashable, result: Any = None, exc: BaseException | None = None) -> None:
        with self._lock:
            waiters = self._calls.pop(key)
        for fut in waiters:
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)


def _unfit_descriptor(fd: int) -> str | None:
    """Why a descriptor a shim passed cannot be judged (not a regular file, not open for
    reading), or None. Only a regular file's content is identified by its stat, so anything
    else (a pipe, a socket, ``/dev/zero``) would poison the identity memo and the cache."""
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        return f"descriptor cannot be examined: {_reason(exc)}"
    if not stat.S_ISREG(st.st_mode):
        return f"descriptor is not a regular file ({_file_kind(st.st_mode)})"
    if flags & os.O_ACCMODE == os.O_WRONLY or flags & os.O_PATH:
        return "descriptor is not open for reading"
    return None


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_IFIFO: "a pipe",
        stat.S_IFSOCK: "a socket",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
        stat.S_IFDIR: "a directory",
        stat.S_IFLNK: "a symlink",
    }
    return kinds.get(stat.S_IFMT(mode), "not a file")


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "file vanished before it could be read"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"{exc.strerror or exc}"


class Pipeline:
    """Scan requests to verdicts. ``engine()`` returns the current :class:`~.patterns.Engine`;
    a request takes it once and keeps it to the end, so a swap never splits a request."""

    def __init__(
        self,
        engine: Callable[[], Engine],
        *,
        cache: VerdictCache,
        memo: IdentityMemo,
        registry: Registry,
        verdicts: Verdicts,
        gate: PriorityGate,
        pool: Executor,
        stream_pool: Executor,
        counters: Counters,
        inherited: IdentityMemo | None = None,
        locations: LocationIndex | None = None,
        clock: Clock = SYSTEM_CLOCK,
        chunk_timeout: float = 3 * protocol.DEFAULT_HEARTBEAT,
        shared: SharedTier | None = None,
        extents: ExtentIndex | None = None,
    ) -> None:
        self._engine = engine
        self.shared = shared  # the fleet's L2 tier in Redis (cache/redis_tier.py), if any
        self.cache = cache
        self.memo = memo
        # clone file identity -> master digest (see clones.py)
        self.inherited = inherited if inherited is not None else IdentityMemo()
        self.locations = locations if locations is not None else LocationIndex()
        # repeated clean hits of batches, one lookup each (hot.py)
        self.hot = HotHits(self.memo, self.inherited, cache, self.locations)
        self.registry = registry
        self.verdicts = verdicts
        self.gate = gate
        # bulk jobs (:mod:`.bulk`) at once: their Python half holds the GIL, so more of them
        # than there are CPUs only hand the GIL around (bench/RESULTS.md, issue 15)
        self.bulk_gate = PriorityGate(max(1, min(gate.limit, BULK_JOBS)))
        self.pool = pool
        self.stream_pool = stream_pool
        self.counters = counters
        self.clock = clock
        self.chunk_timeout = chunk_timeout  # seconds a stream may wait for its next chunk
        self.flights = SingleFlight()
        self.thread_flights = ThreadFlights()  # contents being matched by bulk jobs
        self.request_kinds: dict[str, int] = {"access": 0, "demand": 0, "stream": 0}
        # reflinked copies: digests learnt from shared extents (see cache/extents.py)
        self.extents = extents if extents is not None else ExtentIndex(open_confined)

    @property
    def engine(self) -> Engine:
        return self._engine()

    # -- requests -------------------------------------------------------------------------

    async def scan_request(self, shim: str, msg: dict[str, Any], fds: list[int]) -> VerdictRecord:
        """A ``scan`` frame in ``path`` or ``fd`` mode; the descriptors in ``fds`` are closed."""
        t0 = self.clock.monotonic()
        vm = self.registry.owned(shim, msg["vm"])
        path = msg["path"]
        mode = msg.get("mode", "path")
        try:
            check_relpath(path)  # refuse escapes before anything, exclusions included
        except ConfinementError as exc:
            self.verdicts.refused(vm, shim, path, exc)
        policy = self.registry.effective_policy(vm)
        why = policies.excluded(policy, path)
        if why:
            return await self._excluded(vm, path, why, t0)
        prio = PRIORITIES.get(msg.get("prio", "access"), 1)
        self.request_kinds["access" if prio == 0 else "demand"] += 1
        fd = -1
        try:
            if mode == "fd":
                if len(fds) != 1:
                    raise RequestFailed("malformed", "fd mode needs exactly one descriptor")
                fd = fds.pop()
                unfit = _unfit_descriptor(fd)  # before anything reads, hashes or caches it
                if unfit:
                    res = ScanResult(path, "error", reason=unfit)
                    return await self._finish(vm, path, res, "scan", None, t0, self.engine)
            elif mode == "path":
                try:
                    fd = await asyncio.get_running_loop().run_in_executor(
                        self.pool, lambda: open_confined(vm.root, path, strict_root=True)
                    )
                except ConfinementError as exc:
                    self.verdicts.refused(vm, shim, path, exc)
                except OSError as exc:
                    res = ScanResult(path, "error", reason=_reason(exc))
                    return await self._finish(vm, path, res, "scan", None, t0, self.engine)
            else:
                raise RequestFailed("unsupported", f"content mode {mode!r} is not supported")
            size = os.fstat(fd).st_size
            why = policies.excluded(policy, path, size)
            if why:
                return await self._excluded(vm, path, why, t0)
            eng = self.engine
            if size > eng.matcher.max_file_size:  # refused from fstat: never read nor hashed
                limit = eng.matcher.max_file_size
                res = ScanResult(
                    path,
                    "error",
                    reason=f"file size {size} exceeds max file size {limit} bytes",
                    size=size,
                )
                return await self._finish(vm, path, res, "scan", None, t0, eng)
            return await self.judge(vm, path, fd, prio, t0)
        finally:
            if fd >= 0:
                os.close(fd)
            close_fds(fds)

    async def scan_stream(
        self, shim: str, msg: dict[str, Any], chunks: asyncio.Queue[StreamItem]
    ) -> VerdictRecord:
        """Content streamed in chunk frames (remote shims): matched and hashed as it arrives in
        one pass, never spooled. It runs on a thread of its own rather than behind the
        admission gate, so a stream waiting for its chunks cannot starve the others. A stream
        silent for ``chunk_timeout`` is an error; one whose connection went away
        (:data:`~.limits.ABORT`) raises StreamAborted at once."""
        t0 = self.clock.monotonic()
        vm = self.registry.owned(shim, msg["vm"])
        self.request_kinds["stream"] += 1
        size = msg.get("size")
        if not isinstance(size, int) or size < 0:
            raise RequestFailed("malformed", "stream mode needs a non-negative integer size")
        loop = asyncio.get_running_loop()
        timeout = self.chunk_timeout
        eng = self.engine

        def pieces() -> Iterator[bytes]:
            while True:
                fut = asyncio.run_coroutine_threadsafe(chunks.get(), loop)
                try:
                    item = fut.result(timeout)
                except concurrent.futures.TimeoutError:
                    fut.cancel()  # or the pending get would swallow the next chunk
                    raise _StreamStalled from None
                except concurrent.futures.CancelledError:
                    raise StreamAborted from None
                if item is None:
                    return
                if isinstance(item, bytes):
                    yield item
                else:
                    raise StreamAborted

        try:
            res = await self._scan_pieces(eng, msg["path"], size, pieces)
        except _StreamStalled:
            raise RequestFailed(
                "malformed", f"stream sent no chunk for {timeout:g} s; scan abandoned"
            ) from None
        self.counters.contents_matched += 1
        self.counters.bytes_matched += res.bytes_scanned
        digest = bytes.fromhex(res.digest) if res.digest else None
        if res.status != "error" and digest is not None:
            self.cache.put(
                CachedVerdict(res.status, res.matches, eng.version, digest, size, self.clock.time())
            )
        return await self._finish(vm, msg["path"], res, "scan", digest, t0, eng)

    async def _scan_pieces(
        self, eng: Engine, path: str, size: int, pieces: Callable[[], Iterator[bytes]]
    ) -> ScanResult:
        res: ScanResult = await asyncio.get_running_loop().run_in_executor(
            self.stream_pool,
            lambda: eng.matcher.scan_chunks(pieces(), size, path=path, allmatch=True, digest=True),
        )
        return res

    # -- one open file --------------------------------------------------------------------

    async def judge(self, vm: VMRecord, path: str, fd: int, prio: int, t0: float) -> VerdictRecord:
        """The verdict for the open file ``fd`` (``path`` in ``vm``), admitted at ``prio``:
        from the memo and cache when the content is known, else matched once however many
        requests ask for it at the same time."""
        eng = self.engine  # scans that started keep their engine across a swap
        async with self.gate.slot(prio):
            st = os.fstat(fd)
            ident = Identity.from_stat("local", st)
            digest, source, data = await self._digest(fd, st, ident, vm.root, path)
            size = st.st_size
            self.locations.add(digest, vm.name, path, ident)
            cached = self.cache.get(digest, size, eng.version)
            if cached is None and self.shared is not None:  # judged elsewhere in the fleet?
                async with self.gate.released(prio):
                    cached = await self.shared.get(digest, size, eng.version)
            if cached is None and eng.revalidation is not None:
                cached = await self.revalidate(eng, digest, size, fd, ident)
                if cached is not None:
                    return await self._finish(
                        vm, path, cached, "revalidated", digest, t0, eng, ino=st.st_ino
                    )
            if cached is not None:
                if source == "identity":
                    self.counters.served_identity += 1
                elif source == "clone":
                    self.counters.served_clone += 1
                else:
                    self.counters.served_digest += 1
                return await self._finish(vm, path, cached, source, digest, t0, eng, ino=st.st_ino)
            res = await self._match(eng, path, fd, ident, digest, size, data)
            return await self._finish(vm, path, res, "scan", digest, t0, eng, ino=st.st_ino)

    async def _digest(
        self, fd: int, st: os.stat_result, ident: Identity, root: str = "", path: str = ""
    ) -> tuple[bytes, DigestSource, bytearray | None]:
        """The content digest and where it came from: the identity memo, a clone's inherited
        identity, or reading the file (remembered only if the file did not change meanwhile);
        a small file read here keeps its bytes so a cache miss matches them without a 2nd read."""
        known = self.memo.get(ident)
        if known is not None:
            return known, "identity", None
        known = self.inherited.get(ident)
        if known is not None:
            return known, "clone", None
        digest, nread, shared, data = await asyncio.get_running_loop().run_in_executor(
            self.pool, self._read_digest, fd, st, ident, root, path
        )
        if shared:  # a reflinked copy of content digested before: nothing read
            self.memo.put(ident, digest)
            return digest, "clone", None
        self.counters.bytes_read += nread
        if Identity.from_stat("local", os.fstat(fd)) == ident:
            self.memo.put(ident, digest)
        return digest, "digest", data

    def _read_digest(
        self, fd: int, st: os.stat_result, ident: Identity, root: str, path: str
    ) -> tuple[bytes, int, bool, bytearray | None]:
        """(digest, bytes read, from shared extents, the bytes of a small file): the reflink
        index first (cache/extents.py, zero bytes read), else one read that keeps a small
        file's bytes for the match, noted for later copies when the file did not change."""
        known = self.extents.lookup(fd, st)
        if known is not None:
            return known, 0, True, None
        read = read_digest(fd, st.st_size)
        if root and Identity.from_stat("local", os.fstat(fd)) == ident:
            self.extents.note(fd, st, read.digest, root, path)
        return read.digest, read.nread, False, read.data

    async def _match(
        self,
        eng: Engine,
        path: str,
        fd: int,
        ident: Identity,
        digest: bytes,
        size: int,
        data: bytearray | None = None,
    ) -> ScanResult | CachedVerdict:
        """Match the content once for every request asking for it now (single-flight); the
        verdict is cached unless the file changed while it was read."""
        led = False
        key = (digest, size, eng.version)

        async def match() -> ScanResult | CachedVerdict:
            nonlocal led
            pending = self.thread_flights.waiting(key)  # a bulk job is matching it now
            if pending is not None:
                with contextlib.suppress(Exception):  # if it failed: match it here
                    joined: ScanResult | CachedVerdict = await asyncio.wrap_future(pending)
                    return joined
            done = self.cache.get(digest, size, eng.version)  # a bulk job's, since judge looked
            if done is not None:
                return done
            led = True
            self.counters.contents_matched += 1
            res: ScanResult = await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: eng.matcher.scan_fd(fd, path=path, allmatch=True, preread=data)
            )
            if data is None:  # else matched from the bytes read for the digest
                self.counters.bytes_read += res.bytes_scanned
            self.counters.bytes_matched += res.bytes_scanned
            unchanged = not res.changed and Identity.from_stat("local", os.fstat(fd)) == ident
            if res.status != "error" and unchanged:
                self.cache.put(
                    CachedVerdict(
                        res.status, res.matches, eng.version, digest, size, self.clock.time()
                    )
                )
            return res

        res = await self.flights.run(key, self._fleet_once(key, match))
        if not led:  # an identical content was being matched for another request
            self.counters.joined_in_flight += 1
        return res

    def _fleet_once(
        self, key: tuple[bytes, int, str], fn: Callable[[], Awaitable[T]]
    ) -> Callable[[], Awaitable[T | CachedVerdict]]:
        """``fn``, done once across the fleet when there is a shared tier (its verdict if
        another appliance did it); ``fn`` itself otherwise."""
        shared = self.shared
        if shared is None:
            return fn
        return lambda: shared.once(*key, fn)

    async def revalidate(
        self, eng: Engine, digest: bytes, size: int, fd: int, ident: Identity
    ) -> CachedVerdict | None:
        """:meth:`_revalidate`, once per content across the fleet."""
        run = self._fleet_once(
            (digest, size, eng.version), lambda: self._revalidate(eng, digest, size, fd, ident)
        )
        return await run()

    async def _revalidate(
        self, eng: Engine, digest: bytes, size: int, fd: int, ident: Identity
    ) -> CachedVerdict | None:
        """Make the previous version's cached verdict for this content current, reading it
        through the small delta matcher only; None when it must be matched in full."""
        rv = eng.revalidation
        assert rv is not None
        old = self.cache.get(digest, size, rv.old_version)
        if old is None or set(old.matches) & rv.removed:
            if old is not None:
                self.counters.revalidation_rescans += 1
            return None
        t = self.clock.monotonic()
        status, matches = old.status, tuple(old.matches)
        delta = rv.delta
        if delta is not None:
            res: ScanResult = await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: delta.scan_fd(fd, allmatch=True)
            )
            if res.status == "error":
                return None
            self.counters.revalidation_bytes += res.bytes_scanned
            self.counters.bytes_read += res.bytes_scanned
            if res.matches:
                status = "infected"
                matches = matches + tuple(m for m in res.matches if m not in matches)
            if res.changed or Identity.from_stat("local", os.fstat(fd)) != ident:
                return None
        new = CachedVerdict(status, matches, eng.version, digest, size, self.clock.time())
        self.cache.put(new)
        self.counters.revalidations += 1
        self.counters.revalidation_seconds += self.clock.monotonic() - t
        return new

    # -- endings --------------------------------------------------------------------------

    async def _excluded(self, vm: VMRecord, path: str, why: str, t0: float) -> VerdictRecord:
        self.counters.excluded += 1
        res = ScanResult(path, "clean", reason=f"not scanned: {why}")
        return await self._finish(vm, path, res, "excluded", None, t0, self.engine)

    async def _finish(
        self,
        vm: VMRecord,
        path: str,
        res: Judged,
        source: ApplianceVerdictSource,
        digest: bytes | None,
        t0: float,
        eng: Engine,
        *,
        ino: int | None = None,
    ) -> VerdictRecord:
        return await self.verdicts.finish(
            vm, path, res, source, digest, t0, version=eng.version, ino=ino
        )
