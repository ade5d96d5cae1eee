"""One clamd client connection at the byte level: commands, stream chunks, passed descriptors.

clamd's protocol is not framed: a command ends at a NUL (``z`` prefix) or a newline (``n``
prefix, or no prefix), INSTREAM data follows as 4-byte big-endian lengths, and FILDES
descriptors ride as ``SCM_RIGHTS`` on any packet. :class:`ClamdSocket` reads with ``recvmsg``
(so descriptors are never lost), bounds what it buffers and how long it waits, and writes
replies. It touches only its socket and the descriptors received on it (closed unless taken).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import struct
from collections import deque

__all__ = ["ClientGone", "ClamdSocket", "CommandTooLong", "peer_uid"]

RECV_SIZE = 64 << 10  # bytes asked of the kernel per recvmsg
# Unprefixed commands clamd also takes when they arrive alone, without their newline
# (argument-less, so what arrived cannot be the start of a longer command).
BARE_WORDS = frozenset({b"PING", b"VERSION", b"RELOAD", b"SHUTDOWN", b"STATS", b"QUIT"})
MAX_FDS = 4  # descriptors kept from a client before it names them with FILDES


class ClientGone(ConnectionError):
    """The client closed, reset or stalled past its timeout; nothing more can be said to it."""


class CommandTooLong(ValueError):
    """A command line longer than the configured maximum."""


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of a unix socket's peer (SO_PEERCRED), None on TCP or when unknown."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return int(struct.unpack("3i", raw)[1])


class ClamdSocket:
    """Non-blocking reads and writes on one accepted clamd connection (asyncio)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        self.is_unix = sock.family == socket.AF_UNIX
        self.uid = peer_uid(sock)
        self._anc = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize) if self.is_unix else 0
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        self.eof = False
        self.closed = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    async def _wait(self, timeout: float, *, write: bool = False) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        (loop.add_writer if write else loop.add_reader)(self._fd, wake)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ClientGone("timed out waiting for the client") from None
        finally:
            if not self.closed:
                (loop.remove_writer if write else loop.remove_reader)(self._fd)

    async def _fill(self, timeout: float) -> None:
        """Receive once (waiting up to ``timeout`` seconds); sets ``eof`` when the peer closed."""
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(RECV_SIZE, self._anc)
                break
            except (BlockingIOError, InterruptedError):
                await self._wait(timeout)
            except OSError as exc:
                raise ClientGone(str(exc)) from exc
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                self._fds.extend(got)
        while len(self._fds) > MAX_FDS:  # never hold more than a few unclaimed descriptors
            with contextlib.suppress(OSError):
                os.close(self._fds.popleft())
        if not data:
            self.eof = True
        self._buf += data

    async def read_command(self, max_len: int, timeout: float) -> tuple[str, bytes] | None:
        """The next command as (prefix, text without its delimiter); prefix is ``"z"``,
        ``"n"`` or ``""``. None when the client closed between commands. A plain (unprefixed)
        command may also end at the end of the connection, or be a bare argument-less word
        that arrived alone (``PING``), as clamd allows."""
        while True:
            if self._buf:
                prefix = chr(self._buf[0]) if self._buf[0] in b"zn" else ""
                delim = b"\0" if prefix == "z" else b"\n"
                end = self._buf.find(delim)
                if end >= 0:
                    raw = bytes(self._buf[len(prefix) : end])
                    del self._buf[: end + 1]
                    return prefix, raw
                if len(self._buf) > max_len:
                    raise CommandTooLong(f"command longer than {max_len} bytes")
                if not prefix and bytes(self._buf).rstrip(b"\r") in BARE_WORDS:
                    raw = bytes(self._buf).rstrip(b"\r")
                    self._buf.clear()
                    return prefix, raw
                if self.eof:
                    if prefix:
                        raise ClientGone("connection closed in the middle of a command")
                    raw = bytes(self._buf)
                    self._buf.clear()
                    return prefix, raw.rstrip(b"\r")
            elif self.eof:
                return None
            await self._fill(timeout)

    async def read_exact(self, n: int, timeout: float) -> bytes:
        while len(self._buf) < n:
            if self.eof:
                raise ClientGone("connection closed in the middle of a stream")
            await self._fill(timeout)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_some(self, n: int, timeout: float) -> bytes:
        """Between 1 and ``n`` bytes (what is buffered, else one receive)."""
        if not self._buf:
            if self.eof:
                raise ClientGone("connection closed in the middle of a stream")
            await self._fill(timeout)
            if not self._buf:
                raise ClientGone("connection closed in the middle of a stream")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def take_fd(self, timeout: float) -> int | None:
        """FILDES: consume the dummy byte that carries the descriptor and return the oldest
        descriptor received (the caller owns it), or None if none came with it."""
        if not self._buf and not self.eof:
            await self._fill(timeout)
        if self._buf:
            del self._buf[:1]
        return self._fds.popleft() if self._fds else None

    async def send(self, data: bytes, timeout: float) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                await self._wait(timeout, write=True)
                continue
            except OSError as exc:
                raise ClientGone(str(exc)) from exc
            view = view[n:]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            loop.remove_reader(self._fd)
        with contextlib.suppress(Exception):
            loop.remove_writer(self._fd)
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.popleft())
        with contextlib.suppress(OSError):
            self.sock.close()
