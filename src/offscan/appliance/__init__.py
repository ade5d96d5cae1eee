"""The appliance (``offscan serve``): one scanner per host serving every VM's shim, split one
module per concern: :mod:`.config` (serve options), :mod:`.facade` (the :class:`Appliance`:
wiring and lifecycle), :mod:`.session` (one client connection), :mod:`.registry` and
:mod:`.inventory` (VMs), :mod:`.pipeline` (admission → identity memo → digest → verdict cache →
single-flight → matcher), :mod:`.patterns` (engine swaps, revalidation, updates),
:mod:`.verdicts` (verdict records, event log), :mod:`.actions` (what a detection triggers),
:mod:`.control` (operator commands), :mod:`.status` (status reply, metrics, counters) and
:mod:`.common` (what they all share). This module only re-exports; it touches nothing.
"""

from __future__ import annotations

from .actions import Actions, threat_level
from .common import SYSTEM_CLOCK, Clock, RequestFailed, SystemClock
from .config import DEFAULT_CONCURRENCY, DEFAULT_CREDITS, ApplianceConfig, ApplianceOptions
from .control import HANDLERS, Command
from .facade import Appliance, serve
from .inventory import Inventory, LocationIndex, VMRecord
from .patterns import Engine, Patterns, Revalidation
from .pipeline import PRIORITIES, Pipeline, PriorityGate
from .registry import Registry
from .session import HANDSHAKE_TIMEOUT, STREAM_QUEUE_CHUNKS, Session
from .status import Counters
from .verdicts import RECENT_DETECTIONS, EventLog, Verdicts

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_CREDITS",
    "HANDLERS",
    "HANDSHAKE_TIMEOUT",
    "PRIORITIES",
    "RECENT_DETECTIONS",
    "STREAM_QUEUE_CHUNKS",
    "SYSTEM_CLOCK",
    "Actions",
    "Appliance",
    "ApplianceConfig",
    "ApplianceOptions",
    "Clock",
    "Command",
    "Counters",
    "Engine",
    "EventLog",
    "Inventory",
    "LocationIndex",
    "Patterns",
    "Pipeline",
    "PriorityGate",
    "Registry",
    "RequestFailed",
    "Revalidation",
    "Session",
    "SystemClock",
    "VMRecord",
    "Verdicts",
    "serve",
    "threat_level",
]
