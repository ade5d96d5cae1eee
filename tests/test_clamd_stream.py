"""The clamd front in-process: INSTREAM matching of unknown-length streams against the engine's
own answer for the same bytes (both cores), and the front's timeouts and bounds with small
limits on a real socket."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
import struct
from pathlib import Path

from helpers import EICAR, run_async
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offscan import Matcher, PatternDB
from offscan.appliance import Appliance
from offscan.appliance.clamd import ClamdFront, ClamdOptions
from offscan.appliance.clamd_stream import StreamPlan, scan_stream

MARKS = [b"alpha-marker-01", b"beta-marker-002", b"gamma-tail-0003", b"delta-hash-file"]
DB_TEXT = [
    ("s.ndb", f"Any-Alpha:0:*:{MARKS[0].hex()}\nAt-Ten:0:10:{MARKS[1].hex()}\n"),
    ("e.ndb", f"Tail-Gamma:0:EOF-15:{MARKS[2].hex()}\nNear-End:0:EOF-40,25:{MARKS[1].hex()}\n"),
    ("h.hsb", f"{hashlib.sha256(MARKS[3]).hexdigest()}:{len(MARKS[3])}:Hash-Delta\n"),
    ("g.ndb", f"Gapped:0:*:{MARKS[0][:6].hex()}{{10-200}}{MARKS[2][:6].hex()}\n"),
]


def _plan(impl: str, window: int) -> StreamPlan:
    db = PatternDB.from_text(DB_TEXT)
    return StreamPlan.build(Matcher(db, impl=impl, window_size=window))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    filler=st.binary(max_size=300),
    plants=st.lists(st.tuples(st.sampled_from(MARKS), st.integers(0, 300)), max_size=4),
    cuts=st.lists(st.integers(1, 97), min_size=1, max_size=6),
    window=st.sampled_from([16, 64, 1 << 20]),
    exact=st.booleans(),
)
def test_stream_matches_what_the_engine_finds(
    filler: bytes,
    plants: list[tuple[bytes, int]],
    cuts: list[int],
    window: int,
    exact: bool,
) -> None:
    data = MARKS[3] if exact else filler
    for mark, at in plants if not exact else []:
        at = min(at, len(data))
        data = data[:at] + mark + data[at:]
    for impl in ("py", "auto"):
        plan = _plan(impl, window)
        want = plan.matcher.scan_bytes(data, allmatch=True)
        pieces, pos, i = [], 0, 0
        while pos < len(data):
            step = cuts[i % len(cuts)]
            pieces.append(data[pos : pos + step])
            pos, i = pos + step, i + 1
        got = scan_stream(plan, iter(pieces))
        assert set(got.matches) == set(want.matches), (impl, data)
        assert got.status == want.status
        assert got.size == len(data)
        assert got.digest == hashlib.sha256(data).hexdigest()


def test_stream_applies_the_hash_allowlist() -> None:
    db = PatternDB.from_text(DB_TEXT)
    from offscan.signatures import allowlist

    listed = b"xx" + MARKS[0]
    allowed = allowlist.apply(db, [("a.fp", f"{hashlib.md5(listed).hexdigest()}:{len(listed)}:X")])
    plan = StreamPlan.build(Matcher(allowed))
    assert scan_stream(plan, iter([listed[:3], listed[3:]])).status == "clean"
    assert scan_stream(plan, iter([listed + b"!"])).matches == ("Any-Alpha",)


# -- bounds on a real socket ---------------------------------------------------------------


def _recv_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


async def _with_front(tmp_path: Path, **limits: float) -> tuple[Appliance, ClamdFront, str]:
    path = str(tmp_path / "c.sock")
    app = Appliance()
    front = ClamdFront(app, ClamdOptions(socket_path=path, roots=[str(tmp_path)], **limits))
    app.clamd = front
    await app.start()
    return app, front, path


def test_timeouts_and_limits_close_only_that_connection(tmp_path: Path) -> None:
    async def main() -> None:
        app, front, path = await _with_front(
            tmp_path,
            command_timeout=0.3,
            idle_timeout=0.3,
            read_timeout=0.3,
            max_command_length=64,
            stream_max_length=1000,
        )
        loop = asyncio.get_running_loop()

        def client(data: bytes) -> bytes:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(20)
            s.connect(path)
            try:
                if data:
                    s.sendall(data)
                return _recv_all(s)
            finally:
                s.close()

        try:
            # silent client, idle session, stalled stream: each closed by its timeout
            assert await loop.run_in_executor(None, client, b"") == b""
            idle = await loop.run_in_executor(None, client, b"zIDSESSION\0zPING\0")
            assert idle == b"1: PONG\0"
            stalled = b"zINSTREAM\0" + struct.pack(">I", 100) + b"x"
            assert await loop.run_in_executor(None, client, stalled) == b""
            long = await loop.run_in_executor(None, client, b"zSCAN /" + b"a" * 100)
            assert long == b"command longer than 64 bytes. ERROR\n"
            over = b"zINSTREAM\0" + struct.pack(">I", 600) + b"y" * 600 + struct.pack(">I", 600)
            assert await loop.run_in_executor(None, client, over) == (
                b"INSTREAM size limit exceeded. ERROR\0"
            )
            ok = b"zINSTREAM\0" + struct.pack(">I", len(EICAR)) + EICAR + struct.pack(">I", 0)
            assert await loop.run_in_executor(None, client, ok) == (
                b"stream: Eicar-Test-Signature FOUND\0"
            )
            assert front.stats.errors == 0
            assert front.stats.active == set()
        finally:
            await app.stop()

    run_async(main)


def test_a_stream_stopped_by_the_time_limit_is_drained_and_answered(tmp_path: Path) -> None:
    """The matcher gives up after its first window (max scan time 0); the reader must keep
    reading the client's chunks without waiting on the matching thread, then answer ERROR."""

    async def main() -> None:
        app, front, path = await _with_front(tmp_path)
        eng = app.patterns.engine
        app.patterns.engine = dataclasses.replace(
            eng, matcher=Matcher(eng.db, max_scan_time=0.0, window_size=4096)
        )
        loop = asyncio.get_running_loop()
        data = b"z" * (1 << 20)
        body = b"".join(
            struct.pack(">I", 8192) + data[i : i + 8192] for i in range(0, len(data), 8192)
        )

        def client() -> bytes:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(path)
            try:
                s.sendall(b"zINSTREAM\0" + body + struct.pack(">I", 0))
                return _recv_all(s)
            finally:
                s.close()

        try:
            out = await loop.run_in_executor(None, client)
            assert out.startswith(b"stream: ") and out.endswith(b"exceeded. ERROR\0"), out
            assert front.stats.errors == 0
        finally:
            await app.stop()

    run_async(main)
