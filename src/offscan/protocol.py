"""The shim ⇄ appliance wire protocol: framing, validation, connections, servers and the client.

Length-prefixed msgpack frames on one persistent stream connection (unix socket on the host,
or TCP to a remote appliance), multiplexed by request id; file descriptors ride along as
``SCM_RIGHTS`` on unix sockets. The rules (message types, fields, error codes) are in
``docs/protocol.md``; this module is their executable form.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import io
import itertools
import logging
import os
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "DEFAULT_HEARTBEAT",
    "ERROR_CODES",
    "MAX_CHUNK",
    "MAX_FDS_PER_FRAME",
    "MAX_FRAME",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "ApplianceClient",
    "Connection",
    "ConnectionClosed",
    "ProtocolError",
    "RequestError",
    "Server",
    "connect",
    "pack",
    "parse_address",
    "start_tcp_server",
    "start_unix_server",
    "unpack",
    "validate",
]

log = logging.getLogger("offscan.protocol")

PROTOCOL_VERSION = 1
MAX_FRAME = 4 << 20  # bytes of msgpack payload in one frame
MAX_CHUNK = 256 << 10  # bytes of content per chunk frame
DEFAULT_HEARTBEAT = 5.0  # seconds
MAX_FDS_PER_FRAME = 8  # descriptors one frame may carry (a scan carries exactly one)
DEAD_AFTER_HEARTBEATS = 3  # silence of this many heartbeats means the peer is gone
HEADER = struct.Struct(">I")
RECV_SIZE = 256 << 10  # bytes asked of the kernel per recvmsg
MAX_PENDING_FD_BATCHES = 4  # fd batches received but not yet claimed by a frame
STREAM_PREFETCH = MAX_CHUNK  # bytes read ahead from a file object when streaming

ERROR_CODES = frozenset(
    {
        "malformed",
        "oversized",
        "sequence",
        "version",
        "auth",
        "backpressure",
        "unknown-vm",
        "conflict",
        "confined",
        "unsupported",
        "internal",
    }
)
SCAN_MODES = ("path", "fd", "stream")
PRIORITIES = ("access", "demand")
VERDICT_STATUSES = ("clean", "infected", "error")
VERDICT_ACTIONS = ("allow", "deny")
VERDICT_SOURCES = ("scan", "identity", "digest", "clone", "excluded", "revalidated")


class ProtocolError(Exception):
    """A peer broke the protocol (or a message we were about to send would).

    ``code`` is one of :data:`ERROR_CODES` (``malformed``, ``oversized``, ``sequence``...),
    ready to put in a fatal ``error`` frame; ``str(e)`` is the human-readable reason.
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.code = code


class ConnectionClosed(ConnectionError):
    """The connection is gone: closed by either side, reset, or declared dead by heartbeat.

    ``code`` is set when the peer said why in a fatal ``error`` frame (e.g. ``auth``).
    """

    def __init__(self, message: str = "connection closed", *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class RequestError(Exception):
    """The appliance answered a request with an ``error`` frame (``code``, ``str(e)``)."""

    def __init__(
        self, code: str, message: str = "", *, reply: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message or code)
        self.code = code
        self.reply = reply


# -- codec ----------------------------------------------------------------------------------


def pack(msg: dict[str, Any], *, max_frame: int = MAX_FRAME) -> bytes:
    """Encode one message as a frame: 4-byte big-endian length + msgpack payload."""
    try:
        payload = msgpack.packb(msg, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("malformed", f"cannot encode message: {exc}") from None
    if len(payload) > max_frame:
        raise ProtocolError(
            "oversized", f"{msg.get('t', '?')} frame of {len(payload)} bytes exceeds {max_frame}"
        )
    return HEADER.pack(len(payload)) + payload


def unpack(payload: bytes) -> dict[str, Any]:
    """Decode one frame's payload (without its header) and :func:`validate` it."""
    try:
        msg = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_array_len=1 << 16,
            max_map_len=1 << 16,
        )
    except Exception as exc:  # noqa: BLE001 -- msgpack raises a zoo of ValueError/TypeError/its own types
        raise ProtocolError("malformed", f"payload is not valid msgpack: {exc}") from None
    return validate(msg)


# -- validation -----------------------------------------------------------------------------

_Check = Callable[[str, Any], None]


def _fail(field: str, want: str, value: Any) -> None:
    raise ProtocolError("malformed", f"{field}: expected {want}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"bin of {len(value)} bytes"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass; msgpack true must not pass as 1


def _req_id(field: str, value: Any) -> None:
    if not _is_int(value) or value < 0 or value >= 1 << 63:
        _fail(field, "a non-negative integer id", value)


def _uint(field: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        _fail(field, "a non-negative integer", value)


def _pos_int(field: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        _fail(field, "a positive integer", value)


def _text(field: str, value: Any) -> None:
    if not isinstance(value, str):
        _fail(field, "str", value)


def _name(field: str, value: Any) -> None:
    # Names and paths reach os.* calls on the appliance; NUL would raise there, so stop it here.
    if not isinstance(value, str) or not value:
        _fail(field, "a non-empty str", value)
    if "\x00" in value:
        raise ProtocolError("malformed", f"{field}: contains a NUL character")


def _path(field: str, value: Any) -> None:
    if not isinstance(value, str):
        _fail(field, "str (a path)", value)
    if "\x00" in value:
        raise ProtocolError("malformed", f"{field}: contains a NUL character")


def _bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(field, "bool", value)


def _map(field: str, value: Any) -> None:
    if not isinstance(value, dict):
        _fail(field, "a map", value)


def _positive_number(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        _fail(field, "a positive number of seconds", value)


def _str_list(field: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(field, "a list of str", value)


def _one_of(*choices: str) -> _Check:
    def check(field: str, value: Any) -> None:
        if value not in choices:
            _fail(field, " or ".join(repr(c) for c in choices), value)

    return check


def _chunk_data(field: str, value: Any) -> None:
    if not isinstance(value, bytes):
        _fail(field, "bin", value)
    if len(value) > MAX_CHUNK:
        raise ProtocolError(
            "oversized", f"{field}: {len(value)} bytes exceeds {MAX_CHUNK} per chunk"
        )


def _nullable(check: _Check) -> _Check:
    def nullable(field: str, value: Any) -> None:
        if value is not None:
            check(field, value)

    return nullable


@dataclass(frozen=True)
class _Schema:
    required: dict[str, _Check]
    optional: dict[str, _Check]


_S = _Schema
# Keys not listed are allowed and ignored (forward compatibility, free-form status replies).
SCHEMAS: dict[str, _Schema] = {
    # handshake
    "hello": _S({"v": _uint, "shim": _name}, {"secret": _nullable(_text)}),
    "welcome": _S(
        {"v": _uint, "appliance": _text, "credits": _uint, "heartbeat": _positive_number},
        {"pattern_version": _nullable(_text)},
    ),
    # either direction
    "ping": _S({"id": _req_id}, {}),
    "pong": _S({"id": _req_id}, {}),
    "error": _S({"code": _text, "message": _text}, {"id": _nullable(_req_id)}),
    # client -> appliance
    "register": _S(
        {"id": _req_id, "vm": _name, "root": _name},
        {"policy": _nullable(_map), "clone_of": _nullable(_name)},
    ),
    "unregister": _S({"id": _req_id, "vm": _name}, {}),
    "scan": _S(
        {"id": _req_id, "vm": _name, "path": _path, "mode": _one_of(*SCAN_MODES)},
        {"prio": _one_of(*PRIORITIES), "size": _nullable(_uint)},
    ),
    "chunk": _S({"id": _req_id, "data": _chunk_data, "end": _bool}, {}),
    "status": _S({"id": _req_id}, {}),  # the request, and the reply (plus free-form keys)
    "bye": _S({}, {"id": _nullable(_req_id)}),
    # operator commands (vm clone/list/show/untag, policy, quarantine); reply "ok" + free-form keys
    "control": _S({"id": _req_id, "op": _name}, {"args": _nullable(_map)}),
    # appliance -> client
    "credit": _S({"n": _pos_int}, {}),
    "ok": _S({"id": _req_id}, {}),
    "verdict": _S(
        {
            "id": _req_id,
            "vm": _text,
            "path": _text,
            "status": _one_of(*VERDICT_STATUSES),
            "action": _one_of(*VERDICT_ACTIONS),
        },
        {
            "matches": _str_list,
            "reason": _nullable(_text),
            "source": _one_of(*VERDICT_SOURCES),
            "digest": _nullable(_text),
            "pattern_version": _nullable(_text),
        },
    ),
}
MESSAGE_TYPES = frozenset(SCHEMAS)


def validate(msg: Any) -> dict[str, Any]:
    """Check a decoded message against ``docs/protocol.md`` and return it unchanged.

    Raises :class:`ProtocolError` (code ``malformed``, or ``oversized`` for chunk data over
    :data:`MAX_CHUNK`) naming the offending field. Only structure and types are checked here;
    meaning (is the VM registered, is the path inside its root) is the appliance's business.
    """
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", f"payload must be a map, got {_describe(msg)}")
    t = msg.get("t")
    if t is None:
        raise ProtocolError("malformed", 'message has no type ("t" missing)')
    if not isinstance(t, str):
        _fail("t", "str", t)
    schema = SCHEMAS.get(t)
    if schema is None:
        raise ProtocolError("malformed", f"unknown message type {t!r}")
    for key in msg:
        if not isinstance(key, str):
            raise ProtocolError("malformed", f"{t}: map keys must be str, got {_describe(key)}")
    for field, check in schema.required.items():
        if field not in msg:
            raise ProtocolError("malformed", f"{t}: missing required field {field!r}")
        check(f"{t}.{field}", msg[field])
    for field, check in schema.optional.items():
        if field in msg:
            check(f"{t}.{field}", msg[field])
    nfds = msg.get("fds", 0)
    if not _is_int(nfds) or not 0 <= nfds <= MAX_FDS_PER_FRAME:
        _fail(f"{t}.fds", f"an integer 0..{MAX_FDS_PER_FRAME}", nfds)
    if t == "scan" and msg["mode"] == "stream" and msg.get("size") is None:
        raise ProtocolError("malformed", "scan in stream mode needs its content size")
    if t == "scan" and msg["mode"] == "fd":
        if nfds != 1:
            raise ProtocolError(
                "malformed", f"scan in fd mode must carry exactly one descriptor, not {nfds}"
            )
    elif nfds:
        raise ProtocolError("malformed", f"{t} frames carry no descriptors (fds={nfds})")
    return msg


# -- addresses ------------------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, Any]:
    """``"unix:/p"`` or anything with a ``/`` → ``("unix", path)``; ``"host:port"``,
    ``"tcp:host:port"`` or ``"[v6]:port"`` → ``("tcp", (host, port))``."""
    if address.startswith("unix:"):
        path = address[5:]
        if not path:
            raise ValueError(f"empty unix socket path in {address!r}")
        return "unix", path
    if "/" in address:
        return "unix", address
    rest = address.removeprefix("tcp:")
    host, sep, port_text = rest.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"address {address!r} is neither a socket path nor HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return "tcp", (host or "localhost", int(port_text))


# -- connection -----------------------------------------------------------------------------


@dataclass
class _FdBatch:
    """Descriptors from one recvmsg, which delivered stream bytes [start, end)."""

    start: int
    end: int
    fds: list[int]


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Connection:
    """Framed messages over one connected non-blocking socket (AF_UNIX or TCP), asyncio.

    Reads with ``loop.add_reader`` + ``sock.recvmsg`` so ``SCM_RIGHTS`` descriptors can be
    received on unix sockets, and only when no complete frame is buffered, so the buffer never
    holds more than one frame plus one read. Writes go straight to the socket with ``sendmsg``
    (descriptors attached to the first byte of their frame), one frame at a time under a lock.
    Every received frame is :func:`validate`-d. Owns the socket: :meth:`close` closes it.
    """

    def __init__(self, sock: socket.socket, *, max_frame: int = MAX_FRAME) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self.max_frame = max_frame
        self.is_unix = sock.family == socket.AF_UNIX
        self.peer_cred: tuple[int, int, int] | None = None  # (pid, uid, gid) of a unix peer
        self.peer = self._describe_peer()
        if self.is_unix:
            self._ancbufsize = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * array.array("i").itemsize)
        else:
            self._ancbufsize = 0
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()
        self._pos = 0  # start of unparsed data in _buf
        self._received = 0  # stream offset just past the last byte received
        self._fd_batches: deque[_FdBatch] = deque()
        self._eof = False
        self._error: ProtocolError | None = None
        self._closed = False
        self._recv_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None

    def _describe_peer(self) -> str:
        if self.is_unix:
            try:
                raw = self._sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
                )
                pid, uid, gid = struct.unpack("3i", raw)
                self.peer_cred = (pid, uid, gid)
                return f"unix:pid={pid},uid={uid}"
            except (OSError, AttributeError):
                return "unix:?"
        try:
            host, port = self._sock.getpeername()[:2]
        except OSError:
            return "tcp:?"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def __repr__(self) -> str:
        return f"<Connection {self.peer}{' closed' if self._closed else ''}>"

    @property
    def closed(self) -> bool:
        return self._closed

    # -- receiving ------------------------------------------------------------------------

    async def recv(self) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors it carried (the caller owns and must close them).

        Raises :class:`ProtocolError` for a malformed or oversized frame or a descriptor
        mismatch (the connection is then unusable: send a fatal error and close it), and
        :class:`ConnectionClosed` when the peer closed. Safe to cancel: nothing is lost.
        """
        async with self._recv_lock:
            while True:
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise ConnectionClosed(f"connection to {self.peer} is closed")
                try:
                    frame = self._next_frame()
                except ProtocolError as exc:
                    self._error = exc
                    raise
                if frame is not None:
                    return frame
                if self._eof:
                    pending = len(self._buf) - self._pos
                    if pending:
                        raise ConnectionClosed(
                            f"{self.peer} closed the connection mid-frame ({pending} bytes)"
                        )
                    raise ConnectionClosed(f"{self.peer} closed the connection")
                if not self._read_some():
                    await self._wait_readable()

    def _read_some(self) -> bool:
        """One non-blocking recvmsg into the buffer; False if nothing was ready."""
        try:
            data, ancdata, flags, _ = self._sock.recvmsg(RECV_SIZE, self._ancbufsize)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._eof = True
            raise ConnectionClosed(f"connection to {self.peer} lost: {exc}") from exc
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        start = self._received
        self._received += len(data)
        if fds:
            self._fd_batches.append(_FdBatch(start, self._received, fds))
        if flags & socket.MSG_CTRUNC:
            self._error = ProtocolError(
                "malformed", f"more than {MAX_FDS_PER_FRAME} descriptors arrived with one message"
            )
            raise self._error
        if len(self._fd_batches) > MAX_PENDING_FD_BATCHES:
            self._error = ProtocolError(
                "malformed", "descriptors arrived with no frame claiming them"
            )
            raise self._error
        if not data:
            self._eof = True
            return True
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > RECV_SIZE:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data
        return True

    def _next_frame(self) -> tuple[dict[str, Any], list[int]] | None:
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(buf, pos)
        if size == 0:
            raise ProtocolError("malformed", "empty frame (length 0)")
        if size > self.max_frame:
            raise ProtocolError("oversized", f"frame of {size} bytes exceeds {self.max_frame}")
        if available < HEADER.size + size:
            return None
        start = self._received - available  # stream offset of this frame's first byte
        payload = bytes(buf[pos + HEADER.size : pos + HEADER.size + size])
        self._pos = pos + HEADER.size + size
        msg = unpack(payload)
        fds = self._claim_fds(msg.get("fds", 0), start, start + HEADER.size + size)
        return msg, fds

    def _claim_fds(self, nfds: int, start: int, next_start: int) -> list[int]:
        # The sender attaches a frame's descriptors to its first byte, and the kernel never
        # merges two descriptor batches into one recvmsg, so the batch for this frame is the
        # one whose recvmsg delivered byte `start`.
        fds: list[int] = []
        batches = self._fd_batches
        if nfds:
            if not batches or not batches[0].start <= start < batches[0].end:
                raise ProtocolError(
                    "malformed", f"frame announced {nfds} descriptor(s) that did not arrive with it"
                )
            batch = batches.popleft()
            if len(batch.fds) != nfds:
                _close_fds(batch.fds)
                raise ProtocolError(
                    "malformed",
                    f"frame announced {nfds} descriptor(s) but {len(batch.fds)} arrived",
                )
            fds = batch.fds
        if batches and batches[0].end <= next_start:
            _close_fds(fds)
            raise ProtocolError("malformed", "descriptors arrived with no frame claiming them")
        return fds

    async def _wait_readable(self) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._read_waiter = fut
        loop.add_reader(self._fd, _wake, fut)
        try:
            await fut
        finally:
            self._read_waiter = None
            if not self._closed:  # close() already unregistered; the fd number may be reused
                loop.remove_reader(self._fd)

    # -- sending --------------------------------------------------------------------------

    async def send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Validate, frame and send one message, with ``fds`` attached (unix sockets only).

        Sets ``msg["fds"] = len(fds)`` when descriptors are passed; the caller keeps its own
        descriptors (the kernel duplicates them in flight). Concurrent senders are serialized
        frame by frame. Cancelling a send half-way through a frame closes the connection,
        since the stream can no longer be framed.
        """
        if fds:
            if not self.is_unix:
                raise ProtocolError(
                    "unsupported", "descriptors can only be passed over a unix socket"
                )
            msg["fds"] = len(fds)
        validate(msg)
        data = pack(msg, max_frame=self.max_frame)
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        async with self._send_lock:
            view = memoryview(data)
            sent_any = False
            try:
                while view:
                    if self._closed:
                        raise ConnectionClosed(f"connection to {self.peer} is closed")
                    try:
                        if anc and not sent_any:
                            n = self._sock.sendmsg([view], anc)
                        else:
                            n = self._sock.send(view)
                    except (BlockingIOError, InterruptedError):
                        await self._wait_writable()
                        continue
                    except OSError as exc:
                        self.close()
                        raise ConnectionClosed(f"connection to {self.peer} lost: {exc}") from exc
                    sent_any = True
                    view = view[n:]
            except BaseException:
                if sent_any and view:
                    self.close()  # a partial frame on the wire: nothing after it could be parsed
                raise
            finally:
                view.release()

    async def _wait_writable(self) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._write_waiter = fut
        loop.add_writer(self._fd, _wake, fut)
        try:
            await fut
        finally:
            self._write_waiter = None
            if not self._closed:
                loop.remove_writer(self._fd)

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket and any received descriptors no frame claimed. Idempotent;
        wakes a pending ``recv``/``send`` with :class:`ConnectionClosed`."""
        if self._closed:
            return
        self._closed = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self._fd)
            with contextlib.suppress(Exception):
                loop.remove_writer(self._fd)
        for waiter in (self._read_waiter, self._write_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionClosed(f"connection to {self.peer} was closed"))
        while self._fd_batches:
            _close_fds(self._fd_batches.popleft().fds)
        self._buf = bytearray()
        self._pos = 0
        with contextlib.suppress(OSError):
            self._sock.close()


async def connect(address: str, *, timeout: float = 5.0, max_frame: int = MAX_FRAME) -> Connection:
    """Open a :class:`Connection` to ``address`` (see :func:`parse_address`)."""
    kind, target = parse_address(address)
    loop = asyncio.get_running_loop()

    async def open_socket() -> socket.socket:
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, target)
            except BaseException:
                sock.close()
                raise
            return sock
        host, port = target
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, type_, proto, _, sockaddr in infos:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, sockaddr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise last or OSError(errno.EHOSTUNREACH, f"no address for {host}:{port}")

    try:
        sock = await asyncio.wait_for(open_socket(), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"connecting to {address} timed out after {timeout:g} s") from None
    return Connection(sock, max_frame=max_frame)


# -- servers --------------------------------------------------------------------------------

Handler = Callable[[Connection], Awaitable[None]]


class Server:
    """A listening socket that runs ``handler(conn)`` in a task per accepted connection.

    The connection is closed when its handler returns. ``close()`` stops accepting, removes
    the unix socket file and closes every live connection (their pending ``recv`` raises
    :class:`ConnectionClosed`); ``wait_closed()`` waits for the handlers to finish.
    """

    def __init__(self, sock: socket.socket, handler: Handler, *, path: str | None = None) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._handler = handler
        self.path = path
        self.port: int | None = None if path else sock.getsockname()[1]
        self._inode = os.stat(path).st_ino if path else None
        self._loop = asyncio.get_running_loop()
        self._conns: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop.add_reader(self._fd, self._on_accept)

    @property
    def address(self) -> str:
        """The address a client passes to :func:`connect`."""
        if self.path:
            return self.path
        host = self._sock.getsockname()[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept on %s failed: %s; pausing for 0.1 s", self.address, exc)
                self._loop.remove_reader(self._fd)
                self._loop.call_later(0.1, self._resume)
                return
            conn = Connection(sock)
            self._conns.add(conn)
            task = self._loop.create_task(self._run(conn), name=f"offscan-conn {conn.peer}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._fd, self._on_accept)

    async def _run(self, conn: Connection) -> None:
        try:
            await self._handler(conn)
        except (ConnectionError, ProtocolError) as exc:
            log.debug("%s: %s", conn.peer, exc)
        except Exception:
            log.exception("%s: connection handler failed", conn.peer)
        finally:
            conn.close()
            self._conns.discard(conn)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._sock.close()
        if self.path:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
        for conn in list(self._conns):
            conn.close()

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "refusing to replace a file that is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        rc = probe.connect_ex(path)
    finally:
        probe.close()
    if rc in (errno.ECONNREFUSED, errno.ENOENT):
        log.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        raise OSError(errno.EADDRINUSE, "another server is listening on", path)


async def start_unix_server(
    path: str, handler: Handler, *, mode: int = 0o600, backlog: int = 128
) -> Server:
    """Listen on a unix socket at ``path`` whose file mode (``0o600`` by default) is the access
    control: it is bound under a umask that never grants more than ``mode``, then chmod-ed.
    A stale socket file is replaced; a live one or a non-socket file is left alone (error)."""
    path = os.fspath(path)
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o777 & ~mode)  # process-wide, so held only around bind()
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
        return Server(sock, handler, path=path)
    except BaseException:
        sock.close()
        raise


async def start_tcp_server(host: str, port: int, handler: Handler, *, backlog: int = 128) -> Server:
    """Listen on TCP ``host:port`` (port 0 picks a free one: read ``Server.port``)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
        return Server(sock, handler)
    except BaseException:
        sock.close()
        raise


# -- client ---------------------------------------------------------------------------------


def _remaining(fileobj: Any) -> int:
    """Bytes left to read in a seekable binary file object."""
    if isinstance(fileobj, io.BytesIO):
        return fileobj.getbuffer().nbytes - fileobj.tell()
    try:
        return os.fstat(fileobj.fileno()).st_size - fileobj.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    try:
        here = fileobj.tell()
        end = fileobj.seek(0, io.SEEK_END)
        fileobj.seek(here)
        return int(end - here)
    except (AttributeError, OSError, io.UnsupportedOperation):
        raise ValueError("cannot tell the size of this stream; pass size=") from None


@dataclass
class _Pending:
    fut: asyncio.Future[dict[str, Any]] | None  # None: a heartbeat ping nobody awaits
    scan: bool  # its reply returns a credit


class ApplianceClient:
    """What a shim (or any tool) uses to talk to the appliance.

    Does the handshake, assigns request ids, routes replies (in any order) to the waiting
    callers, holds ``scan`` requests back while no credit is left, pings every ``heartbeat``
    seconds when idle and declares the appliance dead after 3 heartbeats of silence. On
    connection loss every pending request raises :class:`ConnectionClosed` (a
    ``ConnectionError``); ``connect()`` may be called again to reconnect.
    """

    def __init__(self, address: str, *, shim_id: str, secret: str | None = None) -> None:
        self.address = address
        self.shim_id = shim_id
        self.secret = secret
        self.welcome: dict[str, Any] | None = None
        self.credits = 0
        self.heartbeat = DEFAULT_HEARTBEAT
        self.lost: ConnectionClosed | None = None  # why the last connection ended
        self._conn: Connection | None = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._credit_event = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reader: asyncio.Task[Any] | None = None
        self._closing = False
        self._last_recv = 0.0
        self._last_send = 0.0

    @property
    def connected(self) -> bool:
        return self._conn is not None and self.lost is None

    @property
    def peer(self) -> str | None:
        return self._conn.peer if self._conn else None

    # -- lifecycle ------------------------------------------------------------------------

    async def connect(self, timeout: float = 5.0) -> dict[str, Any]:
        """Connect and shake hands; returns the ``welcome`` message.

        Raises :class:`RequestError` if the appliance refuses (``auth``, ``version``...),
        :class:`ProtocolError` on a nonsensical answer, ``OSError``/``TimeoutError`` if the
        appliance cannot be reached.
        """
        if self.connected:
            raise RuntimeError(f"already connected to {self.address}")
        await self._stop_tasks()
        conn = await connect(self.address, timeout=timeout)
        try:
            hello: dict[str, Any] = {"t": "hello", "v": PROTOCOL_VERSION, "shim": self.shim_id}
            if self.secret is not None:
                hello["secret"] = self.secret
            await asyncio.wait_for(conn.send(hello), timeout)
            try:
                msg, fds = await asyncio.wait_for(conn.recv(), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no welcome from {self.address} within {timeout:g} s") from None
            _close_fds(fds)
            if msg["t"] == "error":
                raise RequestError(msg["code"], msg["message"], reply=msg)
            if msg["t"] != "welcome":
                raise ProtocolError("sequence", f"expected welcome, got {msg['t']!r}")
            if msg["v"] != PROTOCOL_VERSION:
                raise ProtocolError(
                    "version", f"appliance speaks protocol {msg['v']}, we speak {PROTOCOL_VERSION}"
                )
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self.lost = None
        self.welcome = msg
        self.credits = msg["credits"]
        self.heartbeat = float(msg["heartbeat"])
        self._pending = {}
        self._last_recv = self._last_send = time.monotonic()
        self._reader = self._spawn(self._read_loop(conn), "reader")
        self._spawn(self._heartbeat_loop(conn), "heartbeat")
        return msg

    async def close(self, timeout: float = 2.0) -> None:
        """Say ``bye``, give outstanding replies up to ``timeout`` seconds to arrive, close."""
        conn = self._conn
        if conn is not None and self.lost is None:
            self._closing = True  # the appliance closing after our bye is no news
            try:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.send({"t": "bye"}), timeout)
                if self._reader is not None and not self._reader.done():
                    # It ends when the appliance closes, after its outstanding replies.
                    await asyncio.wait([self._reader], timeout=timeout)
                self._lose(conn, ConnectionClosed("closed by the client"), quiet=True)
            finally:
                self._closing = False
        await self._stop_tasks()

    async def __aenter__(self) -> Self:
        if not self.connected:
            await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: Awaitable[Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"offscan-client {self.shim_id} {what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _stop_tasks(self) -> None:
        me = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not me]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _lose(self, conn: Connection, exc: ConnectionClosed, *, quiet: bool = False) -> None:
        """The connection is over: close it, fail every pending request, wake credit waiters."""
        if conn is not self._conn or self.lost is not None:
            return
        self.lost = exc
        conn.close()
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.fut is not None and not p.fut.done():
                p.fut.set_exception(ConnectionClosed(str(exc), code=exc.code))
        self._credit_event.set()
        me = asyncio.current_task()
        for t in list(self._tasks):
            if t is not me:
                t.cancel()
        if not quiet:
            log.warning("%s", exc)

    def _require(self) -> Connection:
        if self._conn is None:
            raise ConnectionClosed(f"not connected to {self.address}")
        if self.lost is not None:
            raise ConnectionClosed(str(self.lost), code=self.lost.code)
        return self._conn

    async def _send(self, conn: Connection, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        try:
            await conn.send(msg, fds)
        except ConnectionError as exc:
            lost = ConnectionClosed(f"connection to appliance {conn.peer} lost: {exc}")
            self._lose(conn, lost)
            raise lost from exc
        self._last_send = time.monotonic()

    # -- background tasks -----------------------------------------------------------------

    async def _read_loop(self, conn: Connection) -> None:
        try:
            while True:
                msg, fds = await conn.recv()
                _close_fds(fds)
                self._last_recv = time.monotonic()
                self._dispatch(conn, msg)
        except ConnectionClosed as exc:
            message = str(exc) if exc.code else f"lost the appliance: {exc}"
            self._lose(conn, ConnectionClosed(message, code=exc.code), quiet=self._closing)
        except ProtocolError as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    conn.send({"t": "error", "code": exc.code, "message": str(exc)}), 1.0
                )
            self._lose(
                conn,
                ConnectionClosed(f"appliance {conn.peer} broke the protocol ({exc.code}): {exc}"),
            )

    def _dispatch(self, conn: Connection, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "ping":
            self._spawn(self._pong(conn, msg["id"]), "pong")
        elif t == "credit":
            self.credits += msg["n"]
            self._credit_event.set()
        elif t == "error" and msg.get("id") is None:
            raise ConnectionClosed(
                f"closed by the appliance ({msg['code']}): {msg['message']}", code=msg["code"]
            )
        elif t in ("pong", "verdict", "ok", "status", "error"):
            p = self._pending.pop(msg["id"], None)
            if p is None:
                log.warning(
                    "appliance %s: reply %r for unknown request id %s ignored",
                    conn.peer,
                    t,
                    msg["id"],
                )
                return
            if p.scan:
                self.credits += 1
                self._credit_event.set()
            if p.fut is not None and not p.fut.done():  # done: the caller timed out or gave up
                p.fut.set_result(msg)
        else:
            raise ProtocolError("sequence", f"unexpected {t!r} frame from the appliance")

    async def _pong(self, conn: Connection, rid: int) -> None:
        with contextlib.suppress(ConnectionError):  # the reader reports the loss
            await self._send(conn, {"t": "pong", "id": rid})

    async def _heartbeat_loop(self, conn: Connection) -> None:
        beat = self.heartbeat
        dead_after = DEAD_AFTER_HEARTBEATS * beat
        last_ping = 0.0
        while True:
            await asyncio.sleep(beat / 2)
            now = time.monotonic()
            if now - self._last_recv >= dead_after:
                self._lose(
                    conn,
                    ConnectionClosed(
                        f"appliance {conn.peer} silent for {dead_after:g} s; declaring it dead"
                    ),
                )
                return
            # Ping when we said nothing (the appliance drops connections silent for 3 H) or
            # heard nothing (a long upload must not look like a dead appliance) for H seconds.
            idle = now - self._last_send >= beat or now - self._last_recv >= beat
            if idle and now - last_ping >= beat:
                last_ping = now
                rid = next(self._ids)
                self._pending[rid] = _Pending(None, scan=False)
                try:
                    # A peer that stopped reading must not stall the silence check above.
                    await asyncio.wait_for(self._send(conn, {"t": "ping", "id": rid}), beat)
                except (asyncio.TimeoutError, ConnectionError, ProtocolError):
                    self._pending.pop(rid, None)

    # -- requests -------------------------------------------------------------------------

    async def _take_credit(self) -> None:
        while True:
            self._require()
            if self.credits > 0:
                self.credits -= 1
                return
            self._credit_event.clear()
            await self._credit_event.wait()

    def _return_credit(self) -> None:
        self.credits += 1
        self._credit_event.set()

    async def _begin(
        self, msg: dict[str, Any], fds: Sequence[int] = ()
    ) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        """Send a request; returns its id and the future its reply will complete."""
        conn = self._require()
        msg = dict(msg)
        if msg.get("t") in ("hello", "bye", "chunk", "pong"):
            raise ValueError(f"{msg.get('t')!r} is not a request with a reply")
        scan = msg.get("t") == "scan"
        if scan:
            await self._take_credit()
        conn = self._require()
        rid = next(self._ids)
        msg["id"] = rid
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending(fut, scan)
        try:
            await self._send(conn, msg, fds)
        except BaseException:
            # Not (fully) sent: no reply will come. A half-sent frame already closed the
            # connection, which reset the pending table and the credits.
            if self._pending.pop(rid, None) is not None and scan:
                self._return_credit()
            raise
        return rid, fut

    @staticmethod
    async def _finish(fut: asyncio.Future[dict[str, Any]], timeout: float | None) -> dict[str, Any]:
        if timeout is None:
            reply = await fut
        else:
            try:
                reply = await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no reply within {timeout:g} s") from None
        if reply["t"] == "error":
            raise RequestError(reply["code"], reply["message"], reply=reply)
        return reply

    async def request(
        self, msg: dict[str, Any], fds: Sequence[int] = (), timeout: float | None = None
    ) -> dict[str, Any]:
        """Send a request (an ``"id"`` is assigned) and return its reply.

        Raises :class:`RequestError` for an ``error`` reply, :class:`ConnectionClosed` if the
        connection is lost first, ``TimeoutError`` after ``timeout`` seconds (a late reply is
        then discarded, but still returns its credit).
        """
        _, fut = await self._begin(msg, fds)
        return await self._finish(fut, timeout)

    async def register(
        self,
        vm: str,
        root: str,
        *,
        policy: dict[str, Any] | None = None,
        clone_of: str | None = None,
    ) -> dict[str, Any]:
        msg: dict[str, Any] = {"t": "register", "vm": vm, "root": root}
        if policy is not None:
            msg["policy"] = policy
        if clone_of is not None:
            msg["clone_of"] = clone_of
        return await self.request(msg)

    async def unregister(self, vm: str) -> dict[str, Any]:
        return await self.request({"t": "unregister", "vm": vm})

    async def scan_path(self, vm: str, path: str, *, prio: str = "access") -> dict[str, Any]:
        """Ask for a verdict on ``path`` (relative to the VM root), opened by the appliance."""
        return await self.request(
            {"t": "scan", "vm": vm, "path": path, "mode": "path", "prio": prio}
        )

    async def scan_fd(self, vm: str, path: str, fd: int, *, prio: str = "access") -> dict[str, Any]:
        """Pass an open descriptor for the appliance to read; ``fd`` stays open (ours)."""
        return await self.request(
            {"t": "scan", "vm": vm, "path": path, "mode": "fd", "prio": prio}, fds=[fd]
        )

    async def scan_stream(
        self,
        vm: str,
        path: str,
        content: bytes | bytearray | memoryview | io.IOBase | Any,
        *,
        prio: str = "access",
        size: int | None = None,
    ) -> dict[str, Any]:
        """Send the content itself in ``chunk`` frames of at most :data:`MAX_CHUNK` bytes.

        ``content`` is bytes-like or a binary file object, read from its current position
        (in a worker thread unless it is in memory). ``size`` defaults to the bytes left in it
        and is required for an unseekable file; at most ``size`` bytes are sent. If the
        appliance fails the scan early, the stream is cut short with an empty ``end`` chunk
        and the error is raised.
        """
        if isinstance(content, (bytes, bytearray, memoryview)):
            data = memoryview(content).cast("B")
            if size is not None:
                data = data[:size]
            pieces = (bytes(data[i : i + MAX_CHUNK]) for i in range(0, len(data), MAX_CHUNK))
            size = len(data)

            async def read() -> bytes:
                return next(pieces, b"")

        else:
            fileobj = content
            if size is None:
                size = _remaining(fileobj)
            left = size
            in_memory = isinstance(fileobj, io.BytesIO)

            async def read() -> bytes:
                nonlocal left
                want = min(MAX_CHUNK, left)
                if want <= 0:
                    return b""
                if in_memory:
                    piece = bytes(fileobj.read(want))
                else:
                    piece = bytes(await asyncio.to_thread(fileobj.read, want))
                left -= len(piece)
                return piece

        msg = {"t": "scan", "vm": vm, "path": path, "mode": "stream", "prio": prio, "size": size}

        rid, fut = await self._begin(msg)
        conn = self._require()
        try:
            piece = await read()
            while not fut.done():
                following = await read() if piece else b""
                end = not following
                await self._send(conn, {"t": "chunk", "id": rid, "data": piece, "end": end})
                if end:
                    break
                piece = following
            else:
                if not fut.cancelled() and fut.exception() is None:
                    # Answered before the end (an error): tell the appliance the stream is over.
                    await self._send(conn, {"t": "chunk", "id": rid, "data": b"", "end": True})
        except BaseException:
            if fut.done():
                if not fut.cancelled():
                    fut.exception()  # the caller gets the exception being raised instead
            else:
                fut.cancel()  # abandoned; a late reply still returns its credit
                if self.lost is None:  # end the stream so the appliance can let go
                    with contextlib.suppress(Exception):
                        await self._send(conn, {"t": "chunk", "id": rid, "data": b"", "end": True})
            raise
        return await self._finish(fut, None)

    async def status(self) -> dict[str, Any]:
        """The appliance's ``status`` reply (counters, VMs, pattern version...)."""
        return await self.request({"t": "status"})

    async def control(self, op: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """An operator command (``vm-clone``, ``vm-list``, ``policy-set``, ``quarantine-list``...)."""
        return await self.request({"t": "control", "op": op, "args": args}, timeout=timeout)

    async def ping(self) -> float:
        """Round trip time to the appliance, in seconds."""
        t0 = time.perf_counter()
        await self.request({"t": "ping"})
        return time.perf_counter() - t0
