"""``scan-batch`` frames: many scans in one frame, cache hits answered without a task each.

:class:`BatchScans` serves the batches of one :class:`~.session.Session`. For a batch it
opens every path-mode file in one thread-pool job (confined to the VM root, as a single scan
does), then, on the event loop, answers each file whose identity the memo knows and whose
content the verdict cache holds under the current pattern version: no task, no further
thread hop, the verdict encoded from a per-content template (:mod:`.fastpath`). Those
verdicts' event-log lines are group-committed and the verdicts leave in one ``verdict-batch``
frame. Every other scan (a miss, an infected hit whose actions must run, an exclusion, a
refusal, an unknown VM) takes the ordinary pipeline in a task of its own, exactly as a single
``scan`` would; its verdict joins the next ``verdict-batch``, its failure is an ``error`` frame.
It touches the session's connection and the descriptors of the batch, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .. import policy as policies
from .. import protocol
from ..cache import Identity
from ..confine import ConfinementError, check_relpath, identify_confined_many, open_confined_many
from .bulk import NewFile, judge_new
from .common import RequestFailed, close_fds, log
from .fastpath import Tail, VerdictCodec, Where, batch_frame, encode_item
from .hot import HotEntry

if TYPE_CHECKING:
    from ..cache import CachedVerdict
    from ..protocol.messages import BatchVerdict, ErrorMessage
    from .inventory import VMRecord
    from .pipeline import DigestSource
    from .session import Session

BATCH_LIMIT = protocol.MAX_BATCH  # what the welcome offers (credits bound it further)
SINGLES = 64  # buffered single scan frames served together
COALESCE = 256  # scans of buffered scan-batch frames served together (one walk, one send)
_R = TypeVar("_R")


# (scan, its VM, fd, fstat, identity); fd None: looked up by path, not opened (no fstat)
_Entry = tuple[dict[str, Any], "VMRecord", int | None, os.stat_result | None, Identity]
_Known = tuple[_Entry, Identity, bytes, "DigestSource"]  # its digest, and what told it


def _by_root(
    jobs: list[tuple[str, str]], many: Callable[..., list[_R | OSError]]
) -> list[_R | None]:
    """``many(root, paths, strict_root=True)`` for each root of the (root, path) jobs, the
    results back in job order; None where that failed (the slow path tries again and
    reports why)."""
    out: list[_R | None] = [None] * len(jobs)
    roots = {root for root, _ in jobs}
    if len(roots) == 1:  # the common case, one VM's scans: no grouping
        try:
            got = many(roots.pop(), [path for _, path in jobs], strict_root=True)
        except OSError:
            return out
        return [None if isinstance(res, OSError) else res for res in got]
    by_root: dict[str, list[int]] = {}
    for i, (root, _path) in enumerate(jobs):
        by_root.setdefault(root, []).append(i)
    for root, idx in by_root.items():
        try:
            got = many(root, [jobs[i][1] for i in idx], strict_root=True)
        except OSError:  # the root itself is gone: every scan of it takes the slow path
            continue
        for i, res in zip(idx, got, strict=True):
            out[i] = None if isinstance(res, OSError) else res
    return out


def _split_hot(
    entries: list[_Entry],
    epoch: object,
    table: dict[Identity, HotEntry],
    memo_knows: Callable[[Identity], bool],
    hot: list[tuple[_Entry, HotEntry]],
) -> list[_Entry]:
    """The entries the hot table cannot answer in ``epoch``; those it can appended to
    ``hot`` with their entry (:mod:`.hot`). An entry a clone's inherited identity gave is
    not used once the memo knows that identity: the chain asks the memo first."""
    rest: list[_Entry] = []
    get = table.get
    for entry in entries:
        found = get(entry[4])
        if (
            found is not None
            and found[0] is epoch
            and (found[2] == "identity" or not memo_knows(entry[4]))
        ):
            hot.append((entry, found))
        else:
            rest.append(entry)
    return rest


def _open_all(jobs: list[tuple[str, str]]) -> list[tuple[int, os.stat_result] | None]:
    """Open and fstat each (root, path), confined (:func:`open_confined_many`). Runs on a
    pool thread: one hop for all the misses of a batch."""
    return _by_root(jobs, open_confined_many)


def _stat_all(jobs: list[tuple[str, str]]) -> list[Identity | None]:
    """The identity of each (root, path) without opening it (:func:`identify_confined_many`:
    the refusals of a confined open). On the event loop: a directory walk and one
    ``fstatat`` per file, what a hit costs instead of a thread hop, an open and a close."""
    return _by_root(jobs, _identify_local)


def _identify_local(root: str, paths: list[str], *, strict_root: bool) -> list[Identity | OSError]:
    return identify_confined_many(root, paths, "local", strict_root=strict_root)


class BatchScans:
    """The ``scan-batch`` side of one session: serving batches, and the reply outbox."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.app = session.app
        self.codec = VerdictCodec()
        self._outbox: list[bytes] = []
        self._flushing: asyncio.Task[None] | None = None
        self.fast = 0  # scans answered on the fast path
        self.slow = 0  # scans that took the pipeline

    async def serve(self, shim: str, frames: list[tuple[dict[str, Any], list[int]]]) -> None:
        """Answer ``scan-batch`` frames (validated: ids, modes and descriptor count) that
        arrived together, in one pass: their ids and credits checked frame by frame, in
        order, each frame counting the scans of those before it (a broken rule is fatal,
        raised once the frames before it were served: their hits answered).

        Path-mode scans are looked up by a confined stat on the event loop; the hits are
        answered at once (their event-log lines written in one ``write(2)``, then their
        ``verdict-batch`` frames sent together); only the misses are opened, in one pool
        job."""
        scans: list[dict[str, Any]] = []
        fd_of: dict[int, int] = {}
        ahead: set[int] = set()  # ids of the frames before: not yet in flight
        failure: protocol.ProtocolError | None = None
        for k, (msg, fds) in enumerate(frames):
            try:
                ahead |= self._check_credits(msg["scans"], fds, ahead)
            except protocol.ProtocolError as exc:
                for _msg, rest in frames[k + 1 :]:
                    close_fds(rest)
                failure = exc
                break
            if fds:  # validated: one per fd-mode scan, in order
                it = iter(list(fds))
                fds.clear()  # ours now: each is closed by whoever takes its scan
                for scan in msg["scans"]:
                    if scan["mode"] == "fd":
                        fd_of[scan["id"]] = next(it)
            scans.extend(msg["scans"])
        if scans:
            await self._serve_scans(shim, scans, fd_of)
        if failure is not None:
            raise failure

    async def _serve_scans(
        self, shim: str, scans: list[dict[str, Any]], fd_of: dict[int, int]
    ) -> None:
        t0 = self.app.clock.monotonic()
        entries, to_stat = self._admit(shim, scans, fd_of, t0)
        if to_stat:
            stats = _stat_all([(vm.root, scan["path"]) for scan, vm in to_stat])
            for (scan, vm), ident in zip(to_stat, stats, strict=True):
                if ident is None:
                    self._slow(shim, scan, None, t0)
                else:
                    entries.append((scan, vm, None, None, ident))
        to_open = self.answer(entries, t0, self._outbox)
        await self.drain()
        if to_open:  # the misses: opened (one hop), then judged as fd-mode scans are
            jobs = [(vm.root, scan["path"]) for scan, vm in to_open]
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self.app.pool, _open_all, jobs)
            opened: list[_Entry] = []
            for (scan, vm), got in zip(to_open, results, strict=True):
                if got is None:
                    self._slow(shim, scan, None, t0)
                else:
                    st = got[1]
                    opened.append((scan, vm, got[0], st, Identity.from_stat("local", st)))
            if self.answer(opened, t0, self._outbox):
                raise AssertionError("an opened file was sent to be opened")  # pragma: no cover
            await self.drain()

    def _check_credits(
        self, scans: list[dict[str, Any]], fds: list[int], ahead: set[int]
    ) -> set[int]:
        """One frame's ids (unique, none in flight or in a frame before it: ``ahead``) and
        credits (those in flight, ahead and its own); closes its descriptors if it fails.
        Returns its ids."""
        inflight = self.session.inflight
        credits = self.app.config.credits
        ids = {scan["id"] for scan in scans}
        if len(ids) != len(scans) or not ids.isdisjoint(inflight) or not ids.isdisjoint(ahead):
            close_fds(fds)
            raise protocol.ProtocolError("sequence", "duplicate request id in scan-batch")
        if self.session.over_credits(len(ahead) + len(scans)):
            close_fds(fds)
            raise protocol.ProtocolError("backpressure", f"more than {credits} outstanding scans")
        return ids

    def _admit(
        self, shim: str, scans: list[dict[str, Any]], fd_of: dict[int, int], t0: float
    ) -> tuple[list[_Entry], list[tuple[dict[str, Any], VMRecord]]]:
        """Scans that may take the fast path: fd-mode ones with their fstat, path-mode ones
        to look up; the others go to the pipeline now."""
        fit = self._fit(shim)
        entries: list[_Entry] = []
        to_stat: list[tuple[dict[str, Any], VMRecord]] = []
        for scan in scans:
            fd = fd_of.get(scan["id"])
            vm = fit(scan, fd is not None)
            if vm is None:
                self._slow(shim, scan, fd, t0)
            elif fd is None:
                to_stat.append((scan, vm))
            else:
                try:
                    st = os.fstat(fd)
                except OSError:
                    self._slow(shim, scan, fd, t0)
                else:
                    entries.append((scan, vm, fd, st, Identity.from_stat("local", st)))
        return entries, to_stat

    def _fit(self, shim: str) -> Callable[[dict[str, Any], bool], VMRecord | None]:
        """A test of one scan for the fast path: its VM, when ``shim`` owns it, the path is
        not excluded by name, and (for a descriptor, which no walk checks) the path does not
        escape; None sends the scan to the pipeline, which answers why."""
        registry = self.app.registry
        owned: dict[str, VMRecord | None] = {}
        path_rules: dict[str, dict[str, Any] | None] = {}  # the policy, if it excludes paths

        def fit(scan: dict[str, Any], by_fd: bool) -> VMRecord | None:
            name, path = scan["vm"], scan["path"]
            if name not in owned:
                try:
                    owned[name] = rec = registry.owned(shim, name)
                    effective = registry.effective_policy(rec)
                    rules = effective.get("exclude_ext") or effective.get("exclude_globs")
                    path_rules[name] = effective if rules else None
                except RequestFailed:
                    owned[name] = None
            vm = owned[name]
            # A path-mode scan is checked component by component when it is looked up (an
            # escape fails there and takes the slow path, which refuses it).
            try:
                if vm is None or (by_fd and not check_relpath(path)):
                    return None
            except ConfinementError:
                return None
            rules_of = path_rules.get(name)
            if rules_of is not None and policies.excluded(rules_of, path):
                return None
            return vm

        return fit

    async def serve_singles(self, shim: str, msgs: list[dict[str, Any]]) -> None:
        """Path-mode ``scan`` frames that arrived together (up to :data:`SINGLES` of them),
        served as a batch is: looked up by a confined stat on the event loop, the clean
        hits answered here, each with its own ``verdict`` frame (the frames written
        together, after their event-log lines); every other scan started as a single scan
        always is (:meth:`Session.start_scan <.session.Session.start_scan>`). Request ids
        and credits are checked frame by frame, in order, as for single scans."""
        session = self.session
        t0 = self.app.clock.monotonic()
        fit = self._fit(shim)
        to_stat: list[tuple[dict[str, Any], VMRecord]] = []
        ids: set[int] = set()
        for msg in msgs:
            session.check_scan(msg["id"], ids)
            ids.add(msg["id"])
            vm = fit(msg, False)
            if vm is None:
                ids.discard(msg["id"])
                session.start_scan(shim, msg, [])
            else:
                to_stat.append((msg, vm))
        entries: list[_Entry] = []
        if to_stat:
            stats = _stat_all([(vm.root, msg["path"]) for msg, vm in to_stat])
            for (msg, vm), ident in zip(to_stat, stats, strict=True):
                if ident is None:
                    session.start_scan(shim, msg, [])
                else:
                    entries.append((msg, vm, None, None, ident))
        frames: list[bytes] = []
        for msg, _vm in self.answer(entries, t0, frames, frames=True):
            session.start_scan(shim, msg, [])
        if frames:
            self.app.events.flush()  # logged before sent
            with contextlib.suppress(ConnectionError, OSError):
                await session.conn.send_encoded_many(frames)

    def answer(
        self, entries: list[_Entry], t0: float, out: list[bytes], *, frames: bool = False
    ) -> list[tuple[dict[str, Any], VMRecord]]:
        """Answer the clean cache hits among ``entries`` here: their encoded replies
        appended to ``out`` (``verdict-batch`` items, or whole ``verdict`` frames with
        ``frames``), their event-log lines queued as one write. The other opened ones go to
        the pipeline with their descriptors; the stat-only ones that missed are returned, to
        be opened. In phases, each one call for the whole batch: the size rules, the hot
        table (:mod:`.hot`), the identity memo, the verdict cache, then the replies."""
        pipeline = self.app.pipeline
        to_open: list[tuple[dict[str, Any], VMRecord]] = []
        entries = self._within_size(entries, to_open, t0)
        version = pipeline.engine.version
        epoch = pipeline.hot.epoch(version)  # before the chain is asked (hot.py)
        hot: list[tuple[_Entry, HotEntry]] = []
        if epoch is not None and entries:
            entries = _split_hot(entries, epoch, pipeline.hot.map, pipeline.memo.knows, hot)
        idents = [entry[4] for entry in entries]
        known: list[_Known] = []
        new: list[tuple[int, NewFile]] = []
        kinds = pipeline.request_kinds
        inherited_get = pipeline.inherited.get
        for entry, ident, digest in zip(
            entries, idents, pipeline.memo.get_many(idents), strict=True
        ):
            if digest is not None:
                known.append((entry, ident, digest, "identity"))
                continue
            digest = inherited_get(ident)
            if digest is not None:
                known.append((entry, ident, digest, "clone"))
                continue
            scan, vm, fd, st, _ = entry
            if fd is None or st is None:
                to_open.append((scan, vm))
                continue
            prio = 0 if scan.get("prio", "access") == "access" else 1
            kinds["access" if prio == 0 else "demand"] += 1
            new.append((scan["id"], NewFile(vm, scan["path"], fd, st, prio)))
        keys = [(digest, ident.size, version) for _, ident, digest, _ in known]
        cached_all = pipeline.cache.get_many(keys) if keys else []
        self._reply(known, cached_all, hot, epoch, t0, out, frames, to_open)
        if new:
            self._spawn_new(new, t0)
        return to_open

    def _within_size(
        self, entries: list[_Entry], to_open: list[tuple[dict[str, Any], VMRecord]], t0: float
    ) -> list[_Entry]:
        """The entries no size rule excludes; the excluded ones answered by the pipeline
        (opened first when they were only looked up, as the slow path does)."""
        app = self.app
        size_rules: dict[str, dict[str, Any] | None] = {}  # the VM's policy, if it has one
        kept: list[_Entry] = []
        for entry in entries:
            scan, vm, fd, _, ident = entry
            if vm.name not in size_rules:
                policy = app.registry.effective_policy(vm)
                size_rules[vm.name] = policy if policy.get("max_size") is not None else None
            rules = size_rules[vm.name]
            why = policies.excluded(rules, scan["path"], ident.size) if rules else None
            if not why:
                kept.append(entry)
            elif fd is None:
                to_open.append((scan, vm))
            else:
                os.close(fd)
                self._spawn(scan["id"], app.pipeline._excluded(vm, scan["path"], why, t0), [])
        return kept

    def _reply(
        self,
        known: list[_Known],
        cached_all: list[CachedVerdict | None],
        hot: list[tuple[_Entry, HotEntry]],
        epoch: object | None,
        t0: float,
        out: list[bytes],
        frames: bool,
        to_open: list[tuple[dict[str, Any], VMRecord]],
    ) -> None:
        """The replies (and event-log lines, counters, locations) of the clean hits: the
        ``hot`` ones and those among ``known`` (kept in the hot table when ``epoch``); the
        other ``known`` ones to be opened or, opened, to the pipeline."""
        app = self.app
        now, latency = app.clock.time(), app.clock.monotonic() - t0
        rows: list[tuple[int, Tail, Where]] = []
        seen: list[tuple[bytes, tuple[str, str], Identity]] = []
        access = identity = hot_clones = 0
        hot_table, codec = app.pipeline.hot, self.codec
        for entry, (_, tail, source, where, digest, encoded) in hot:
            scan, vm = entry[0], entry[1]
            if entry[2] is not None:
                os.close(entry[2])
            if scan.get("prio", "access") == "access":
                access += 1
            if source == "identity":
                identity += 1
            else:
                hot_clones += 1
            path = scan["path"]
            if where[1] != path or where[0] != vm.name:  # the same file seen at another path
                where, encoded = (vm.name, path), codec.where(vm.name, path)
                seen.append((digest, where, entry[4]))
                hot_table.store(entry[4], (epoch, tail, source, where, digest, encoded))
            rows.append((scan["id"], tail, encoded))
        for (entry, ident, _, source), cached in zip(known, cached_all, strict=True):
            scan, vm, fd = entry[0], entry[1], entry[2]
            if cached is None or cached.status != "clean":
                if fd is None:
                    to_open.append((scan, vm))
                else:
                    self._slow_opened(scan, vm, fd, t0)
                continue
            if fd is not None:
                os.close(fd)
            if scan.get("prio", "access") == "access":
                access += 1
            if source == "identity":
                identity += 1
            path = scan["path"]
            where, encoded = (vm.name, path), codec.where(vm.name, path)
            tail = codec.tail(cached, source)
            seen.append((cached.digest, where, ident))
            rows.append((scan["id"], tail, encoded))
            if epoch is not None:
                hot_table.store(ident, (epoch, tail, source, where, cached.digest, encoded))
        n = len(rows)
        if not n:
            return
        lines: list[str] | None = [] if app.events.enabled else None
        self.codec.hits(rows, out, lines, now, latency, frames=frames)
        if seen:
            app.pipeline.locations.add_many(seen)
        if hot:
            hot_table.count(len(hot), hot_clones)
        kinds, counters = app.pipeline.request_kinds, app.counters
        kinds["access"] += access
        kinds["demand"] += n - access
        counters.served_identity += identity
        counters.served_clone += n - identity
        counters.verdicts += n
        self.fast += n
        if lines:  # one group-commit line set: written before the replies are sent
            app.events.write_lines(lines)
        histogram = app.verdicts.latency
        if histogram is not None:
            histogram.observe(latency, times=n)

    # -- the slow path: one task per scan, as for single scans ----------------------------

    def _slow(self, shim: str, scan: dict[str, Any], fd: int | None, t0: float) -> None:
        msg = {**scan, "t": "scan"}
        fds = [] if fd is None else [fd]
        self._spawn(scan["id"], self.app.pipeline.scan_request(shim, msg, fds), fds)

    def _slow_opened(self, scan: dict[str, Any], vm: VMRecord, fd: int, t0: float) -> None:
        prio = 0 if scan.get("prio", "access") == "access" else 1
        self.app.pipeline.request_kinds["access" if prio == 0 else "demand"] += 1
        self._spawn(scan["id"], self.app.pipeline.judge(vm, scan["path"], fd, prio, t0), [fd])

    def _spawn_new(self, new: list[tuple[int, NewFile]], t0: float) -> None:
        """New contents of a batch, judged in bulk (:mod:`.bulk`) by one task; every scan
        of it stays in flight (holds its credit) until that task is done."""
        self.slow += len(new)
        task = asyncio.create_task(self._new_replies(new, t0))
        inflight = self.session.inflight
        for rid, _ in new:
            inflight[rid] = task

        def done(_t: object) -> None:
            for rid, _ in new:
                inflight.pop(rid, None)

        task.add_done_callback(done)

    async def _new_replies(self, new: list[tuple[int, NewFile]], t0: float) -> None:
        codec = self.codec
        try:
            results = await judge_new(self.app.pipeline, [f for _, f in new], t0, codec)
        finally:  # the bulk job closed each descriptor it read (fd -1); these are the rest
            for _, f in new:
                if f.fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(f.fd)
                    f.fd = -1
        errors: list[ErrorMessage] = []
        outbox, item_of = self._outbox, codec.item
        for (rid, f), res in zip(new, results, strict=True):
            if isinstance(res, Tail):  # clean: counted and logged already
                outbox.append(item_of(rid, f.vm.name, f.path, res))
            elif isinstance(res, RequestFailed):
                errors.append({"t": "error", "id": rid, "code": res.code, "message": str(res)})
            elif isinstance(res, BaseException):
                log.error("scan %r failed: %r", rid, res)
                errors.append({"t": "error", "id": rid, "code": "internal", "message": str(res)})
            else:
                item = cast("BatchVerdict", {"id": rid, **res})
                outbox.append(encode_item(item))
        await self.drain()
        for failed in errors:
            with contextlib.suppress(ConnectionError, OSError):
                await self.session.conn.send(dict(failed))

    def _spawn(self, rid: int, work: Any, fds: list[int]) -> None:
        self.slow += 1
        task = asyncio.create_task(self._slow_reply(rid, work, fds))
        inflight = self.session.inflight
        inflight[rid] = task
        task.add_done_callback(lambda _t: inflight.pop(rid, None))

    async def _slow_reply(self, rid: int, work: Any, fds: list[int]) -> None:
        failed: ErrorMessage | None = None
        try:
            record = await work
            item = cast("BatchVerdict", {"id": rid, **record})
            self._outbox.append(encode_item(item))
        except RequestFailed as exc:
            failed = {"t": "error", "id": rid, "code": exc.code, "message": str(exc)}
        except Exception as exc:  # one bad request must not end the connection
            log.exception("scan %r failed", rid)
            failed = {"t": "error", "id": rid, "code": "internal", "message": str(exc)}
        finally:
            close_fds(fds)
        if failed is not None:
            self.app.events.flush()
            with contextlib.suppress(ConnectionError, OSError):
                await self.session.conn.send(dict(failed))
        elif self._flushing is None:
            self._flushing = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        try:
            await asyncio.sleep(0)  # let verdicts finishing in this iteration join the frame
            await self.drain()
        finally:
            self._flushing = None

    async def drain(self) -> None:
        """Send every queued verdict, in frames of at most :data:`BATCH_LIMIT`, after
        their event-log lines were written."""
        with contextlib.suppress(ConnectionError, OSError):
            while self._outbox:
                self.app.events.flush()
                items, self._outbox = self._outbox, []
                frames = [
                    batch_frame(items[i : i + BATCH_LIMIT])
                    for i in range(0, len(items), BATCH_LIMIT)
                ]
                await self.session.conn.send_encoded_many(frames)
