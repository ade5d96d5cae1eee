"""Fuzzing the wire (issue 14): the frame decoder, every message type, and a real appliance.

Bounded for CI (``OFFSCAN_FUZZ_EXAMPLES``, default 150 per test); ``make fuzz`` raises it.
The property everywhere: hostile input is a :class:`ProtocolError` (or a clean close), never
another exception, a crash, a leaked descriptor or a wedged appliance.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from harden_support import raw_frame, raw_hello
from helpers import ApplianceProc, open_fds, run_async, status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offscan import protocol
from offscan.protocol import Connection, ProtocolError, validation
from offscan.protocol.validation import SCHEMAS

EXAMPLES = int(os.environ.get("OFFSCAN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# msgpack-able values, nested a little: what a hostile peer can put in any field
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.binary(max_size=64)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
types = st.sampled_from(sorted(SCHEMAS)) | st.text(max_size=10)


# Plausible values per field name, so that many fuzzed frames are valid and reach the
# appliance's own checks (ownership, confinement, stream bookkeeping, operator commands).
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "id": st.integers(0, 20),
    "v": st.just(protocol.PROTOCOL_VERSION),
    "vm": st.sampled_from(["fz", "other", "x" * 300]),
    "path": st.sampled_from(["f", "../f", "/etc/passwd", "a/../f", ".", "nope", "f/"]),
    "root": st.sampled_from(["/etc", "/", "relative", "/tmp", "/proc/self"]),
    "mode": st.sampled_from(["path", "fd", "stream", "bogus"]),
    "size": st.integers(0, 1 << 40) | st.none(),
    "prio": st.sampled_from(["access", "demand"]),
    "data": st.binary(max_size=300),
    "end": st.booleans(),
    "op": st.sampled_from(
        ["vm-list", "vm-show", "policy-set", "vm-clone", "quarantine-list", "reload", "zz"]
    ),
    "args": st.dictionaries(
        st.sampled_from(["name", "vm", "settings", "count", "into", "id", "base"]),
        values,
        max_size=3,
    ),
    "policy": st.dictionaries(st.sampled_from(["actions", "fail_mode", "max_size"]), values),
    "clone_of": st.sampled_from(["fz", "ghost"]) | st.none(),
}


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    """A message of any type with its schema's fields (each present or not; a plausible
    value or any value), plus junk keys: close enough to valid to reach every check."""
    t = draw(types)
    schema = SCHEMAS.get(t)
    msg: dict[str, Any] = {"t": t}
    if schema is not None:
        for field in sorted(schema.fields):
            roll = draw(st.integers(0, 9))
            if roll < 6 and field in PLAUSIBLE:
                msg[field] = draw(PLAUSIBLE[field])
            elif roll < 9:
                msg[field] = draw(values)
    msg.update(
        draw(st.dictionaries(st.sampled_from(["fds", "x", "id", "mode"]), values, max_size=2))
    )
    return msg


@FUZZ
@given(st.binary(max_size=512))
def test_any_payload_decodes_to_a_valid_message_or_a_protocol_error(payload: bytes) -> None:
    try:
        msg = protocol.unpack(payload)
    except ProtocolError as exc:
        assert exc.code in protocol.ERROR_CODES
        return
    assert protocol.validate(msg) is msg


@FUZZ
@given(messages())
def test_every_message_type_validates_or_names_the_field(msg: dict[str, Any]) -> None:
    try:
        packed = msgpack.packb(msg, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return  # not encodable: no peer can send it
    try:
        got = protocol.unpack(packed)
    except ProtocolError as exc:
        assert exc.code in ("malformed", "oversized") and str(exc)
        return
    assert got["t"] in SCHEMAS
    for field in SCHEMAS[got["t"]].required:
        assert field in got
    # what validates also round-trips through our own encoder
    again = protocol.pack(got)
    assert protocol.pack(protocol.unpack(again[4:])) == again  # bytes: NaN != NaN


def _stream_into_connection(data: bytes) -> tuple[list[str], int]:
    """Feed ``data`` to a real :class:`Connection` over a socketpair; what it made of it
    (message types, then the exception's name) and the descriptors it left open."""

    async def go() -> tuple[list[str], int]:
        a, b = socket.socketpair()
        before = len(open_fds())
        conn = Connection(a)
        seen: list[str] = []
        b.sendall(data)
        b.close()
        try:
            while True:
                msg, fds = await conn.recv()
                for fd in fds:
                    os.close(fd)
                seen.append(str(msg["t"]))
        except (ProtocolError, protocol.ConnectionClosed) as exc:
            seen.append(type(exc).__name__)
        finally:
            conn.close()
        return seen, len(open_fds()) - before  # both ends are closed now: -2

    return run_async(go, timeout=30)


@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    """A byte stream of frames: valid ones, mutated ones, lying headers, raw junk."""
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            try:
                out += raw_frame(draw(messages()))
            except ProtocolError:
                out += b"\x00\x00\x00\x01\xc1"
        elif kind == 1:
            body = draw(st.binary(max_size=64))
            out += struct.pack(">I", len(body)) + body
        elif kind == 2:
            out += struct.pack(">I", draw(st.integers(0, (1 << 32) - 1)))
        else:
            out += draw(st.binary(max_size=32))
    return out


@FUZZ
@given(frame_streams())
def test_the_frame_decoder_never_raises_anything_else_nor_leaks(data: bytes) -> None:
    seen, leaked = _stream_into_connection(data)
    assert seen[-1] in ("ProtocolError", "ConnectionClosed"), seen
    assert leaked == -2


# -- a real appliance under fuzzed sessions ---------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProc]:
    work = tmp_path_factory.mktemp("fuzz-appliance")
    (work / "vm").mkdir()
    (work / "vm" / "f").write_bytes(b"hello")
    a = ApplianceProc(work)
    yield a
    a.stop()


@settings(
    max_examples=max(10, EXAMPLES // 5),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(messages(), min_size=1, max_size=12), st.booleans())
def test_a_live_appliance_survives_fuzzed_sessions(
    live: ApplianceProc, frames: list[dict[str, Any]], main_socket: bool
) -> None:
    path = str(live.sock) if main_socket else protocol.admin_socket_for(str(live.sock))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        raw_hello(s, "fuzzer")
        register = {"t": "register", "id": 1, "vm": "fz", "root": str(live.work / "vm")}
        data = raw_frame(register)
        for m in frames:
            if m.get("t") in ("bye",):
                continue
            try:
                data += raw_frame(m)
            except ProtocolError:
                data += b"\x00\x00\x00\x02\x81\xc1"
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    except (TimeoutError, ConnectionError):
        pass  # the appliance may close on us: that is an answer
    finally:
        s.close()
    assert live.p.poll() is None, live.output()


def test_after_fuzzing_the_appliance_answers_and_logged_no_traceback(live: ApplianceProc) -> None:
    assert status(live.sock)["appliance"]
    log = live.output()
    assert "Traceback" not in log and "internal error" not in log, log[-4000:]


def _item_of(schema: Any, plausible: dict[str, st.SearchStrategy[Any]]) -> Any:
    """Batch items near the schema: plausible fields (required ones always there), the same
    with one field set to any value, or any map of its field names."""
    good = st.fixed_dictionaries(
        {f: plausible[f] for f in sorted(schema.required)},
        optional={f: plausible.get(f, values) for f in sorted(schema.optional)},
    )
    names = sorted(schema.fields) + ["t", "x"]
    broken = st.tuples(good, st.sampled_from(names), values).map(lambda g: {**g[0], g[1]: g[2]})
    return good | broken | st.dictionaries(st.sampled_from(names), values, max_size=4)


VERDICT_PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "id": st.integers(-1, 1 << 64),
    "vm": st.sampled_from(["vm", ""]),
    "path": st.sampled_from(["f", "a\0b"]),
    "status": st.sampled_from(["clean", "infected", "error", "bogus"]),
    "action": st.sampled_from(["allow", "deny", "bogus"]),
    "matches": st.lists(st.sampled_from(["Eicar", ""]), max_size=2) | st.just([1]),
    "source": st.sampled_from(["identity", "cache", "scan", "clone", "bogus"]),
    "reason": st.none() | st.just("why"),
    "digest": st.none() | st.just("ab"),
    "pattern_version": st.none() | st.just("v1"),
    "quarantine_id": st.just("q"),
    "action_errors": st.just(["e"]),
}


@FUZZ
@given(
    scan=_item_of(validation.BATCH_SCAN, PLAUSIBLE),
    verdict=_item_of(validation.BATCH_VERDICT, VERDICT_PLAUSIBLE),
)
def test_a_batch_item_the_quick_check_passes_passes_the_full_check(scan: Any, verdict: Any) -> None:
    """The quick tests of batch items (_plain_scan, _plain_verdict) never raise and never
    pass an item the full schema check would refuse."""
    for plain, schema, item in (
        (validation._plain_scan, validation.BATCH_SCAN, scan),
        (validation._plain_verdict, validation.BATCH_VERDICT, verdict),
    ):
        if plain(item):
            validation._check_fields(schema, "item", item)
