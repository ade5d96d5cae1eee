"""The shim's link to the appliance: connect, register every VM, reconnect with backoff, and
fail over along an ordered list of appliances.

:class:`Connection` owns the one appliance client of a shim and the state that goes with it
(online or not, which appliance it uses, which VMs are registered on this connection, the
effective policies the appliance sent back). With several appliances (``offscan shim
--appliance A --appliance B``) it uses the first that answers, in priority order; it pings the
one it uses every ``failover_after / 3`` seconds and fails over when it is lost or silent for
``failover_after`` seconds; while it uses a lower-priority one it probes the better ones and
fails back when one answers. Whatever was not answered is replayed to the next appliance. It touches nothing but the network (through the client) and the
:class:`~offscan.shim.backlog.Backlog`'s replay marks; :class:`ShimClient` says what it and the
senders need from a client, so embedders and tests may substitute their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
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
DEFAULT_FAILOVER_AFTER = 1.5  # seconds of silence from the appliance in use before failing over
FAILBACK_INTERVAL = 1.0  # seconds between probes of the better appliances while on a worse one


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
        address: str | Sequence[str],
        *,
        shim_id: str,
        secret: str | None,
        backlog: Backlog,
        vms: Mapping[str, _VM],
        on_online: Callable[[], None],
        reconnect_max_delay: float = DEFAULT_RECONNECT_MAX_DELAY,
        client_factory: ClientFactory | None = None,
        failover_after: float = DEFAULT_FAILOVER_AFTER,
    ) -> None:
        self.addresses: tuple[str, ...] = (address,) if isinstance(address, str) else tuple(address)
        if not self.addresses:
            raise ValueError("a shim needs at least one appliance address")
        if len(set(self.addresses)) != len(self.addresses):
            raise ValueError("an appliance address is given twice")
        self.address = self.addresses[0]  # the appliance in use (or tried last)
        self.failover_after = failover_after
        self.failovers = 0  # switches to a lower-priority appliance
        self.failbacks = 0  # switches back to a higher-priority one
        self._in_use: int | None = None  # index in addresses of the connected appliance
        self._probe_registered: set[str] = set()
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
        self.on_adopt: Callable[[str, str, str], None] | None = None  # set by the Shim
        self._lost = asyncio.Event()

    def lost(self, client: ShimClient, exc: BaseException | None = None) -> None:
        """A request on ``client`` found the connection dead: go offline and reconnect."""
        if client is self.client and self.online:
            log.warning("connection to appliance lost%s", f" ({exc})" if exc else "")
            self.online = False
            self.online_evt.clear()
            self._lost.set()

    def new_client(self, address: str | None = None) -> ShimClient:
        address = address or self.address
        if self._client_factory is not None:
            return self._client_factory(address, shim_id=self.shim_id, secret=self.secret)
        from ..protocol import ApplianceClient

        client = ApplianceClient(address, shim_id=self.shim_id, secret=self.secret)
        client.on_adopt = self.on_adopt  # clones the operator makes of our VMs
        client.policies = self.policies  # shared: the appliance pushes policy changes into it
        return client

    @property
    def in_use(self) -> str | None:
        """The appliance the shim is connected to (None while offline)."""
        return self.addresses[self._in_use] if self._in_use is not None and self.online else None

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

    async def _open(self, address: str) -> ShimClient:
        """A client connected to ``address`` with every VM registered (or an exception)."""
        client = self.new_client(address)
        timeout = CONNECT_TIMEOUT if len(self.addresses) == 1 else self.failover_after
        try:
            await client.connect(timeout=timeout)
            self.registered = set()
            await self._register_all(client)
        except BaseException:
            with contextlib.suppress(Exception):
                await client.close()
            raise
        return client

    async def _first_healthy(
        self, candidates: Sequence[int], errors: dict[str, str]
    ) -> tuple[int, ShimClient] | None:
        """The first of ``candidates`` (indexes, in priority order) that connects; a failure
        is logged once per appliance and message."""
        for i in candidates:
            address = self.addresses[i]
            try:
                return i, await self._open(address)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever failed, try the next one
                message = f"{type(exc).__name__}: {exc}"
                if errors.get(address) != message:
                    log.warning(
                        "appliance %s unavailable (%s); %s (backlog %d)",
                        address,
                        message,
                        "trying the next" if i + 1 < len(self.addresses) else "retrying",
                        len(self._backlog),
                    )
                    errors[address] = message
        return None

    async def run(self) -> None:
        """Connect to the first healthy appliance, register, stay online until it is lost (or
        a better one answers); again, forever (until cancelled), backing off exponentially
        while no appliance is available."""
        delay = RECONNECT_MIN_DELAY
        ever_connected = False
        errors: dict[str, str] = {}
        previous: int | None = None
        ready: tuple[int, ShimClient] | None = None
        while True:
            order = list(range(len(self.addresses)))
            if previous is not None and len(order) > 1:  # the one just lost goes last
                order.remove(previous)
                order.append(previous)
            got = ready or await self._first_healthy(order, errors)
            ready = None
            if got is None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max_delay)
                continue
            index, client = got
            errors.pop(self.addresses[index], None)
            delay = RECONNECT_MIN_DELAY
            self.address = self.addresses[index]
            self._log_connected(index, previous, ever_connected)
            ever_connected = True
            previous = index
            ready = await self._stay_online(client, index)

    def _log_connected(self, index: int, previous: int | None, ever_connected: bool) -> None:
        if ever_connected:
            self.reconnects += 1
            if previous is not None and index > previous:
                self.failovers += 1
            elif previous is not None and index < previous:
                self.failbacks += 1
            log.warning(
                "%s appliance %s (priority %d of %d); replaying %d undelivered path(s)",
                "reconnected to" if index == previous else "now using",
                self.address,
                index + 1,
                len(self.addresses),
                len(self._backlog),
            )
        else:
            log.info(
                "connected to appliance %s (priority %d of %d)",
                self.address,
                index + 1,
                len(self.addresses),
            )

    async def _stay_online(self, client: ShimClient, index: int) -> tuple[int, ShimClient] | None:
        """Serve on ``client`` until it is lost, or until a better appliance answers (then
        that one's ready client is returned); then go offline and mark everything queued as
        a replay."""
        self.client = client
        self._in_use = index
        self._lost.clear()
        self.online = True
        self.online_evt.set()
        self._on_online()  # replay whatever is ready
        watchers: list[asyncio.Task[Any]] = []
        better: asyncio.Task[tuple[int, ShimClient] | None] | None = None
        if len(self.addresses) > 1:
            watchers.append(asyncio.create_task(self._watch_liveness(client)))
            if index > 0:
                better = asyncio.create_task(self._probe_better(index))
                watchers.append(better)
        try:
            while self.online and getattr(client, "connected", True):
                if better is not None and better.done():
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), 0.2)
        finally:
            if self.online and not self.closing and not (better is not None and better.done()):
                log.warning("connection to appliance %s lost", self.address)
            self.online = False
            self.online_evt.clear()
            self.client = None
            self._in_use = None
            self.registered = set()
            self._backlog.mark_replay()
            for t in watchers:
                if t is not better or not t.done():
                    t.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await client.close()
        if better is not None and better.done() and not better.cancelled():
            found = better.result()
            if found is not None:
                self.registered = self._probe_registered  # the VMs the probe registered
            return found
        return None

    async def _watch_liveness(self, client: ShimClient) -> None:
        """Ping the appliance in use; silence for ``failover_after`` seconds counts as lost."""
        ping = getattr(client, "ping", None)
        if ping is None:
            return
        while True:
            await asyncio.sleep(self.failover_after / 3)
            try:
                await asyncio.wait_for(ping(), self.failover_after)
            except (TimeoutError, ConnectionError) as exc:
                self.lost(client, exc if str(exc) else TimeoutError("no answer to ping"))
                return
            except Exception:  # an odd reply is not silence
                continue

    async def _probe_better(self, index: int) -> tuple[int, ShimClient] | None:
        """While on ``addresses[index]``: try the better appliances every
        :data:`FAILBACK_INTERVAL` seconds; the first that connects (VMs registered) is it."""
        while True:
            await asyncio.sleep(FAILBACK_INTERVAL)
            for i in range(index):
                try:
                    return i, await self._open_quiet(self.addresses[i])
                except asyncio.CancelledError:
                    raise
                except Exception:  # still down: the next probe tries again
                    continue

    async def _open_quiet(self, address: str) -> ShimClient:
        """:meth:`_open` for a probe: registrations of the probe do not touch ``registered``
        (it belongs to the connection in use) until the shim switches."""
        saved = self.registered
        try:
            client = await self._open(address)
            probe_registered = self.registered
        finally:
            self.registered = saved
        self._probe_registered = probe_registered
        return client
