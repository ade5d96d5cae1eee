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
import shlex
import logging
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

from . import __version__, protocol
from . import policy as policies
from .cache import CachedVerdict, Identity, IdentityMemo, SingleFlight, VerdictCache, digest_fd
from .clones import clone_tree
from .confine import ConfinementError, check_relpath, open_confined
from .engine import Matcher, ScanResult
from .signatures import SignatureError, load_database

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
    owner: str | None  # shim that registered it (only it may scan there); None: unclaimed
    policy: dict[str, Any] = field(default_factory=dict)
    clone_of: str | None = None
    tags: list[str] = field(default_factory=list)
    registered_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Revalidation:
    """How cached verdicts of the previous pattern version become current without a full
    rescan: clean ones are matched against the added signatures only (``delta``; None when the
    update only removed signatures), those naming a removed signature are rescanned."""

    old_version: str
    delta: Matcher | None
    removed: frozenset[str]


@dataclass(frozen=True)
class Engine:
    """The unit of an atomic pattern swap: a request takes one Engine and keeps it to the end."""

    matcher: Matcher
    version: str
    db: Any
    revalidation: Revalidation | None = None


class LocationIndex:
    """Where each content was last seen: digest -> {(vm, path): identity}, bounded. Lets a
    pattern update revalidate a cached verdict by reading one copy, and report every copy."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self.max_entries = max_entries
        self._by_digest: "OrderedDict[bytes, dict[tuple[str, str], Identity]]" = OrderedDict()
        self._count = 0

    def add(self, digest: bytes, vm: str, path: str, ident: Identity) -> None:
        locs = self._by_digest.get(digest)
        if locs is None:
            locs = self._by_digest[digest] = {}
        else:
            self._by_digest.move_to_end(digest)
        if (vm, path) not in locs:
            self._count += 1
        locs[(vm, path)] = ident
        while self._count > self.max_entries and self._by_digest:
            _, dropped = self._by_digest.popitem(last=False)
            self._count -= len(dropped)

    def get(self, digest: bytes) -> list[tuple[str, str, Identity]]:
        return [(vm, path, ident) for (vm, path), ident in self._by_digest.get(digest, {}).items()]

    def __len__(self) -> int:
        return self._count


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
    served_clone: int = 0
    excluded: int = 0
    quarantined: int = 0
    action_failures: int = 0
    hook_runs: int = 0
    revalidations: int = 0
    revalidation_bytes: int = 0
    revalidation_seconds: float = 0.0
    revalidation_rescans: int = 0
    swaps: int = 0
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
        policy_file: str | None = None,
        isolation_hook: str | None = None,
        hook_timeout: float = 10.0,
        quarantine_dir: str | None = None,
        metrics: tuple[str, int] | None = None,
        updates: str | None = None,
        trust: str | None = None,
        poll: float = 60.0,
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
        self.databases = list(databases)
        self.impl = impl
        self.store: Any = None
        self.update_client: Any = None
        self.poll = poll
        self.update_error: str | None = None
        self.last_swap: dict[str, Any] | None = None
        if updates and not trust:
            raise ValueError("--updates needs --trust PUB: bundles are verified before use")
        if trust:
            if not self.state_dir:
                raise ValueError("signed pattern updates need a --state directory")
            from .updates import PatternStore, UpdateClient

            self.store = PatternStore(self.state_dir / "patterns", trust)
            if updates:
                self.update_client = UpdateClient(updates, self.store)
        if self.store is not None and self.store.current_version is not None:
            db = self.store.load()
            version = str(self.store.current_version)
        else:
            db = load_database(*databases)
            version = db.version
        self.engine = Engine(Matcher(db, impl=impl), version, db)
        self.locations = LocationIndex()
        self.memo = IdentityMemo()
        self.inherited = IdentityMemo()  # clone file identity -> master digest (see clones.py)
        self.default_policy: dict[str, Any] = {}
        self.vm_policies: dict[str, dict[str, Any]] = {}
        if policy_file:
            self.default_policy, self.vm_policies = policies.load_policy_file(policy_file)
        self.isolation_hook = isolation_hook
        self.hook_timeout = hook_timeout
        qdir = quarantine_dir or (self.state_dir / "quarantine" if self.state_dir else None)
        self.vault = None
        if qdir:
            from .quarantine import Vault

            self.vault = Vault(qdir)
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
        self._background: set[asyncio.Task[None]] = set()
        self._servers: list[protocol.Server] = []
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self.tcp_port: int | None = None
        self.metrics_address = metrics
        self.metrics_port: int | None = None
        self._metrics_server: Any = None
        self.latency: Any = None  # Histogram when metrics are on
        self.request_kinds: dict[str, int] = {"access": 0, "demand": 0, "stream": 0}

    @property
    def matcher(self) -> Matcher:
        return self.engine.matcher

    @property
    def pattern_version(self) -> str:
        return self.engine.version

    @property
    def db(self) -> Any:
        return self.engine.db

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

        if self.update_client is not None:
            self._spawn(self._update_loop())
        if self.metrics_address:
            from .metrics import start_metrics_server

            self.registry = self._build_metrics()
            self._metrics_server = await start_metrics_server(self.registry, *self.metrics_address)
            self.metrics_port = self._metrics_server.port
            log.info("metrics on http://%s:%s/metrics", self.metrics_address[0], self.metrics_port)

    def _build_metrics(self) -> Any:
        """Prometheus view of the appliance: counters read from ``self.counters`` at scrape
        time (no second set of books), latency observed per verdict."""
        from .metrics import Counter, Registry

        c = self.counters

        class CounterView(Counter):
            def __init__(self, name: str, help: str, labelnames: Sequence[str], read: Any) -> None:
                super().__init__(name, help, labelnames)
                self._read = read

            def _samples(self) -> list[tuple[tuple[str, ...], float]]:
                return [(k, float(v)) for k, v in self._read().items()]

        reg = Registry()
        for name, help_, labels, read in (
            ("offscan_requests_total", "Scan requests by kind (priority or stream).", ("kind",),
             lambda: {(k,): v for k, v in self.request_kinds.items()}),
            ("offscan_contents_total", "Verdicts by how the content was judged: matched now or "
             "served from cache (identity memo, digest, clone inheritance, policy exclusion).", ("reason",),
             lambda: {("matched",): c.contents_matched, ("identity",): c.served_identity,
                      ("digest",): c.served_digest, ("clone",): c.served_clone,
                      ("joined",): c.joined_in_flight, ("excluded",): c.excluded}),
            ("offscan_verdicts_total", "Verdicts sent.", (), lambda: {(): c.verdicts}),
            ("offscan_detections_total", "Infected verdicts.", (), lambda: {(): c.detections}),
            ("offscan_actions_total", "Actions taken on detections.", ("action",),
             lambda: {("quarantine",): c.quarantined, ("failed",): c.action_failures, ("hook",): c.hook_runs}),
            ("offscan_bytes_read_total", "Bytes read from VM files (hashing and matching).", (),
             lambda: {(): c.bytes_read}),
            ("offscan_bytes_matched_total", "Bytes run through the matcher.", (), lambda: {(): c.bytes_matched}),
            ("offscan_refused_total", "Requests refused for leaving the VM root.", (), lambda: {(): c.refused}),
            ("offscan_protocol_errors_total", "Connections closed for protocol errors.", (),
             lambda: {(): c.protocol_errors}),
            ("offscan_revalidations_total", "Cached verdicts made current after a pattern update "
             "by matching the added signatures only.", (), lambda: {(): c.revalidations}),
            ("offscan_revalidation_bytes_total", "Bytes read to revalidate cached verdicts.", (),
             lambda: {(): c.revalidation_bytes}),
            ("offscan_revalidation_seconds_total", "Time spent revalidating cached verdicts.", (),
             lambda: {(): c.revalidation_seconds}),
            ("offscan_pattern_swaps_total", "Pattern database swaps.", (), lambda: {(): c.swaps}),
        ):
            reg.register(CounterView(name, help_, labels, read))
        reg.gauge("offscan_queue_depth", "Requests waiting for admission.", fn=lambda: self.gate.waiting)
        reg.gauge("offscan_in_flight", "Requests being read or matched.", fn=lambda: self.gate.active)
        reg.gauge("offscan_vms", "Registered VMs.", fn=lambda: len(self.inventory.vms))
        reg.gauge("offscan_cache_entries", "Verdict cache entries.", fn=lambda: len(self.cache))
        self.latency = reg.histogram("offscan_verdict_seconds", "Request to verdict latency.")
        return reg

    async def stop(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        for t in [*self._conn_tasks, *self._background]:
            t.cancel()
        await asyncio.gather(*self._conn_tasks, *self._background, return_exceptions=True)
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
        controls: set[asyncio.Task[None]] = set()

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
                elif t == "control":  # may run for minutes (clones): keep reading frames
                    ct = asyncio.create_task(self._serve_control(conn, shim, msg))
                    controls.add(ct)
                    ct.add_done_callback(controls.discard)
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
            for st in [*inflight.values(), *controls]:
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
            elif t == "control":
                reply = await self.control(msg["op"], msg.get("args") or {})
            else:
                raise RequestFailed("unsupported", f"message type {t!r} not supported here")
            await conn.send({**reply, "t": "status" if t == "status" else "ok", "id": rid})
        except RequestFailed as exc:
            await conn.send({"t": "error", "id": rid, "code": exc.code, "message": str(exc)})
        except (ConnectionError, OSError):
            pass
        except Exception as exc:  # a failed command must not end the connection
            log.exception("%s %s failed", msg.get("t"), msg.get("op", ""))
            with contextlib.suppress(Exception):
                await conn.send({"t": "error", "id": rid, "code": "internal", "message": str(exc)})

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
        if old and old.owner not in (None, shim):
            raise RequestFailed("conflict", f"VM {vm!r} is registered by another shim ({old.owner})")
        if clone_of is not None and clone_of not in self.inventory.vms:
            raise RequestFailed("unknown-vm", f"clone_of: no VM named {clone_of!r}")
        if clone_of == vm:
            raise RequestFailed("malformed", "a VM cannot be a clone of itself")
        try:
            policy = policies.validate(policy or (old.policy if old else {}))
        except policies.PolicyError as exc:
            raise RequestFailed("malformed", str(exc)) from None
        if self.vault and self.vault.inside(os.path.realpath(root)) or (
            self.vault and _is_within(str(self.vault.directory), os.path.realpath(root))
        ):
            raise RequestFailed("malformed", "a VM root must not overlap the quarantine vault")
        rec = VMRecord(vm, os.path.realpath(root), shim, policy, clone_of or (old.clone_of if old else None),
                       old.tags if old else [], old.registered_at if old else time.time())
        self.inventory.vms[vm] = rec
        self.inventory.save()
        log.info("VM %s registered by %s: root %s%s", vm, shim, rec.root, f", clone of {clone_of}" if clone_of else "")
        return {"vm": vm, "root": rec.root, "policy": self.effective_policy(rec)}

    def effective_policy(self, rec: VMRecord, _seen: frozenset[str] = frozenset()) -> dict[str, Any]:
        """Defaults < policy file [default] < base VM's effective policy < the VM's own."""
        base: dict[str, Any] = {}
        if rec.clone_of and rec.clone_of not in _seen and rec.clone_of in self.inventory.vms:
            base = self.effective_policy(self.inventory.vms[rec.clone_of], _seen | {rec.name})
        return policies.merge(self.default_policy, base, self.vm_policies.get(rec.name), rec.policy)

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
        try:
            check_relpath(path)  # refuse escapes before anything, exclusions included
        except ConfinementError as exc:
            self._refused(vm, shim, path, exc)
        policy = self.effective_policy(vm)
        why = policies.excluded(policy, path)
        if why:
            return await self._excluded(vm, path, why, t0)
        prio = PRIORITIES.get(msg.get("prio", "access"), 1)
        self.request_kinds["access" if prio == 0 else "demand"] += 1
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
                    self._refused(vm, shim, path, exc)
                except OSError as exc:
                    return await self._finish(vm, path, ScanResult(path, "error", reason=_reason(exc)), "scan", None, t0)
            else:
                raise RequestFailed("unsupported", f"content mode {mode!r} is not supported")
            why = policies.excluded(policy, path, os.fstat(fd).st_size)
            if why:
                return await self._excluded(vm, path, why, t0)
            return await self._pipeline(vm, path, fd, prio, t0)
        finally:
            if fd >= 0:
                os.close(fd)
            _close_fds(fds)

    def _refused(self, vm: VMRecord, shim: str, path: str, exc: ConfinementError) -> None:
        self.counters.refused += 1
        log.warning("refused: VM %s (shim %s): %s", vm.name, shim, exc)
        self.events.write({"time": time.time(), "event": "refused", "vm": vm.name, "path": path,
                           "reason": str(exc)})
        raise RequestFailed("confined", str(exc)) from None

    async def scan_stream(self, shim: str, msg: dict[str, Any], chunks: asyncio.Queue[bytes | None]) -> dict[str, Any]:
        """Content streamed in chunk frames (remote shims): matched and hashed as it arrives in
        one pass, never spooled. It runs on a thread of its own rather than behind the
        admission gate, so a stream waiting for its chunks cannot starve the others."""
        t0 = time.monotonic()
        vm = self._vm(shim, msg["vm"])
        self.request_kinds["stream"] += 1
        size = msg.get("size")
        if not isinstance(size, int) or size < 0:
            raise RequestFailed("malformed", "stream mode needs a non-negative integer size")
        loop = asyncio.get_running_loop()
        timeout = 3 * self.heartbeat
        eng = self.engine

        def pieces() -> Iterator[bytes]:
            while True:
                item = asyncio.run_coroutine_threadsafe(chunks.get(), loop).result(timeout)
                if item is None:
                    return
                yield item

        res: ScanResult = await loop.run_in_executor(
            self.stream_pool,
            lambda: eng.matcher.scan_chunks(pieces(), size, path=msg["path"], allmatch=True, digest=True),
        )
        self.counters.contents_matched += 1
        self.counters.bytes_matched += res.bytes_scanned
        digest = bytes.fromhex(res.digest) if res.digest else None
        if res.status != "error" and digest is not None:
            self.cache.put(CachedVerdict(res.status, res.matches, eng.version, digest, size, time.time()))
        return await self._finish(vm, msg["path"], res, "scan", digest, t0, version=eng.version)

    async def _pipeline(self, vm: VMRecord, path: str, fd: int, prio: int, t0: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        eng = self.engine  # scans that started keep their engine across a swap
        version = eng.version
        async with self.gate.slot(prio):
            st = os.fstat(fd)
            ident = Identity.from_stat("local", st)
            digest = self.memo.get(ident)
            source = "identity"
            if digest is None:
                digest = self.inherited.get(ident)
                source = "clone"
            if digest is None:
                digest, nread = await loop.run_in_executor(self.pool, digest_fd, fd, st.st_size)
                self.counters.bytes_read += nread
                source = "digest"
                if Identity.from_stat("local", os.fstat(fd)) == ident:
                    self.memo.put(ident, digest)
            size = st.st_size
            self.locations.add(digest, vm.name, path, ident)
            cached = self.cache.get(digest, size, version)
            if cached is None and eng.revalidation is not None:
                cached = await self._revalidate(eng, digest, size, fd, ident)
                if cached is not None:
                    return await self._finish(vm, path, cached, "revalidated", digest, t0, ino=st.st_ino)
            if cached is not None:
                if source == "identity":
                    self.counters.served_identity += 1
                elif source == "clone":
                    self.counters.served_clone += 1
                else:
                    self.counters.served_digest += 1
                return await self._finish(vm, path, cached, source, digest, t0, ino=st.st_ino)

            led = False

            async def match() -> ScanResult:
                nonlocal led
                led = True
                self.counters.contents_matched += 1
                res: ScanResult = await loop.run_in_executor(
                    self.pool, lambda: eng.matcher.scan_fd(fd, path=path, allmatch=True)
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
            return await self._finish(vm, path, res, "scan", digest, t0, ino=st.st_ino, version=version)

    # -- pattern updates ------------------------------------------------------------------

    async def _revalidate(self, eng: Engine, digest: bytes, size: int, fd: int,
                          ident: Identity) -> CachedVerdict | None:
        """Make the previous version's cached verdict for this content current, reading it
        through the small delta matcher only; None when it must be matched in full."""
        rv = eng.revalidation
        assert rv is not None
        old = self.cache.get(digest, size, rv.old_version)
        if old is None or set(old.matches) & rv.removed:
            if old is not None:
                self.counters.revalidation_rescans += 1
            return None
        t = time.monotonic()
        status, matches = old.status, tuple(old.matches)
        if rv.delta is not None:
            res: ScanResult = await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: rv.delta.scan_fd(fd, allmatch=True))  # type: ignore[union-attr]
            if res.status == "error":
                return None
            self.counters.revalidation_bytes += res.bytes_scanned
            self.counters.bytes_read += res.bytes_scanned
            if res.matches:
                status = "infected"
                matches = matches + tuple(m for m in res.matches if m not in matches)
            if res.changed or Identity.from_stat("local", os.fstat(fd)) != ident:
                return None
        new = CachedVerdict(status, matches, eng.version, digest, size, time.time())
        self.cache.put(new)
        self.counters.revalidations += 1
        self.counters.revalidation_seconds += time.monotonic() - t
        return new

    async def _revalidate_cached(self, eng: Engine) -> None:
        """After a swap: bring cached verdicts of the previous version up to date, hottest
        first, reading one known copy of each content; an infected result is reported for
        every VM holding that content."""
        rv = eng.revalidation
        assert rv is not None
        loop = asyncio.get_running_loop()
        done = 0
        t0 = time.monotonic()
        for entry in list(self.cache.entries()):
            if self.engine is not eng:
                return  # superseded by a newer swap
            if entry.pattern_version != rv.old_version:
                continue
            if self.cache.get(entry.digest, entry.size, eng.version) is not None:
                continue
            new: CachedVerdict | None = None
            for vm_name, path, ident in self.locations.get(entry.digest):
                vm = self.inventory.vms.get(vm_name)
                if vm is None:
                    continue
                try:
                    fd = await loop.run_in_executor(self.pool, open_confined, vm.root, path)
                except OSError:
                    continue
                try:
                    if Identity.from_stat("local", os.fstat(fd)) != ident:
                        continue  # changed since: its own next event rescans it
                    async with self.gate.slot(PRIORITIES["demand"]):
                        new = await self._revalidate(eng, entry.digest, entry.size, fd, ident)
                finally:
                    os.close(fd)
                break
            if new is None and rv.delta is None and entry.status == "clean":
                new = CachedVerdict("clean", (), eng.version, entry.digest, entry.size, time.time())
                self.cache.put(new)  # removals alone cannot make clean content infected
                self.counters.revalidations += 1
            done += 1
            if new is not None and new.infected:
                await self._report_copies(new)
        log.info("revalidated %d cached verdict(s) for pattern version %s in %.2f s",
                 done, eng.version, time.monotonic() - t0)

    async def _report_copies(self, verdict: CachedVerdict) -> None:
        """A content became infected under new patterns: a verdict for every copy we know of."""
        for vm_name, path, ident in self.locations.get(verdict.digest):
            vm = self.inventory.vms.get(vm_name)
            if vm is None:
                continue
            try:
                st = os.stat(os.path.join(vm.root, path), follow_symlinks=False)
            except OSError:
                continue
            if Identity.from_stat("local", st) != ident:
                continue
            await self._finish(vm, path, verdict, "revalidated", verdict.digest, time.monotonic(), ino=st.st_ino)

    async def swap(self, db: Any, version: str, *, added: Any = None, removed: Sequence[str] = ()) -> dict[str, Any]:
        """Compile ``db`` in the background, then switch atomically: running scans finish on
        the old matcher, new ones use the new one. ``added`` (a PatternDB of the added
        signatures) and ``removed`` (signature names) drive revalidation of cached verdicts."""
        loop = asyncio.get_running_loop()
        rss0 = _rss_bytes()
        t = time.monotonic()
        matcher = await loop.run_in_executor(None, lambda: Matcher(db, impl=self.impl))
        delta = None
        if added is not None and (added.body or added.hashes):
            delta = await loop.run_in_executor(None, lambda: Matcher(added, impl=self.impl))
        old = self.engine
        # "*": unknown lineage (a full reload): no shortcut, every content is matched again
        rv = None if "*" in removed else Revalidation(old.version, delta, frozenset(removed))
        self.engine = Engine(matcher, version, db, rv)
        self.counters.swaps += 1
        self.last_swap = {
            "from": old.version, "to": version, "time": time.time(),
            "compile_seconds": round(time.monotonic() - t, 3),
            "rss_before": rss0, "rss_peak_during": _rss_bytes(),
            "added": (len(added.body) + len(added.hashes)) if added is not None else None,
            "removed": len(removed),
        }
        log.info("patterns swapped %s -> %s (%s); compile %.2f s, RSS %d -> %d MB", old.version, version,
                 db.summary(), self.last_swap["compile_seconds"], rss0 >> 20, self.last_swap["rss_peak_during"] >> 20)
        if rv is not None:
            self._spawn(self._revalidate_cached(self.engine))
        return self.last_swap

    async def check_updates(self) -> list[Any]:
        """Fetch and apply what the update server has beyond our version, then swap."""
        from .updates import UpdateError

        loop = asyncio.get_running_loop()
        try:
            applied = await loop.run_in_executor(None, self.update_client.update)
        except (UpdateError, OSError) as exc:
            self.update_error = str(exc)
            log.error("pattern update failed, version %s keeps serving: %s", self.pattern_version, exc)
            applied = list(getattr(self.update_client, "last_applied", []) or [])
            if not applied:
                return []
        else:
            self.update_error = None
        if not applied:
            return []
        last = applied[-1]
        db = last.database or self.store.load()
        added = None
        removed: list[str] = ["*"]
        if applied[0].parent is not None and str(applied[0].parent) == self.pattern_version:
            merged: dict[str, list[str]] = {}
            removed = []
            for a in applied:
                for name, lines in a.added.items():
                    merged.setdefault(name, []).extend(lines)
                for name, lines in a.removed.items():
                    removed.extend(_signature_names(name, lines))
            from .signatures import PatternDB

            added = PatternDB.from_text((n, "\n".join(ls)) for n, ls in sorted(merged.items()) if ls)
        await self.swap(db, str(last.version), added=added, removed=removed)
        return applied

    async def _update_loop(self) -> None:
        while True:
            try:
                await self.check_updates()
            except Exception:  # keep polling; the running patterns stay
                log.exception("pattern update check failed")
            await asyncio.sleep(self.poll)

    async def reload(self) -> dict[str, Any]:
        """The ``reload`` command: poll the update server now, or re-read the -d databases."""
        if self.update_client is not None:
            applied = await self.check_updates()
            return {"pattern_version": self.pattern_version, "applied": [a.version for a in applied],
                    "error": self.update_error}
        db = await asyncio.get_running_loop().run_in_executor(None, load_database, *self.databases)
        if db.version == self.pattern_version:
            return {"pattern_version": self.pattern_version, "changed": False}
        await self.swap(db, db.version, removed=["*"])
        return {"pattern_version": self.pattern_version, "changed": True}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _excluded(self, vm: VMRecord, path: str, why: str, t0: float) -> dict[str, Any]:
        self.counters.excluded += 1
        res = ScanResult(path, "clean", reason=f"not scanned: {why}")
        return await self._finish(vm, path, res, "excluded", None, t0)

    async def _finish(self, vm: VMRecord, path: str, res: ScanResult | CachedVerdict, source: str,
                      digest: bytes | None, t0: float, *, ino: int | None = None,
                      version: str | None = None) -> dict[str, Any]:
        """Record the verdict; on a detection run the VM's actions and tag it."""
        extra: dict[str, Any] = {}
        action = "allow"
        if res.status == "infected":
            action, extra = await self._act(vm, path, res.matches, ino)
        # the version that judged it: a cached verdict's own, else the engine the scan ran on
        version = getattr(res, "pattern_version", None) or version or self.pattern_version
        return self._verdict(vm, path, res, source, digest, t0, action, extra, version)

    async def _act(self, vm: VMRecord, path: str, matches: Sequence[str], ino: int | None) -> tuple[str, dict[str, Any]]:
        """Actions in policy order, the first that succeeds wins; then tags and the hook."""
        loop = asyncio.get_running_loop()
        actions = self.effective_policy(vm)["actions"]
        extra: dict[str, Any] = {}
        action = "deny"
        for act in actions:
            if act == "pass":
                action = "allow"
                break
            if act == "deny":
                action = "deny"
                break
            if act == "quarantine":
                if self.vault is None:
                    extra.setdefault("action_errors", []).append("quarantine: no vault (no --state)")
                    continue
                try:
                    entry = await loop.run_in_executor(
                        self.pool, lambda: self.vault.quarantine(  # type: ignore[union-attr]
                            vm=vm.name, root=vm.root, path=path, signatures=list(matches), expect_ino=ino))
                except Exception as exc:  # fall back to the next action
                    self.counters.action_failures += 1
                    log.warning("quarantine of VM %s: %s failed: %s", vm.name, path, exc)
                    extra.setdefault("action_errors", []).append(f"quarantine: {exc}")
                    continue
                self.counters.quarantined += 1
                extra["quarantine_id"] = entry.id
                action = "deny"
                break
        await self._tag(vm, ["virus_found", f"threat={threat_level(matches)}"], {"path": path, "matches": list(matches)})
        return action, extra

    async def _tag(self, vm: VMRecord, tags: Sequence[str], detection: dict[str, Any] | None) -> None:
        new = [t for t in tags if t not in vm.tags]
        threat = [t for t in new if t.startswith("threat=")]
        if threat:  # keep the highest threat level only
            vm.tags = [t for t in vm.tags if not t.startswith("threat=") or _threat_rank(t) > _threat_rank(threat[0])]
            if any(t.startswith("threat=") for t in vm.tags):
                new = [t for t in new if not t.startswith("threat=")]
        if not new:
            return
        vm.tags.extend(new)
        self.inventory.save()
        log.warning("VM %s tagged %s", vm.name, ",".join(vm.tags))
        await self._run_hook(vm, detection)

    async def _run_hook(self, vm: VMRecord, detection: dict[str, Any] | None) -> None:
        """The isolation hook: ``HOOK VM TAG...`` with JSON on stdin (NSX tag → security group)."""
        if not self.isolation_hook:
            return
        payload = json.dumps({"vm": vm.name, "root": vm.root, "tags": vm.tags, "detection": detection}).encode()
        cmd = [*shlex.split(self.isolation_hook), vm.name, *vm.tags]
        self.counters.hook_runs += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            log.error("isolation hook %s could not start: %s", cmd[0], exc)
            return
        try:
            out, _ = await asyncio.wait_for(proc.communicate(payload), self.hook_timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("isolation hook for VM %s killed after %.0f s", vm.name, self.hook_timeout)
            return
        level = logging.INFO if proc.returncode == 0 else logging.ERROR
        log.log(level, "isolation hook for VM %s exited %s: %s", vm.name, proc.returncode,
                out.decode(errors="replace").strip()[:500])

    def _verdict(self, vm: VMRecord, path: str, res: ScanResult | CachedVerdict, source: str,
                 digest: bytes | None, t0: float, action: str = "allow",
                 extra: dict[str, Any] | None = None, version: str | None = None) -> dict[str, Any]:
        infected = res.status == "infected"
        verdict = {
            "vm": vm.name,
            "path": path,
            "status": res.status,
            "matches": list(res.matches),
            "reason": getattr(res, "reason", None),
            "action": action,
            "source": source,
            "digest": digest.hex() if digest else None,
            "pattern_version": version or self.pattern_version,
            **(extra or {}),
        }
        self.counters.verdicts += 1
        if res.status == "error":
            self.counters.errors += 1
        now = time.time()
        latency = time.monotonic() - t0
        if self.latency is not None:
            self.latency.observe(latency)
        event = {"time": now, "event": "verdict", **verdict, "latency_ms": round(latency * 1000, 3)}
        self.events.write(event)
        if infected:
            self.counters.detections += 1
            det = {"time": now, "vm": vm.name, "path": path, "matches": list(res.matches), "action": action,
                   **(extra or {})}
            self.detections.append(det)
            del self.detections[:-RECENT_DETECTIONS]
            log.warning("DETECTION: VM %s: %s: %s (%s)", vm.name, path, ", ".join(res.matches), action)
        return verdict

    # -- operator commands ----------------------------------------------------------------

    async def control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Operator commands from ``offscan vm|policy|quarantine`` (same socket permissions)."""
        loop = asyncio.get_running_loop()

        def arg(name: str, kind: type = str) -> Any:
            v = args.get(name)
            if not isinstance(v, kind):
                raise RequestFailed("malformed", f"{op}: argument {name!r} must be a {kind.__name__}")
            return v

        def vm_named(name: str) -> VMRecord:
            rec = self.inventory.vms.get(name)
            if rec is None:
                raise RequestFailed("unknown-vm", f"no VM named {name!r}")
            return rec

        def show(rec: VMRecord) -> dict[str, Any]:
            return {**asdict(rec), "policy": self.effective_policy(rec),
                    "clones": sorted(v.name for v in self.inventory.vms.values() if v.clone_of == rec.name)}

        if op == "reload":
            try:
                return await self.reload()
            except SignatureError as exc:
                raise RequestFailed("refused", f"database not reloaded, old one keeps serving: {exc}") from None
        if op == "vm-list":
            return {"vms": [show(v) for v in self.inventory.vms.values()]}
        if op == "vm-show":
            return show(vm_named(arg("name")))
        if op == "vm-unregister":
            rec = vm_named(arg("name"))
            del self.inventory.vms[rec.name]
            self.inventory.save()
            log.info("VM %s unregistered by the operator", rec.name)
            return {"vm": rec.name}
        if op == "vm-untag":
            rec = vm_named(arg("name"))
            drop = args.get("tags") or list(rec.tags)
            rec.tags = [t for t in rec.tags if t not in drop]
            self.inventory.save()
            log.info("VM %s untagged %s; tags now %s", rec.name, drop, rec.tags)
            await self._run_hook(rec, None)  # lets the policy engine release the VM
            return {"vm": rec.name, "tags": rec.tags}
        if op == "vm-clone":
            return await self._clone(vm_named(arg("base")), arg("count", int), arg("into"),
                                     args.get("prefix") or f"{arg('base')}-clone")
        if op == "policy-set":
            rec = vm_named(arg("vm"))
            try:
                settings = policies.validate(arg("settings", dict))
            except policies.PolicyError as exc:
                raise RequestFailed("malformed", str(exc)) from None
            rec.policy = {**rec.policy, **settings}
            self.inventory.save()
            log.info("policy of VM %s set: %s", rec.name, settings)
            return {"vm": rec.name, "policy": self.effective_policy(rec)}
        if op == "policy-unset":
            rec = vm_named(arg("vm"))
            for key in args.get("keys") or []:
                rec.policy.pop(key, None)
            self.inventory.save()
            return {"vm": rec.name, "policy": self.effective_policy(rec)}
        if op.startswith("quarantine-"):
            if self.vault is None:
                raise RequestFailed("unsupported", "no quarantine vault (start the appliance with --state)")
            from .quarantine import QuarantineError

            vault = self.vault
            try:
                if op == "quarantine-list":
                    return {"entries": [asdict(e) for e in vault.list()]}
                if op == "quarantine-restore":
                    entry = vault.get(arg("id"))
                    rec = self.inventory.vms.get(entry.vm)
                    root = rec.root if rec else entry.root
                    where = await loop.run_in_executor(self.pool, lambda: vault.restore(
                        entry.id, root=root, overwrite=bool(args.get("overwrite"))))
                    log.info("quarantine %s restored to VM %s: %s", entry.id, entry.vm, where)
                    return {"qid": entry.id, "restored": where}
                if op == "quarantine-delete":
                    vault.delete(arg("id"))
                    return {"qid": args["id"]}
            except QuarantineError as exc:
                raise RequestFailed("refused", str(exc)) from None
        raise RequestFailed("unsupported", f"unknown operator command {op!r}")

    async def _clone(self, base: VMRecord, count: int, into: str, prefix: str) -> dict[str, Any]:
        """Make ``count`` clones of ``base`` under ``into``; clones inherit its verdicts unread
        and are registered unclaimed (the first shim that registers a name watches it)."""
        if not 1 <= count <= 10_000:
            raise RequestFailed("malformed", "count must be between 1 and 10000")
        if not os.path.isabs(into):
            raise RequestFailed("malformed", "--into must be an absolute directory")
        loop = asyncio.get_running_loop()
        made, t0 = [], time.monotonic()
        totals = {"files": 0, "inherited": 0, "bytes_copied": 0, "reflinked": 0}
        for i in range(1, count + 1):
            name = f"{prefix}{i:03d}" if not prefix.endswith("-") else f"{prefix}{i}"
            if name in self.inventory.vms:
                raise RequestFailed("conflict", f"VM {name!r} already exists")
            dest = os.path.join(os.path.realpath(into), name)
            try:
                st = await loop.run_in_executor(None, clone_tree, base.root, dest, self.memo, self.inherited)
            except OSError as exc:
                raise RequestFailed("internal", f"cloning {base.name} into {dest}: {exc}") from None
            for k in totals:
                totals[k] += getattr(st, k)
            self.inventory.vms[name] = VMRecord(name, dest, None, {}, base.name)
            made.append({"name": name, "root": dest, "files": st.files, "inherited": st.inherited})
        self.inventory.save()
        secs = time.monotonic() - t0
        log.info("cloned %s x%d into %s in %.2f s (%d files, %d inherit verdicts)",
                 base.name, count, into, secs, totals["files"], totals["inherited"])
        return {"base": base.name, "clones": made, "seconds": round(secs, 3), **totals}

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        c = self.counters
        served = c.served_identity + c.served_digest + c.served_clone
        lookups = served + c.contents_matched
        return {
            "appliance": self.appliance_id,
            "version": __version__,
            "uptime": round(time.time() - self.started, 3),
            "pattern_version": self.pattern_version,
            "patterns": self.db.summary(),
            "native": self.matcher.native,
            "patterns_source": self.store.status() if self.store is not None else {"databases": self.databases},
            "update_error": self.update_error,
            "last_swap": self.last_swap,
            "locations": len(self.locations),
            "vms": [{**asdict(v), "policy": self.effective_policy(v)} for v in self.inventory.vms.values()],
            "queue_depth": self.gate.waiting,
            "in_flight": self.gate.active,
            "connections": len(self._conn_tasks),
            "served_from_cache": served,
            "hit_ratio": round(served / lookups, 4) if lookups else 0.0,
            "cache_entries": len(self.cache),
            "recent_detections": self.detections[-10:],
            **asdict(c),
        }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _signature_names(filename: str, lines: Sequence[str]) -> list[str]:
    """Signature names in database lines (.ndb: first field; .hdb/.hsb: third)."""
    field_ = 0 if filename.endswith(".ndb") else 2
    out = []
    for line in lines:
        parts = line.split(":")
        if len(parts) > field_:
            out.append(parts[field_])
    return out


_THREATS = ("low", "medium", "high")


def threat_level(matches: Sequence[str]) -> str:
    """NSX-style threat level from signature names: test files low, PUA medium, else high."""
    names = " ".join(matches).lower()
    if any(k in names for k in ("eicar", "test")):
        return "low"
    if any(k in names for k in ("pua", "adware", "heuristics")):
        return "medium"
    return "high"


def _threat_rank(tag: str) -> int:
    level = tag.partition("=")[2]
    return _THREATS.index(level) if level in _THREATS else len(_THREATS)


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


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
