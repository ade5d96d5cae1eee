"""Listening sockets: :class:`Server`, :func:`start_unix_server`, :func:`start_tcp_server`.

A server accepts connections and runs a handler in a task per :class:`~.connection.Connection`.
It touches its listening socket, the connections it accepted and, for a unix listener, the
socket file (created under a restrictive umask, replaced only when stale, removed on close).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .connection import Connection
from .errors import ProtocolError

if TYPE_CHECKING:
    from typing import Self

__all__ = ["Handler", "Server", "start_tcp_server", "start_unix_server"]

log = logging.getLogger("offscan.protocol")

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
