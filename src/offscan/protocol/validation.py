"""Validation of decoded messages: one table of field checks per message type.

:data:`SCHEMAS` is the executable form of the message tables in ``docs/protocol.md`` and of
the ``TypedDict``\\ s in :mod:`.messages`; ``tests/test_messages.py`` checks that the three
name the same fields, with the same required ones. Only structure and types are checked
here; what a message means is the appliance's business. Pure functions on values: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError
from .messages import (
    MAX_CHUNK,
    MAX_FDS_PER_FRAME,
    PRIORITIES,
    SCAN_MODES,
    VERDICT_ACTIONS,
    VERDICT_SOURCES,
    VERDICT_STATUSES,
    ApplianceStatus,
    StatusRequest,
)

__all__ = ["MESSAGE_TYPES", "SCHEMAS", "validate"]

_Check = Callable[[str, Any], None]


def _fail(field: str, want: str, value: Any) -> None:
    raise ProtocolError("malformed", f"{field}: expected {want}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"bin of {len(value)} bytes"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass; msgpack true must not pass as 1


def _req_id(field: str, value: Any) -> None:
    if not _is_int(value) or value < 0 or value >= 1 << 63:
        _fail(field, "a non-negative integer id", value)


def _uint(field: str, value: Any) -> None:
    if not _is_int(value) or value < 0:
        _fail(field, "a non-negative integer", value)


def _pos_int(field: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        _fail(field, "a positive integer", value)


def _text(field: str, value: Any) -> None:
    if not isinstance(value, str):
        _fail(field, "str", value)


def _name(field: str, value: Any) -> None:
    # Names and paths reach os.* calls on the appliance; NUL would raise there, so stop it here.
    if not isinstance(value, str) or not value:
        _fail(field, "a non-empty str", value)
    if "\x00" in value:
        raise ProtocolError("malformed", f"{field}: contains a NUL character")


def _path(field: str, value: Any) -> None:
    if not isinstance(value, str):
        _fail(field, "str (a path)", value)
    if "\x00" in value:
        raise ProtocolError("malformed", f"{field}: contains a NUL character")


def _bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(field, "bool", value)


def _map(field: str, value: Any) -> None:
    if not isinstance(value, dict):
        _fail(field, "a map", value)


def _positive_number(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        _fail(field, "a positive number of seconds", value)


def _str_list(field: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(field, "a list of str", value)


def _free_form(field: str, value: Any) -> None:
    """Documented but not checked: the ``status`` reply is informational, for people."""


def _one_of(*choices: str) -> _Check:
    def check(field: str, value: Any) -> None:
        if value not in choices:
            _fail(field, " or ".join(repr(c) for c in choices), value)

    return check


def _chunk_data(field: str, value: Any) -> None:
    if not isinstance(value, bytes):
        _fail(field, "bin", value)
    if len(value) > MAX_CHUNK:
        raise ProtocolError(
            "oversized", f"{field}: {len(value)} bytes exceeds {MAX_CHUNK} per chunk"
        )


def _nullable(check: _Check) -> _Check:
    def nullable(field: str, value: Any) -> None:
        if value is not None:
            check(field, value)

    return nullable


@dataclass(frozen=True)
class _Schema:
    required: dict[str, _Check]
    optional: dict[str, _Check]

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(self.required) | frozenset(self.optional)


def _keys(typed_dict: Any) -> frozenset[str]:
    return frozenset(typed_dict.__required_keys__ | typed_dict.__optional_keys__)


# The status reply's keys beyond the request's, derived from ApplianceStatus: listed so the
# schema names every field of the contract, and checked by nothing, as when they were unlisted.
_STATUS_REPLY: dict[str, _Check] = dict.fromkeys(
    sorted(_keys(ApplianceStatus) - _keys(StatusRequest)), _free_form
)

_S = _Schema
# Keys not listed are allowed and ignored (forward compatibility, free-form replies).
SCHEMAS: dict[str, _Schema] = {
    # handshake
    "hello": _S({"v": _uint, "shim": _name}, {"secret": _nullable(_text)}),
    "welcome": _S(
        {"v": _uint, "appliance": _text, "credits": _uint, "heartbeat": _positive_number},
        {"pattern_version": _nullable(_text)},
    ),
    # either direction
    "ping": _S({"id": _req_id}, {}),
    "pong": _S({"id": _req_id}, {}),
    "error": _S({"code": _text, "message": _text}, {"id": _nullable(_req_id)}),
    # client -> appliance
    "register": _S(
        {"id": _req_id, "vm": _name, "root": _name},
        {"policy": _nullable(_map), "clone_of": _nullable(_name)},
    ),
    "unregister": _S({"id": _req_id, "vm": _name}, {}),
    "scan": _S(
        {"id": _req_id, "vm": _name, "path": _path, "mode": _one_of(*SCAN_MODES)},
        {"prio": _one_of(*PRIORITIES), "size": _nullable(_uint)},
    ),
    "chunk": _S({"id": _req_id, "data": _chunk_data, "end": _bool}, {}),
    # the request, and the reply (its keys unchecked)
    "status": _S({"id": _req_id}, _STATUS_REPLY),
    "bye": _S({}, {"id": _nullable(_req_id)}),
    # operator commands (vm clone/list/show/untag, policy, quarantine); reply "ok" + free-form keys
    "control": _S({"id": _req_id, "op": _name}, {"args": _nullable(_map)}),
    # appliance -> client
    "credit": _S({"n": _pos_int}, {}),
    "ok": _S({"id": _req_id}, {}),
    "policy": _S({"vm": _name, "policy": _map}, {}),
    "adopt": _S({"vm": _name, "root": _name, "clone_of": _name}, {}),
    "verdict": _S(
        {
            "id": _req_id,
            "vm": _text,
            "path": _text,
            "status": _one_of(*VERDICT_STATUSES),
            "action": _one_of(*VERDICT_ACTIONS),
        },
        {
            "matches": _str_list,
            "reason": _nullable(_text),
            "source": _one_of(*VERDICT_SOURCES),
            "digest": _nullable(_text),
            "pattern_version": _nullable(_text),
            "quarantine_id": _text,
            "action_errors": _str_list,
        },
    ),
}
MESSAGE_TYPES = frozenset(SCHEMAS)


def validate(msg: Any) -> dict[str, Any]:
    """Check a decoded message against ``docs/protocol.md`` and return it unchanged.

    Raises :class:`ProtocolError` (code ``malformed``, or ``oversized`` for chunk data over
    :data:`MAX_CHUNK`) naming the offending field. Only structure and types are checked here;
    meaning (is the VM registered, is the path inside its root) is the appliance's business.
    """
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", f"payload must be a map, got {_describe(msg)}")
    t = msg.get("t")
    if t is None:
        raise ProtocolError("malformed", 'message has no type ("t" missing)')
    if not isinstance(t, str):
        _fail("t", "str", t)
    schema = SCHEMAS.get(t)
    if schema is None:
        raise ProtocolError("malformed", f"unknown message type {t!r}")
    for key in msg:
        if not isinstance(key, str):
            raise ProtocolError("malformed", f"{t}: map keys must be str, got {_describe(key)}")
    for field, check in schema.required.items():
        if field not in msg:
            raise ProtocolError("malformed", f"{t}: missing required field {field!r}")
        check(f"{t}.{field}", msg[field])
    for field, check in schema.optional.items():
        if field in msg:
            check(f"{t}.{field}", msg[field])
    _check_descriptors(t, msg)
    return msg


def _check_descriptors(t: str, msg: dict[str, Any]) -> None:
    """The ``fds`` count any frame may carry, and the scan modes' own rules."""
    nfds = msg.get("fds", 0)
    if not _is_int(nfds) or not 0 <= nfds <= MAX_FDS_PER_FRAME:
        _fail(f"{t}.fds", f"an integer 0..{MAX_FDS_PER_FRAME}", nfds)
    if t == "scan" and msg["mode"] == "stream" and msg.get("size") is None:
        raise ProtocolError("malformed", "scan in stream mode needs its content size")
    if t == "scan" and msg["mode"] == "fd":
        if nfds != 1:
            raise ProtocolError(
                "malformed", f"scan in fd mode must carry exactly one descriptor, not {nfds}"
            )
    elif nfds:
        raise ProtocolError("malformed", f"{t} frames carry no descriptors (fds={nfds})")
