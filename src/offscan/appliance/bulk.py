"""New content in bulk: the files of a batch that the identity memo does not know, judged in
two thread-pool jobs per group instead of two per file.

A batch's new files are split into up to ``gate.limit`` groups; each group, holding one
admission slot, hashes all its files in one job, looks the digests up in the verdict cache on
the event loop, claims the unknown contents in the pipeline's single-flight (so a concurrent
request for the same content joins this match instead of starting its own: invariant 2), and
matches them in a second job. The verdicts are then finished as single scans' are
(:meth:`Pipeline._finish`: actions on a detection, the event line, the counters). A file the
memo-and-cache rules treat specially (a pending revalidation, a content another request is
matching) takes :meth:`Pipeline.judge` on its own. Reads VM files only through the
descriptors it is handed; writes only through the verdict cache.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..cache import CachedVerdict, Identity
from ..engine import ReadDigest, ScanResult, read_digest
from .pipeline import _reason

if TYPE_CHECKING:
    from ..engine import Matcher
    from ..protocol.messages import ApplianceVerdictSource, VerdictRecord
    from .inventory import VMRecord
    from .pipeline import Pipeline

MIN_GROUP = 8  # files per group below which a batch is not split further


@dataclass
class NewFile:
    """One file of a batch whose content is not known yet (its descriptor is open)."""

    vm: VMRecord
    path: str
    fd: int
    st: os.stat_result
    prio: int


def _digest_all(
    jobs: list[tuple[int, int]],
) -> list[tuple[ReadDigest, os.stat_result] | OSError]:
    """(the read and digest, fstat after) of each (fd, size), on a pool thread: one read per
    file, whose bytes (a small file's) are kept so a miss is matched without a second read."""
    out: list[tuple[ReadDigest, os.stat_result] | OSError] = []
    for fd, size in jobs:
        try:
            read = read_digest(fd, size)
            out.append((read, os.fstat(fd)))
        except OSError as exc:
            out.append(exc)
    return out


def _match_all(
    matcher: Matcher, jobs: list[tuple[int, str, bytearray | None]]
) -> list[tuple[ScanResult, Any]]:
    """(result, fstat after or None) of matching each (fd, path, bytes already read or None);
    on a pool thread."""
    out: list[tuple[ScanResult, Any]] = []
    for fd, path, data in jobs:
        res = matcher.scan_fd(fd, path=path, allmatch=True, preread=data)
        try:
            after: Any = os.fstat(fd)
        except OSError:
            after = None
        out.append((res, after))
    return out


async def judge_new(
    pipeline: Pipeline, files: list[NewFile], t0: float
) -> list[VerdictRecord | BaseException]:
    """Verdicts for ``files`` (in order; a failure in its place), groups in parallel."""
    groups = max(1, min(pipeline.gate.limit, len(files) // MIN_GROUP))
    parts = [files[i::groups] for i in range(groups)]
    done = await asyncio.gather(*(_group(pipeline, part, t0) for part in parts))
    out: list[VerdictRecord | BaseException] = [RuntimeError("not judged")] * len(files)
    for g, results in enumerate(done):
        for j, res in enumerate(results):
            out[g + j * groups] = res
    return out


async def _group(
    pipeline: Pipeline, files: list[NewFile], t0: float
) -> list[VerdictRecord | BaseException]:
    """One group: hash, look up, claim, match, finish. Long: the phases in order, each a
    loop over the group, is what keeps the hops per group (not per file)."""
    loop = asyncio.get_running_loop()
    counters = pipeline.counters
    eng = pipeline.engine
    judged: list[tuple[Any, ApplianceVerdictSource, bytes | None] | None] = [None] * len(files)
    alone: list[int] = []  # files that take Pipeline.judge on their own
    leaders: dict[tuple[bytes, int, str], list[int]] = {}
    kept: dict[int, bytearray | None] = {}  # a leader's bytes, read with its digest
    claims: dict[tuple[bytes, int, str], asyncio.Future[Any]] = {}
    try:
        async with pipeline.gate.slot(min(f.prio for f in files)):
            digests = await loop.run_in_executor(
                pipeline.pool, _digest_all, [(f.fd, f.st.st_size) for f in files]
            )
            memo_puts: list[tuple[Identity, bytes]] = []
            for i, (f, got) in enumerate(zip(files, digests, strict=True)):
                if isinstance(got, OSError):
                    judged[i] = (ScanResult(f.path, "error", reason=_reason(got)), "scan", None)
                    continue
                read, after = got
                digest = read.digest
                counters.bytes_read += read.nread
                ident = Identity.from_stat("local", f.st)
                if Identity.from_stat("local", after) == ident and read.nread == f.st.st_size:
                    memo_puts.append((ident, digest))
                pipeline.locations.add(digest, f.vm.name, f.path, ident)
                size = f.st.st_size
                cached = pipeline.cache.get(digest, size, eng.version)
                key = (digest, size, eng.version)
                if cached is not None:
                    counters.served_digest += 1
                    judged[i] = (cached, "digest", digest)
                elif eng.revalidation is not None or pipeline.shared is not None:
                    # a pending revalidation, or the fleet's shared tier to ask first (and its
                    # cluster-wide single-flight): Pipeline.judge, served its digest by the memo
                    alone.append(i)
                elif key in leaders:
                    leaders[key].append(i)
                elif (claim := pipeline.flights.lead(key)) is not None:
                    leaders[key], claims[key] = [i], claim
                    kept[i] = read.data
                else:  # being matched for another request: join it
                    alone.append(i)
            pipeline.memo.put_many(memo_puts)  # one identity-log write for the group
            if leaders:
                jobs = [
                    (files[idx[0]].fd, files[idx[0]].path, kept.pop(idx[0]))
                    for idx in leaders.values()
                ]
                matched = await loop.run_in_executor(pipeline.pool, _match_all, eng.matcher, jobs)
                puts: list[CachedVerdict] = []
                for (key, idx), job, (res, after) in zip(
                    leaders.items(), jobs, matched, strict=True
                ):
                    _matched(pipeline, files[idx[0]], key, res, after, puts, reread=job[2] is None)
                    claim = claims.pop(key)
                    if not claim.done():
                        claim.set_result(res)
                    counters.joined_in_flight += len(idx) - 1
                    for i in idx:
                        judged[i] = (res, "scan", key[0])
                pipeline.cache.put_many(puts)  # one verdict-log write for the group
    finally:
        for claim in claims.values():  # failed or cancelled before matching: let joiners retry
            if not claim.done():
                claim.set_exception(RuntimeError("bulk match did not complete"))
    out: list[VerdictRecord | BaseException] = []
    for i, f in enumerate(files):
        try:
            if i in alone:
                out.append(await pipeline.judge(f.vm, f.path, f.fd, f.prio, t0))
                continue
            item = judged[i]
            assert item is not None
            res, source, known = item
            out.append(
                await pipeline._finish(f.vm, f.path, res, source, known, t0, eng, ino=f.st.st_ino)
            )
        except Exception as exc:  # one file's failure is its own answer
            out.append(exc)
    return out


def _matched(
    pipeline: Pipeline,
    f: NewFile,
    key: tuple[bytes, int, str],
    res: ScanResult,
    after: os.stat_result | None,
    puts: list[CachedVerdict],
    *,
    reread: bool,
) -> None:
    """Count a content matched now (``reread``: read again, not from its digest's bytes);
    its verdict goes to ``puts`` (to be cached) if the file did not change while read."""
    counters = pipeline.counters
    counters.contents_matched += 1
    if reread:  # else matched from the bytes read for its digest
        counters.bytes_read += res.bytes_scanned
    counters.bytes_matched += res.bytes_scanned
    digest, size, version = key
    unchanged = (
        not res.changed
        and after is not None
        and Identity.from_stat("local", after) == Identity.from_stat("local", f.st)
    )
    if res.status != "error" and unchanged:
        puts.append(
            CachedVerdict(res.status, res.matches, version, digest, size, pipeline.clock.time())
        )
