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
from typing import TYPE_CHECKING, Any, cast

from .. import protocol
from .activation import activate_clone
from .batch import BATCH_LIMIT, BatchScans
from .common import RequestFailed, close_fds, log

if TYPE_CHECKING:
    from ..protocol.messages import ApplianceStatus, ErrorMessage, Pong, Verdict, Welcome
    from .control import Reply
    from .facade import Appliance

HANDSHAKE_TIMEOUT = 5.0  # seconds
STREAM_QUEUE_CHUNKS = 8  # chunk frames buffered per stream (at most 2 MiB)


def _frame(msg: Welcome | Pong | Verdict | ApplianceStatus | ErrorMessage) -> dict[str, Any]:
    """A typed message as :meth:`Connection.send <offscan.protocol.Connection.send>` takes it:
    a plain dict (it may add ``fds``), which a TypedDict is at run time. No copy, no change."""
    return cast("dict[str, Any]", msg)


class Session:
    """The per-connection handler; :meth:`run` returns when the connection is done."""

    def __init__(self, app: Appliance, conn: protocol.Connection) -> None:
        self.app = app
        self.conn = conn
        self.inflight: dict[int, asyncio.Task[None]] = {}
        self.streams: dict[int, asyncio.Queue[bytes | None]] = {}
        self.draining: set[int] = set()  # streams answered before their end chunk arrived
        self.controls: set[asyncio.Task[None]] = set()
        self.batches = BatchScans(self)  # scan-batch frames and their verdict-batch replies

    async def run(self) -> None:
        conn = self.conn
        try:
            shim = await self._handshake()
            if shim is not None:
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
            for st in [*self.inflight.values(), *self.controls]:
                st.cancel()
            conn.close()

    async def _handshake(self) -> str | None:
        """The shim id from a valid ``hello`` (answered with ``welcome``); None on timeout."""
        conn, app = self.conn, self.app
        try:
            msg, fds = await asyncio.wait_for(conn.recv(), timeout=HANDSHAKE_TIMEOUT)
        except TimeoutError:
            log.warning("%s: no hello within %.0f s", conn.peer, HANDSHAKE_TIMEOUT)
            return None
        close_fds(fds)
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
        while True:
            try:
                msg, fds = await asyncio.wait_for(self.conn.recv(), timeout=silence)
            except TimeoutError:
                log.warning("%s: no frame for %.0f s, closing", self.conn.peer, silence)
                return
            t = msg["t"]
            if t == "scan-batch":  # its fd-mode scans' descriptors (validated count)
                await self.batches.serve(shim, msg, fds)
                continue
            if t != "scan" or msg.get("mode") != "fd":
                close_fds(fds)  # only an fd-mode scan may pass descriptors
            if t == "ping":
                pong: Pong = {"t": "pong", "id": msg["id"]}  # validated: a ping has one
                await self.conn.send(_frame(pong))
            elif t == "scan":
                self._start_scan(shim, msg, fds)
            elif t == "chunk":
                await self._chunk(msg)
            elif t == "bye":
                await asyncio.gather(*self.inflight.values(), return_exceptions=True)
                await self.batches.drain()
                return
            elif t == "control":  # may run for minutes (clones): keep reading frames
                ct = asyncio.create_task(self._serve_control(shim, msg))
                self.controls.add(ct)
                ct.add_done_callback(self.controls.discard)
            else:
                await self._serve_control(shim, msg)

    def _start_scan(self, shim: str, msg: dict[str, Any], fds: list[int]) -> None:
        rid = msg["id"]
        credits = self.app.config.credits
        if rid in self.inflight:
            close_fds(fds)
            raise protocol.ProtocolError("sequence", f"duplicate request id {rid}")
        if len(self.inflight) >= credits:
            close_fds(fds)
            raise protocol.ProtocolError("backpressure", f"more than {credits} outstanding scans")
        if msg.get("mode") == "stream":
            self.streams[rid] = asyncio.Queue(maxsize=STREAM_QUEUE_CHUNKS)
        st = asyncio.create_task(self._serve_scan(shim, msg, fds, self.streams.get(rid)))
        self.inflight[rid] = st
        st.add_done_callback(lambda _task: self._finished(rid))

    def _finished(self, rid: int) -> None:
        self.inflight.pop(rid, None)
        if self.streams.pop(rid, None) is not None:
            self.draining.add(rid)

    async def _chunk(self, msg: dict[str, Any]) -> None:
        rid = msg["id"]
        if rid in self.draining:  # answered early (e.g. an error): drop the rest
            if msg.get("end"):
                self.draining.discard(rid)
            return
        q = self.streams.get(rid)
        if q is None:
            raise protocol.ProtocolError("sequence", f"chunk for unknown stream {rid}")
        await q.put(bytes(msg["data"]))  # full queue: TCP backpressure on this client
        if msg.get("end"):
            await q.put(None)
            self.streams.pop(rid, None)

    async def _serve_control(self, shim: str, msg: dict[str, Any]) -> None:
        conn, app = self.conn, self.app
        rid = msg.get("id")
        try:
            t = msg["t"]
            if t == "status":  # the one reply here the protocol types in full
                status: ApplianceStatus = {**app.status(), "t": "status", "id": msg["id"]}
                await conn.send(_frame(status))
                return
            reply: Reply  # ``ok`` plus the request's own keys
            if t == "register":
                before = app.registry.vms.get(msg["vm"])
                reply = app.registry.register(
                    shim, msg["vm"], msg["root"], msg.get("policy") or {}, msg.get("clone_of")
                )
                if before is None or before.owner is None:  # claimed now: activate a clone
                    reply = {**reply, **await activate_clone(app, app.registry.vms[msg["vm"]])}
            elif t == "unregister":
                reply = app.registry.unregister(shim, msg["vm"])
            elif t == "control":
                reply = await app.control(msg["op"], msg.get("args") or {})
            else:
                raise RequestFailed("unsupported", f"message type {t!r} not supported here")
            await conn.send({**reply, "t": "ok", "id": rid})
        except RequestFailed as exc:
            failed: ErrorMessage = {"t": "error", "id": rid, "code": exc.code, "message": str(exc)}
            await conn.send(_frame(failed))
        except (ConnectionError, OSError):
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
                await conn.send(_frame(internal))

    async def _serve_scan(
        self,
        shim: str,
        msg: dict[str, Any],
        fds: list[int],
        stream: asyncio.Queue[bytes | None] | None,
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
        except Exception as exc:  # one bad request must not end the connection
            log.exception("scan %r failed", msg.get("path"))
            reply = {"t": "error", "id": rid, "code": "internal", "message": str(exc)}
        self.app.events.flush()  # a verdict is logged before it is sent (docs/protocol.md)
        with contextlib.suppress(ConnectionError, OSError):
            await self.conn.send(_frame(reply))
