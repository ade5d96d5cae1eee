"""New content in bulk: the files of a batch that the identity memo does not know, judged in
one thread-pool job per group instead of several hops per file.

A batch's new files are split into groups of up to :data:`GROUP_FILES` (at most
``gate.limit`` groups); each group, holding one admission slot and one of the pipeline's
``bulk_gate`` slots (:data:`~.pipeline.BULK_JOBS` jobs at once), is one pool job
(:func:`_judge_all`): for each file it reads and hashes the content (one read; a small
file's bytes are kept), looks the digest up in the verdict cache, claims an unknown content
in :class:`~.pipeline.ThreadFlights` (so a concurrent request for the same content joins this
match instead of starting its own: invariant 2), matches it from the bytes read, and closes
the descriptor; the group's identities and verdicts are written to the memo and verdict
logs in one call each. Back on the event loop, a clean verdict is encoded from a
:class:`~.fastpath.Tail` as the hit path's are (the group's event lines queued in one call);
an infected or failed one is finished as a single scan's is (:meth:`Pipeline._finish`:
actions on a detection, the event line, the counters). A file the memo-and-cache rules treat
specially (a pending revalidation, the fleet's shared tier, a content matched on the event
loop) keeps its descriptor and takes :meth:`Pipeline.judge` on its own. Reads VM files only
through the descriptors it is handed; writes only through the memo and the verdict cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

from ..cache import CachedVerdict, Identity
from ..engine import ScanResult, read_digest
from .common import log
from .fastpath import Tail, _json, _map_header, _pack
from .pipeline import _file_kind, _reason

if TYPE_CHECKING:
    from ..protocol.messages import VerdictRecord
    from .fastpath import VerdictCodec
    from .inventory import VMRecord
    from .patterns import Engine
    from .pipeline import Pipeline

GROUP_FILES = 64  # files per pool job: one hop for a whole scan-batch frame (SEND_BATCH)

# What the job found for one file (the kinds of _Outcome).
CACHED, MATCHED, DUPLICATE, WAIT, ALONE, FAILED = range(6)

Judgement: TypeAlias = "Tail | VerdictRecord | BaseException"  # fast, a record, a failure


@dataclass
class NewFile:
    """One file of a batch whose content is not known yet (its descriptor is open; -1 once
    the bulk job has closed it)."""

    vm: VMRecord
    path: str
    fd: int
    st: os.stat_result
    prio: int


class _Outcome:
    """What the pool job found for one file (``kind``: one of CACHED ... FAILED)."""

    __slots__ = ("digest", "ident", "kind", "memo", "nread", "res", "wait")

    def __init__(
        self,
        kind: int,
        res: Any = None,
        digest: bytes | None = None,
        nread: int = 0,
        *,
        memo: bool = False,
        wait: concurrent.futures.Future[Any] | None = None,
    ) -> None:
        self.kind = kind
        self.res = res  # CachedVerdict (CACHED), _Matched (MATCHED), ScanResult (FAILED),
        # the leader's index (DUPLICATE)
        self.digest = digest
        self.nread = nread  # bytes read for the digest
        self.memo = memo  # the identity may be memoised: the file did not change while read
        self.wait = wait  # WAIT: the other job's match
        self.ident: Identity | None = None  # the file's, set by the job with a digest


class _Matched:
    """A content matched by the job: the result, its cache entry if it may be kept, and
    whether the matcher read it again (a file too large to keep its bytes)."""

    __slots__ = ("cached", "reread", "result")

    def __init__(self, result: ScanResult, cached: CachedVerdict | None, reread: bool) -> None:
        self.result = result
        self.cached = cached
        self.reread = reread


def _judge_all(pipeline: Pipeline, eng: Engine, jobs: list[tuple[int, NewFile]]) -> list[_Outcome]:
    """The pool job of one group: every (fd, file) read, hashed, looked up, matched if new
    and closed, except the descriptors of WAIT and ALONE files, which the caller gets back
    (all of them are closed if this raises). Long-ish on purpose: one flat loop per job."""
    out: list[_Outcome] = []
    kept: set[int] = set()
    seen: dict[tuple[bytes, int], int] = {}  # a content matched by this job: its index
    claims: list[tuple[tuple[bytes, int, str], ScanResult]] = []  # held until cached
    try:
        for fd, f in jobs:
            o = _judge_one(pipeline, eng, fd, f, seen)
            if o.kind == MATCHED:
                assert o.digest is not None
                seen[o.digest, f.st.st_size] = len(out)
                claims.append(((o.digest, f.st.st_size, eng.version), o.res.result))
            if o.kind in (WAIT, ALONE):
                kept.add(fd)
            out.append(o)
        puts = [o.res.cached for o in out if o.kind == MATCHED and o.res.cached is not None]
        memo_puts: list[tuple[Identity, bytes]] = []
        for (_fd, f), o in zip(jobs, out, strict=True):
            if o.digest is not None:
                o.ident = ident = Identity.from_stat("local", f.st)
                if o.memo and o.nread == f.st.st_size:
                    memo_puts.append((ident, o.digest))
        pipeline.cache.put_many(puts)  # one verdict-log write for the group
        pipeline.memo.put_many(memo_puts)  # one identity-log write for the group
    except BaseException:
        kept.clear()
        raise
    finally:
        for key, res in claims:  # after the cache has them: a joiner never finds neither
            pipeline.thread_flights.done(key, res)
        for fd, _f in jobs:
            if fd not in kept:
                try:
                    os.close(fd)
                except OSError:
                    pass
    return out


def _judge_one(
    pipeline: Pipeline, eng: Engine, fd: int, f: NewFile, seen: dict[tuple[bytes, int], int]
) -> _Outcome:
    size = f.st.st_size
    matcher = eng.matcher
    if not stat.S_ISREG(f.st.st_mode):  # a shim's descriptor: only a file's stat identifies it
        reason = f"descriptor is not a regular file ({_file_kind(f.st.st_mode)})"
        return _Outcome(FAILED, ScanResult(f.path, "error", reason=reason))
    if size > matcher.max_file_size:  # refused from fstat: never read nor hashed
        reason = f"file size {size} exceeds max file size {matcher.max_file_size} bytes"
        return _Outcome(FAILED, ScanResult(f.path, "error", reason=reason, size=size))
    try:
        read = read_digest(fd, size)
    except OSError as exc:
        return _Outcome(FAILED, ScanResult(f.path, "error", reason=_reason(exc)))
    digest, nread = read.digest, read.nread
    cached = pipeline.cache.get(digest, size, eng.version)
    if cached is not None:
        return _Outcome(CACHED, cached, digest, nread, memo=_unchanged(fd, f.st))
    if eng.revalidation is not None or pipeline.shared is not None:
        # a pending revalidation, or the fleet's shared tier to ask first (and its
        # cluster-wide single-flight): Pipeline.judge, served its digest by the memo
        return _Outcome(ALONE, None, digest, nread, memo=_unchanged(fd, f.st))
    leader = seen.get((digest, size))
    if leader is not None:  # the same content earlier in this group
        return _Outcome(DUPLICATE, leader, digest, nread, memo=_unchanged(fd, f.st))
    key = (digest, size, eng.version)
    flights = pipeline.thread_flights
    mine, other = flights.claim(key, pipeline.flights)
    if not mine:  # another job's match (wait for it), or the event loop's (judge joins it)
        kind = WAIT if other is not None else ALONE
        return _Outcome(kind, None, digest, nread, memo=_unchanged(fd, f.st), wait=other)
    cached = pipeline.cache.get(digest, size, eng.version)  # cached since the first look?
    if cached is not None:
        flights.done(key, cached)
        return _Outcome(CACHED, cached, digest, nread, memo=_unchanged(fd, f.st))
    data = read.data
    reread = data is None or len(data) != size
    try:
        if reread:  # too large to keep its bytes (or it shrank: flagged as changed)
            res = matcher.scan_fd(fd, path=f.path, allmatch=True)
        else:  # from the bytes read for the digest: no second read, no fstat of its own
            res = matcher.scan_bytes(data, allmatch=True)  # type: ignore[arg-type]
        same = _unchanged(fd, f.st)  # since the stat that found it new: the read and the match
    except BaseException as exc:
        flights.done(key, exc=RuntimeError(f"bulk match failed: {exc!r}"))
        raise
    # the claim is ended by _judge_all once the verdict is cached (or none will be)
    entry: CachedVerdict | None = None
    if res.status != "error" and not res.changed and same:
        status = cast("Literal['clean', 'infected']", res.status)
        entry = CachedVerdict(status, res.matches, eng.version, digest, size, pipeline.clock.time())
    matched = _Matched(res, entry, reread=reread)
    return _Outcome(MATCHED, matched, digest, nread, memo=same)


def _unchanged(fd: int, st: os.stat_result) -> bool:
    """Whether the open file still has the identity ``st`` gave it (size, times, inode)."""
    try:
        now = os.fstat(fd)
    except OSError:
        return False
    return (now.st_ino, now.st_size, now.st_mtime_ns, now.st_ctime_ns, now.st_dev) == (
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_dev,
    )


async def judge_new(
    pipeline: Pipeline, files: list[NewFile], t0: float, codec: VerdictCodec
) -> list[Judgement]:
    """Verdicts for ``files`` (in order): a :class:`~.fastpath.Tail` for a clean verdict
    already counted and logged (the caller encodes the reply), a record for any other, a
    failure in its place. Groups run in parallel."""
    groups = max(1, min(pipeline.gate.limit, -(-len(files) // GROUP_FILES)))
    if groups == 1:  # a scan-batch frame's worth: one job, no task of its own
        return await _group(pipeline, files, t0, codec)
    parts = [files[i::groups] for i in range(groups)]
    done = await asyncio.gather(*(_group(pipeline, part, t0, codec) for part in parts))
    out: list[Judgement] = [RuntimeError("not judged")] * len(files)
    for g, results in enumerate(done):
        for j, res in enumerate(results):
            out[g + j * groups] = res
    return out


async def _run_job(pipeline: Pipeline, eng: Engine, files: list[NewFile]) -> list[_Outcome]:
    """:func:`_judge_all` on the pool. The job owns the descriptors from here on: a file
    whose descriptor it closed gets ``fd = -1``; if this is cancelled they are closed when
    the job is done (or at once, if it never started)."""
    jobs = [(f.fd, f) for f in files]
    for f in files:
        f.fd = -1
    cf = pipeline.pool.submit(_judge_all, pipeline, eng, jobs)
    try:
        out = await asyncio.wrap_future(cf)
    except asyncio.CancelledError:
        cf.add_done_callback(lambda c: _close_left(c, jobs))
        raise
    for (fd, f), o in zip(jobs, out, strict=True):
        if o.kind in (WAIT, ALONE):
            f.fd = fd  # still open: the caller closes it
    return out


def _close_left(cf: concurrent.futures.Future[list[_Outcome]], jobs: list[tuple[int, Any]]) -> None:
    """After a cancelled wait: close what the job did not (all if it never ran)."""
    if cf.cancelled():
        left = [fd for fd, _ in jobs]
    elif cf.exception() is not None:
        left = []
    else:
        left = [fd for (fd, _), o in zip(jobs, cf.result(), strict=True) if o.kind in (WAIT, ALONE)]
    for fd in left:
        try:
            os.close(fd)
        except OSError:
            pass


async def _group(
    pipeline: Pipeline, files: list[NewFile], t0: float, codec: VerdictCodec
) -> list[Judgement]:
    """One group: one pool job, then the verdicts (long: counting and encoding are kept flat,
    in one loop, as the hit path's)."""
    eng = pipeline.engine
    prio = min(f.prio for f in files)
    try:
        async with pipeline.bulk_gate.slot(prio), pipeline.gate.slot(prio):
            outcomes = await _run_job(pipeline, eng, files)
    except Exception as exc:  # the job failed as a whole (a closed cache...): each scan's answer
        log.error("bulk job of %d files failed: %r", len(files), exc)
        return [RuntimeError(f"scan failed: {exc}") for _ in files]
    counters, add_location = pipeline.counters, pipeline.locations.add
    clock, events = pipeline.clock, pipeline.verdicts.events
    latency = clock.monotonic() - t0
    line_of = codec.lines(clock.time(), latency) if events.enabled else None
    lines: list[str] = []
    out: list[Judgement] = []
    slow: list[tuple[int, Any, str, bytes | None]] = []  # (index, result, source, digest)
    scan_tails: dict[int, Tail] = {}  # a matched content's tail, by the outcome's index
    version = eng.version
    nread = served = joined = 0
    for i, (f, o) in enumerate(zip(files, outcomes, strict=True)):
        if o.ident is not None and o.digest is not None:
            nread += o.nread
            add_location(o.digest, f.vm.name, f.path, o.ident)
        kind = o.kind
        if kind == CACHED:
            served += 1
            res: Any = o.res
            source = "digest"
        elif kind in (MATCHED, DUPLICATE):
            leader = i if kind == MATCHED else o.res
            res = outcomes[leader].res.result
            source = "scan"
            if kind == MATCHED:
                _count_match(pipeline, res, reread=o.res.reread)
            else:
                joined += 1
        else:  # WAIT, ALONE, FAILED: finished below, one by one
            out.append(RuntimeError("not judged"))
            slow.append((i, o.res, "scan", o.digest))
            continue
        if res.status != "clean":
            out.append(RuntimeError("not judged"))
            slow.append((i, res, source, o.digest))
            continue
        if kind == CACHED:
            tail = codec.tail(res, "digest")
        elif leader in scan_tails:
            tail = scan_tails[leader]
        else:
            tail = scan_tails[leader] = _scan_tail(res, o.digest, version)
        out.append(tail)
        if line_of is not None:
            lines.append(line_of(f.vm.name, f.path, tail))
    counters.bytes_read += nread
    counters.served_digest += served
    counters.joined_in_flight += joined
    fast = len(files) - len(slow)
    if fast:
        counters.verdicts += fast
        events.write_lines(lines)
        histogram = pipeline.verdicts.latency
        if histogram is not None:
            histogram.observe(latency, times=fast)
    for i, res, source, digest in slow:
        out[i] = await _finish_one(pipeline, files[i], outcomes[i], res, source, digest, t0, eng)
    return out


async def _finish_one(
    pipeline: Pipeline,
    f: NewFile,
    o: _Outcome,
    res: Any,
    source: Any,
    digest: bytes | None,
    t0: float,
    eng: Engine,
) -> VerdictRecord | BaseException:
    """A verdict the fast encoding does not cover: a detection (its actions run), an error,
    a content matched elsewhere (waited for), or one that takes :meth:`Pipeline.judge`."""
    try:
        if o.kind == WAIT and o.wait is not None:
            try:
                res = await asyncio.wrap_future(o.wait)
                pipeline.counters.joined_in_flight += 1
            except Exception:  # that match failed: judge it here
                o.kind = ALONE
        if o.kind == ALONE:
            return await pipeline.judge(f.vm, f.path, f.fd, f.prio, t0)
        return await pipeline._finish(f.vm, f.path, res, source, digest, t0, eng, ino=f.st.st_ino)
    except Exception as exc:  # one file's failure is its own answer
        return exc


def _count_match(pipeline: Pipeline, res: ScanResult, *, reread: bool) -> None:
    """Count a content matched now (``reread``: read again, not from its digest's bytes)."""
    counters = pipeline.counters
    counters.contents_matched += 1
    if reread:
        counters.bytes_read += res.bytes_scanned
    counters.bytes_matched += res.bytes_scanned


def _scan_tail(res: ScanResult, digest: bytes | None, version: str) -> Tail:
    """The encoded fields of a clean verdict matched now, as :meth:`Verdicts.record
    <.verdicts.Verdicts.record>` would build them (not kept in the codec: one batch uses it)."""
    if digest is not None and not res.matches and res.reason is None:
        return _CleanScanTail(digest.hex(), version)
    return Tail(
        {
            "status": res.status,
            "matches": list(res.matches),
            "reason": res.reason,
            "action": "allow",
            "source": "scan",
            "digest": digest.hex() if digest else None,
            "pattern_version": version,
        }
    )


class _CleanScanTail(Tail):
    """:class:`~.fastpath.Tail` of the common new-content verdict (clean, no match, no
    reason, source "scan"), its encodings assembled from constants: every field but the
    digest and the version is the same for all of them (tests/test_bulk.py checks the bytes
    against ``Tail``'s own)."""

    __slots__ = ()
    _HEAD = _pack("status") + _pack("clean") + _pack("matches") + _pack([])
    _HEAD += _pack("reason") + _pack(None) + _pack("action") + _pack("allow")
    _HEAD += _pack("source") + _pack("scan") + _pack("digest")
    _ITEM = _map_header(3 + 7) + b"\xa2id"
    _FRAME = _map_header(4 + 7) + b"\xa1t\xa7verdict\xa2id"

    def __init__(self, digest_hex: str, version: str) -> None:
        self.record = {
            "status": "clean",
            "matches": [],
            "reason": None,
            "action": "allow",
            "source": "scan",
            "digest": digest_hex,
            "pattern_version": version,
        }
        self.fields = 7
        self.msgpack = self._HEAD + _pack(digest_hex) + _pack("pattern_version") + _pack(version)
        self.json = (
            '"status":"clean","matches":[],"reason":null,"action":"allow","source":"scan",'
            f'"digest":"{digest_hex}","pattern_version":{_json(version)}'
        )
        self.item_head = self._ITEM
        self.frame_head = self._FRAME
