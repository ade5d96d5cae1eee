"""The appliance (``offscan serve``): one scanner per host serving every VM's shim.

Pipeline per request: admission (on-access before on-demand, bounded concurrency) → identity
memo (stat only) → content digest (SHA-256) → verdict cache keyed by (digest, size, pattern
version) → single-flight → the matcher in a thread pool → verdict, event log line, action.
Nothing blocking runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import hmac
import itertools
import json
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

from . import __version__, protocol
from .cache import CachedVerdict, Identity, IdentityMemo, SingleFlight, VerdictCache, digest_fd
from .confine import ConfinementError, open_confined
from .engine import Matcher, ScanResult
from .signatures import load_database

log = logging.getLogger("offscan.appliance")

DEFAULT_CONCURRENCY = 4  # concurrent reads+scans; DSVA's recommended value, degrading above 8
DEFAULT_CREDITS = 256  # outstanding scan requests per connection
HANDSHAKE_TIMEOUT = 5.0  # seconds
PRIORITIES = {"access": 0, "demand": 1}
RECENT_DETECTIONS = 50
STREAM_QUEUE_CHUNKS = 8  # chunk frames buffered per stream (at most 2 MiB)


class RequestFailed(Exception):
    """A request-level failure, answered with an ``error`` frame carrying the request id."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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
        if self.active < self.limit and not self._waiters:
            self.active += 1
        else:
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
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self.active -= 1


@dataclass
class VMRecord:
    name: str
    root: str
    owner: str  # shim id that registered it; only that shim may scan in it
    policy: dict[str, Any] = field(default_factory=dict)
    clone_of: str | None = None
    tags: list[str] = field(default_factory=list)
    registered_at: float = field(default_factory=time.time)


class Inventory:
    """VMs known to the appliance, persisted (atomically) in the state directory."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.vms: dict[str, VMRecord] = {}
        if path and path.exists():
            try:
                for rec in json.loads(path.read_text())["vms"]:
                    self.vms[rec["name"]] = VMRecord(**rec)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("inventory %s unreadable (%s); starting empty", path, exc)

    def save(self) -> None:
        if not self.path:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"vms": [asdict(v) for v in self.vms.values()]}, indent=1))
        os.replace(tmp, self.path)


class EventLog:
    """One JSON line per verdict (and per refused request), written straight to the OS."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640) if path else None

    def write(self, event: dict[str, Any]) -> None:
        if self._fd is not None:
            os.write(self._fd, (json.dumps(event, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class Counters:
    verdicts: int = 0
    contents_matched: int = 0
    served_identity: int = 0
    served_digest: int = 0
    joined_in_flight: int = 0
    detections: int = 0
    errors: int = 0
    refused: int = 0
    bytes_read: int = 0
    bytes_matched: int = 0
    protocol_errors: int = 0


class Appliance:
    """The central scanning appliance. ``start()`` opens the listeners; ``stop()`` closes them."""

    def __init__(
        self,
        *,
        socket_path: str | None,
        listen: tuple[str, int] | None = None,
        secret: str | None = None,
        databases: Sequence[str] = (),
        state_dir: str | os.PathLike[str] | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        credits: int = DEFAULT_CREDITS,
        heartbeat: float = protocol.DEFAULT_HEARTBEAT,
        socket_mode: int = 0o600,
        cache_entries: int = 1_000_000,
        impl: str = "auto",
    ) -> None:
        if listen and not secret:
            raise ValueError("a TCP listener needs a shared secret (--secret or OFFSCAN_SECRET)")
        self.socket_path = socket_path
        self.listen = listen
        self.secret = secret
        self.heartbeat = heartbeat
        self.credits = credits
        self.socket_mode = socket_mode
        self.state_dir = Path(state_dir) if state_dir else None
        if self.state_dir:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = load_database(*databases)
        self.matcher = Matcher(self.db, impl=impl)
        self.pattern_version = self.db.version
        self.memo = IdentityMemo()
        self.cache = VerdictCache(
            cache_entries, state_dir=self.state_dir / "cache" if self.state_dir else None
        )
        self.flights = SingleFlight()
        self.gate = PriorityGate(concurrency)
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="offscan-scan")
        self.stream_pool = ThreadPoolExecutor(max_workers=credits, thread_name_prefix="offscan-stream")
        self.inventory = Inventory(self.state_dir / "inventory.json" if self.state_dir else None)
        self.events = EventLog(self.state_dir / "events.jsonl" if self.state_dir else None)
        self.counters = Counters()
        self.detections: list[dict[str, Any]] = []
        self.connections = 0
        self.started = time.time()
        self.appliance_id = f"{socket.gethostname()}:{os.getpid()}"
        self._servers: list[protocol.Server] = []
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self.tcp_port: int | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self.socket_path:
            self._servers.append(
                await protocol.start_unix_server(self.socket_path, self._handle, mode=self.socket_mode)
            )
        if self.listen:
            srv = await protocol.start_tcp_server(self.listen[0], self.listen[1], self._handle)
            self.tcp_port = srv.port
            self._servers.append(srv)
        log.info(
            "appliance %s ready: %s; patterns %s",
            self.appliance_id,
            ", ".join(filter(None, [self.socket_path, self.listen and f"tcp {self.listen[0]}:{self.tcp_port}"])),
            self.db.summary(),
        )

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        for t in list(self._conn_tasks):
            t.cancel()
        await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.stream_pool.shutdown(wait=False, cancel_futures=True)
        self.cache.close()
        self.events.close()

    # -- connections ----------------------------------------------------------------------

    async def _handle(self, conn: protocol.Connection) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conn_tasks.add(task)
        self.connections += 1
        inflight: dict[int, asyncio.Task[None]] = {}
        streams: dict[int, asyncio.Queue[bytes | None]] = {}
        draining: set[int] = set()  # streams answered before their end chunk arrived

        def _finished(rid: int) -> None:
            inflight.pop(rid, None)
            if streams.pop(rid, None) is not None:
                draining.add(rid)

        try:
            shim = await self._handshake(conn)
            if shim is None:
                return
            while True:
                try:
                    msg, fds = await asyncio.wait_for(conn.recv(), timeout=3 * self.heartbeat)
                except asyncio.TimeoutError:
                    log.warning("%s: no frame for %.0f s, closing", conn.peer, 3 * self.heartbeat)
                    return
                t = msg["t"]
                if t != "scan" or msg.get("mode") != "fd":
                    _close_fds(fds)
                    fds = []
                if t == "ping":
                    await conn.send({"t": "pong", "id": msg.get("id")})
                elif t == "scan":
                    rid = msg["id"]
                    if rid in inflight:
                        _close_fds(fds)
                        raise protocol.ProtocolError("sequence", f"duplicate request id {rid}")
                    if len(inflight) >= self.credits:
                        _close_fds(fds)
                        raise protocol.ProtocolError(
                            "backpressure", f"more than {self.credits} outstanding scans"
                        )
                    if msg.get("mode") == "stream":
                        streams[rid] = asyncio.Queue(maxsize=STREAM_QUEUE_CHUNKS)
                    st = asyncio.create_task(self._serve_scan(conn, shim, msg, fds, streams.get(rid)))
                    inflight[rid] = st
                    st.add_done_callback(lambda _t, rid=rid: _finished(rid))
                elif t == "chunk":
                    if msg["id"] in draining:  # answered early (e.g. an error): drop the rest
                        if msg.get("end"):
                            draining.discard(msg["id"])
                        continue
                    q = streams.get(msg["id"])
                    if q is None:
                        raise protocol.ProtocolError("sequence", f"chunk for unknown stream {msg['id']}")
                    await q.put(bytes(msg["data"]))  # full queue: TCP backpressure on this client
                    if msg.get("end"):
                        await q.put(None)
                        streams.pop(msg["id"], None)
                elif t == "bye":
                    await asyncio.gather(*inflight.values(), return_exceptions=True)
                    return
                else:
                    await self._serve_control(conn, shim, msg)
        except protocol.ProtocolError as exc:
            self.counters.protocol_errors += 1
            log.warning("%s: protocol error (%s): %s; closing connection", conn.peer, exc.code, exc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    conn.send({"t": "error", "code": exc.code, "message": str(exc)}), 1.0
                )
        except (ConnectionError, EOFError, OSError):
            pass
        except Exception:  # never let one client take the appliance down
            log.exception("%s: internal error; closing connection", conn.peer)
        finally:
            for st in inflight.values():
                st.cancel()
            conn.close()
            self._conn_tasks.discard(task)

    async def _handshake(self, conn: protocol.Connection) -> str | None:
        try:
            msg, fds = await asyncio.wait_for(conn.recv(), timeout=HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("%s: no hello within %.0f s", conn.peer, HANDSHAKE_TIMEOUT)
            return None
        _close_fds(fds)
        if msg["t"] != "hello":
            raise protocol.ProtocolError("sequence", f"expected hello, got {msg['t']}")
        if msg.get("v") != protocol.PROTOCOL_VERSION:
            raise protocol.ProtocolError(
                "version", f"protocol version {msg.get('v')} not supported (want {protocol.PROTOCOL_VERSION})"
            )
        if not conn.is_unix:
            given = msg.get("secret") or ""
            if not self.secret or not hmac.compare_digest(given.encode(), self.secret.encode()):
                raise protocol.ProtocolError("auth", "bad or missing shared secret")
        await conn.send(
            {
                "t": "welcome",
                "v": protocol.PROTOCOL_VERSION,
                "appliance": self.appliance_id,
                "credits": self.credits,
                "heartbeat": self.heartbeat,
                "pattern_version": self.pattern_version,
            }
        )
        return str(msg["shim"])

    async def _serve_control(self, conn: protocol.Connection, shim: str, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        try:
            t = msg["t"]
            if t == "register":
                reply = self.register(shim, msg["vm"], msg["root"], msg.get("policy") or {}, msg.get("clone_of"))
            elif t == "unregister":
                reply = self.unregister(shim, msg["vm"])
            elif t == "status":
                reply = self.status()
            else:
                raise RequestFailed("unsupported", f"message type {t!r} not supported here")
            await conn.send({"t": "status" if t == "status" else "ok", "id": rid, **reply})
        except RequestFailed as exc:
            await conn.send({"t": "error", "id": rid, "code": exc.code, "message": str(exc)})

    async def _serve_scan(self, conn: protocol.Connection, shim: str, msg: dict[str, Any],
                          fds: list[int], stream: asyncio.Queue[bytes | None] | None = None) -> None:
        rid = msg["id"]
        try:
            if stream is not None:
                verdict = await self.scan_stream(shim, msg, stream)
            else:
                verdict = await self.scan_request(shim, msg, fds)
            reply = {"t": "verdict", "id": rid, **verdict}
        except RequestFailed as exc:
            reply = {"t": "error", "id": rid, "code": exc.code, "message": str(exc)}
        except Exception as exc:  # one bad request must not end the connection
            log.exception("scan %r failed", msg.get("path"))
            reply = {"t": "error", "id": rid, "code": "internal", "message": str(exc)}
        with contextlib.suppress(ConnectionError, OSError):
            await conn.send(reply)

    # -- inventory ------------------------------------------------------------------------

    def register(self, shim: str, vm: str, root: str, policy: dict[str, Any], clone_of: str | None) -> dict[str, Any]:
        if not os.path.isabs(root):
            raise RequestFailed("malformed", f"VM root {root!r} must be an absolute path")
        old = self.inventory.vms.get(vm)
        if old and old.owner != shim:
            raise RequestFailed("conflict", f"VM {vm!r} is registered by another shim ({old.owner})")
        if clone_of is not None and clone_of not in self.inventory.vms:
            raise RequestFailed("unknown-vm", f"clone_of: no VM named {clone_of!r}")
        rec = VMRecord(vm, os.path.realpath(root), shim, policy, clone_of,
                       old.tags if old else [], old.registered_at if old else time.time())
        self.inventory.vms[vm] = rec
        self.inventory.save()
        log.info("VM %s registered by %s: root %s%s", vm, shim, rec.root, f", clone of {clone_of}" if clone_of else "")
        return {"vm": vm, "root": rec.root}

    def unregister(self, shim: str, vm: str) -> dict[str, Any]:
        rec = self._vm(shim, vm)
        del self.inventory.vms[rec.name]
        self.inventory.save()
        log.info("VM %s unregistered", vm)
        return {"vm": vm}

    def _vm(self, shim: str, vm: str) -> VMRecord:
        rec = self.inventory.vms.get(vm)
        if rec is None:
            raise RequestFailed("unknown-vm", f"no VM named {vm!r}; register it first")
        if rec.owner != shim:
            raise RequestFailed("unknown-vm", f"VM {vm!r} belongs to another shim")
        return rec

    # -- scanning -------------------------------------------------------------------------

    async def scan_request(self, shim: str, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        t0 = time.monotonic()
        vm = self._vm(shim, msg["vm"])
        path = msg["path"]
        mode = msg.get("mode", "path")
        prio = PRIORITIES.get(msg.get("prio", "access"), 1)
        loop = asyncio.get_running_loop()
        fd = -1
        try:
            if mode == "fd":
                if len(fds) != 1:
                    raise RequestFailed("malformed", "fd mode needs exactly one descriptor")
                fd = fds.pop()
            elif mode == "path":
                try:
                    fd = await loop.run_in_executor(self.pool, open_confined, vm.root, path)
                except ConfinementError as exc:
                    self.counters.refused += 1
                    log.warning("refused: VM %s (shim %s): %s", vm.name, shim, exc)
                    self.events.write({"time": time.time(), "event": "refused", "vm": vm.name,
                                       "path": path, "reason": str(exc)})
                    raise RequestFailed("confined", str(exc)) from None
                except OSError as exc:
                    return self._verdict(vm, path, ScanResult(path, "error", reason=_reason(exc)), "scan", None, t0)
            else:
                raise RequestFailed("unsupported", f"content mode {mode!r} is not supported")
            return await self._pipeline(vm, path, fd, prio, t0)
        finally:
            if fd >= 0:
                os.close(fd)
            _close_fds(fds)

    async def scan_stream(self, shim: str, msg: dict[str, Any], chunks: asyncio.Queue[bytes | None]) -> dict[str, Any]:
        """Content streamed in chunk frames (remote shims): matched and hashed as it arrives in
        one pass, never spooled. It runs on a thread of its own rather than behind the
        admission gate, so a stream waiting for its chunks cannot starve the others."""
        t0 = time.monotonic()
        vm = self._vm(shim, msg["vm"])
        size = msg.get("size")
        if not isinstance(size, int) or size < 0:
            raise RequestFailed("malformed", "stream mode needs a non-negative integer size")
        loop = asyncio.get_running_loop()
        timeout = 3 * self.heartbeat

        def pieces() -> Iterator[bytes]:
            while True:
                item = asyncio.run_coroutine_threadsafe(chunks.get(), loop).result(timeout)
                if item is None:
                    return
                yield item

        res: ScanResult = await loop.run_in_executor(
            self.stream_pool,
            lambda: self.matcher.scan_chunks(pieces(), size, path=msg["path"], allmatch=True, digest=True),
        )
        self.counters.contents_matched += 1
        self.counters.bytes_matched += res.bytes_scanned
        digest = bytes.fromhex(res.digest) if res.digest else None
        if res.status != "error" and digest is not None:
            self.cache.put(CachedVerdict(res.status, res.matches, self.pattern_version, digest, size, time.time()))
        return self._verdict(vm, msg["path"], res, "scan", digest, t0)

    async def _pipeline(self, vm: VMRecord, path: str, fd: int, prio: int, t0: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        version = self.pattern_version
        async with self.gate.slot(prio):
            st = os.fstat(fd)
            ident = Identity.from_stat("local", st)
            digest = self.memo.get(ident)
            source = "identity"
            if digest is None:
                digest, nread = await loop.run_in_executor(self.pool, digest_fd, fd, st.st_size)
                self.counters.bytes_read += nread
                source = "digest"
                if Identity.from_stat("local", os.fstat(fd)) == ident:
                    self.memo.put(ident, digest)
            size = st.st_size
            cached = self.cache.get(digest, size, version)
            if cached is not None:
                if source == "identity":
                    self.counters.served_identity += 1
                else:
                    self.counters.served_digest += 1
                return self._verdict(vm, path, cached, source, digest, t0)

            led = False

            async def match() -> ScanResult:
                nonlocal led
                led = True
                self.counters.contents_matched += 1
                res: ScanResult = await loop.run_in_executor(
                    self.pool, lambda: self.matcher.scan_fd(fd, path=path, allmatch=True)
                )
                self.counters.bytes_read += res.bytes_scanned
                self.counters.bytes_matched += res.bytes_scanned
                unchanged = not res.changed and Identity.from_stat("local", os.fstat(fd)) == ident
                if res.status != "error" and unchanged:
                    self.cache.put(CachedVerdict(res.status, res.matches, version, digest, size, time.time()))
                return res

            res = await self.flights.run((digest, size, version), match)
            if not led:  # an identical content was being matched for another request
                self.counters.joined_in_flight += 1
            return self._verdict(vm, path, res, "scan", digest, t0)

    def _verdict(self, vm: VMRecord, path: str, res: ScanResult | CachedVerdict, source: str,
                 digest: bytes | None, t0: float) -> dict[str, Any]:
        infected = res.status == "infected"
        action = "deny" if infected else "allow"
        verdict = {
            "vm": vm.name,
            "path": path,
            "status": res.status,
            "matches": list(res.matches),
            "reason": getattr(res, "reason", None),
            "action": action,
            "source": source,
            "digest": digest.hex() if digest else None,
            "pattern_version": self.pattern_version,
        }
        self.counters.verdicts += 1
        if res.status == "error":
            self.counters.errors += 1
        now = time.time()
        event = {"time": now, "event": "verdict", **verdict,
                 "latency_ms": round((time.monotonic() - t0) * 1000, 3)}
        self.events.write(event)
        if infected:
            self.counters.detections += 1
            det = {"time": now, "vm": vm.name, "path": path, "matches": list(res.matches), "action": action}
            self.detections.append(det)
            del self.detections[:-RECENT_DETECTIONS]
            log.warning("DETECTION: VM %s: %s: %s (%s)", vm.name, path, ", ".join(res.matches), action)
        return verdict

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        c = self.counters
        served = c.served_identity + c.served_digest
        lookups = served + c.contents_matched
        return {
            "appliance": self.appliance_id,
            "version": __version__,
            "uptime": round(time.time() - self.started, 3),
            "pattern_version": self.pattern_version,
            "patterns": self.db.summary(),
            "native": self.matcher.native,
            "vms": [asdict(v) for v in self.inventory.vms.values()],
            "queue_depth": self.gate.waiting,
            "in_flight": self.gate.active,
            "connections": len(self._conn_tasks),
            "served_from_cache": served,
            "hit_ratio": round(served / lookups, 4) if lookups else 0.0,
            "cache_entries": len(self.cache),
            "recent_detections": self.detections[-10:],
            **asdict(c),
        }


def _reason(exc: OSError) -> str:
    import errno

    if exc.errno == errno.ENOENT:
        return "file vanished before it could be read"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"{exc.strerror or exc}"


def _close_fds(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


async def serve(appliance: Appliance, *, ready_file: str | None = None) -> None:
    """Run until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await appliance.start()
    if ready_file:
        Path(ready_file).write_text(json.dumps({"pid": os.getpid(), "tcp_port": appliance.tcp_port}))
    try:
        await stop.wait()
    finally:
        log.info("appliance stopping")
        await appliance.stop()
