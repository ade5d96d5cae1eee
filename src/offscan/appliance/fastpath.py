"""The cache-hit fast path's encodings: a verdict built once per content, not once per request.

A cache hit's verdict differs between requests only in ``id``, ``vm`` and ``path``; every
other field (status, matches, source, digest, pattern version) is the cached verdict's. So
:class:`VerdictCodec` encodes those fields once per (content, pattern version, source), as
msgpack bytes for the ``verdict-batch`` reply and as a JSON fragment for the event log line,
and a hit costs three small encodings and two concatenations. The bytes are exactly what
``msgpack.packb`` / ``json.dumps`` make of the same dicts (tests/test_eventpath.py checks it),
so the shim and the event log cannot tell a fast verdict from a slow one. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring_ascii as _json_str  # what json.dumps uses
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    from ..cache import CachedVerdict
    from ..protocol.messages import ApplianceVerdictSource, BatchVerdict

# a hit's (vm, path) encoded: msgpack after the id, event-line JSON after "vm":
Where = tuple[bytes, str]
MAX_TAILS = 65_536  # encoded verdict tails kept (one per content x source); then start over

_pack = msgpack.Packer(use_bin_type=True).pack  # autoreset: returns the bytes of one object
_json = json.JSONEncoder(separators=(",", ":")).encode  # as EventLog.write (json.dumps)


class Tail:
    """The encoded fields of one cached verdict as a given source serves it."""

    __slots__ = ("fields", "frame_head", "item_head", "json", "msgpack", "record")

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record  # the VerdictRecord fields after vm and path, in wire order
        self.fields = len(record)
        self.msgpack = b"".join(_pack(k) + _pack(v) for k, v in record.items())
        self.json = _json(record)[1:-1]  # '"status":"clean",...' without the braces
        # what precedes the id: a BatchVerdict's map header; a Verdict frame's, and its "t"
        self.item_head = _map_header(3 + self.fields) + b"\xa2id"
        self.frame_head = _map_header(4 + self.fields) + b"\xa1t\xa7verdict\xa2id"


class VerdictCodec:
    """Encodes fast-path verdicts and ``verdict-batch`` frames (on the event loop only)."""

    def __init__(self) -> None:
        self._tails: dict[tuple[bytes, int, str, str], Tail] = {}
        self._vm_pack: dict[str, bytes] = {}
        self._vm_json: dict[str, str] = {}

    def tail(self, cached: CachedVerdict, source: ApplianceVerdictSource) -> Tail:
        key = (cached.digest, cached.size, cached.pattern_version, source)
        tail = self._tails.get(key)
        if tail is None:
            if len(self._tails) >= MAX_TAILS:
                self._tails.clear()
            tail = self._tails[key] = Tail(
                {
                    "status": cached.status,
                    "matches": list(cached.matches),
                    "reason": None,
                    "action": "allow",
                    "source": source,
                    "digest": cached.digest.hex(),
                    "pattern_version": cached.pattern_version,
                }
            )
        return tail

    def _vm(self, vm: str) -> bytes:
        vm_bytes = self._vm_pack.get(vm)
        if vm_bytes is None:
            if len(self._vm_pack) >= MAX_TAILS:
                self._vm_pack.clear()
            vm_bytes = self._vm_pack[vm] = b"\xa2vm" + _pack(vm) + b"\xa4path"
        return vm_bytes

    def _vm_str(self, vm: str) -> str:
        vm_json = self._vm_json.get(vm)
        if vm_json is None:
            if len(self._vm_json) >= MAX_TAILS:
                self._vm_json.clear()
            vm_json = self._vm_json[vm] = _json_str(vm)
        return vm_json

    def item(self, rid: int, vm: str, path: str, tail: Tail) -> bytes:
        """One ``BatchVerdict``: ``{"id", "vm", "path", **tail}`` as msgpack."""
        return tail.item_head + _pack(rid) + self._vm(vm) + _pack(path) + tail.msgpack

    def frame(self, rid: int, vm: str, path: str, tail: Tail) -> bytes:
        """One whole ``verdict`` frame's payload: ``{"t": "verdict", "id", "vm", "path",
        **tail}``, as the session sends a single scan's verdict."""
        return tail.frame_head + _pack(rid) + self._vm(vm) + _pack(path) + tail.msgpack

    def where(self, vm: str, path: str) -> Where:
        """What a hit's encodings hold of its ``vm`` and ``path``, encoded once: the bytes
        between an item's id and its tail, and the event-line text between ``"vm":`` and
        the tail's fields (kept by the hot table, :mod:`.hot`, for the next hit there)."""
        return self._vm(vm) + _pack(path), self._vm_str(vm) + ',"path":' + _json_str(path) + ","

    def hits(
        self,
        rows: Sequence[tuple[int, Tail, Where]],
        out: list[bytes],
        lines: list[str] | None,
        now: float,
        latency: float,
        *,
        frames: bool = False,
    ) -> None:
        """For each ``(id, tail, where)`` of one batch of clean hits (``tail`` from
        :meth:`tail`, ``where`` from :meth:`where`): its :meth:`item` (or :meth:`frame`)
        appended to ``out`` and, unless ``lines`` is None, its event-log line
        (:meth:`lines`) to ``lines``. The same bytes as those methods, in one loop: a hit
        costs one pack and the concatenations."""
        time_head, latency_tail = _line_parts(now, latency)
        add = out.append
        if frames:
            for rid, tail, (item, _) in rows:
                add(tail.frame_head + _pack(rid) + item + tail.msgpack)
        else:
            for rid, tail, (item, _) in rows:
                add(tail.item_head + _pack(rid) + item + tail.msgpack)
        if lines is not None:
            lines.extend(
                [time_head + text + tail.json + latency_tail for _, tail, (_, text) in rows]
            )

    def lines(self, now: float, latency: float) -> Callable[[str, str, Tail], str]:
        """:meth:`event_line` for verdicts sharing ``now`` and ``latency`` (one batch):
        what is common to them formatted once, a line then costs a path's encoding and
        a few concatenations."""
        time_head, latency_tail = _line_parts(now, latency)
        heads: dict[str, str] = {}

        def line(vm: str, path: str, tail: Tail) -> str:
            head = heads.get(vm)
            if head is None:
                head = heads[vm] = time_head + _json_str(vm) + ',"path":'
            return head + _json_str(path) + "," + tail.json + latency_tail

        return line

    def event_line(self, now: float, vm: str, path: str, tail: Tail, latency: float) -> str:
        """The event-log line :meth:`Verdicts.record <.verdicts.Verdicts.record>` would write."""
        vm_json = self._vm_str(vm)
        return (
            f'{{"time":{now!r},"event":"verdict","vm":{vm_json},"path":{_json_str(path)},'
            f'{tail.json},"latency_ms":{round(latency * 1000, 3)!r}}}\n'
        )


def _line_parts(now: float, latency: float) -> tuple[str, str]:
    """What an event-log verdict line holds before its VM, and after its verdict's fields."""
    return (
        f'{{"time":{now!r},"event":"verdict","vm":',
        f',"latency_ms":{round(latency * 1000, 3)!r}}}\n',
    )


def encode_item(item: BatchVerdict) -> bytes:
    """A verdict made the slow way, as a ``verdict-batch`` item."""
    return _pack(item)


def batch_frame(items: list[bytes]) -> bytes:
    """The payload of a ``verdict-batch`` frame holding the encoded ``items``."""
    return b"\x82\xa1t\xadverdict-batch\xa8verdicts" + _array_header(len(items)) + b"".join(items)


def _map_header(n: int) -> bytes:
    return bytes((0x80 | n,)) if n < 16 else b"\xde" + n.to_bytes(2, "big")


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")
