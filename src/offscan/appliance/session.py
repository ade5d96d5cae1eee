"""One client connection (a shim or an operator): handshake, then frames until ``bye``.

:class:`Session` checks the ``hello`` (protocol version, shared secret on TCP), then reads
frames: scans run concurrently up to the connection's credits, streamed content is queued per
request, registrations, status and operator commands are answered in order (operator commands
in the background, since a clone may take minutes). It touches nothing but its connection and
the descriptors the client passes; the work is done by the appliance's parts. The frames it
sends are built as the protocol's TypedDicts (:mod:`offscan.protocol.messages`), but for the
``ok`` replies, whose keys are each request's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from .. import protocol
from . import limits
from .activation import activate_clone
from .batch import BATCH_LIMIT, COALESCE, SINGLES, BatchScans
from .common import RequestFailed, close_fds, log

if TYPE_CHECKING:
    from ..protocol.messages import (
        Adopt,
        ApplianceStatus,
        ErrorMessage,
        PolicyUpdate,
        Pong,
        Verdict,
        Welcome,
    )
    from .control import Reply
    from .facade import Appliance

HANDSHAKE_TIMEOUT = 5.0  # seconds
REFUSAL_TIMEOUT = 1.0  # seconds a connection over its client's limit may take to say hello
STREAM_QUEUE_CHUNKS = 8  # chunk frames buffered per stream (at most 2 MiB)
MAX_CONTROLS = 4  # operator commands running at once per connection; the next one waits
MAX_DRAINING = 1024  # answered streams whose remaining chunks are still being discarded


_Frame = tuple[dict[str, Any], list[int]]  # a received message and its descriptors


def _path_scan(msg: dict[str, Any], fds: list[int]) -> bool:
    return msg["t"] == "scan" and msg.get("mode", "path") == "path" and not fds


def _batch(msg: dict[str, Any], _fds: list[int]) -> bool:
    return msg["t"] == "scan-batch"


def _batch_size(msg: dict[str, Any]) -> int:
    return len(msg["scans"])


def _frame(msg: Welcome | Pong | Verdict | ApplianceStatus | ErrorMessage) -> dict[str, Any]:
    """A typed message as :meth:`Connection.send <offscan.protocol.Connection.send>` takes it:
    a plain dict (it may add ``fds``), which a TypedDict is at run time. No copy, no change."""
    return cast("dict[str, Any]", msg)


class Session:
    """The per-connection handler; :meth:`run` returns when the connection is done."""

    def __init__(self, app: Appliance, conn: protocol.Connection, *, admin: bool = False) -> None:
        self.app = app
        self.conn = conn
        self.admin = admin  # accepted on the operator's admin socket: control allowed
        self.client = limits.client_key(conn)
        self.inflight: dict[int, asyncio.Task[None]] = {}
        self.streams: dict[int, asyncio.Queue[limits.StreamItem]] = {}
        # streams answered before their end chunk arrived (insertion-ordered, bounded)
        self.draining: dict[int, None] = {}
        self.stream_slots: set[int] = set()  # stream scans holding one of the client's slots
        self.controls: set[asyncio.Task[None]] = set()
        self.batches = BatchScans(self)  # scan-batch frames and their verdict-batch replies
        self.shim: str | None = None  # who said hello
        self.admitted = False  # counted in the client's connections

    async def run(self) -> None:
        conn = self.conn
        budget = self.app.client_budget
        self.admitted = budget.admit_connection(self.client)  # counted from accept
        try:
            shim = await self._handshake()
            if shim is not None:
                self.shim = shim
                self.app.live_sessions.add(self)
                await self._serve(shim)
        except protocol.ProtocolError as exc:
            self.app.counters.protocol_errors += 1
            log.warning("%s: protocol error (%s): %s; closing connection", conn.peer, exc.code, exc)
            fatal: ErrorMessage = {"t": "error", "code": exc.code, "message": str(exc)}
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.send(_frame(fatal)), 1.0)
        except (ConnectionError, EOFError, OSError):
            pass
        except Exception:  # never let one client take the appliance down
            log.exception("%s: internal error; closing connection", conn.peer)
        finally:
            self.app.live_sessions.discard(self)
            for st in [*self.inflight.values(), *self.controls]:
                st.cancel()
            for q in self.streams.values():  # wake stream threads at once: none outlives us
                limits.abort_stream(q)
            self.streams.clear()
            if self.admitted:
                budget.release_connection(self.client)
            conn.close()

    async def _handshake(self) -> str | None:
        """The shim id from a valid ``hello`` (answered with ``welcome``); None on timeout."""
        conn, app = self.conn, self.app
        # Over its connection limit, a client gets a second to say hello and hear why.
        wait = HANDSHAKE_TIMEOUT if self.admitted else REFUSAL_TIMEOUT
        try:
            msg, fds = await asyncio.wait_for(conn.recv(), timeout=wait)
        except TimeoutError:
            log.warning("%s: no hello within %.0f s", conn.peer, wait)
            return None
        close_fds(fds)
        # Refusals come after the hello is read: closing on an unread frame would reset the
        # connection before the client could read why.
        if self.admin:
            limits.check_operator(conn)
        if not self.admitted:
            raise app.client_budget.refusal(self.client)
        if msg["t"] != "hello":
            raise protocol.ProtocolError("sequence", f"expected hello, got {msg['t']}")
        if msg.get("v") != protocol.PROTOCOL_VERSION:
            raise protocol.ProtocolError(
                "version",
                f"protocol version {msg.get('v')} not supported (want {protocol.PROTOCOL_VERSION})",
            )
        if not conn.is_unix:
            given = msg.get("secret") or ""
            secret = app.config.secret
            if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
                raise protocol.ProtocolError("auth", "bad or missing shared secret")
        welcome: Welcome = {
            "t": "welcome",
            "v": protocol.PROTOCOL_VERSION,
            "appliance": app.appliance_id,
            "credits": app.config.credits,
            "heartbeat": app.config.heartbeat,
            "pattern_version": app.pattern_version,
            "batch": min(BATCH_LIMIT, app.config.credits),
        }
        await conn.send(_frame(welcome))
        return str(msg["shim"])

    async def _serve(self, shim: str) -> None:
        """Frames until ``bye``, or until the client is silent for three heartbeats."""
        silence = 3 * self.app.config.heartbeat
        conn = self.conn
        while True:
            try:
                async with asyncio.timeout(silence):  # no task per frame, as wait_for makes
                    msg, fds = await conn.recv()
            except TimeoutError:
                log.warning("%s: no frame for %.0f s, closing", conn.peer, silence)
                return
            if _path_scan(msg, fds):
                # Path-mode scans that arrived together take the hit fast path together.
                frames, other = self._buffered((msg, fds), _path_scan, lambda _m: 1, SINGLES)
                await self.batches.serve_singles(shim, [m for m, _ in frames])
            elif msg["t"] == "scan-batch":
                # So do scan-batch frames: one lookup walk, one event-log write, one send.
                frames, other = self._buffered((msg, fds), _batch, _batch_size, COALESCE)
                await self.batches.serve(shim, frames)
            else:
                other = (msg, fds)
            if other is not None and not await self._handle(shim, *other):
                return

    def _buffered(
        self,
        first: _Frame,
        same: Callable[[dict[str, Any], list[int]], bool],
        size: Callable[[dict[str, Any]], int],
        limit: int,
    ) -> tuple[list[_Frame], _Frame | None]:
        """``first`` and the frames already buffered behind it that are ``same`` kind, up to
        ``limit`` scans (by ``size``); and the first frame of another kind, if one was taken.
        Never waits for a frame. If a buffered frame is malformed, the descriptors of those
        taken are closed before the ProtocolError goes on."""
        frames, n = [first], size(first[0])
        try:
            while n < limit:
                got = self.conn.next_buffered()
                if got is None:
                    break
                if not same(*got):
                    return frames, got
                frames.append(got)
                n += size(got[0])
        except protocol.ProtocolError:
            for _msg, fds in frames:
                close_fds(fds)
            raise
        return frames, None

    async def _handle(self, shim: str, msg: dict[str, Any], fds: list[int]) -> bool:
        """One frame; False once the client said ``bye`` (and was answered)."""
        t = msg["t"]
        if t == "scan-batch":  # its fd-mode scans' descriptors (validated count)
            await self.batches.serve(shim, [(msg, fds)])
            return True
        if t != "scan" or msg.get("mode") != "fd":
            close_fds(fds)  # only an fd-mode scan may pass descriptors
        if t == "ping":
            pong: Pong = {"t": "pong", "id": msg["id"]}  # validated: a ping has one
            await self._send(_frame(pong))
        elif t == "scan":
            self.start_scan(shim, msg, fds)
        elif t == "chunk":
            await self._chunk(msg)
        elif t == "bye":
            await asyncio.gather(*self.inflight.values(), return_exceptions=True)
            await self.batches.drain()
            return False
        elif t == "control":  # may run for minutes (clones): keep reading frames
            while len(self.controls) >= MAX_CONTROLS:  # backpressure: stop reading
                await asyncio.wait(self.controls, return_when=asyncio.FIRST_COMPLETED)
            ct = asyncio.create_task(self._serve_control(shim, msg))
            self.controls.add(ct)
            ct.add_done_callback(self.controls.discard)
        else:
            await self._serve_control(shim, msg)
        return True

    def over_credits(self, more: int) -> bool:
        """Whether the scans holding a credit (in flight and not yet answered) and ``more``
        exceed the connection's credits. A task that sent its reply is done, though its
        done callback (which forgets it) may not have run yet; the client, which got the
        reply, may already have used the credit again: so a done task holds none."""
        inflight = self.inflight
        credits = self.app.config.credits
        if len(inflight) + more <= credits:
            return False  # the common case: no need to look closer
        return sum(1 for task in inflight.values() if not task.done()) + more > credits

    def check_scan(self, rid: int, ahead: set[int] | frozenset[int] = frozenset()) -> None:
        """A ``scan`` frame's id and credit (``ahead``: scans received before it, not yet in
        flight); ProtocolError (fatal) if the client broke either rule."""
        if rid in self.inflight or rid in ahead:
            raise protocol.ProtocolError("sequence", f"duplicate request id {rid}")
        if self.over_credits(len(ahead) + 1):
            credits = self.app.config.credits
            raise protocol.ProtocolError("backpressure", f"more than {credits} outstanding scans")

    def start_scan(self, shim: str, msg: dict[str, Any], fds: list[int]) -> None:
        rid = msg["id"]
        try:
            self.check_scan(rid)
        except protocol.ProtocolError:
            close_fds(fds)
            raise
        if msg.get("mode") == "stream":
            refusal = self.app.client_budget.take_stream(self.client)
            if refusal is not None:  # answered at once; its chunks are discarded
                self._drain(rid)
                st = asyncio.create_task(self._refuse(rid, refusal))
                self.inflight[rid] = st
                st.add_done_callback(lambda _task: self.inflight.pop(rid, None))
                return
            self.streams[rid] = asyncio.Queue(maxsize=STREAM_QUEUE_CHUNKS)
            self.stream_slots.add(rid)
        st = asyncio.create_task(self._serve_scan(shim, msg, fds, self.streams.get(rid)))
        self.inflight[rid] = st
        st.add_done_callback(lambda _task: self._finished(rid))

    def _finished(self, rid: int) -> None:
        self.inflight.pop(rid, None)
        if rid in self.stream_slots:
            self.stream_slots.discard(rid)
            self.app.client_budget.release_stream(self.client)
        q = self.streams.pop(rid, None)
        if q is not None:  # answered before its end chunk: discard the rest
            self._drain(rid)
            limits.abort_stream(q)

    def _drain(self, rid: int) -> None:
        self.draining[rid] = None
        while len(self.draining) > MAX_DRAINING:  # a later chunk for the oldest: sequence
            del self.draining[next(iter(self.draining))]

    async def _refuse(self, rid: int, message: str) -> None:
        refused: ErrorMessage = {
            "t": "error",
            "id": rid,
            "code": "backpressure",
            "message": message,
        }
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await self._send(_frame(refused))

    async def push(self, msg: PolicyUpdate | Adopt) -> None:
        """Tell this session's shim, unasked, of a change to its VMs (best effort)."""
        with contextlib.suppress(ConnectionError, OSError, TimeoutError, protocol.ProtocolError):
            await self._send(cast("dict[str, Any]", msg))

    async def _send(self, frame: dict[str, Any]) -> None:
        """Send one frame; a client that does not take it within three heartbeats stopped
        reading: its connection is closed, so unread replies cannot pile up here. In this
        task, not one of its own (as ``wait_for`` would make): a scan task that sent its
        reply is done at once, so it no longer holds a credit when the client, having read
        the reply, sends its next scan (see :meth:`over_credits`)."""
        try:
            async with asyncio.timeout(3 * self.app.config.heartbeat):
                await self.conn.send(frame)
        except TimeoutError:
            log.warning("%s: not reading its replies; closing", self.conn.peer)
            self.conn.close()
            raise

    async def _chunk(self, msg: dict[str, Any]) -> None:
        rid = msg["id"]
        if rid in self.draining:  # answered early (e.g. an error): drop the rest
            if msg.get("end"):
                self.draining.pop(rid, None)
            return
        q = self.streams.get(rid)
        if q is None:
            raise protocol.ProtocolError("sequence", f"chunk for unknown stream {rid}")
        await q.put(bytes(msg["data"]))  # full queue: TCP backpressure on this client
        if msg.get("end"):
            await q.put(None)
            self.streams.pop(rid, None)  # its slot is held until it is answered

    async def _serve_control(self, shim: str, msg: dict[str, Any]) -> None:
        app = self.app
        rid = msg.get("id")
        try:
            t = msg["t"]
            if t == "status":  # the one reply here the protocol types in full
                report = app.status() if self.admin else limits.own_status(app, shim)
                status: ApplianceStatus = {**report, "t": "status", "id": msg["id"]}
                await self._send(_frame(status))
                return
            reply: Reply  # ``ok`` plus the request's own keys
            if t == "register":
                if msg["vm"] not in app.inventory.vms and len(app.inventory.vms) >= limits.MAX_VMS:
                    raise RequestFailed(
                        "backpressure", f"the appliance holds {limits.MAX_VMS} VMs (the limit)"
                    )
                before = app.registry.vms.get(msg["vm"])
                reply = app.registry.register(
                    shim, msg["vm"], msg["root"], msg.get("policy") or {}, msg.get("clone_of")
                )
                if before is None or before.owner is None:  # claimed now: activate a clone
                    reply = {**reply, **await activate_clone(app, app.registry.vms[msg["vm"]])}
            elif t == "unregister":
                reply = app.registry.unregister(shim, msg["vm"])
            elif t == "report":  # a shim's on-access counters; it learns the pattern version
                reply = {
                    **app.registry.report(shim, msg["vms"]),
                    "pattern_version": app.pattern_version,
                }
            elif t == "control":
                if not self.admin:
                    raise RequestFailed("auth", limits.NOT_ADMIN)
                reply = await app.control(msg["op"], msg.get("args") or {})
            else:
                raise RequestFailed("unsupported", f"message type {t!r} not supported here")
            await self._send({**reply, "t": "ok", "id": rid})
        except RequestFailed as exc:
            failed: ErrorMessage = {"t": "error", "id": rid, "code": exc.code, "message": str(exc)}
            await self._send(_frame(failed))
        except (ConnectionError, OSError, TimeoutError):
            pass
        except Exception as exc:  # a failed command must not end the connection
            log.exception("%s %s failed", msg.get("t"), msg.get("op", ""))
            internal: ErrorMessage = {
                "t": "error",
                "id": rid,
                "code": "internal",
                "message": str(exc),
            }
            with contextlib.suppress(Exception):
                await self._send(_frame(internal))

    async def _serve_scan(
        self,
        shim: str,
        msg: dict[str, Any],
        fds: list[int],
        stream: asyncio.Queue[limits.StreamItem] | None,
    ) -> None:
        rid = msg["id"]
        pipeline = self.app.pipeline
        reply: Verdict | ErrorMessage
        try:
            if stream is not None:
                verdict = await pipeline.scan_stream(shim, msg, stream)
            else:
                verdict = await pipeline.scan_request(shim, msg, fds)
            reply = {"t": "verdict", "id": rid, **verdict}
        except RequestFailed as exc:
            reply = {"t": "error", "id": rid, "code": exc.code, "message": str(exc)}
        except limits.StreamAborted:  # its connection is gone: nobody to answer
            return
        except Exception as exc:  # one bad request must not end the connection
            log.exception("scan %r failed", msg.get("path"))
            reply = {"t": "error", "id": rid, "code": "internal", "message": str(exc)}
        self.app.events.flush()  # a verdict is logged before it is sent (docs/protocol.md)
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await self._send(_frame(reply))
