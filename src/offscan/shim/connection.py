"""The shim's link to the appliance: connect, register every VM, reconnect with backoff.

:class:`Connection` owns the one appliance client of a shim and the state that goes with it
(online or not, which VMs are registered on this connection, the effective policies the
appliance sent back). It touches nothing but the network (through the client) and the
:class:`~offscan.shim.backlog.Backlog`'s replay marks; :class:`ShimClient` says what it and the
senders need from a client, so embedders and tests may substitute their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from .backlog import Backlog, Prio
from .walk import inherited_listing
from .watch import _VM

if TYPE_CHECKING:
    from ..protocol.messages import Verdict, Welcome

log = logging.getLogger("offscan.shim")

DEFAULT_RECONNECT_MAX_DELAY = 2.0  # seconds, cap of the exponential reconnect backoff
RECONNECT_MIN_DELAY = 0.05  # seconds, first reconnect backoff step
CONNECT_TIMEOUT = 5.0  # seconds for connect + handshake


class ShimClient(Protocol):
    """What the shim uses of :class:`offscan.protocol.ApplianceClient`.

    A client may also have a ``connected`` property; without one it counts as connected until
    a request raises ``ConnectionError``. Replies are typed as the protocol's messages where it
    has a TypedDict for them; ``register``/``unregister`` answer ``ok`` plus keys of their own
    (a plain dict).
    """

    async def connect(self, timeout: float = ...) -> Welcome: ...

    async def close(self, timeout: float = ...) -> None: ...

    async def register(
        self,
        vm: str,
        root: str,
        *,
        policy: dict[str, Any] | None = ...,
        clone_of: str | None = ...,
    ) -> dict[str, Any]: ...

    async def unregister(self, vm: str) -> dict[str, Any]: ...

    async def scan_path(self, vm: str, path: str, *, prio: Prio = ...) -> Verdict: ...

    async def scan_fd(self, vm: str, path: str, fd: int, *, prio: Prio = ...) -> Verdict: ...

    async def scan_stream(
        self, vm: str, path: str, content: BinaryIO, *, prio: Prio = ...
    ) -> Verdict: ...


ClientFactory = Callable[..., ShimClient]  # called as factory(address, shim_id=..., secret=...)


class Connection:
    """One shim's connection to the appliance, kept up by :meth:`run` until cancelled.

    ``vms`` is the shim's own (live) map of protected VMs: every connection registers all of
    them, bases before their clones. ``on_online`` is called whenever a connection is ready
    (every VM registered), so senders replay what is queued.
    """

    def __init__(
        self,
        address: str,
        *,
        shim_id: str,
        secret: str | None,
        backlog: Backlog,
        vms: Mapping[str, _VM],
        on_online: Callable[[], None],
        reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY,
        client_factory: ClientFactory | None = None,
    ) -> None:
        self.address = address
        self.shim_id = shim_id
        self.secret = secret
        self.reconnect_max_delay = max(reconnect_max_delay, RECONNECT_MIN_DELAY)
        self._backlog = backlog
        self._vms = vms
        self._on_online = on_online
        self._client_factory = client_factory
        self.client: ShimClient | None = None
        self.registered: set[str] = set()  # VMs registered on the current connection
        self.online = False  # connected and every VM registered: senders may send
        self.online_evt = asyncio.Event()
        self.policies: dict[str, dict[str, Any]] = {}  # effective policy from the appliance
        self.reconnects = 0
        self.closing = False  # the shim is shutting down: a lost connection is expected
        self._lost = asyncio.Event()

    def lost(self, client: ShimClient, exc: BaseException | None = None) -> None:
        """A request on ``client`` found the connection dead: go offline and reconnect."""
        if client is self.client and self.online:
            log.warning("connection to appliance lost%s", f" ({exc})" if exc else "")
            self.online = False
            self.online_evt.clear()
            self._lost.set()

    def new_client(self) -> ShimClient:
        if self._client_factory is not None:
            return self._client_factory(self.address, shim_id=self.shim_id, secret=self.secret)
        from ..protocol import ApplianceClient

        return ApplianceClient(self.address, shim_id=self.shim_id, secret=self.secret)

    async def register(self, client: ShimClient, vm: _VM) -> None:
        spec = vm.spec
        try:
            reply = await client.register(
                spec.name, vm.root, policy=spec.policy, clone_of=spec.clone_of
            )
            if isinstance(reply, dict) and isinstance(reply.get("policy"), dict):
                self.policies[spec.name] = reply["policy"]
            vm.inherited = inherited_listing(reply)  # a clone's files verdicted at once
        except ConnectionError:
            raise
        except Exception as exc:  # one refused VM must not stop the others
            log.error("VM %s: appliance refused registration: %s", spec.name, exc)
            return
        self.registered.add(spec.name)

    async def register_live(self, vm: _VM, *, again: bool) -> None:
        """Register ``vm`` on the current connection, if there is one; ``again=False`` leaves
        a VM already registered on it alone. A connection lost meanwhile is not an error (the
        next connection registers every VM)."""
        client = self.client
        if self.online and client is not None and (again or vm.name not in self.registered):
            with contextlib.suppress(ConnectionError):
                await self.register(client, vm)

    async def unregister(self, name: str) -> None:
        """Forget ``name`` on this connection and tell the appliance, if it was registered."""
        client = self.client
        registered = name in self.registered
        self.registered.discard(name)
        if self.online and client is not None and registered:
            try:
                await client.unregister(name)
            except Exception as exc:  # the appliance may already have forgotten it
                log.warning("VM %s: unregister failed: %s", name, exc)

    async def _register_all(self, client: ShimClient) -> None:
        """Register every VM on a fresh connection, bases before their clones; VMs added while
        this runs are picked up too."""
        attempted: set[str] = set()
        while True:
            todo = [vm for name, vm in self._vms.items() if name not in attempted]
            if not todo:
                return
            todo.sort(key=lambda vm: vm.spec.clone_of is not None)
            for vm in todo:
                attempted.add(vm.name)
                if self._vms.get(vm.name) is vm:
                    await self.register(client, vm)

    async def run(self) -> None:
        """Connect, register, stay online until the connection is lost; again, forever (until
        cancelled), backing off exponentially while the appliance is unavailable."""
        delay = RECONNECT_MIN_DELAY
        ever_connected = False
        last_error = ""
        while True:
            client = self.new_client()
            try:
                await client.connect(timeout=CONNECT_TIMEOUT)
                self.registered = set()
                await self._register_all(client)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await client.close()
                raise
            except Exception as exc:  # whatever failed, back off and retry
                with contextlib.suppress(Exception):
                    await client.close()
                message = f"{type(exc).__name__}: {exc}"
                if message != last_error:
                    log.warning(
                        "appliance %s unavailable (%s); retrying (backlog %d)",
                        self.address,
                        message,
                        len(self._backlog),
                    )
                    last_error = message
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max_delay)
                continue
            delay = RECONNECT_MIN_DELAY
            last_error = ""
            if ever_connected:
                self.reconnects += 1
                log.warning(
                    "reconnected to appliance %s; replaying %d undelivered path(s)",
                    self.address,
                    len(self._backlog),
                )
            else:
                log.info("connected to appliance %s", self.address)
            ever_connected = True
            await self._stay_online(client)

    async def _stay_online(self, client: ShimClient) -> None:
        """Serve on ``client`` until it is lost; then go offline and mark everything queued
        as a replay."""
        self.client = client
        self._lost.clear()
        self.online = True
        self.online_evt.set()
        self._on_online()  # replay whatever is ready
        try:
            while self.online and getattr(client, "connected", True):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), 0.2)
        finally:
            if self.online and not self.closing:
                log.warning("connection to appliance %s lost", self.address)
            self.online = False
            self.online_evt.clear()
            self.client = None
            self.registered = set()
            self._backlog.mark_replay()
            with contextlib.suppress(Exception):
                await client.close()
