"""What the appliance reports about itself: the ``status`` reply, the Prometheus view, and the
:class:`Counters` every part of the appliance adds to.

Read-only over the facade's parts (nothing here changes state); the metrics registry reads the
counters at scrape time, so there is one set of books. The reply is built as the protocol's
:class:`~offscan.protocol.messages.StatusReport`, key by key, so the type checker holds it (and
:class:`Counters`) to the wire contract.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, cast

from .. import __version__
from ..metrics import Counter, Registry
from ..protocol import messages

if TYPE_CHECKING:
    from .facade import Appliance

Samples = Callable[[], dict[tuple[str, ...], float]]


@dataclass
class Counters:
    """The appliance's books, added to by every part; reported as the protocol's
    :class:`~offscan.protocol.messages.Counters` (see :meth:`message`)."""

    verdicts: int = 0
    contents_matched: int = 0
    served_identity: int = 0
    served_digest: int = 0
    served_clone: int = 0
    excluded: int = 0
    quarantined: int = 0
    action_failures: int = 0
    hook_runs: int = 0
    revalidations: int = 0
    revalidation_bytes: int = 0
    revalidation_seconds: float = 0.0
    revalidation_rescans: int = 0
    swaps: int = 0
    joined_in_flight: int = 0
    detections: int = 0
    errors: int = 0
    refused: int = 0
    bytes_read: int = 0
    bytes_matched: int = 0
    protocol_errors: int = 0

    def message(self) -> messages.Counters:
        """The counters as the wire has them, field by field in declaration order (what
        ``asdict`` gave): a counter the protocol loses or renames fails the type check here,
        and :data:`_UNREPORTED` refuses, at import, one that is kept but not reported."""
        return {
            "verdicts": self.verdicts,
            "contents_matched": self.contents_matched,
            "served_identity": self.served_identity,
            "served_digest": self.served_digest,
            "served_clone": self.served_clone,
            "excluded": self.excluded,
            "quarantined": self.quarantined,
            "action_failures": self.action_failures,
            "hook_runs": self.hook_runs,
            "revalidations": self.revalidations,
            "revalidation_bytes": self.revalidation_bytes,
            "revalidation_seconds": self.revalidation_seconds,
            "revalidation_rescans": self.revalidation_rescans,
            "swaps": self.swaps,
            "joined_in_flight": self.joined_in_flight,
            "detections": self.detections,
            "errors": self.errors,
            "refused": self.refused,
            "bytes_read": self.bytes_read,
            "bytes_matched": self.bytes_matched,
            "protocol_errors": self.protocol_errors,
        }


# The other direction of the contract (mypy cannot see it): every counter kept is reported.
_UNREPORTED = {f.name for f in fields(Counters)} ^ set(
    messages.Counters.__required_keys__ | messages.Counters.__optional_keys__
)
if _UNREPORTED:
    raise TypeError(f"Counters and protocol.messages.Counters disagree on {sorted(_UNREPORTED)}")


def status(app: Appliance) -> messages.StatusReport:
    """The reply to a ``status`` frame (and ``offscan status``), without its envelope."""
    c = app.counters
    served = c.served_identity + c.served_digest + c.served_clone
    lookups = served + c.contents_matched
    patterns = app.patterns
    source: messages.PatternsSource
    if patterns.store is not None:
        # PatternStore.status() is a plain dict; its keys are PatternsSource's (documented in
        # docs/protocol.md, checked against a real appliance by tests/test_messages.py).
        source = cast("messages.PatternsSource", patterns.store.status())
    else:
        source = {"databases": list(app.config.databases)}
    return {
        "appliance": app.appliance_id,
        "version": __version__,
        "uptime": round(app.clock.time() - app.started, 3),
        "pattern_version": app.pattern_version,
        "patterns": app.db.summary(),
        "native": app.matcher.native,
        "patterns_source": source,
        "update_error": patterns.update_error,
        "last_swap": patterns.last_swap,
        "locations": len(app.locations),
        "vms": [app.registry.describe(v) for v in app.inventory.vms.values()],
        "queue_depth": app.gate.waiting,
        "drain_rate": app.drain.rate(),
        "in_flight": app.gate.active,
        "connections": len(app.sessions),
        "served_from_cache": served,
        "hit_ratio": round(served / lookups, 4) if lookups else 0.0,
        "cache_entries": len(app.cache),
        "hot_hits": app.pipeline.hot.served,
        "recent_detections": app.verdicts.detections[-10:],
        "shared_cache": (
            cast("messages.SharedCacheStatus", app.shared.status()) if app.shared else None
        ),
        **c.message(),
    }


class CounterView(Counter):
    """A Prometheus counter whose samples are read from elsewhere when scraped."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str], read: Samples) -> None:
        super().__init__(name, help, labelnames)
        self._read = read

    def _samples(self) -> list[tuple[tuple[str, ...], float]]:
        return [(k, float(v)) for k, v in self._read().items()]


def _counter_views(app: Appliance) -> list[tuple[str, str, tuple[str, ...], Samples]]:
    """Every Prometheus counter as (name, help, labels, read): one table, one entry a metric,
    which is why it runs long."""
    c = app.counters
    kinds = app.pipeline.request_kinds
    return [
        (
            "offscan_requests_total",
            "Scan requests by kind (priority or stream).",
            ("kind",),
            lambda: {(k,): v for k, v in kinds.items()},
        ),
        (
            "offscan_contents_total",
            "Verdicts by how the content was judged: matched now or "
            "served from cache (identity memo, digest, clone inheritance, policy exclusion).",
            ("reason",),
            lambda: {
                ("matched",): c.contents_matched,
                ("identity",): c.served_identity,
                ("digest",): c.served_digest,
                ("clone",): c.served_clone,
                ("joined",): c.joined_in_flight,
                ("excluded",): c.excluded,
            },
        ),
        ("offscan_verdicts_total", "Verdicts sent.", (), lambda: {(): c.verdicts}),
        ("offscan_detections_total", "Infected verdicts.", (), lambda: {(): c.detections}),
        (
            "offscan_actions_total",
            "Actions taken on detections.",
            ("action",),
            lambda: {
                ("quarantine",): c.quarantined,
                ("failed",): c.action_failures,
                ("hook",): c.hook_runs,
            },
        ),
        (
            "offscan_bytes_read_total",
            "Bytes read from VM files (hashing and matching).",
            (),
            lambda: {(): c.bytes_read},
        ),
        (
            "offscan_bytes_matched_total",
            "Bytes run through the matcher.",
            (),
            lambda: {(): c.bytes_matched},
        ),
        (
            "offscan_refused_total",
            "Requests refused for leaving the VM root.",
            (),
            lambda: {(): c.refused},
        ),
        (
            "offscan_protocol_errors_total",
            "Connections closed for protocol errors.",
            (),
            lambda: {(): c.protocol_errors},
        ),
        (
            "offscan_revalidations_total",
            "Cached verdicts made current after a pattern update "
            "by matching the added signatures only.",
            (),
            lambda: {(): c.revalidations},
        ),
        (
            "offscan_revalidation_bytes_total",
            "Bytes read to revalidate cached verdicts.",
            (),
            lambda: {(): c.revalidation_bytes},
        ),
        (
            "offscan_revalidation_seconds_total",
            "Time spent revalidating cached verdicts.",
            (),
            lambda: {(): c.revalidation_seconds},
        ),
        ("offscan_pattern_swaps_total", "Pattern database swaps.", (), lambda: {(): c.swaps}),
    ]


def build_metrics(app: Appliance) -> Registry:
    """Prometheus view of the appliance: counters read from ``app.counters`` at scrape time
    (no second set of books), latency observed per verdict (it sets ``app.verdicts.latency``)."""
    reg = Registry()
    for name, help_, labels, read in _counter_views(app):
        reg.register(CounterView(name, help_, labels, read))
    gate = app.gate
    reg.gauge("offscan_queue_depth", "Requests waiting for admission.", fn=lambda: gate.waiting)
    reg.gauge("offscan_in_flight", "Requests being read or matched.", fn=lambda: gate.active)
    reg.gauge("offscan_vms", "Registered VMs.", fn=lambda: len(app.inventory.vms))
    reg.gauge("offscan_cache_entries", "Verdict cache entries.", fn=lambda: len(app.cache))
    shared = app.shared
    if shared is not None:  # the fleet's tier in Redis (docs/fleet.md)
        reg.register(
            CounterView(
                "offscan_shared_cache_total",
                "Shared verdict tier (Redis) events: hits, misses, forged entries, round trips...",
                ("event",),
                lambda: {(k,): v for k, v in shared.counts.items()},
            )
        )
        reg.gauge(
            "offscan_shared_cache_up",
            "Redis tier reachable (1) or not (0).",
            fn=lambda: int(shared.up),
        )
        reg.gauge(
            "offscan_shared_cache_outbox",
            "Verdicts waiting for Redis.",
            fn=lambda: shared.status()["outbox"],
        )
    app.verdicts.latency = reg.histogram("offscan_verdict_seconds", "Request to verdict latency.")
    return reg
