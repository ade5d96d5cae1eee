"""Validation of decoded messages: one table of field checks per message type.

:data:`SCHEMAS` is the executable form of the message tables in ``docs/protocol.md`` and of
the ``TypedDict``\\ s in :mod:`.messages`; ``tests/test_messages.py`` checks that the three
name the same fields, with the same required ones. Only structure and types are checked
here; what a message means is the appliance's business. Pure functions on values: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError
from .messages import (
    MAX_BATCH,
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

__all__ = [
    "BATCH_SCAN",
    "BATCH_VERDICT",
    "MESSAGE_TYPES",
    "SCHEMAS",
    "check_scan_items",
    "validate",
]

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


def _items(schema: _Schema, what: str, plain: Callable[[Any], bool]) -> _Check:
    """An array of at most MAX_BATCH maps, each checked against ``schema`` (a batch frame).
    ``plain(item)`` is a quick test passing the common well-formed item; an item it does not
    pass gets the full schema check (which names what is wrong, or lets it through)."""

    def check(field: str, value: Any) -> None:
        if not isinstance(value, list) or not value:
            _fail(field, f"a non-empty array of {what}", value)
        if len(value) > MAX_BATCH:
            raise ProtocolError("oversized", f"{field}: {len(value)} items exceed {MAX_BATCH}")
        for i, item in enumerate(value):
            if plain(item):
                continue
            if not isinstance(item, dict):
                _fail(f"{field}[{i}]", f"a map ({what})", item)
            _check_fields(schema, f"{field}[{i}]", item)

    return check


_SCAN_KEYS = frozenset({"id", "vm", "path", "mode", "prio", "size"})
_VERDICT_KEYS = frozenset(
    {"id", "vm", "path", "status", "action", "matches", "reason", "source", "digest"}
    | {"pattern_version", "quarantine_id", "action_errors"}
)
_BATCH_MODES = frozenset({"path", "fd"})
_PRIOS = frozenset(PRIORITIES)
_STATUSES = frozenset(VERDICT_STATUSES)
_ACTIONS = frozenset(VERDICT_ACTIONS)
_SOURCES = frozenset(VERDICT_SOURCES)


_NULLABLE_TEXT = (str, type(None))
# A verdict's keys when it needs no further look: quarantine_id and action_errors (an
# infected file's) get the full check.
_PLAIN_VERDICT_KEYS = _VERDICT_KEYS - {"quarantine_id", "action_errors"}


def _plain_scan(item: Any) -> bool:
    """A batched scan with only known keys, each of the right type (the full check's
    verdict on it would be the same: it passes). Every value is type-checked before it is
    looked up in a set (an unhashable one must fail here, not raise)."""
    if type(item) is not dict or not item.keys() <= _SCAN_KEYS:
        return False
    get = item.get
    rid, vm, path, mode, prio = (
        get("id"),
        get("vm"),
        get("path"),
        get("mode"),
        get("prio", "access"),
    )
    return (
        type(rid) is int
        and 0 <= rid < 1 << 63
        and type(vm) is str
        and vm != ""
        and "\x00" not in vm
        and type(path) is str
        and "\x00" not in path
        and type(mode) is str
        and mode in _BATCH_MODES
        and type(prio) is str
        and prio in _PRIOS
        and get("size") is None
    )


def _plain_verdict(item: Any) -> bool:
    """A batched verdict as the appliance sends a clean one: known keys, right types (the
    full check would pass it). Type checks come before set lookups, as for scans."""
    if type(item) is not dict or not item.keys() <= _PLAIN_VERDICT_KEYS:
        return False
    get = item.get
    rid, status, action = get("id"), get("status"), get("action")
    source, matches = get("source", "scan"), get("matches", [])
    return (
        type(rid) is int
        and 0 <= rid < 1 << 63
        and type(get("vm")) is str
        and type(get("path")) is str
        and type(status) is str
        and status in _STATUSES
        and type(action) is str
        and action in _ACTIONS
        and type(matches) is list
        and (not matches or all(type(m) is str for m in matches))
        and type(get("reason")) in _NULLABLE_TEXT
        and type(source) is str
        and source in _SOURCES
        and type(get("digest")) in _NULLABLE_TEXT
        and type(get("pattern_version")) in _NULLABLE_TEXT
    )


def _check_fields(schema: _Schema, where: str, msg: dict[str, Any]) -> None:
    for key in msg:
        if not isinstance(key, str):
            raise ProtocolError("malformed", f"{where}: map keys must be str, got {_describe(key)}")
    for field, check in schema.required.items():
        if field not in msg:
            raise ProtocolError("malformed", f"{where}: missing required field {field!r}")
        check(f"{where}.{field}", msg[field])
    for field, check in schema.optional.items():
        if field in msg:
            check(f"{where}.{field}", msg[field])


# The status reply's keys beyond the request's, derived from ApplianceStatus: listed so the
# schema names every field of the contract, and checked by nothing, as when they were unlisted.
_STATUS_REPLY: dict[str, _Check] = dict.fromkeys(
    sorted(_keys(ApplianceStatus) - _keys(StatusRequest)), _free_form
)

_S = _Schema
_VERDICT_REQUIRED: dict[str, _Check] = {
    "id": _req_id,
    "vm": _text,
    "path": _text,
    "status": _one_of(*VERDICT_STATUSES),
    "action": _one_of(*VERDICT_ACTIONS),
}
_VERDICT_OPTIONAL: dict[str, _Check] = {
    "matches": _str_list,
    "reason": _nullable(_text),
    "source": _one_of(*VERDICT_SOURCES),
    "digest": _nullable(_text),
    "pattern_version": _nullable(_text),
    "quarantine_id": _text,
    "action_errors": _str_list,
}
# The items of batch frames: a scan in path or fd mode, a verdict, each without "t".
BATCH_SCAN = _S(
    {"id": _req_id, "vm": _name, "path": _path, "mode": _one_of("path", "fd")},
    {"prio": _one_of(*PRIORITIES), "size": _nullable(_uint)},
)
BATCH_VERDICT = _S(_VERDICT_REQUIRED, _VERDICT_OPTIONAL)
# Keys not listed are allowed and ignored (forward compatibility, free-form replies).
SCHEMAS: dict[str, _Schema] = {
    # handshake
    "hello": _S({"v": _uint, "shim": _name}, {"secret": _nullable(_text)}),
    "welcome": _S(
        {"v": _uint, "appliance": _text, "credits": _uint, "heartbeat": _positive_number},
        {"pattern_version": _nullable(_text), "batch": _nullable(_uint)},
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
    # the shim's on-access counters per VM (shapes checked by the appliance); reply "ok"
    "report": _S({"id": _req_id, "vms": _map}, {}),
    # appliance -> client
    "credit": _S({"n": _pos_int}, {}),
    "ok": _S({"id": _req_id}, {}),
    "policy": _S({"vm": _name, "policy": _map}, {}),
    "adopt": _S({"vm": _name, "root": _name, "clone_of": _name}, {}),
    "verdict": _S(_VERDICT_REQUIRED, _VERDICT_OPTIONAL),
    # many scans in one frame, and many verdicts in one reply (docs/protocol.md, Batches)
    "scan-batch": _S({"scans": _items(BATCH_SCAN, "scans", _plain_scan)}, {}),
    "verdict-batch": _S({"verdicts": _items(BATCH_VERDICT, "verdicts", _plain_verdict)}, {}),
}
MESSAGE_TYPES = frozenset(SCHEMAS)


def check_scan_items(items: Sequence[tuple[Any, Any, Any, Any]]) -> None:
    """Raise the ProtocolError :func:`validate` would for the scans of a ``scan-batch``
    built from ``(vm, path, prio, fd)`` items (the client packs that frame as built, without
    validating it again): each (vm, prio) pair gets the full check once, a path the quick
    one its full check amounts to. The ids and the descriptor count are the builder's."""
    good: set[tuple[str, str]] = set()
    for i, (vm, path, prio, fd) in enumerate(items):
        if (
            type(path) is str
            and "\x00" not in path
            and type(vm) is str
            and type(prio) is str
            and (vm, prio) in good
        ):
            continue
        mode = "path" if fd is None else "fd"
        scan = {"id": 0, "vm": vm, "path": path, "mode": mode, "prio": prio}
        _check_fields(BATCH_SCAN, f"scan-batch.scans[{i}]", scan)
        good.add((vm, prio))


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
    _check_fields(schema, t, msg)
    _check_descriptors(t, msg)
    return msg


def _check_descriptors(t: str, msg: dict[str, Any]) -> None:
    """The ``fds`` count any frame may carry, and the scan modes' own rules."""
    nfds = msg.get("fds", 0)
    if not _is_int(nfds) or not 0 <= nfds <= MAX_FDS_PER_FRAME:
        _fail(f"{t}.fds", f"an integer 0..{MAX_FDS_PER_FRAME}", nfds)
    if t == "scan" and msg["mode"] == "stream" and msg.get("size") is None:
        raise ProtocolError("malformed", "scan in stream mode needs its content size")
    if t == "scan-batch":
        want = sum(1 for scan in msg["scans"] if scan["mode"] == "fd")
        if nfds != want:
            raise ProtocolError(
                "malformed",
                f"scan-batch has {want} fd-mode scan(s) but carries {nfds} descriptor(s)",
            )
    elif t == "scan" and msg["mode"] == "fd":
        if nfds != 1:
            raise ProtocolError(
                "malformed", f"scan in fd mode must carry exactly one descriptor, not {nfds}"
            )
    elif nfds:
        raise ProtocolError("malformed", f"{t} frames carry no descriptors (fds={nfds})")
