"""clamd's commands as a table, like clamd's own ``{name, len, cmdtype, need_arg}`` parser:
:data:`HANDLERS` maps a command word to its :class:`Command` (handler, whether it takes an
argument, needs a ``z``/``n`` prefix, is allowed inside an IDSESSION, is operator-only), and
:func:`dispatch` checks those rules once for every command. Reply strings are clamd 1.4's
(``PONG``, ``stream: OK``, ``PATH: NAME FOUND``, ``... ERROR``, ``UNKNOWN COMMAND``).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..cache import CachedVerdict
from ..confine import ConfinementError, open_confined
from ..engine import ScanResult
from . import clamd_paths as paths
from .clamd_io import ClientGone
from .clamd_stream import scan_stream, threaded_pieces
from .pipeline import PRIORITIES

if TYPE_CHECKING:
    from ..protocol.messages import VerdictRecord
    from .clamd import Client
    from .inventory import VMRecord

__all__ = ["HANDLERS", "Command", "dispatch"]

Handler = Callable[["Client", str], Awaitable[None]]
STREAM_PIECE = 256 << 10  # bytes: stream data is handed to the matching thread in such pieces
STREAM_QUEUE = 4  # pieces waiting for the matching thread (bounds a stream's memory)
ERROR_INVALID_IN_SESSION = "Command invalid inside IDSESSION. ERROR"


@dataclass(frozen=True)
class Command:
    handler: Handler
    need_arg: bool = False
    need_prefix: bool = False
    in_session: bool = True
    operator: bool = False


class _Abort(ClientGone):
    """Ends a stream the client will not finish (sent to the matching thread too)."""


# -- replies ------------------------------------------------------------------------------


def verdict_lines(shown: str, v: VerdictRecord | ScanResult, *, allmatch: bool) -> list[str]:
    """clamd's reply lines for one verdict: ``NAME: SIG FOUND`` (one per match with
    ALLMATCHSCAN, else the first), ``NAME: OK``, or ``NAME: REASON. ERROR``."""
    status = v["status"] if isinstance(v, dict) else v.status
    matches = list(v["matches"] if isinstance(v, dict) else v.matches)
    if status == "infected":
        return [f"{shown}: {m} FOUND" for m in (matches if allmatch else matches[:1])]
    if status == "error":
        reason = (v.get("reason") if isinstance(v, dict) else v.reason) or "scan failed"
        return [f"{shown}: {reason.rstrip('.')}. ERROR"]
    return [f"{shown}: OK"]


# -- simple commands ----------------------------------------------------------------------


async def _ping(c: Client, arg: str) -> None:
    await c.reply("PONG")


def version_line(c: Client) -> str:
    """``ClamAV offscan-X.Y[/DBVERSION/BUILD TIME]``: the database part only when ClamAV
    containers (.cvd/.cld) are loaded, as clamd prints it only for versioned databases."""
    line = f"ClamAV offscan-{__version__}"
    infos = getattr(c.front.appliance.db, "containers", ())
    if infos:
        newest = max(infos, key=lambda i: i.version)
        built = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(newest.build_time))
        line += f"/{newest.version}/{built}"
    return line


async def _version(c: Client, arg: str) -> None:
    await c.reply(version_line(c))


async def _versioncommands(c: Client, arg: str) -> None:
    cmds = " ".join(n for n in HANDLERS if n not in ("END",))
    await c.reply(f"{version_line(c)}| COMMANDS: {cmds} END")


async def _stats(c: Client, arg: str) -> None:
    front, app = c.front, c.front.appliance
    active = sorted(x.current for x in front.stats.active if x.current)
    lines = [
        "POOLS: 1",
        "",
        "STATE: VALID PRIMARY",
        f"THREADS: live {len(front.stats.active)}  idle 0 max {front.options.max_connections} "
        f"idle-timeout {front.options.idle_timeout:g}",
        f"QUEUE: {app.gate.waiting} items",
        *(f"\t{name}" for name in active),
        "",
        "MEMSTATS: heap N/A mmap N/A used N/A free N/A releasable N/A pools 1 "
        "pools_used N/A pools_total N/A",
        f"OFFSCAN: version {__version__} patterns {app.pattern_version} "
        f"verdicts {app.counters.verdicts} detections {app.counters.detections} "
        f"cache_entries {len(app.cache)} clamd_connections {front.stats.connections} "
        f"clamd_streams {front.stats.streams} clamd_refused {front.stats.refused}",
        "END",
    ]
    await c.reply("\n".join(lines))


async def _reload(c: Client, arg: str) -> None:
    await c.reply("RELOADING")
    app = c.front.appliance

    async def reload() -> None:
        try:
            await app.reload()
        except Exception as exc:  # the old engine stays; the operator sees it in the log
            from .common import log

            log.error("clamd RELOAD failed, old patterns kept: %s", exc)

    app._spawn(reload())


async def _shutdown(c: Client, arg: str) -> None:
    c.closing = True
    request = getattr(c.front.appliance, "request_shutdown", None)
    if request is not None:
        request()


async def _end(c: Client, arg: str) -> None:
    c.closing = True


# -- scanning files by path ---------------------------------------------------------------


async def _judge_fd(c: Client, vm: VMRecord, path: str, fd: int) -> VerdictRecord:
    pipeline = c.front.appliance.pipeline
    t0 = c.front.appliance.clock.monotonic()
    return await pipeline.judge(vm, path, fd, PRIORITIES["demand"], t0)


async def _scan_one(c: Client, root: str, rel: str, shown: str, allmatch: bool) -> list[str]:
    loop = asyncio.get_running_loop()
    app = c.front.appliance
    try:
        fd = await loop.run_in_executor(app.pool, open_confined, root, rel)
    except ConfinementError as exc:
        return [f"{shown}: {_confined_reason(exc)}. ERROR"]
    except OSError as exc:
        return [f"{shown}: File path check failure: {exc.strerror or exc}. ERROR"]
    try:
        v = await _judge_fd(c, c.front.vm_for(root), rel, fd)
    finally:
        os.close(fd)
    return verdict_lines(shown, v, allmatch=allmatch)


def _confined_reason(exc: ConfinementError) -> str:
    text = str(exc)
    if "symlink" in text:
        return "Symbolic link not followed"
    if "not a regular file" in text:
        return "Not supported file type"
    return f"Access denied ({text})"


async def _scan_paths(c: Client, arg: str, *, stop_on_found: bool, allmatch: bool,
                      parallel: bool = False) -> None:  # fmt: skip
    """SCAN, CONTSCAN, MULTISCAN and ALLMATCHSCAN: a file, or a directory walked (only
    FOUND and ERROR lines, ``DIR: OK`` when there were none; SCAN stops at the first FOUND)."""
    opts = c.front.options
    loop = asyncio.get_running_loop()
    try:
        target = paths.resolve(opts.roots, arg)
        what = await loop.run_in_executor(c.front.appliance.pool, paths.kind, target)
    except ConfinementError as exc:
        c.front.stats.refused += 1
        await c.reply(f"{arg}: {_confined_reason(exc)}. ERROR")
        return
    except OSError as exc:
        await c.reply(f"{arg}: File path check failure: {exc.strerror or exc}. ERROR")
        return
    if what != "dir":
        reason = {"symlink": "Symbolic link not followed", "special": "Not supported file type"}
        if what in reason:
            await c.reply(f"{arg}: {reason[what]}. ERROR")
            return
        for line in await _scan_one(c, target.root, target.rel, arg, allmatch):
            await c.reply(line)
        return
    found = await loop.run_in_executor(
        c.front.appliance.pool, lambda: list(paths.walk(target, opts.max_recursion))
    )
    said = False
    sem = asyncio.Semaphore(max(1, c.front.appliance.config.concurrency) if parallel else 1)

    async def one(rel: str, err: str | None) -> list[str]:
        if err is not None:
            return [f"{target.display(rel)}: {err}. ERROR"]
        async with sem:
            lines = await _scan_one(c, target.root, rel, target.display(rel), allmatch)
        return [ln for ln in lines if not ln.endswith(": OK")]

    if parallel:  # in batches, so a huge tree never becomes a task per file at once
        batch = 4 * max(1, c.front.appliance.config.concurrency)
        for i in range(0, len(found), batch):
            for lines in await asyncio.gather(*(one(r, e) for r, e in found[i : i + batch])):
                for line in lines:
                    said = True
                    await c.reply(line)
    else:
        for rel, err in found:
            lines = await one(rel, err)
            for line in lines:
                said = True
                await c.reply(line)
            if stop_on_found and any(ln.endswith(" FOUND") for ln in lines):
                return
    if not said:
        await c.reply(f"{arg}: OK")


async def _scan(c: Client, arg: str) -> None:
    await _scan_paths(c, arg, stop_on_found=True, allmatch=False)


async def _contscan(c: Client, arg: str) -> None:
    await _scan_paths(c, arg, stop_on_found=False, allmatch=False)


async def _multiscan(c: Client, arg: str) -> None:
    await _scan_paths(c, arg, stop_on_found=False, allmatch=False, parallel=True)


async def _allmatchscan(c: Client, arg: str) -> None:
    await _scan_paths(c, arg, stop_on_found=True, allmatch=True)


# -- descriptors and streams --------------------------------------------------------------


async def _fildes(c: Client, arg: str) -> None:
    if not c.sock.is_unix:
        await c.reply("FILDES: only supported on a unix socket. ERROR")
        return
    fd = await c.sock.take_fd(c.front.options.read_timeout)
    if fd is None:
        await c.reply("No file descriptor received. ERROR")
        return
    c.front.stats.fildes += 1
    shown = f"fd[{fd}]"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            await c.reply(f"{shown}: Not supported file type. ERROR")
            return
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            await c.reply(f"{shown}: Descriptor not open for reading. ERROR")
            return
        v = await _judge_fd(c, c.front.vm_for(None), shown, fd)
        for line in verdict_lines(shown, v, allmatch=False):
            await c.reply(line)
    finally:
        os.close(fd)


async def _instream(c: Client, arg: str) -> None:
    """Chunks (4-byte big-endian length, data; a zero length ends) matched as they arrive on a
    worker thread; more than StreamMaxLength in all is refused as clamd refuses it."""
    front, opts = c.front, c.front.options
    app = front.appliance
    loop = asyncio.get_running_loop()
    plan = front.stream_plan()
    eng = app.engine
    queue: asyncio.Queue[bytes | None | BaseException] = asyncio.Queue(STREAM_QUEUE)
    t0 = app.clock.monotonic()
    front.stats.streams += 1
    job = loop.run_in_executor(
        front.stream_pool,
        # the thread waits longer than the socket reads, so a stalled client is noticed here
        lambda: scan_stream(plan, threaded_pieces(queue, loop, 2 * opts.read_timeout + 1)),
    )
    total = 0
    try:
        while True:
            (n,) = struct.unpack(">I", await c.sock.read_exact(4, opts.read_timeout))
            if n == 0:
                break
            if total + n > opts.stream_max_length:
                await c.reply("INSTREAM size limit exceeded. ERROR")
                c.closing = True
                raise _Abort("stream too long")
            total += n
            while n:
                piece = await c.sock.read_some(min(n, STREAM_PIECE), opts.read_timeout)
                n -= len(piece)
                await _offer(queue, job, piece)  # dropped once the matcher stopped (time limit)
        await _offer(queue, job, None)
        res: ScanResult = await job
    except BaseException:
        if not job.done():
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(_Abort("client went away"))
        await asyncio.gather(job, return_exceptions=True)
        raise
    front.stats.stream_bytes += total
    app.counters.contents_matched += 1
    app.counters.bytes_matched += res.bytes_scanned
    digest = bytes.fromhex(res.digest) if res.digest else None
    if res.status != "error" and digest is not None:
        app.cache.put(
            CachedVerdict(res.status, res.matches, eng.version, digest, total, app.clock.time())
        )
    v = await app.verdicts.finish(
        front.vm_for(None), "stream", res, "scan", digest, t0, version=eng.version
    )
    for line in verdict_lines("stream", v, allmatch=False):
        await c.reply(line)


async def _offer(
    queue: asyncio.Queue[bytes | None | BaseException], job: asyncio.Future[Any], item: bytes | None
) -> None:
    """Put ``item`` for the matching thread, unless (or as soon as) the thread has finished:
    a matcher that stopped early must not leave the reader waiting on a full queue."""
    if job.done():
        return
    put = asyncio.ensure_future(queue.put(item))
    await asyncio.wait({put, job}, return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()


async def _idsession(c: Client, arg: str) -> None:
    c.request = 0  # dispatch numbers the commands that follow


async def _removed(c: Client, arg: str) -> None:
    await c.reply("UNKNOWN COMMAND")
    c.closing = True


HANDLERS: dict[str, Command] = {
    "SCAN": Command(_scan, need_arg=True),
    "QUIT": Command(_end, in_session=False),
    "RELOAD": Command(_reload, in_session=False, operator=True),
    "PING": Command(_ping),
    "CONTSCAN": Command(_contscan, need_arg=True, in_session=False),
    "VERSIONCOMMANDS": Command(_versioncommands, need_prefix=True),
    "VERSION": Command(_version),
    "SHUTDOWN": Command(_shutdown, in_session=False, operator=True),
    "MULTISCAN": Command(_multiscan, need_arg=True, in_session=False),
    "FILDES": Command(_fildes),
    "STATS": Command(_stats),
    "IDSESSION": Command(_idsession, need_prefix=True, in_session=False),
    "INSTREAM": Command(_instream, need_prefix=True),
    "ALLMATCHSCAN": Command(_allmatchscan, need_arg=True, need_prefix=True, in_session=False),
    "END": Command(_end, need_prefix=True),
}


async def dispatch(c: Client, prefix: str, raw: bytes) -> bool:
    """Run one command; False when the connection is to be closed after it. Outside an
    IDSESSION clamd serves one command per connection; inside one, every command is numbered
    and answered ``N: REPLY``."""
    c.delim = b"\0" if prefix == "z" else b"\n"
    text = os.fsdecode(raw)
    name, sep, arg = text.partition(" ")
    cmd = HANDLERS.get(name)
    in_session = c.request is not None
    if in_session:
        if name == "END" and not arg:
            return False
        assert c.request is not None
        c.request += 1
    if cmd is None or (cmd.need_arg and not sep) or (cmd.need_prefix and not prefix):
        await c.reply("UNKNOWN COMMAND")
        return False
    if in_session and (not cmd.in_session or not prefix):
        await c.reply(ERROR_INVALID_IN_SESSION)
        return False
    if cmd.operator and not c.operator:
        c.front.stats.refused += 1
        who = "a TCP client" if c.sock.uid is None else f"uid {c.sock.uid}"
        await c.reply(f"{name}: operator only, refused for {who}. ERROR")
        return False
    c.current = name
    try:
        await cmd.handler(c, arg)
    except ConfinementError as exc:  # pragma: no cover - handlers answer their own
        await c.reply(f"{arg}: {_confined_reason(exc)}. ERROR")
    finally:
        c.current = ""
    return c.request is not None and not c.closing
