"""The wire contracts as types: every message's fields, the enumerations and the limits.

Messages are msgpack maps on the wire and plain dicts in Python; the ``TypedDict``\\ s here
name their shapes so callers can be annotated with no behaviour change (a TypedDict is a
dict at run time). This is the one place the shapes are written down in code: the validation
tables (:mod:`.validation`) and the tables in ``docs/protocol.md`` must agree with these
types, and ``tests/test_messages.py`` checks that they do, field by field, value by value.
This module imports nothing from the package and touches nothing: it is data.

It deliberately does not use ``from __future__ import annotations``: on Python 3.11 a
``TypedDict`` only sees ``NotRequired`` in evaluated annotations, and the required/optional
split (``__required_keys__``) is part of the contract the tests compare.
"""

from typing import Any, Literal, NotRequired, TypedDict, get_args

__all__ = [
    "DEAD_AFTER_HEARTBEATS",
    "DEFAULT_HEARTBEAT",
    "ENVELOPE_FIELDS",
    "ERROR_CODES",
    "MAX_BATCH",
    "MAX_CHUNK",
    "MAX_FDS_PER_FRAME",
    "MAX_FRAME",
    "MESSAGES",
    "PRIORITIES",
    "PROTOCOL_VERSION",
    "SCAN_MODES",
    "SHIM_VERDICT_SOURCES",
    "VERDICT_ACTIONS",
    "VERDICT_SOURCES",
    "VERDICT_STATUSES",
    "ApplianceStatus",
    "ApplianceVerdictSource",
    "BatchScan",
    "BatchVerdict",
    "Bye",
    "Chunk",
    "Control",
    "ControlOp",
    "Counters",
    "Credit",
    "Detection",
    "ErrorCode",
    "ErrorMessage",
    "FdScanRequest",
    "Hello",
    "LocalVerdict",
    "MessageType",
    "Ok",
    "PathScanRequest",
    "PatternSwap",
    "PatternsSource",
    "Ping",
    "PolicyUpdate",
    "Adopt",
    "Pong",
    "PreventionStats",
    "Priority",
    "Register",
    "Report",
    "ScanBatch",
    "ScanMode",
    "ScanRequest",
    "SharedCacheStatus",
    "ShimVerdict",
    "ShimVerdictSource",
    "StatusReport",
    "StatusRequest",
    "StreamScanRequest",
    "Unregister",
    "VMInfo",
    "Verdict",
    "VerdictAction",
    "VerdictBatch",
    "VerdictRecord",
    "VerdictSource",
    "VerdictStatus",
    "Welcome",
]

# -- limits ---------------------------------------------------------------------------------

PROTOCOL_VERSION = 1
MAX_FRAME = 4 << 20  # bytes of msgpack payload in one frame
MAX_CHUNK = 256 << 10  # bytes of content per chunk frame
DEFAULT_HEARTBEAT = 5.0  # seconds
MAX_FDS_PER_FRAME = 8  # descriptors one frame may carry (a scan carries exactly one)
DEAD_AFTER_HEARTBEATS = 3  # silence of this many heartbeats means the peer is gone
MAX_BATCH = 1024  # scans one scan-batch frame may carry (each still takes one credit)

# -- enumerations ---------------------------------------------------------------------------

MessageType = Literal[
    "hello",
    "welcome",
    "ping",
    "pong",
    "error",
    "register",
    "unregister",
    "scan",
    "chunk",
    "status",
    "bye",
    "control",
    "credit",
    "ok",
    "verdict",
    "report",
    "scan-batch",
    "verdict-batch",
    "policy",
    "adopt",
]

# What an ``error`` frame's ``code`` says. Senders use these; receivers accept any string, so
# a newer peer's code does not break an older one.
ErrorCode = Literal[
    "malformed",  # bad frame or field (also a request the appliance finds nonsensical)
    "oversized",  # frame over MAX_FRAME, chunk over MAX_CHUNK
    "sequence",  # out-of-order frame: no hello first, chunk for an unknown stream, duplicate id
    "version",  # protocol version not spoken
    "auth",  # bad or missing shared secret on a TCP listener
    "backpressure",  # more scans outstanding than credits granted
    "unknown-vm",  # no such VM, or it belongs to another shim
    "conflict",  # the VM (or clone name) belongs to another shim / already exists
    "confined",  # the path escapes the VM root
    "refused",  # an operator command declined, state unchanged (bad reload, vault refusal)
    "unsupported",  # a mode, message type or command this appliance does not do
    "internal",  # the appliance failed; the connection stays up
]
ScanMode = Literal["path", "fd", "stream"]
Priority = Literal["access", "demand"]
VerdictStatus = Literal["clean", "infected", "error"]
VerdictAction = Literal["allow", "deny"]
# How the appliance reached a verdict: matched now, or served without matching.
ApplianceVerdictSource = Literal["scan", "identity", "digest", "clone", "excluded", "revalidated"]
# A verdict the shim made up itself when a request failed (never on the wire).
ShimVerdictSource = Literal["shim"]
VerdictSource = Literal[ApplianceVerdictSource, ShimVerdictSource]
# ``control`` operations (``offscan vm|policy|quarantine|reload``).
ControlOp = Literal[
    "reload",
    "vm-list",
    "vm-show",
    "vm-unregister",
    "vm-untag",
    "vm-clone",
    "policy-set",
    "policy-unset",
    "quarantine-list",
    "quarantine-restore",
    "quarantine-delete",
]

ERROR_CODES: frozenset[str] = frozenset(get_args(ErrorCode))
SCAN_MODES: tuple[ScanMode, ...] = get_args(ScanMode)
PRIORITIES: tuple[Priority, ...] = get_args(Priority)
VERDICT_STATUSES: tuple[VerdictStatus, ...] = get_args(VerdictStatus)
VERDICT_ACTIONS: tuple[VerdictAction, ...] = get_args(VerdictAction)
# Sources an appliance may send (what validation accepts); the shim's own come on top.
VERDICT_SOURCES: tuple[ApplianceVerdictSource, ...] = get_args(ApplianceVerdictSource)
SHIM_VERDICT_SOURCES: tuple[ShimVerdictSource, ...] = get_args(ShimVerdictSource)

# Fields any frame may carry, checked by ``validate`` itself rather than a per-type table:
# the type, and how many descriptors ride along (only a scan in fd mode carries one).
ENVELOPE_FIELDS = frozenset({"t", "fds"})

# -- handshake and either direction ---------------------------------------------------------


class Hello(TypedDict):
    """Client → appliance, first frame."""

    t: Literal["hello"]
    v: int
    shim: str
    secret: NotRequired[str | None]  # required on TCP listeners, ignored on the unix socket


class Welcome(TypedDict):
    """Appliance → client, the answer to ``hello``."""

    t: Literal["welcome"]
    v: int
    appliance: str
    credits: int
    heartbeat: float
    pattern_version: NotRequired[str | None]
    batch: NotRequired[int | None]  # most scans per scan-batch; absent: no batches


class Ping(TypedDict):
    t: Literal["ping"]
    id: int


class Pong(TypedDict):
    t: Literal["pong"]
    id: int


class ErrorMessage(TypedDict):
    """With an ``id`` it fails that request only; without, it is fatal."""

    t: Literal["error"]
    code: str  # an ErrorCode from us; any string from a peer
    message: str
    id: NotRequired[int | None]


class Bye(TypedDict):
    t: Literal["bye"]
    id: NotRequired[int | None]


# -- client → appliance ---------------------------------------------------------------------


class Register(TypedDict):
    t: Literal["register"]
    id: int
    vm: str
    root: str
    policy: NotRequired[dict[str, Any] | None]
    clone_of: NotRequired[str | None]


class Unregister(TypedDict):
    t: Literal["unregister"]
    id: int
    vm: str


class PathScanRequest(TypedDict):
    """The appliance opens ``root/path`` itself, confined to the VM root."""

    t: Literal["scan"]
    id: int
    vm: str
    path: str
    mode: Literal["path"]
    prio: NotRequired[Priority]
    size: NotRequired[int | None]


class FdScanRequest(TypedDict):
    """The shim passes an open descriptor (unix socket only)."""

    t: Literal["scan"]
    id: int
    vm: str
    path: str
    mode: Literal["fd"]
    prio: NotRequired[Priority]
    size: NotRequired[int | None]
    fds: NotRequired[Literal[1]]  # set by Connection.send when the descriptor is attached


class StreamScanRequest(TypedDict):
    """The content follows in ``chunk`` frames; ``size`` is its length."""

    t: Literal["scan"]
    id: int
    vm: str
    path: str
    mode: Literal["stream"]
    prio: NotRequired[Priority]
    size: int


ScanRequest = PathScanRequest | FdScanRequest | StreamScanRequest


class BatchScan(TypedDict):
    """One scan inside a ``scan-batch``: a ``scan`` in ``path`` or ``fd`` mode without its
    envelope. It holds one credit until its own reply (in a ``verdict-batch`` or an
    ``error`` with its ``id``) arrives."""

    id: int
    vm: str
    path: str
    mode: Literal["path", "fd"]
    prio: NotRequired[Priority]
    size: NotRequired[int | None]


class ScanBatch(TypedDict):
    """Many scans in one frame (what a shim sends whenever more than one event is ready);
    the fd-mode ones' descriptors ride along in order (``fds``, at most MAX_FDS_PER_FRAME)."""

    t: Literal["scan-batch"]
    scans: list[BatchScan]


class Chunk(TypedDict):
    t: Literal["chunk"]
    id: int
    data: bytes  # at most MAX_CHUNK
    end: bool


class PreventionStats(TypedDict):
    """One VM's on-access prevention as its shim reports it (``report.vms``, ``VMInfo``)."""

    enabled: bool  # opens are held (False: watch mode only)
    mode: str  # "mount", "directories" or "watch"
    reason: str | None  # why prevention is not on, when it was asked for
    held: int  # opens held right now, waiting for a verdict
    allowed: int
    denied: int
    timeouts: int  # answered by the fail mode after the timeout
    unreachable: int  # answered by the fail mode: no appliance
    memo_hits: int  # answered from the shim's identity memo, no round trip
    exempt: int  # the shim's and the appliance's own opens, never held


class Report(TypedDict):
    """Client → appliance: the shim's on-access counters per VM; answered by ``ok`` with
    ``pattern_version`` (the shim drops its identity memo when that changes)."""

    t: Literal["report"]
    id: int
    vms: dict[str, PreventionStats]


class StatusRequest(TypedDict):
    t: Literal["status"]
    id: int


class Control(TypedDict):
    """An operator command; answered by ``ok`` with the command's own keys, or ``error``."""

    t: Literal["control"]
    id: int
    op: str  # a ControlOp; an unknown one is answered with ``unsupported``
    args: NotRequired[dict[str, Any] | None]


# -- appliance → client ---------------------------------------------------------------------


class Credit(TypedDict):
    t: Literal["credit"]
    n: int


class PolicyUpdate(TypedDict):
    """Appliance → the shim that owns ``vm``, unasked: the operator changed the VM's policy
    (``offscan policy set``); ``policy`` is the new effective one (its ``fail_mode``...)."""

    t: Literal["policy"]
    vm: str
    policy: dict[str, Any]


class Adopt(TypedDict):
    """Appliance → the shim that owns ``clone_of``, unasked: the operator cloned it
    (``offscan vm clone``); the shim starts protecting the clone at once."""

    t: Literal["adopt"]
    vm: str
    root: str
    clone_of: str


class Ok(TypedDict):
    """Plus whatever the request reports (``register``: ``vm``, ``root``, ``policy``)."""

    t: Literal["ok"]
    id: int


class Verdict(TypedDict):
    """The answer to a ``scan``. The appliance always sends every field but the last two,
    which it adds after acting on a detection."""

    t: Literal["verdict"]
    id: int
    vm: str
    path: str
    status: VerdictStatus
    action: VerdictAction
    matches: NotRequired[list[str]]
    reason: NotRequired[str | None]
    source: NotRequired[VerdictSource]
    digest: NotRequired[str | None]  # hex SHA-256 of the content
    pattern_version: NotRequired[str | None]
    quarantine_id: NotRequired[str]  # the file was moved into the quarantine vault
    action_errors: NotRequired[list[str]]  # actions that failed before the one taken


class BatchVerdict(TypedDict):
    """One verdict inside a ``verdict-batch``: a :class:`Verdict` without its envelope."""

    id: int
    vm: str
    path: str
    status: VerdictStatus
    action: VerdictAction
    matches: NotRequired[list[str]]
    reason: NotRequired[str | None]
    source: NotRequired[ApplianceVerdictSource]
    digest: NotRequired[str | None]
    pattern_version: NotRequired[str | None]
    quarantine_id: NotRequired[str]
    action_errors: NotRequired[list[str]]


class VerdictBatch(TypedDict):
    """Verdicts for scans of ``scan-batch`` frames, in any order and any grouping; a scan
    that failed is answered by an ``error`` frame with its ``id`` instead."""

    t: Literal["verdict-batch"]
    verdicts: list[BatchVerdict]


class VerdictRecord(TypedDict):
    """A verdict as the appliance makes it: a :class:`Verdict` without its envelope (``t``,
    ``id``), as written to the event log and spread into the ``verdict`` reply. Stricter than
    :class:`Verdict` (which a shim reads leniently): every field but the last two is always
    there. Not a message; building the reply from it (``{"t": "verdict", "id": rid,
    **record}`` typed as :class:`Verdict`) lets the type checker hold the two together."""

    vm: str
    path: str
    status: VerdictStatus
    matches: list[str]
    reason: str | None
    action: VerdictAction
    source: ApplianceVerdictSource
    digest: str | None
    pattern_version: str
    quarantine_id: NotRequired[str]
    action_errors: NotRequired[list[str]]


class ShimVerdict(TypedDict):
    """The verdict a shim makes up when a request failed (never on the wire, so no ``id``):
    an error, the file allowed, ``source`` ``"shim"``; ``reason`` says what failed."""

    t: Literal["verdict"]
    vm: str
    path: str
    status: Literal["error"]
    matches: list[str]  # always empty
    reason: str
    action: Literal["allow"]
    source: ShimVerdictSource
    digest: None


# What a shim reports for a file (its ``on_verdict`` callback): the appliance's verdict, or
# the one it made up itself. ``source`` (or ``"id" in v``) tells them apart.
LocalVerdict = Verdict | ShimVerdict


class Counters(TypedDict):
    """The appliance's counters since it started, flat in the ``status`` reply."""

    verdicts: int
    contents_matched: int
    served_identity: int
    served_digest: int
    served_clone: int
    excluded: int
    quarantined: int
    action_failures: int
    hook_runs: int
    revalidations: int
    revalidation_bytes: int
    revalidation_seconds: float
    revalidation_rescans: int
    swaps: int
    joined_in_flight: int
    detections: int
    errors: int
    refused: int
    bytes_read: int
    bytes_matched: int
    protocol_errors: int


class VMInfo(TypedDict):
    """A registered VM, as ``status.vms``, ``vm-list`` and ``vm-show`` report it."""

    name: str
    root: str
    owner: str | None  # the shim that registered it; None: unclaimed (a fresh clone)
    policy: dict[str, Any]  # the effective policy
    clone_of: str | None
    tags: list[str]
    registered_at: float
    clones: NotRequired[list[str]]  # vm-list and vm-show only
    prevention: NotRequired[PreventionStats]  # the owning shim's last report, if any


class Detection(TypedDict):
    """One of ``status.recent_detections``."""

    time: float
    vm: str
    path: str
    matches: list[str]
    action: VerdictAction
    quarantine_id: NotRequired[str]
    action_errors: NotRequired[list[str]]


class PatternsSource(TypedDict, total=False):
    """Where the patterns come from: ``databases`` (files given with ``-d``), or the signed
    pattern store's state (every other key)."""

    databases: list[str]
    version: int | None
    kind: str | None  # "full" or "delta"
    files: dict[str, int]
    signatures: int
    created: str | None  # ISO 8601, UTC
    fetched_from: str | None
    fetched_at: float | None
    signer: str | None


# The last pattern database swap, as ``status.last_swap`` reports it. "from" is a keyword:
# the functional syntax is the only way to spell this one.
PatternSwap = TypedDict(
    "PatternSwap",
    {
        "from": str,
        "to": str,
        "time": float,
        "compile_seconds": float,
        "rss_before": int,
        "rss_peak_during": int,
        "added": int | None,
        "removed": int,
    },
)


class SharedCacheStatus(TypedDict):
    """``status.shared_cache``: the fleet's verdict tier in Redis (docs/fleet.md), its health
    and its books since the appliance started."""

    url: str  # password redacted
    state: Literal["up", "down"]
    last_error: str | None
    outbox: int  # verdicts waiting to be written to Redis
    ttl: float  # seconds an entry lives
    hits: int
    misses: int
    skipped: int  # lookups answered "unknown" at once because Redis was down
    forged: int  # entries ignored because the fleet key did not sign them
    round_trips: int
    keys_looked_up: int
    writes: int
    dropped: int  # verdicts the full outbox dropped during an outage (kept in L1)
    oversize: int  # verdicts too big to share (kept in L1)
    locks_won: int
    lock_waits: int
    served_by_peer: int  # waited for another appliance's verdict and got it
    takeovers: int  # a lock expired without a verdict and this appliance took over
    outages: int
    errors: int


class StatusReport(Counters):
    """The ``status`` reply without its envelope (``t``, ``id``): what the appliance reports
    about itself in process (``Appliance.status()``, an agent's status file). Not a message:
    :class:`ApplianceStatus` is this plus the envelope."""

    appliance: str
    version: str  # the offscan package version (the protocol's is welcome.v)
    uptime: float
    pattern_version: str
    patterns: str  # a one-line summary of the database
    native: bool  # the native matcher is in use
    patterns_source: PatternsSource
    update_error: str | None
    last_swap: PatternSwap | None
    locations: int
    vms: list[VMInfo]
    queue_depth: int
    drain_rate: float  # verdicts per second over the last 10 s
    in_flight: int
    connections: int
    served_from_cache: int
    hit_ratio: float
    cache_entries: int
    hot_hits: int  # clean hits answered by the hot table (appliance/hot.py)
    recent_detections: list[Detection]
    shared_cache: SharedCacheStatus | None  # None: no --cache-redis


class ApplianceStatus(StatusReport):
    """The ``status`` reply: what ``offscan status`` prints (informational, not validated
    beyond ``id``). Its fields are :class:`StatusReport`'s (counters spread flat) and these."""

    t: Literal["status"]
    id: int


# Every message type and the TypedDicts it may take (a scan has three modes; ``status`` is
# both the request and its reply). Nested shapes (Counters, VMInfo...) are reached from these.
MESSAGES: dict[MessageType, tuple[type, ...]] = {
    "hello": (Hello,),
    "welcome": (Welcome,),
    "ping": (Ping,),
    "pong": (Pong,),
    "error": (ErrorMessage,),
    "register": (Register,),
    "unregister": (Unregister,),
    "scan": (PathScanRequest, FdScanRequest, StreamScanRequest),
    "chunk": (Chunk,),
    "status": (StatusRequest, ApplianceStatus),
    "bye": (Bye,),
    "control": (Control,),
    "credit": (Credit,),
    "ok": (Ok,),
    "verdict": (Verdict,),
    "report": (Report,),
    "scan-batch": (ScanBatch,),
    "verdict-batch": (VerdictBatch,),
    "policy": (PolicyUpdate,),
    "adopt": (Adopt,),
}
