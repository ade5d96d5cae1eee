"""The update client: keeps a :class:`PatternStore` at an update server's latest version.

:class:`UpdateClient` polls the server's ``latest`` index with ``If-None-Match``, plans the
cheapest bundles to fetch (:func:`plan_updates`: a delta chain, a full bundle, or both) and
applies them to its store, falling back to full bundles once if a delta does not apply. It
counts every byte on the wire in both directions. It touches the network and, through
:meth:`PatternStore.apply`, the store it was given; nothing else.
"""

from __future__ import annotations

import heapq
import http.client
import json
import logging
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

from ._common import UpdateError, is_int, sha256_hex
from .bundle import MAX_BUNDLE_SIZE
from .server import INDEX_FORMAT, INDEX_PATH, MAX_INDEX_SIZE, BundleEntry, CountingReader
from .store import AppliedUpdate, PatternStore

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds, per HTTP request


class _Counter:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self._lock = threading.Lock()

    def add_sent(self, n: int) -> None:
        with self._lock:
            self.sent += n

    def add_received(self, n: int) -> None:
        with self._lock:
            self.received += n


class _CountingSocket:
    """Counts bytes on a socket as http.client uses it: ``sendall`` out, ``makefile`` in."""

    def __init__(self, sock: socket.socket, counter: _Counter) -> None:
        self._sock, self._counter = sock, counter

    def sendall(self, data: Any, *args: Any) -> None:
        self._counter.add_sent(len(memoryview(data).cast("B")))
        self._sock.sendall(data, *args)

    def makefile(self, *args: Any, **kwargs: Any) -> Any:
        return CountingReader(self._sock.makefile(*args, **kwargs), self._counter.add_received)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _CountingHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket counts every byte; the base of the HTTPS one too.

    Wrapping after ``connect()`` means that for HTTPS the TLS socket is wrapped: the count is
    of HTTP bytes (headers and bodies), the same for both schemes.
    """

    def __init__(self, *args: Any, counter: _Counter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counter = counter

    def connect(self) -> None:
        super().connect()
        self.sock = _CountingSocket(self.sock, self._counter)


class _CountingHTTPSConnection(_CountingHTTPConnection, http.client.HTTPSConnection):
    """HTTPS: the MRO runs HTTPSConnection.connect (TCP, then TLS) before the wrap above."""


class _CountingHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self._counter = counter

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)

    def _connection(self, host: str, /, **kwargs: Any) -> http.client.HTTPConnection:
        return _CountingHTTPConnection(host, counter=self._counter, **kwargs)


class _CountingHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, counter: _Counter, context: ssl.SSLContext | None = None) -> None:
        super().__init__(context=context)
        self._counter = counter
        self._ssl_context = context

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req, context=self._ssl_context)

    def _connection(self, host: str, /, **kwargs: Any) -> http.client.HTTPConnection:
        return _CountingHTTPSConnection(host, counter=self._counter, **kwargs)


def plan_updates(
    bundles: Iterable[BundleEntry], current: int | None, target: int, *, deltas: bool = True
) -> list[BundleEntry] | None:
    """The cheapest bundles (in bytes, then in steps) taking ``current`` to ``target``.

    Deltas apply only to their parent; a full bundle applies to anything older. So the plan is
    a delta chain, a full bundle, or a full bundle of an intermediate version followed by
    deltas, whichever is smallest. None if no sequence reaches ``target``.
    """
    fulls: list[BundleEntry] = []
    by_parent: dict[int | None, list[BundleEntry]] = {}
    for b in bundles:
        if b.version > target or (current is not None and b.version <= current):
            continue
        if b.kind == "full":
            fulls.append(b)
        elif deltas:
            by_parent.setdefault(b.parent, []).append(b)
    best: dict[int | None, tuple[int, int]] = {current: (0, 0)}
    came: dict[int, tuple[int | None, BundleEntry]] = {}
    heap: list[tuple[int, int, int, int | None]] = [(0, 0, -1, current)]
    while heap:
        size, steps, _, node = heapq.heappop(heap)
        if node == target:
            break
        if (size, steps) > best.get(node, (size, steps)):
            continue
        for b in by_parent.get(node, []) + [f for f in fulls if node is None or f.version > node]:
            cost = (size + b.size, steps + 1)
            if cost < best.get(b.version, (1 << 62, 0)):
                best[b.version] = cost
                came[b.version] = (node, b)
                heapq.heappush(heap, (cost[0], cost[1], b.version, b.version))
    if target not in came:
        return None
    plan: list[BundleEntry] = []
    step: int | None = target
    while step != current:
        assert step is not None
        step, b = came[step]
        plan.append(b)
    return plan[::-1]


class UpdateClient:
    """Keeps a :class:`PatternStore` at the server's latest version, fetching only what it lacks.

    Synchronous (urllib); the appliance runs it in a thread. ``bytes_transferred`` counts every
    byte on the wire in both directions, headers included; ``last_update_seconds`` times the last
    :meth:`update` that changed something.
    """

    def __init__(
        self, base_url: str, store: PatternStore, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.store = store
        self.timeout = timeout
        self._counter = _Counter()
        self._opener = urllib.request.build_opener(
            _CountingHTTPHandler(self._counter), _CountingHTTPSHandler(self._counter)
        )
        self._etag: str | None = None
        self._index: tuple[int | None, list[BundleEntry]] | None = None
        self.requests = 0
        self.not_modified = 0
        self.last_checked_at: float | None = None
        self.last_update_seconds: float | None = None
        self.last_applied: list[AppliedUpdate] = []

    @property
    def bytes_transferred(self) -> int:
        return self._counter.sent + self._counter.received

    @property
    def bytes_received(self) -> int:
        return self._counter.received

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "not_modified": self.not_modified,
            "bytes_transferred": self.bytes_transferred,
            "bytes_received": self.bytes_received,
            "last_checked_at": self.last_checked_at,
            "last_update_seconds": self.last_update_seconds,
        }

    def _get(self, url: str, headers: Mapping[str, str], limit: int) -> tuple[int, Any, bytes]:
        self.requests += 1
        req = urllib.request.Request(url, headers=dict(headers))
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                body = resp.read(limit + 1)
                if len(body) > limit:
                    raise UpdateError(f"{url}: response larger than {limit} bytes")
                return resp.status, resp.headers, body
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code == 304:
                    exc.read()
                    return 304, exc.headers, b""
                raise UpdateError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise UpdateError(f"{url}: cannot fetch: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise UpdateError(f"{url}: cannot fetch: {exc}") from None

    def fetch_index(self) -> tuple[int | None, list[BundleEntry]]:
        """The server's index, by a conditional GET (a 304 reuses the copy from last time)."""
        url = self.base_url + INDEX_PATH
        headers = {"If-None-Match": self._etag} if self._etag and self._index else {}
        status, resp_headers, body = self._get(url, headers, MAX_INDEX_SIZE)
        self.last_checked_at = time.time()
        if status == 304 and self._index is not None:
            self.not_modified += 1
            return self._index
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise UpdateError(f"{url}: index is not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
            raise UpdateError(f"{url}: not an offscan update index")
        latest = doc.get("latest")
        if latest is not None and not is_int(latest):
            raise UpdateError(f"{url}: bad latest version {latest!r}")
        raw = doc.get("bundles")
        if not isinstance(raw, list):
            raise UpdateError(f"{url}: index lacks a bundle list")
        self._index = (latest, [BundleEntry.from_json(e) for e in raw])
        self._etag = resp_headers.get("ETag")
        return self._index

    def check(self) -> int | None:
        """The newer version the server offers, or None if the store is up to date."""
        latest, _ = self.fetch_index()
        current = self.store.current_version
        if latest is None or (current is not None and latest <= current):
            return None
        return latest

    def update(self) -> list[AppliedUpdate]:
        """Bring the store to the server's latest version; returns what was applied, in order.

        Takes the cheapest plan (delta chain or full bundle); if a delta does not apply (the
        local version differs from the publisher's, or the delta is bad), falls back to full
        bundles once. If it fails part way, :attr:`last_applied` still lists what was applied
        (the store moved; the caller should reload it).
        """
        t0 = time.monotonic()
        applied: list[AppliedUpdate] = []
        self.last_applied = applied
        target = self.check()
        if target is None:
            return applied
        _, bundles = self._index or (None, [])
        delta_error: UpdateError | None = None
        while True:
            current = self.store.current_version
            if current is not None and current >= target:
                break
            plan = plan_updates(bundles, current, target, deltas=delta_error is None)
            if plan is None:
                why = f" ({delta_error})" if delta_error else ""
                raise UpdateError(
                    f"{self.base_url}: version {target} is offered but there is no full bundle "
                    f"and no usable delta chain from version {current}{why}"
                )
            try:
                for entry in plan:
                    applied.append(self._apply(entry))
            except UpdateError as exc:
                if delta_error is not None or entry.kind != "delta":
                    raise
                log.warning("%s; falling back to full bundles", exc)
                delta_error = exc
        self.last_update_seconds = time.monotonic() - t0
        return applied

    def _apply(self, entry: BundleEntry) -> AppliedUpdate:
        url = self.base_url + urllib.parse.quote(entry.name)
        _, _, data = self._get(url, {}, min(entry.size, MAX_BUNDLE_SIZE))
        if len(data) != entry.size or sha256_hex(data) != entry.sha256:
            raise UpdateError(
                f"{url}: download does not match the index (size or sha256); corrupted in transit?"
            )
        return self.store.apply(data, source=url)
