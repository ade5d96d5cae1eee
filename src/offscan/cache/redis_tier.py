"""The fleet's shared verdict tier: an L2 in Redis behind each appliance's in-process cache.

:class:`SharedTier` answers three questions for the scan pipeline, on the event loop:

- :meth:`~SharedTier.get`: *has any appliance of the fleet judged this content under this
  pattern version?* Lookups that arrive while a round trip is out are sent together in the
  next one (one pipelined ``GET`` per key), so a boot storm costs a few round trips, not one a
  file.
- :meth:`~SharedTier.once`: cluster-wide single-flight. Before matching, an appliance takes a
  short lock key (``SET NX PX``, refreshed while it works); another appliance asking for the
  same content waits for the winner's verdict, or takes over if the lock expires without one.
- :meth:`~SharedTier.publish`: every verdict the appliance caches is written to Redis (``SET
  PX ttl``) by a background writer, from a bounded outbox that survives an outage.

Every entry is signed with the fleet key (:mod:`.redis_entries`); one that fails the check is
ignored and counted. Redis down or slow: every round trip has a deadline; the first failure
marks the tier down, logs once, and from then on lookups answer "unknown" at once (the
appliance works from L1 alone, nothing is lost) while a reconnect loop pings Redis and, once it
answers, sends the outbox and brings the tier back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .records import CachedVerdict
from .redis_entries import (
    DEFAULT_NAMESPACE,
    MAX_ENTRY_BYTES,
    EntryKey,
    decode_entry,
    encode_entry,
)
from .verdicts import VerdictCache

log = logging.getLogger("offscan.cache.redis")

T = TypeVar("T")

DEFAULT_TIMEOUT = 0.25  # seconds a round trip may take before the tier counts Redis as down
DEFAULT_TTL = 7 * 24 * 3600.0  # seconds an entry lives (a pattern version rarely lives longer)
DEFAULT_LOCK_TTL = 3.0  # seconds a single-flight lock lives unless its holder refreshes it
DEFAULT_RETRY = 1.0  # seconds between reconnect attempts
DEFAULT_BATCH = 256  # keys per pipelined round trip
DEFAULT_OUTBOX = 100_000  # verdicts waiting to be written; beyond that the oldest is dropped
FORGED_LOG_EVERY = 1000  # forged entries between two log lines about them
SLOW_LIMIT = 3  # round trips in a row past the timeout that count Redis as down
MAX_CLAIMS = 4096  # unused lookup claims kept before the stale ones are forgotten
POLL_FIRST = 0.01  # seconds before a waiting appliance first looks at the winner's entry...
POLL_MAX = 0.1  # ...doubling up to this between looks
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES)

# Delete (or refresh) a lock only if it still holds our token: an expired lock another
# appliance took over must not be released by its previous holder.
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
# A lookup that, finding no entry, claims the content's lock in the same round trip: the
# appliance that misses is the one about to judge it (see SharedTier.once).
_LOOKUP = (
    "local v = redis.call('get', KEYS[1]) "
    "if v then return {v, 0} end "
    "if redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {false, 1} end "
    "return {false, 0}"
)
# Take (or keep, if it holds our token) a content's lock, and read its entry.
_ACQUIRE = (
    "local v = redis.call('get', KEYS[1]) or false "
    "local held = redis.call('get', KEYS[2]) "
    "if held == ARGV[1] then redis.call('pexpire', KEYS[2], ARGV[2]) return {v, 1} end "
    "if held then return {v, 0} end "
    "redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[2]) return {v, 1}"
)
_REFRESH = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)

_ERRORS: tuple[type[BaseException], ...]
try:
    from redis.exceptions import RedisError

    _ERRORS = (RedisError, OSError, TimeoutError)
except ImportError:  # pragma: no cover - redis is a dependency
    _ERRORS = (OSError, TimeoutError)


def check_url(url: str) -> str:
    """``url`` if it names a Redis this tier can use, else ValueError with the schemes."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(
            f"--cache-redis {redact(url)}: scheme must be one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    return url


def redact(url: str) -> str:
    """``url`` without its password (for logs and status)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


@dataclass(frozen=True)
class TierSettings:
    """How the tier talks to Redis (``offscan serve --cache-redis*`` options)."""

    url: str
    fleet_key: bytes
    appliance_id: str = ""
    timeout: float = DEFAULT_TIMEOUT
    ttl: float = DEFAULT_TTL
    lock_ttl: float = DEFAULT_LOCK_TTL
    retry: float = DEFAULT_RETRY
    batch: int = DEFAULT_BATCH
    outbox: int = DEFAULT_OUTBOX
    namespace: str = DEFAULT_NAMESPACE


def _connect(url: str, timeout: float) -> Any:
    """A redis.asyncio client (or cluster client) for ``url``, without retries: the tier
    decides what a failure means."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    scheme = urlsplit(url).scheme
    if scheme in CLUSTER_SCHEMES:
        from redis.asyncio.cluster import RedisCluster

        plain = CLUSTER_SCHEMES[scheme] + url[len(scheme) :]
        return RedisCluster.from_url(plain, socket_timeout=timeout, socket_connect_timeout=timeout)
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


def _pair(item: Any) -> tuple[Any, bool]:
    """A lookup script's ``[value or nil, won]``; a command error reads as an unreadable value."""
    if isinstance(item, Exception):
        return item, False
    return item[0], bool(item[1])


def _releaser(
    batch: list[tuple[EntryKey, str]], values: list[bytes | None], ttl_ms: int
) -> Callable[[Any], list[Any]]:
    """Each lock's verdict (if it still waits) then the lock's compare-and-delete."""

    def build(p: Any) -> list[Any]:
        for (k, token), value in zip(batch, values, strict=True):
            if value is not None:
                p.set(k.name, value, px=ttl_ms)
            p.eval(_RELEASE, 1, k.lock, token)
        return []

    return build


def _acquirer(key: EntryKey, token: str, lock_ms: int) -> Callable[[Any], list[Any]]:
    return lambda p: [p.eval(_ACQUIRE, 2, key.name, key.lock, token, lock_ms)]


def _looker(keys: list[tuple[EntryKey, str]], lock_ms: int) -> Callable[[Any], list[Any]]:
    return lambda p: [p.eval(_LOOKUP, 2, k.name, k.lock, t, lock_ms) for k, t in keys]


class SharedTier:
    """The L2 verdict tier (see the module docstring). ``fill`` puts a verdict read from Redis
    into L1 without publishing it again. :meth:`start` and :meth:`close` run on the loop."""

    def __init__(self, settings: TierSettings, *, fill: Callable[[CachedVerdict], None]) -> None:
        self.settings = s = settings
        self._fill = fill
        self._lock_ms = max(1, int(s.lock_ttl * 1000))
        self._ttl_ms = max(1, int(s.ttl * 1000))
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.up = False
        self.last_error: str | None = None
        self._gets: list[tuple[EntryKey, asyncio.Future[CachedVerdict | None]]] = []
        self._asked: dict[bytes, asyncio.Future[CachedVerdict | None]] = {}  # in flight
        self._get_task: asyncio.Task[None] | None = None
        self._outbox: OrderedDict[bytes, bytes] = OrderedDict()
        self._outbox_lock = threading.Lock()  # publish() may be called from a worker thread
        self._write_task: asyncio.Task[None] | None = None
        self._held: set[bytes] = set()  # entries whose lock we hold: written on release
        # Locks a lookup took on a miss (entry name -> token, when), for once() to use.
        self._claims: dict[bytes, tuple[str, float]] = {}
        self._reconnect_task: asyncio.Task[None] | None = None
        self._releases: list[tuple[EntryKey, str]] = []  # locks to drop (see _release)
        self._release_task: asyncio.Task[None] | None = None
        self._slow = 0  # round trips in a row that timed out
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "hits",
                "misses",
                "skipped",
                "forged",
                "round_trips",
                "keys_looked_up",
                "writes",
                "dropped",
                "oversize",
                "locks_won",
                "lock_waits",
                "served_by_peer",
                "takeovers",
                "outages",
                "errors",
            ),
            0,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and check Redis answers; if it does not, start degraded and keep trying."""
        self._loop = asyncio.get_running_loop()
        self._client = _connect(self.settings.url, self.settings.timeout)
        if await self._ping():
            self.up = True
            log.info("shared verdict tier %s up", redact(self.settings.url))
        else:
            self._went_down(self.last_error or "no answer")

    async def close(self) -> None:
        """Send the releases and what the outbox holds (one bounded try), stop the background
        tasks, close."""
        busy = [t for t in (self._release_task, self._write_task) if t and not t.done()]
        if busy:  # a batch in flight holds entries popped from the outbox: let it land
            await asyncio.wait(busy, timeout=4 * self.settings.timeout)
        if self.up and self._releases:
            await self._drain_releases()
        if self.up and self._outbox:
            await self._write_batch(len(self._outbox))
        tasks = [self._get_task, self._write_task, self._reconnect_task, self._release_task]
        for t in tasks:
            if t is not None:
                t.cancel()
        for t in tasks:
            if t is not None:
                with contextlib.suppress(BaseException):
                    await t
        for f in self._gets:
            if not f[1].done():
                f[1].set_result(None)
        self._gets.clear()
        if self._client is not None:
            with contextlib.suppress(*_ERRORS):
                await self._client.aclose()
            self._client = None
        self.up = False

    # -- lookups -------------------------------------------------------------------------------

    def key(self, digest: bytes, size: int, version: str) -> EntryKey:
        return EntryKey(digest, size, version, self.settings.namespace)

    async def get(self, digest: bytes, size: int, version: str) -> CachedVerdict | None:
        """The fleet's verdict for this content and version (also put into L1), or None:
        unknown, forged, or Redis unreachable (answered at once while the tier is down)."""
        if not self.up:
            self.counts["skipped"] += 1
            return None
        key = self.key(digest, size, version)
        fut = self._asked.get(key.name)
        if fut is None:  # one lookup per key at a time: the VMs of a host ask together
            fut = asyncio.get_running_loop().create_future()
            self._asked[key.name] = fut
            fut.add_done_callback(functools.partial(self._forget_asked, key.name))
            self._gets.append((key, fut))
            if self._get_task is None or self._get_task.done():
                self._get_task = asyncio.create_task(self._drain_gets())
        return await asyncio.shield(fut)

    def _forget_asked(self, name: bytes, _fut: object) -> None:
        self._asked.pop(name, None)

    async def _drain_gets(self) -> None:
        """Send queued lookups, up to ``batch`` keys a round trip, until none are left; the
        lookups that arrive during a round trip go in the next one."""
        while self._gets:
            batch = self._gets[: self.settings.batch]
            del self._gets[: len(batch)]
            batch = [(k, f) for k, f in batch if not f.done()]  # (close() answered them)
            if not batch:
                continue
            tokens = [(k, os.urandom(16).hex()) for k, _ in batch]
            out = await self._call(_looker(tokens, self._lock_ms))
            self.counts["keys_looked_up"] += len(batch)
            now = time.monotonic()
            for i, (k, fut) in enumerate(batch):
                v = None
                if out is not None:
                    raw, won = _pair(out[i])
                    if won:
                        self._claims[k.name] = (tokens[i][1], now)
                    v = self._accept(k, raw)
                if not fut.done():
                    fut.set_result(v)
            if len(self._claims) > MAX_CLAIMS:  # claims nobody used (a request failed)
                old = now - self.settings.lock_ttl
                self._claims = {n: c for n, c in self._claims.items() if c[1] > old}

    def _accept(self, key: EntryKey, raw: Any) -> CachedVerdict | None:
        """The verdict in a value read from Redis (put into L1), or None if there is none or
        the fleet key did not sign it."""
        if raw is None:
            self.counts["misses"] += 1
            return None
        v = None if isinstance(raw, Exception) else decode_entry(key, raw, self.settings.fleet_key)
        if v is None:
            self.counts["forged"] += 1
            if self.counts["forged"] % FORGED_LOG_EVERY == 1:  # a flood must not flood the log
                log.warning(
                    "ignored a shared cache entry that fails the fleet key check (%d so far): %r",
                    self.counts["forged"],
                    key.name,
                )
            return None
        self.counts["hits"] += 1
        self._fill(v)
        return v

    # -- cluster-wide single-flight ------------------------------------------------------------

    async def once(
        self, digest: bytes, size: int, version: str, judge: Callable[[], Awaitable[T]]
    ) -> T | CachedVerdict:
        """``judge()`` unless another appliance of the fleet has judged, or is judging, this
        content under ``version``: then its verdict. The judging appliance holds a lock key
        while it works; the others wait for its entry and take over if the lock expires (or is
        released) without one. With Redis unreachable the content is judged here."""
        key = self.key(digest, size, version)
        token = os.urandom(16).hex()
        waited = False
        while True:
            claim = self._claims.pop(key.name, None)  # a lookup's claim: any request may use it
            if claim is not None:
                token = claim[0]  # a stale claim may still be ours: _ACQUIRE checks
                if time.monotonic() - claim[1] < self.settings.lock_ttl / 2:
                    self.counts["takeovers"] += waited
                    break
            out = await self._call(_acquirer(key, token, self._lock_ms))
            if out is None:
                return await judge()
            raw, won = _pair(out[0])
            if isinstance(raw, Exception):  # the key holds something else: judge it here
                self._accept(key, raw)
                return await judge()
            found = self._accept(key, raw) if raw is not None else None
            if found is not None:
                if won:
                    await self._release(key, token)
                self.counts["served_by_peer"] += waited
                return found
            if won:
                self.counts["takeovers"] += waited
                break
            self.counts["lock_waits"] += 1
            waited = True
            found = await self._wait(digest, size, version)
            if found is not None:
                self.counts["served_by_peer"] += 1
                return found
        self.counts["locks_won"] += 1
        keeper = asyncio.create_task(self._keep_lock(key, token))
        self._held.add(key.name)
        try:
            return await judge()
        finally:
            self._held.discard(key.name)
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await self._release(key, token)

    async def _wait(self, digest: bytes, size: int, version: str) -> CachedVerdict | None:
        """Wait while another appliance holds the content's lock, looking again (batched with
        the other lookups) after 10 ms, doubling to 100 ms: its verdict; or None once the
        lookup found the lock free and took it (a claim), or Redis is gone."""
        name = self.key(digest, size, version).name
        pause = POLL_FIRST
        while True:
            await asyncio.sleep(pause)
            pause = min(2 * pause, POLL_MAX)
            if not self.up:
                return None
            found = await self.get(digest, size, version)
            if found is not None or name in self._claims:
                return found

    async def _keep_lock(self, key: EntryKey, token: str) -> None:
        while True:
            await asyncio.sleep(self.settings.lock_ttl / 3)
            await self._call(lambda p: [p.eval(_REFRESH, 1, key.lock, token, self._lock_ms)])

    async def _release(self, key: EntryKey, token: str) -> None:
        """Queue the release of ``key``'s lock (the caller does not wait for it); releases
        that pile up go out together, each with its verdict if that still waits in the
        outbox, in one round trip: a waiting appliance finds the entry before the lock gone."""
        self._releases.append((key, token))
        if self._release_task is None or self._release_task.done():
            self._release_task = asyncio.create_task(self._drain_releases())

    async def _drain_releases(self) -> None:
        while self._releases:
            batch = self._releases[: self.settings.batch]
            del self._releases[: len(batch)]
            with self._outbox_lock:
                values = [self._outbox.pop(k.name, None) for k, _ in batch]
            if await self._call(_releaser(batch, values, self._ttl_ms)) is None:
                for (k, _), value in zip(batch, values, strict=True):
                    if value is not None:
                        self._queue(k.name, value)  # the locks expire by themselves
            else:
                self.counts["writes"] += sum(v is not None for v in values)

    # -- writes --------------------------------------------------------------------------------

    def publish(self, verdict: CachedVerdict) -> None:
        """Queue ``verdict`` for Redis (any thread; returns at once)."""
        key = self.key(verdict.digest, verdict.size, verdict.pattern_version)
        value = encode_entry(key, verdict, self.settings.fleet_key, self.settings.appliance_id)
        if len(value) > MAX_ENTRY_BYTES:
            self.counts["oversize"] += 1
            return
        self._queue(key.name, value)

    def _queue(self, name: bytes, value: bytes) -> None:
        with self._outbox_lock:
            self._outbox[name] = value
            self._outbox.move_to_end(name)
            while len(self._outbox) > self.settings.outbox:
                self._outbox.popitem(last=False)
                self.counts["dropped"] += 1
        loop = self._loop
        if loop is None or loop.is_closed() or name in self._held:
            return  # a held entry goes out with its lock's release, in the same round trip
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._kick_writer()
        else:
            loop.call_soon_threadsafe(self._kick_writer)

    def _kick_writer(self) -> None:
        if self.up and (self._write_task is None or self._write_task.done()):
            self._write_task = asyncio.create_task(self._drain_writes())

    async def _drain_writes(self) -> None:
        while self._outbox and self.up:
            if not await self._write_batch(self.settings.batch):
                return

    async def _write_batch(self, n: int) -> bool:
        with self._outbox_lock:
            batch = [self._outbox.popitem(last=False) for _ in range(min(n, len(self._outbox)))]
        if not batch:
            return True
        out = await self._call(lambda p: [p.set(k, v, px=self._ttl_ms) for k, v in batch])
        if out is None:
            with self._outbox_lock:  # back at the front, unless a newer verdict replaced one
                for k, v in reversed(batch):
                    if k not in self._outbox:
                        self._outbox[k] = v
                        self._outbox.move_to_end(k, last=False)
            return False
        failed = sum(isinstance(x, Exception) for x in out)  # e.g. Redis full (noeviction)
        self.counts["errors"] += failed
        self.counts["writes"] += len(batch) - failed
        return True

    # -- round trips and health ----------------------------------------------------------------

    async def _call(self, build: Callable[[Any], list[Any]]) -> list[Any] | None:
        """One pipelined round trip (``build`` queues the commands), or None if the tier is
        down or Redis fails to answer in time (which marks it down)."""
        if not self.up or self._client is None:
            return None
        try:
            async with asyncio.timeout(self.settings.timeout):
                pipe = self._client.pipeline(transaction=False)
                build(pipe)
                # A command's own error (a key of the wrong type...) is that command's
                # answer, not an outage: it comes back in its place in the list.
                out: list[Any] = await pipe.execute(raise_on_error=False)
        except _ERRORS as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.counts["errors"] += 1
            self.last_error = why
            slow = isinstance(exc, TimeoutError) or type(exc).__name__ == "TimeoutError"
            self._slow = self._slow + 1 if slow else SLOW_LIMIT
            if self._slow >= SLOW_LIMIT:  # refused, reset, or slow several times running
                self._went_down(why)
            return None
        self._slow = 0
        self.counts["round_trips"] += 1
        return out

    def _went_down(self, why: str) -> None:
        self.last_error = why
        if self.up or self._reconnect_task is None:
            self.counts["outages"] += 1
            log.warning(
                "shared verdict tier %s unreachable (%s): serving from the local cache alone, "
                "reconnecting every %.1f s",
                redact(self.settings.url),
                why,
                self.settings.retry,
            )
        self.up = False
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.create_task(self._reconnect())

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(self.settings.timeout):
                await self._client.ping()
        except _ERRORS as exc:
            self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return False
        return True

    async def _reconnect(self) -> None:
        while not self.up:
            await asyncio.sleep(self.settings.retry)
            if await self._ping():
                self.up = True
                self.last_error = None
                log.warning(
                    "shared verdict tier %s back; sending %d queued verdict(s)",
                    redact(self.settings.url),
                    len(self._outbox),
                )
                self._kick_writer()

    def status(self) -> dict[str, Any]:
        """What ``status.shared_cache`` reports (see docs/fleet.md)."""
        return {
            "url": redact(self.settings.url),
            "state": "up" if self.up else "down",
            "last_error": self.last_error,
            "outbox": len(self._outbox),
            "ttl": self.settings.ttl,
            **self.counts,
        }


class FleetVerdictCache(VerdictCache):
    """The L1 verdict cache of an appliance in a fleet: every verdict it caches is also
    published to the shared tier (set :attr:`shared`); :meth:`put_local` caches one read
    from the tier without writing it back."""

    shared: SharedTier | None = None

    def put(self, verdict: CachedVerdict) -> None:
        super().put(verdict)
        if self.shared is not None:
            self.shared.publish(verdict)

    def put_local(self, verdict: CachedVerdict) -> None:
        super().put(verdict)


def open_fleet_cache(
    settings: TierSettings,
    max_entries: int,
    *,
    state_dir: str | os.PathLike[str] | None = None,
) -> tuple[FleetVerdictCache, SharedTier]:
    """An L1 cache and the shared tier behind it, wired both ways (start the tier on the loop)."""
    cache = FleetVerdictCache(max_entries, state_dir=state_dir)
    tier = SharedTier(settings, fill=cache.put_local)
    cache.shared = tier
    return cache, tier
