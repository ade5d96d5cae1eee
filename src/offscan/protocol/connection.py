"""One framed connection: :class:`Connection` over a connected socket, and :func:`connect`.

Reads frames (with the ``SCM_RIGHTS`` descriptors that rode along on a unix socket, matched
to their frame by stream offset: the "fd batches"), validates them, and writes frames one at
a time. Touches only the socket it is given (and the descriptors received on it); the codec
is :mod:`.framing`, the address syntax :mod:`.address`.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import socket
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .address import parse_address
from .errors import ConnectionClosed, ProtocolError
from .framing import HEADER, pack, unpack
from .messages import MAX_FDS_PER_FRAME, MAX_FRAME
from .validation import validate

__all__ = ["MAX_PENDING_FD_BATCHES", "RECV_SIZE", "Connection", "connect"]

RECV_SIZE = 256 << 10  # bytes asked of the kernel per recvmsg
MAX_PENDING_FD_BATCHES = 4  # fd batches received but not yet claimed by a frame


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

    def next_buffered(self) -> tuple[dict[str, Any], list[int]] | None:
        """The next frame if it is already buffered whole (as :meth:`recv` would return it),
        else None: never reads the socket, never waits. Lets a reader take the frames one
        read delivered together (several ``scan`` frames: one pass for all). None too while
        another :meth:`recv` is waiting, or once the connection failed or closed."""
        if self._recv_lock.locked() or self._error is not None or self._closed:
            return None
        try:
            return self._next_frame()
        except ProtocolError as exc:
            self._error = exc
            raise

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
        anc = self._rights(fds)
        if fds:
            msg["fds"] = len(fds)
        validate(msg)
        await self._write_frame(pack(msg, max_frame=self.max_frame), anc)

    async def send_encoded(self, payload: bytes, fds: Sequence[int] = ()) -> None:
        """Send one frame whose msgpack ``payload`` the caller built itself (the appliance's
        batched replies, assembled from pre-encoded parts; the client's ``scan-batch``,
        packed in one call from checked items): framed, not validated, ``fds`` attached
        (the payload must say ``"fds": len(fds)``). The caller vouches for it being a valid
        message."""
        if len(payload) > self.max_frame:
            raise ProtocolError("oversized", f"frame of {len(payload)} bytes exceeds limit")
        await self._write_frame(HEADER.pack(len(payload)) + payload, self._rights(fds))

    def _rights(self, fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
        """The ``SCM_RIGHTS`` ancillary data carrying ``fds`` (none: no ancillary data)."""
        if not fds:
            return []
        if not self.is_unix:
            raise ProtocolError("unsupported", "descriptors can only be passed over a unix socket")
        return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]

    async def send_encoded_many(self, payloads: list[bytes]) -> None:
        """:meth:`send_encoded` for several frames, written together (one ``send`` when the
        socket takes them all), in order."""
        limit = self.max_frame
        parts: list[bytes] = []
        for payload in payloads:
            if len(payload) > limit:
                raise ProtocolError("oversized", f"frame of {len(payload)} bytes exceeds limit")
            parts.append(HEADER.pack(len(payload)))
            parts.append(payload)
        if parts:
            await self._write_frame(b"".join(parts), [])

    async def _write_frame(self, data: bytes, anc: list[tuple[int, int, bytes]]) -> None:
        """Write one whole frame (descriptors on its first byte), frames one at a time."""
        if not self._send_lock.locked() and not anc and not self._closed:
            try:  # the common case: the socket takes the whole frame at once
                n = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self.close()
                raise ConnectionClosed(f"connection to {self.peer} lost: {exc}") from exc
            if n == len(data):
                return
            if n:  # a partial frame is on the wire: the rest must follow before any other
                data = data[n:]
                async with self._send_lock:
                    await self._write_locked(data, anc, sent_any=True)
                return
        async with self._send_lock:
            await self._write_locked(data, anc, sent_any=False)

    async def _write_locked(
        self, data: bytes, anc: list[tuple[int, int, bytes]], *, sent_any: bool
    ) -> None:
        view = memoryview(data)
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
    _, target = parse_address(address)
    opening = _open_tcp(*target) if isinstance(target, tuple) else _open_unix(target)
    try:
        sock = await asyncio.wait_for(opening, timeout)
    except TimeoutError:
        raise TimeoutError(f"connecting to {address} timed out after {timeout:g} s") from None
    return Connection(sock, max_frame=max_frame)


async def _open_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


async def _open_tcp(host: str, port: int) -> socket.socket:
    """The first of ``host``'s addresses that accepts a connection."""
    loop = asyncio.get_running_loop()
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
