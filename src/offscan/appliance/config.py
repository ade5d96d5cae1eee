"""The appliance's serve options as one frozen value (``offscan serve`` builds it).

:class:`ApplianceConfig` holds what the operator chose and checks that the choices fit together;
it derives the state file locations but creates nothing: the facade acts on it. This module
touches no file and no socket. :class:`ApplianceOptions` names the same options as keyword
arguments, for the ``Appliance(socket_path=..., ...)`` form.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from .. import protocol
from . import limits

DEFAULT_CONCURRENCY = 4  # concurrent reads+scans; DSVA's recommended value, degrading above 8
DEFAULT_CREDITS = 256  # outstanding scan requests per connection
DEFAULT_CACHE_ENTRIES = 1_000_000
# -- hardening (issue 14): where VM roots may be, the admin socket, per-client limits --------
# VM roots must lie under one of these (``--vm-area``, repeatable); the default allows the
# usual places for VM disks and clones and the temp directory, and nothing of the system.
DEFAULT_VM_AREAS = ("/srv", "/var/lib/offscan", "/var/lib/libvirt", tempfile.gettempdir())
ADMIN_SUFFIX = protocol.ADMIN_SUFFIX  # the admin socket's default: the main socket's path + this


@dataclass(frozen=True)
class ApplianceConfig:
    """How to run one appliance. ``state_dir`` holds the inventory, verdict cache, event log,
    quarantine vault (unless ``quarantine_dir``) and the signed pattern store; without it the
    appliance keeps nothing across restarts. Raises ValueError for options that do not fit
    together (a TCP listener without a secret, updates without a trusted key, ...)."""

    socket_path: str | None = None
    listen: tuple[str, int] | None = None
    secret: str | None = None
    databases: Sequence[str] = ()
    state_dir: str | os.PathLike[str] | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    credits: int = DEFAULT_CREDITS
    heartbeat: float = protocol.DEFAULT_HEARTBEAT
    socket_mode: int = 0o600
    cache_entries: int = DEFAULT_CACHE_ENTRIES
    impl: str = "auto"
    policy_file: str | None = None
    isolation_hook: str | None = None
    hook_timeout: float = 10.0
    quarantine_dir: str | None = None
    metrics: tuple[str, int] | None = None
    updates: str | None = None
    trust: str | None = None
    poll: float = 60.0
    # -- the clamd-compatible front (appliance/clamd.py); off unless a socket or port is set --
    clamd_socket: str | None = None
    clamd_listen: tuple[str, int] | None = None
    clamd_roots: Sequence[str] = ()
    clamd_socket_mode: int = 0o660
    clamd_stream_max_length: int | None = None  # bytes; None: clamd's default (100M)
    clamd_max_connections: int | None = None
    # The fleet's shared verdict tier in Redis (docs/fleet.md): URL, fleet key file, seconds.
    cache_redis: str | None = None
    cache_key: str | None = None
    cache_redis_timeout: float = 0.25
    cache_redis_ttl: float = 7 * 24 * 3600.0
    cache_lock_ttl: float = 3.0
    # hardening (issue 14)
    admin_socket: str | None = None  # None: next to socket_path; "" : no admin socket
    vm_areas: Sequence[str] = DEFAULT_VM_AREAS
    connections_per_client: int = limits.DEFAULT_CONNECTIONS_PER_CLIENT
    streams_per_client: int = limits.DEFAULT_STREAMS_PER_CLIENT

    def __post_init__(self) -> None:
        object.__setattr__(self, "databases", tuple(self.databases))  # frozen all the way down
        object.__setattr__(self, "clamd_roots", tuple(self.clamd_roots))
        if self.clamd_roots and not (self.clamd_socket or self.clamd_listen):
            raise ValueError("--clamd-root needs --clamd-socket PATH or --clamd-listen HOST:PORT")
        areas = tuple(os.path.realpath(a) for a in self.vm_areas)
        if not areas or not all(os.path.isabs(a) for a in self.vm_areas):
            raise ValueError("--vm-area needs absolute directories")
        object.__setattr__(self, "vm_areas", areas)
        if self.connections_per_client < 1 or self.streams_per_client < 1:
            raise ValueError("per-client limits must be at least 1")
        if self.listen and not self.secret:
            raise ValueError("a TCP listener needs a shared secret (--secret or OFFSCAN_SECRET)")
        if self.updates and not self.trust:
            raise ValueError("--updates needs --trust PUB: bundles are verified before use")
        if self.trust and not self.state_path:
            raise ValueError("signed pattern updates need a --state directory")
        if self.cache_redis:
            from ..cache.redis_tier import check_url

            check_url(self.cache_redis)
            if not self.cache_key:
                raise ValueError("--cache-redis needs --cache-key FILE: shared entries are signed")
            if min(self.cache_redis_timeout, self.cache_redis_ttl, self.cache_lock_ttl) <= 0:
                raise ValueError("--cache-redis-timeout, -ttl and --cache-lock-ttl must be > 0")

    @property
    def state_path(self) -> Path | None:
        """The state directory as a Path (None when the appliance keeps no state)."""
        return Path(self.state_dir) if self.state_dir else None

    def state_file(self, name: str) -> Path | None:
        """``STATE/name``, or None without a state directory."""
        state = self.state_path
        return state / name if state else None

    @property
    def admin_socket_path(self) -> str | None:
        """Where operator commands are accepted: ``admin_socket``, else the main socket's
        path plus :data:`ADMIN_SUFFIX`; None with neither (no operator commands)."""
        if self.admin_socket is not None:
            return self.admin_socket or None
        return self.socket_path + ADMIN_SUFFIX if self.socket_path else None

    @property
    def vault_path(self) -> str | Path | None:
        """The quarantine vault: ``quarantine_dir``, else ``STATE/quarantine``, else none."""
        return self.quarantine_dir or self.state_file("quarantine")


class ApplianceOptions(TypedDict, total=False):
    """:class:`ApplianceConfig`'s fields as keyword arguments of ``Appliance(...)``."""

    socket_path: str | None
    listen: tuple[str, int] | None
    secret: str | None
    databases: Sequence[str]
    state_dir: str | os.PathLike[str] | None
    concurrency: int
    credits: int
    heartbeat: float
    socket_mode: int
    cache_entries: int
    impl: str
    policy_file: str | None
    isolation_hook: str | None
    hook_timeout: float
    quarantine_dir: str | None
    metrics: tuple[str, int] | None
    updates: str | None
    trust: str | None
    poll: float
    clamd_socket: str | None
    clamd_listen: tuple[str, int] | None
    clamd_roots: Sequence[str]
    clamd_socket_mode: int
    clamd_stream_max_length: int | None
    clamd_max_connections: int | None
    cache_redis: str | None
    cache_key: str | None
    cache_redis_timeout: float
    cache_redis_ttl: float
    cache_lock_ttl: float
    admin_socket: str | None
    vm_areas: Sequence[str]
    connections_per_client: int
    streams_per_client: int
