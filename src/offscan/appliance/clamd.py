"""The clamd-compatible front: clamd's socket protocol on the appliance's engine, cache and
policy, so ``clamdscan``, clamonacc and every clamd client library work unchanged.

:class:`ClamdFront` listens on a unix socket (and optionally TCP), accepts at most
``max_connections`` clients at once (further ones wait in the kernel's backlog, as clamd's
connection queue), and runs one :class:`Client` per connection: one command, or an
``IDSESSION`` of several, each dispatched through the table in :mod:`.clamd_commands`. Every
wait is bounded (first command, next command, stream data, reply write) and so is every
buffer (command length, stream length, passed descriptors). Files are read only inside the
configured scan roots (:mod:`.clamd_paths`), by descriptors passed by the client (FILDES), or
as INSTREAM data matched as it arrives (:mod:`.clamd_stream`). Touches the sockets it creates,
its socket file, and, through the pipeline, what every scan touches.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..protocol.server import _remove_stale_socket
from .clamd_io import ClamdSocket, ClientGone, CommandTooLong
from .clamd_stream import StreamPlan
from .common import log
from .inventory import VMRecord

if TYPE_CHECKING:
    from ..engine import Matcher
    from .config import ApplianceConfig
    from .facade import Appliance

__all__ = ["ClamdFront", "ClamdOptions", "Client", "DEFAULT_STREAM_MAX_LENGTH"]

DEFAULT_STREAM_MAX_LENGTH = 100 << 20  # bytes, clamd's StreamMaxLength default (100M)
DEFAULT_MAX_CONNECTIONS = 32  # clients served at once; more wait in the listen backlog
DEFAULT_MAX_COMMAND_LENGTH = 8192  # bytes: PATH_MAX plus the command word, with room
DEFAULT_COMMAND_TIMEOUT = 30.0  # seconds for the first command (clamd's CommandReadTimeout)
DEFAULT_READ_TIMEOUT = 120.0  # seconds for stream data (clamd's ReadTimeout)
DEFAULT_IDLE_TIMEOUT = 30.0  # seconds between commands of an IDSESSION (clamd's IdleTimeout)
DEFAULT_SEND_TIMEOUT = 30.0  # seconds a client may leave a reply unread
DEFAULT_MAX_RECURSION = 15  # directory depth of SCAN (clamd's MaxDirectoryRecursion)
CLAMD_VM = "clamd"  # the name clamd-front verdicts carry in the event log and policy file


@dataclass(frozen=True)
class ClamdOptions:
    """How the clamd front listens and what bounds it keeps (``serve --clamd-*``)."""

    socket_path: str | None = None
    listen: tuple[str, int] | None = None
    roots: Sequence[str] = ()
    socket_mode: int = 0o660
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    stream_max_length: int = DEFAULT_STREAM_MAX_LENGTH
    max_command_length: int = DEFAULT_MAX_COMMAND_LENGTH
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    max_recursion: int = DEFAULT_MAX_RECURSION

    @classmethod
    def from_config(cls, cfg: ApplianceConfig) -> ClamdOptions:
        """The front's options from the appliance's ``clamd_*`` fields (defaults for unset)."""
        stream_max = cfg.clamd_stream_max_length
        conns = cfg.clamd_max_connections
        return cls(
            socket_path=cfg.clamd_socket,
            listen=cfg.clamd_listen,
            roots=cfg.clamd_roots,
            socket_mode=cfg.clamd_socket_mode,
            stream_max_length=DEFAULT_STREAM_MAX_LENGTH if stream_max is None else stream_max,
            max_connections=DEFAULT_MAX_CONNECTIONS if conns is None else conns,
        )

    def __post_init__(self) -> None:
        roots = tuple(os.path.realpath(r) for r in self.roots)
        object.__setattr__(self, "roots", roots)
        if not self.socket_path and not self.listen:
            raise ValueError("the clamd front needs --clamd-socket PATH and/or --clamd-listen")
        if self.max_connections < 1 or self.stream_max_length < 0:
            raise ValueError("clamd limits must be positive")


@dataclass
class ClamdStats:
    """What STATS reports about the front itself."""

    connections: int = 0
    commands: int = 0
    streams: int = 0
    stream_bytes: int = 0
    fildes: int = 0
    refused: int = 0
    errors: int = 0
    active: set[Client] = field(default_factory=set)


class Client:
    """One clamd connection: its socket, the reply delimiter and IDSESSION request number."""

    def __init__(self, front: ClamdFront, sock: ClamdSocket) -> None:
        self.front = front
        self.sock = sock
        self.delim = b"\n"
        self.request: int | None = None  # the IDSESSION request number being answered
        self.current = ""  # the command being served (STATS lists them)
        self.closing = False  # set by a handler: close the connection after its reply

    @property
    def operator(self) -> bool:
        """A peer allowed RELOAD and SHUTDOWN: on the unix socket, with the appliance's uid
        (or root's), as SO_PEERCRED tells; never a TCP client."""
        uid = self.sock.uid
        return uid is not None and uid in (0, os.getuid())

    async def reply(self, text: str) -> None:
        """Send one reply line, ``N: `` prefixed inside an IDSESSION, ending as the command."""
        line = f"{self.request}: {text}" if self.request is not None else text
        await self.sock.send(os.fsencode(line) + self.delim, self.front.options.send_timeout)

    async def run(self) -> None:
        from .clamd_commands import dispatch

        opts = self.front.options
        timeout = opts.command_timeout
        while True:
            try:
                cmd = await self.sock.read_command(opts.max_command_length, timeout)
            except CommandTooLong as exc:
                self.delim = b"\n"
                await self.reply(f"{exc}. ERROR")
                return
            if cmd is None:
                return
            self.front.stats.commands += 1
            keep = await dispatch(self, *cmd)
            if not keep or self.closing:
                return
            timeout = opts.idle_timeout


class ClamdFront:
    """clamd's listeners for one appliance. ``start()`` listens; ``stop()`` closes everything."""

    def __init__(self, appliance: Appliance, options: ClamdOptions) -> None:
        self.appliance = appliance
        self.options = options
        self.stats = ClamdStats()
        self.stream_pool = ThreadPoolExecutor(
            max_workers=options.max_connections, thread_name_prefix="offscan-clamd"
        )
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused = False
        self._plan: StreamPlan | None = None
        self._inode: int | None = None
        self._vms: dict[str | None, VMRecord] = {}  # scan root (None: fd/stream) -> pseudo-VM
        self.tcp_port: int | None = None

    # -- the appliance's parts, as clamd requests use them --------------------------------

    def stream_plan(self) -> StreamPlan:
        """The current engine's plan for streams of unknown length (rebuilt after a swap)."""
        matcher: Matcher = self.appliance.matcher
        plan = self._plan
        if plan is None or plan.matcher is not matcher:
            plan = self._plan = StreamPlan.build(matcher)
        return plan

    def vm_for(self, root: str | None) -> VMRecord:
        """The pseudo-VM a clamd verdict is recorded under: named ``clamd`` (so the policy
        file's ``[vm.clamd]`` table applies), rooted at the scan root. Descriptors and streams
        have no root: quarantine is left out of their actions (there is no file to move)."""
        rec = self._vms.get(root)
        if rec is None:  # kept, so its tags accumulate and the hook runs on a change only
            rec = self._vms[root] = VMRecord(CLAMD_VM, root or "", None)
            if root is None:
                acts = self.appliance.registry.effective_policy(rec)["actions"]
                rec.policy = {"actions": [a for a in acts if a != "quarantine"] or ["deny"]}
        return rec

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        opts = self.options
        if opts.socket_path:
            self._listeners.append(_listen_unix(opts.socket_path, opts.socket_mode))
            self._inode = os.stat(opts.socket_path).st_ino
        if opts.listen:
            sock = await _listen_tcp(*opts.listen)
            self.tcp_port = sock.getsockname()[1]
            self._listeners.append(sock)
        loop = asyncio.get_running_loop()
        for ls in self._listeners:
            loop.add_reader(ls.fileno(), self._on_accept, ls)
        where = [opts.socket_path, opts.listen and f"tcp {opts.listen[0]}:{self.tcp_port}"]
        log.info(
            "clamd front on %s; scan roots: %s",
            ", ".join(filter(None, where)),
            ", ".join(opts.roots) or "none (SCAN refused)",
        )

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for ls in self._listeners:
            with contextlib.suppress(Exception):
                loop.remove_reader(ls.fileno())
            ls.close()
        self._listeners.clear()
        path = self.options.socket_path
        if path and self._inode is not None:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == self._inode:  # ours, not a successor's
                    os.unlink(path)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.stream_pool.shutdown(wait=False, cancel_futures=True)

    def _on_accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(64):
            if len(self._tasks) >= self.options.max_connections:
                self._pause()
                return
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("clamd accept failed: %s; pausing for 0.1 s", exc)
                self._pause()
                loop.call_later(0.1, self._resume)
                return
            self.stats.connections += 1
            task = loop.create_task(self._serve(conn), name="offscan-clamd")
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            loop = asyncio.get_running_loop()
            for ls in self._listeners:
                loop.remove_reader(ls.fileno())

    def _resume(self) -> None:
        if self._paused and self._listeners:
            self._paused = False
            loop = asyncio.get_running_loop()
            for ls in self._listeners:
                loop.add_reader(ls.fileno(), self._on_accept, ls)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if len(self._tasks) < self.options.max_connections:
            self._resume()

    async def _serve(self, conn: socket.socket) -> None:
        sock = ClamdSocket(conn)
        client = Client(self, sock)
        self.stats.active.add(client)
        try:
            await client.run()
        except ClientGone as exc:
            log.debug("clamd client: %s", exc)
        except Exception:  # a bug must cost one connection, never the appliance
            self.stats.errors += 1
            log.exception("clamd connection failed")
        finally:
            self.stats.active.discard(client)
            sock.close()


def _listen_unix(path: str, mode: int) -> socket.socket:
    """A listening unix socket at ``path`` bound under a umask that never grants more than
    ``mode`` (a stale socket file is replaced, anything else is left alone)."""
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from None
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _listen_tcp(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
