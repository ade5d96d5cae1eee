"""The appliance (``offscan serve``): one scanner per host serving every VM's shim.

:class:`Appliance` is a thin facade: it builds the parts from an :class:`~.config.ApplianceConfig`
(registry and inventory, pipeline, patterns, actions, verdicts), owns the lifecycle (listeners,
metrics endpoint, background tasks, pools, cache and event log) and hands each connection to a
:class:`~.session.Session`. It creates the state directory and the unix socket; the parts write
their own files. :func:`serve` runs it until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Self, Unpack

from .. import policy as policies
from .. import protocol
from .._fsutil import atomic_write
from ..cache import IdentityMemo, VerdictCache
from ..cache.memo_log import PersistentIdentityMemo
from ..engine import Matcher
from ..eventloop import loop_name
from ..signatures import PatternDB
from . import control as commands
from . import status as reports
from .actions import Actions
from .common import SYSTEM_CLOCK, Clock, log
from .config import ApplianceConfig, ApplianceOptions
from .inventory import Inventory, LocationIndex
from .limits import ClientBudget, DrainMeter
from .patterns import Engine, Patterns, initial_engine, open_pattern_source
from .pipeline import Pipeline, PriorityGate
from .registry import Registry
from .session import Session
from .status import Counters
from .verdicts import EventLog, Verdicts

if TYPE_CHECKING:
    from ..cache.redis_tier import SharedTier
    from ..metrics import MetricsServer
    from ..metrics import Registry as MetricsRegistry
    from ..protocol.messages import PatternSwap, StatusReport
    from ..quarantine import Vault
    from ..updates import AppliedUpdate
    from .clamd import ClamdFront
    from .control import Reply


class Appliance:
    """The central scanning appliance. ``start()`` opens the listeners; ``stop()`` closes them.

    Built from an :class:`ApplianceConfig` (``Appliance(config)`` or
    :meth:`from_config`), or from the same options as keywords (``Appliance(socket_path=...,
    databases=[...], state_dir=...)``)."""

    def __init__(
        self, config: ApplianceConfig | None = None, **options: Unpack[ApplianceOptions]
    ) -> None:
        """Build every part from the config. Long because it is the one place the parts are
        wired together, one statement a part, in dependency order."""
        if config is None:
            config = ApplianceConfig(**options)
        elif options:
            raise TypeError("Appliance() takes a config or keyword options, not both")
        self.config = cfg = config
        self.clock: Clock = SYSTEM_CLOCK
        state = cfg.state_path
        if state:
            state.mkdir(parents=True, exist_ok=True, mode=0o700)
        store, update_client = open_pattern_source(cfg)
        engine = initial_engine(cfg, store)
        default_policy: dict[str, Any] = {}
        vm_policies: dict[str, dict[str, Any]] = {}
        if cfg.policy_file:
            default_policy, vm_policies = policies.load_policy_file(cfg.policy_file)
        self.vault: Vault | None = None
        if cfg.vault_path:
            from ..quarantine import Vault

            self.vault = Vault(cfg.vault_path)
        self.appliance_id = f"{socket.gethostname()}:{os.getpid()}"
        self.shared: SharedTier | None = None  # the fleet's tier in Redis (docs/fleet.md)
        if cfg.cache_redis:
            self.cache, self.shared = _fleet_cache(cfg, self.appliance_id)
        else:
            self.cache = VerdictCache(cfg.cache_entries, state_dir=cfg.state_file("cache"))
        self.pool = ThreadPoolExecutor(
            max_workers=cfg.concurrency, thread_name_prefix="offscan-scan"
        )
        self.stream_pool = ThreadPoolExecutor(
            max_workers=cfg.credits, thread_name_prefix="offscan-stream"
        )
        self.inventory = Inventory(cfg.state_file("inventory.json"))
        self.events = EventLog(cfg.state_file("events.jsonl"))
        self.counters = Counters()
        self.registry = Registry(
            self.inventory,
            default_policy=default_policy,
            vm_policies=vm_policies,
            vault=self.vault,
            vm_areas=cfg.vm_areas,
        )
        self.client_budget = ClientBudget(cfg.connections_per_client, cfg.streams_per_client)
        self.drain = DrainMeter()
        self.actions = Actions(
            self.registry,
            self.counters,
            pool=self.pool,
            vault=self.vault,
            isolation_hook=cfg.isolation_hook,
            hook_timeout=cfg.hook_timeout,
            released_file=cfg.state_file("released.json"),
        )
        self.verdicts = Verdicts(self.events, self.counters, self.actions, self.clock)
        self.memo = _identity_memo(cfg)
        self.inherited = IdentityMemo()  # clone file identity -> master digest (see clones.py)
        self.locations = LocationIndex()
        self.gate = PriorityGate(cfg.concurrency)
        self.pipeline = Pipeline(
            lambda: self.patterns.engine,
            cache=self.cache,
            memo=self.memo,
            inherited=self.inherited,
            locations=self.locations,
            registry=self.registry,
            verdicts=self.verdicts,
            gate=self.gate,
            pool=self.pool,
            stream_pool=self.stream_pool,
            counters=self.counters,
            clock=self.clock,
            chunk_timeout=3 * cfg.heartbeat,
            shared=self.shared,
        )
        self.patterns = Patterns(
            engine,
            pipeline=self.pipeline,
            inventory=self.inventory,
            spawn=self._spawn,
            impl=cfg.impl,
            databases=cfg.databases,
            store=store,
            update_client=update_client,
            poll=cfg.poll,
        )
        self.connections = 0
        self.started = self.clock.time()
        self.sessions: set[asyncio.Task[None]] = set()  # one per open connection
        self.live_sessions: set[Session] = set()  # past their hello (policy pushes)
        self._background: set[asyncio.Task[None]] = set()
        self._servers: list[protocol.Server] = []
        self.tcp_port: int | None = None
        self.metrics_port: int | None = None
        self.metrics_registry: MetricsRegistry | None = None
        self._metrics_server: MetricsServer | None = None
        self.clamd: ClamdFront | None = None  # the clamd-compatible front (clamd.py)
        if cfg.clamd_socket or cfg.clamd_listen:
            from .clamd import ClamdFront, ClamdOptions

            self.clamd = ClamdFront(self, ClamdOptions.from_config(cfg))
        self.request_shutdown: Callable[[], None] | None = None  # set by serve(): clamd SHUTDOWN

    @classmethod
    def from_config(cls, config: ApplianceConfig) -> Self:
        return cls(config)

    # -- the parts' current state ---------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self.patterns.engine

    @property
    def matcher(self) -> Matcher:
        return self.engine.matcher

    @property
    def pattern_version(self) -> str:
        return self.engine.version

    @property
    def db(self) -> PatternDB:
        return self.engine.db

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if self.shared is not None:
            await self.shared.start()
        if cfg.socket_path:
            self._servers.append(
                await protocol.start_unix_server(
                    cfg.socket_path, self._handle, mode=cfg.socket_mode
                )
            )
        admin = cfg.admin_socket_path
        if admin:  # operator commands: 0600 whatever --socket-mode says (see limits.py)
            self._servers.append(await protocol.start_unix_server(admin, self._handle_admin))
        if cfg.listen:
            srv = await protocol.start_tcp_server(cfg.listen[0], cfg.listen[1], self._handle)
            self.tcp_port = srv.port
            self._servers.append(srv)
        if self.clamd is not None:
            await self.clamd.start()
        where = [
            cfg.socket_path,
            admin and f"admin {admin}",
            cfg.listen and f"tcp {cfg.listen[0]}:{self.tcp_port}",
        ]
        log.info(
            "appliance %s ready: %s; patterns %s; event loop %s",
            self.appliance_id,
            ", ".join(filter(None, where)),
            self.db.summary(),
            loop_name(),
        )
        if self.patterns.update_client is not None:
            self._spawn(self.patterns.update_loop())
        self._spawn(self.drain.run(self.clock, self.counters))
        if cfg.metrics:
            from ..metrics import start_metrics_server

            self.metrics_registry = reports.build_metrics(self)
            self._metrics_server = await start_metrics_server(self.metrics_registry, *cfg.metrics)
            self.metrics_port = self._metrics_server.port
            log.info("metrics on http://%s:%s/metrics", cfg.metrics[0], self.metrics_port)

    async def stop(self) -> None:
        if self.clamd is not None:
            await self.clamd.stop()
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
        for srv in self._servers:
            srv.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        for t in [*self.sessions, *self._background]:
            t.cancel()
        await asyncio.gather(*self.sessions, *self._background, return_exceptions=True)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.stream_pool.shutdown(wait=False, cancel_futures=True)
        if self.shared is not None:
            await self.shared.close()
        self.cache.close()
        if isinstance(self.memo, PersistentIdentityMemo):
            self.memo.close()
        self.events.close()
        self.inventory.close()

    async def _handle(self, conn: protocol.Connection, *, admin: bool = False) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        self.connections += 1
        try:
            await Session(self, conn, admin=admin).run()
        finally:
            self.sessions.discard(task)

    async def _handle_admin(self, conn: protocol.Connection) -> None:
        await self._handle(conn, admin=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- what sessions and operators ask for ----------------------------------------------

    def status(self) -> StatusReport:
        """The ``status`` reply without its envelope (a session adds ``t`` and ``id``)."""
        return reports.status(self)

    async def control(self, op: str, args: dict[str, Any]) -> Reply:
        """Operator commands from ``offscan vm|policy|quarantine`` (the admin socket's)."""
        return await commands.dispatch(self, op, args)

    async def swap(
        self,
        db: PatternDB,
        version: str,
        *,
        added: PatternDB | None = None,
        removed: Sequence[str] = (),
    ) -> PatternSwap:
        return await self.patterns.swap(db, version, added=added, removed=removed)

    async def check_updates(self) -> list[AppliedUpdate]:
        return await self.patterns.check_updates()

    async def reload(self) -> dict[str, Any]:
        return await self.patterns.reload()


def _identity_memo(cfg: ApplianceConfig) -> IdentityMemo:
    """The identity memo: persisted beside the verdict cache when there is a state directory,
    so a restart does not read every file again just to learn its digest."""
    where = cfg.state_file("cache")
    return PersistentIdentityMemo(where) if where else IdentityMemo()


def _fleet_cache(cfg: ApplianceConfig, appliance_id: str) -> tuple[VerdictCache, SharedTier]:
    """The L1 cache with the shared tier behind it (``--cache-redis``, ``--cache-key``)."""
    from ..cache.redis_entries import load_fleet_key
    from ..cache.redis_tier import TierSettings, open_fleet_cache

    assert cfg.cache_redis and cfg.cache_key  # ApplianceConfig checked both
    settings = TierSettings(
        cfg.cache_redis,
        load_fleet_key(cfg.cache_key),
        appliance_id=appliance_id,
        timeout=cfg.cache_redis_timeout,
        ttl=cfg.cache_redis_ttl,
        lock_ttl=cfg.cache_lock_ttl,
    )
    return open_fleet_cache(settings, cfg.cache_entries, state_dir=cfg.state_file("cache"))


async def serve(appliance: Appliance, *, ready_file: str | None = None) -> None:
    """Run until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    appliance.request_shutdown = stop.set
    try:
        await appliance.start()
    except BaseException:  # a listener failed: close those already open, remove their files
        await appliance.stop()
        raise
    if ready_file:
        # fsync=False: the ready file only tells a parent process (tests, the lab) that the
        # appliance is listening; it must appear whole (atomic), it need not survive a crash.
        atomic_write(
            ready_file,
            json.dumps({"pid": os.getpid(), "tcp_port": appliance.tcp_port}),
            fsync=False,
        )
    try:
        await stop.wait()
    finally:
        log.info("appliance stopping")
        await appliance.stop()
