"""Counters, gauges and histograms in the Prometheus text format, and a tiny HTTP endpoint.

No dependency: the appliance needs a handful of series (events by kind, cache hits by reason,
verdict latency, queue depth, detections, bytes read) and one ``GET /metrics``. Metrics are
thread-safe (scans update them from the pool); :func:`start_metrics_server` serves them from
the event loop, answers garbage with 400 and never lets one client hold much memory.

Names follow Prometheus conventions and are used as given: call a counter ``..._total``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "Counter",
    "Gauge",
    "Histogram",
    "MetricsServer",
    "Registry",
    "start_metrics_server",
]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
MAX_REQUEST_HEAD = 8192  # bytes of request line + headers accepted from one client
MAX_HEADER_LINES = 100
REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request / read the answer
LINGER_TIME = 0.5  # seconds spent discarding input after an error answer
LINGER_BYTES = 1 << 20  # bytes discarded at most
MAX_CONNECTIONS = 64  # concurrent clients; more are closed at once

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

LabelKey = tuple[str, ...]
_M = TypeVar("_M", bound="_Metric")


def _fmt(value: float) -> str:
    """A sample value as Prometheus parses it (Go's ParseFloat: ``+Inf``, ``NaN``, ``1e-05``)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


class _Metric:
    """Name, help, label names and a lock; subclasses keep one value per label set."""

    kind = "untyped"
    _reserved_labels: frozenset[str] = frozenset()

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"invalid metric name {name!r}")
        names = tuple(labelnames)
        for label in names:
            if not _LABEL_RE.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"metric {name}: invalid label name {label!r}")
            if label in self._reserved_labels:
                raise ValueError(f"metric {name}: label name {label!r} is reserved")
        if len(set(names)) != len(names):
            raise ValueError(f"metric {name}: duplicate label names {names}")
        self.name = name
        self.help = help
        self.labelnames = names
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, object]) -> LabelKey:
        if labels.keys() != set(self.labelnames):
            raise ValueError(
                f"metric {self.name}: labels {sorted(labels)} do not match {list(self.labelnames)}"
            )
        return tuple(str(labels[n]) for n in self.labelnames)

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def render_lines(self) -> list[str]:
        raise NotImplementedError


class _Valued(_Metric):
    """A metric with one float per label set (counter, gauge)."""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[LabelKey, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0  # an unlabelled series exists from the start

    def value(self, **labels: object) -> float:
        """The current value for these labels (0 if never touched)."""
        key = self._key(labels)
        with self._lock:
            return self._values.get(key, 0.0)

    def _add(self, amount: float, labels: dict[str, object]) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def _samples(self) -> list[tuple[LabelKey, float]]:
        with self._lock:
            return list(self._values.items())

    def render_lines(self) -> list[str]:
        lines = self._header()
        for key, value in self._samples():
            lines.append(f"{self.name}{_labels_text(self.labelnames, key)} {_fmt(value)}")
        return lines


class Counter(_Valued):
    """A monotonically increasing count, optionally split by labels:
    ``Counter("offscan_events_total", "File events.", labelnames=("kind",)).inc(kind="create")``."""

    kind = "counter"

    def inc(self, amount: float = 1, **labels: object) -> None:
        """Add ``amount`` (>= 0) to the series named by ``labels``."""
        if not amount >= 0:  # also refuses NaN
            raise ValueError(f"counter {self.name} can only go up (got {amount!r})")
        self._add(amount, labels)


class Gauge(_Valued):
    """A value that goes up and down; or, with ``fn``, read from a callback at every render
    (``Gauge("offscan_queue_depth", "Queued requests.", fn=lambda: len(queue))``)."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        *,
        fn: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(name, help, labelnames)
        if fn is not None and self.labelnames:
            raise ValueError(f"gauge {name}: a callback gauge has no labels")
        self.fn = fn

    def set(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def inc(self, amount: float = 1, **labels: object) -> None:
        self._add(amount, labels)

    def dec(self, amount: float = 1, **labels: object) -> None:
        self._add(-amount, labels)

    def value(self, **labels: object) -> float:
        if self.fn is not None:
            self._key(labels)
            return float(self.fn())
        return super().value(**labels)

    def _samples(self) -> list[tuple[LabelKey, float]]:
        if self.fn is None:
            return super()._samples()
        try:
            return [((), float(self.fn()))]
        except Exception:  # a failing callback must not break the whole page
            log.warning("metrics: gauge %s callback failed", self.name, exc_info=True)
            return []


class _Series:
    __slots__ = ("count", "counts", "max", "min", "sum")

    def __init__(self, nbuckets: int) -> None:
        self.counts = [0] * nbuckets  # per bucket, not cumulative; the last one is +Inf
        self.sum = 0.0
        self.count = 0
        self.min = math.inf
        self.max = -math.inf


class Histogram(_Metric):
    """Observations counted into buckets (``le`` upper bounds, cumulative on the page, plus
    ``+Inf``), with ``_sum`` and ``_count``; :meth:`quantile` estimates percentiles for reports."""

    kind = "histogram"
    _reserved_labels = frozenset({"le", "times"})  # times: observe()'s count

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help, labelnames)
        bounds = [float(b) for b in buckets]
        if bounds and math.isinf(bounds[-1]) and bounds[-1] > 0:
            bounds.pop()  # +Inf is always there
        if not bounds or any(math.isnan(b) or math.isinf(b) for b in bounds):
            raise ValueError(f"histogram {name}: buckets must be finite numbers")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"histogram {name}: buckets must be strictly increasing")
        self.buckets = tuple(bounds)
        self._series: dict[LabelKey, _Series] = {}
        if not self.labelnames:
            self._series[()] = _Series(len(self.buckets) + 1)

    def observe(self, value: float, times: int = 1, **labels: object) -> None:
        """Count one observation (e.g. a latency in seconds), or ``times`` equal ones at
        once (a batch whose verdicts share a latency: one call, one lock)."""
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"histogram {self.name}: cannot observe NaN")
        if times < 1:
            if times == 0:
                return
            raise ValueError(f"histogram {self.name}: cannot observe {times} times")
        key = self._key(labels)
        slot = bisect.bisect_left(self.buckets, value)  # first bucket with value <= le
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(len(self.buckets) + 1)
            series.counts[slot] += times
            series.sum += value * times
            series.count += times
            series.min = min(series.min, value)
            series.max = max(series.max, value)

    def count(self, **labels: object) -> int:
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            return series.count if series else 0

    def sum(self, **labels: object) -> float:
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            return series.sum if series else 0.0

    def quantile(self, q: float, **labels: object) -> float:
        """Approximate ``q``-quantile (0..1) by linear interpolation inside the bucket that
        holds it, as PromQL's ``histogram_quantile`` does, clamped to the observed min and max.
        NaN when nothing was observed."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1], got {q!r}")
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            if series is None or series.count == 0:
                return math.nan
            counts, total = list(series.counts), series.count
            lo_seen, hi_seen = series.min, series.max
        rank = q * total
        cumulative = 0
        estimate = hi_seen
        for i, n in enumerate(counts):
            if n and cumulative + n >= rank:
                if i == len(self.buckets):  # the +Inf bucket: the best bound is the largest seen
                    estimate = hi_seen
                    break
                upper = self.buckets[i]
                lower = self.buckets[i - 1] if i else min(0.0, lo_seen)
                estimate = lower + (upper - lower) * ((rank - cumulative) / n)
                break
            cumulative += n
        return min(max(estimate, lo_seen), hi_seen)

    def render_lines(self) -> list[str]:
        lines = self._header()
        with self._lock:
            snapshot = [(k, list(s.counts), s.sum, s.count) for k, s in self._series.items()]
        names = (*self.labelnames, "le")
        bounds = [*(_fmt(b) for b in self.buckets), "+Inf"]
        for key, counts, total, count in snapshot:
            cumulative = 0
            for le, n in zip(bounds, counts, strict=True):
                cumulative += n
                labels = _labels_text(names, (*key, le))
                lines.append(f"{self.name}_bucket{labels} {_fmt(cumulative)}")
            plain = _labels_text(self.labelnames, key)
            lines.append(f"{self.name}_sum{plain} {_fmt(total)}")
            lines.append(f"{self.name}_count{plain} {_fmt(count)}")
        return lines


class Registry:
    """The metrics of one process, rendered together. ``counter``/``gauge``/``histogram``
    create a metric or return the existing one of that name (same type and labels)."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, help: str, labelnames: Iterable[str] = ()) -> Counter:
        return self._get_or_create(Counter, name, help, tuple(labelnames))

    def gauge(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        *,
        fn: Callable[[], float] | None = None,
    ) -> Gauge:
        gauge = self._get_or_create(Gauge, name, help, tuple(labelnames), fn=fn)
        if fn is not None:
            gauge.fn = fn  # the newest callback wins (e.g. a restarted queue)
        return gauge

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        hist = self._get_or_create(Histogram, name, help, tuple(labelnames), buckets=buckets)
        if hist.buckets != Histogram(name, help, labelnames, buckets=buckets).buckets:
            raise ValueError(f"histogram {name} already exists with other buckets")
        return hist

    def register(self, metric: _Metric) -> None:
        """Add a metric made elsewhere; ValueError if its name is taken."""
        with self._lock:
            self._check_names_free(metric)
            self._metrics[metric.name] = metric

    def get(self, name: str) -> _Metric | None:
        with self._lock:
            return self._metrics.get(name)

    def render(self) -> str:
        """All metrics in the Prometheus text exposition format 0.0.4."""
        with self._lock:
            metrics = list(self._metrics.values())
        lines: list[str] = []
        for metric in metrics:
            lines.extend(metric.render_lines())
        return "\n".join(lines) + "\n" if lines else ""

    def _get_or_create(
        self, cls: type[_M], name: str, help: str, labelnames: LabelKey, **kw: Any
    ) -> _M:
        with self._lock:
            existing = self._metrics.get(name)
            if existing is not None:
                if not isinstance(existing, cls) or existing.labelnames != labelnames:
                    raise ValueError(
                        f"metric {name} already exists as a {existing.kind} with labels "
                        f"{list(existing.labelnames)}"
                    )
                return existing
            metric = cls(name, help, labelnames, **kw)
            self._check_names_free(metric)
            self._metrics[name] = metric
            return metric

    def _check_names_free(self, metric: _Metric) -> None:
        # A histogram "x" owns x_bucket, x_sum and x_count: no other metric may take them.
        def owned(m: _Metric) -> set[str]:
            if isinstance(m, Histogram):
                return {m.name, f"{m.name}_bucket", f"{m.name}_sum", f"{m.name}_count"}
            return {m.name}

        mine = owned(metric)
        for other in self._metrics.values():
            if mine & owned(other):
                raise ValueError(f"metric name {metric.name} clashes with {other.name}")


# -- the HTTP endpoint ------------------------------------------------------------------------

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class MetricsServer:
    """The running ``/metrics`` endpoint; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.host = ""
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def _start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST_HEAD)
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]

    def close(self) -> None:
        """Stop accepting and drop clients still connected."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if len(self._handlers) > MAX_CONNECTIONS:
                await self._respond(writer, 503, b"too many connections\n", head_only=False)
                await _linger(reader, writer)
                return
            try:
                method, target = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT)
            except _BadRequest as exc:
                await self._respond(writer, exc.status, b"bad request\n", head_only=False)
                await _linger(reader, writer)
                return
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            path = target.split("?", 1)[0]
            if path != "/metrics":
                await self._respond(writer, 404, b"not found; try /metrics\n", head_only=False)
            elif method not in ("GET", "HEAD"):
                await self._respond(
                    writer, 405, b"use GET\n", head_only=False, extra="Allow: GET, HEAD\r\n"
                )
            else:
                body = self.registry.render().encode()
                await self._respond(
                    writer, 200, body, head_only=method == "HEAD", content_type=CONTENT_TYPE
                )
        except asyncio.CancelledError:
            pass  # closing: drop the client
        except Exception:  # never let one client take the endpoint down
            log.warning("metrics endpoint: request failed", exc_info=True)
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        *,
        head_only: bool,
        content_type: str = "text/plain; charset=utf-8",
        extra: str = "",
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n"
        )
        writer.write(head.encode("ascii") + (b"" if head_only else body))
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close and discard what the client still sends (bounded), so that closing with
    unread input does not reset the connection before the client has read our answer."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER_TIME
        discarded = 0
        while discarded < LINGER_BYTES and (left := deadline - loop.time()) > 0:
            chunk = await asyncio.wait_for(reader.read(65536), left)
            if not chunk:
                break
            discarded += len(chunk)


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The method and target of one HTTP/1.x request; its headers are read and ignored."""
    total = 0
    lines = 0
    request_line = b""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise _BadRequest(431) from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial or request_line:
                raise _BadRequest(400) from None
            raise
        total += len(line)
        lines += 1
        if total > MAX_REQUEST_HEAD or lines > MAX_HEADER_LINES:
            raise _BadRequest(431)
        if not request_line:
            if line in (b"\r\n", b"\n"):  # tolerated blank lines before a request (RFC 9112)
                continue
            request_line = line
            continue
        if line in (b"\r\n", b"\n"):
            break
    try:
        text = request_line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise _BadRequest(400) from None
    parts = text.split(" ")
    if len(parts) != 3:
        raise _BadRequest(400)
    method, target, version = parts
    if (
        not method.isalpha()
        or not method.isupper()
        or not target.startswith("/")
        or version not in ("HTTP/1.0", "HTTP/1.1")
    ):
        raise _BadRequest(400)
    return method, target


async def start_metrics_server(registry: Registry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0 picks a free one, see
    ``.port``); stop it with ``close()`` and ``await wait_closed()``."""
    server = MetricsServer(registry)
    await server._start(host, port)
    return server
