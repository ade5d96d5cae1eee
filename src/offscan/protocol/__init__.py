"""The shim ⇄ appliance wire protocol: framing, validation, connections, servers and the client.

Length-prefixed msgpack frames on one persistent stream connection (unix socket on the host,
or TCP to a remote appliance), multiplexed by request id; file descriptors ride along as
``SCM_RIGHTS`` on unix sockets. The rules (message types, fields, error codes) are in
``docs/protocol.md``; this package is their executable form:

- :mod:`.messages`: the contracts as types (a ``TypedDict`` per message, ``Literal`` enums,
  the limits);
- :mod:`.errors`: the exceptions;
- :mod:`.validation` and :mod:`.framing`: checking messages, and the codec;
- :mod:`.address`: ``unix:/path`` / ``host:port`` parsing;
- :mod:`.connection`, :mod:`.server`, :mod:`.client`: the asyncio transport on both sides
  (:mod:`.chunks`: a stream scan's content, read as chunks);

This module only re-exports: every name that used to live in ``offscan/protocol.py`` is
still importable from ``offscan.protocol``.
"""

from __future__ import annotations

import logging

from .address import ADMIN_SUFFIX, Address, admin_socket_for, parse_address
from .chunks import STREAM_PREFETCH
from .chunks import _remaining as _remaining
from .client import ApplianceClient, BatchItem
from .client import _Pending as _Pending
from .connection import MAX_PENDING_FD_BATCHES, RECV_SIZE, Connection, connect
from .connection import _close_fds as _close_fds
from .connection import _FdBatch as _FdBatch
from .connection import _wake as _wake
from .errors import ConnectionClosed, ProtocolError, RequestError
from .framing import HEADER, pack, unpack
from .messages import (
    DEAD_AFTER_HEARTBEATS,
    DEFAULT_HEARTBEAT,
    ENVELOPE_FIELDS,
    ERROR_CODES,
    MAX_BATCH,
    MAX_CHUNK,
    MAX_FDS_PER_FRAME,
    MAX_FRAME,
    MESSAGES,
    PRIORITIES,
    PROTOCOL_VERSION,
    SCAN_MODES,
    SHIM_VERDICT_SOURCES,
    VERDICT_ACTIONS,
    VERDICT_SOURCES,
    VERDICT_STATUSES,
    Adopt,
    ApplianceStatus,
    ApplianceVerdictSource,
    BatchScan,
    BatchVerdict,
    Bye,
    Chunk,
    Control,
    ControlOp,
    Counters,
    Credit,
    Detection,
    ErrorCode,
    ErrorMessage,
    FdScanRequest,
    Hello,
    MessageType,
    Ok,
    PathScanRequest,
    PatternsSource,
    PatternSwap,
    Ping,
    PolicyUpdate,
    Pong,
    Priority,
    Register,
    ScanBatch,
    ScanMode,
    ScanRequest,
    ShimVerdictSource,
    StatusRequest,
    StreamScanRequest,
    Unregister,
    Verdict,
    VerdictAction,
    VerdictBatch,
    VerdictSource,
    VerdictStatus,
    VMInfo,
    Welcome,
)
from .server import Handler, Server, start_tcp_server, start_unix_server
from .server import _remove_stale_socket as _remove_stale_socket
from .validation import MESSAGE_TYPES, SCHEMAS, validate
from .validation import _Schema as _Schema

__all__ = [
    "ADMIN_SUFFIX",
    "DEAD_AFTER_HEARTBEATS",
    "DEFAULT_HEARTBEAT",
    "ENVELOPE_FIELDS",
    "ERROR_CODES",
    "HEADER",
    "MAX_BATCH",
    "MAX_CHUNK",
    "MAX_FDS_PER_FRAME",
    "MAX_FRAME",
    "MAX_PENDING_FD_BATCHES",
    "MESSAGES",
    "MESSAGE_TYPES",
    "PRIORITIES",
    "PROTOCOL_VERSION",
    "RECV_SIZE",
    "SCAN_MODES",
    "SCHEMAS",
    "SHIM_VERDICT_SOURCES",
    "STREAM_PREFETCH",
    "VERDICT_ACTIONS",
    "VERDICT_SOURCES",
    "VERDICT_STATUSES",
    "Address",
    "Adopt",
    "ApplianceClient",
    "ApplianceStatus",
    "BatchItem",
    "ApplianceVerdictSource",
    "BatchScan",
    "BatchVerdict",
    "Bye",
    "Chunk",
    "Connection",
    "ConnectionClosed",
    "Control",
    "ControlOp",
    "Counters",
    "Credit",
    "Detection",
    "ErrorCode",
    "ErrorMessage",
    "FdScanRequest",
    "Handler",
    "Hello",
    "MessageType",
    "Ok",
    "PathScanRequest",
    "PatternSwap",
    "PatternsSource",
    "Ping",
    "PolicyUpdate",
    "Pong",
    "Priority",
    "ProtocolError",
    "Register",
    "RequestError",
    "ScanBatch",
    "ScanMode",
    "ScanRequest",
    "Server",
    "ShimVerdictSource",
    "StatusRequest",
    "StreamScanRequest",
    "Unregister",
    "VMInfo",
    "Verdict",
    "VerdictAction",
    "VerdictBatch",
    "VerdictSource",
    "VerdictStatus",
    "Welcome",
    "admin_socket_for",
    "connect",
    "pack",
    "parse_address",
    "start_tcp_server",
    "start_unix_server",
    "unpack",
    "validate",
]

log = logging.getLogger("offscan.protocol")
