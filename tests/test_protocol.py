"""offscan.protocol over real sockets: codec and validation, framing edge cases, descriptor
passing, servers, and ApplianceClient against a small appliance written here."""

from __future__ import annotations

import asyncio
import functools
import io
import os
import shutil
import socket
import stat
import tempfile
import time
from typing import Any, TypeVar

import msgpack
import pytest
from helpers import FakeAppliance, run_async
from helpers import fake_appliance as appliance
from helpers import open_fds as _open_fds

from offscan import protocol as P
from offscan.protocol import (
    HEADER,
    MAX_CHUNK,
    MAX_FRAME,
    ApplianceClient,
    Connection,
    ConnectionClosed,
    ProtocolError,
    RequestError,
)

T = TypeVar("T")
TEST_TIMEOUT = 10.0  # seconds any one async test may take before it counts as a hang
QUICK = 2.0  # seconds to wait for something that should be immediate
run = functools.partial(run_async, timeout=TEST_TIMEOUT)


@pytest.fixture
def sockdir() -> Any:
    # Short on purpose: unix socket paths are limited to ~107 bytes, pytest's tmp_path is long.
    path = tempfile.mkdtemp(prefix="ofs-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def conn_pair() -> tuple[Connection, Connection]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(a), Connection(b)


def raw_pair() -> tuple[socket.socket, Connection]:
    """A raw socket to write arbitrary bytes into, and the Connection reading them."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    return a, Connection(b)


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


VERDICT = {
    "t": "verdict",
    "id": 7,
    "vm": "vm1",
    "path": "etc/passwd",
    "status": "infected",
    "matches": ["Eicar-Test-Signature"],
    "reason": None,
    "action": "deny",
    "source": "scan",
    "digest": "ab" * 32,
    "pattern_version": "sha256:0123456789abcdef",
}

# One valid example per message type (and a few variants), as they travel on the wire.
SAMPLES: list[dict[str, Any]] = [
    {"t": "hello", "v": 1, "shim": "host-a/shim", "secret": "s3cret"},
    {"t": "hello", "v": 1, "shim": "host-a/shim"},
    {
        "t": "welcome",
        "v": 1,
        "appliance": "dsva:1",
        "credits": 64,
        "heartbeat": 5.0,
        "pattern_version": "sha256:0123",
    },
    {"t": "ping", "id": 1},
    {"t": "pong", "id": 1},
    {"t": "credit", "n": 8},
    {
        "t": "register",
        "id": 2,
        "vm": "vm1",
        "root": "/srv/vms/vm1",
        "policy": {"on_error": "allow"},
        "clone_of": "master",
    },
    {"t": "register", "id": 3, "vm": "vm2", "root": "/srv/vms/vm2"},
    {"t": "unregister", "id": 4, "vm": "vm1"},
    {"t": "scan", "id": 5, "vm": "vm1", "path": "usr/bin/ls", "mode": "path", "prio": "access"},
    {
        "t": "scan",
        "id": 6,
        "vm": "vm1",
        "path": "big.iso",
        "mode": "stream",
        "prio": "demand",
        "size": 3 << 20,
    },
    {"t": "chunk", "id": 6, "data": bytes(range(256)) * 64, "end": False},
    {"t": "chunk", "id": 6, "data": b"", "end": True},
    {"t": "status", "id": 8},
    {"t": "status", "id": 8, "appliance": "dsva:1", "vms": [{"name": "vm1"}], "hit_ratio": 0.5},
    {"t": "bye"},
    {"t": "control", "id": 12, "op": "vm-list", "args": {"name": "vm1"}},
    {
        "t": "report",
        "id": 13,
        "vms": {
            "vm1": {
                "enabled": True,
                "mode": "mount",
                "reason": None,
                "held": 0,
                "allowed": 10,
                "denied": 1,
                "timeouts": 0,
                "unreachable": 0,
                "memo_hits": 7,
                "exempt": 3,
            }
        },
    },
    {"t": "ok", "id": 2, "vm": "vm1", "root": "/srv/vms/vm1"},
    {"t": "policy", "vm": "vm1", "policy": {"fail_mode": "closed"}},
    {"t": "adopt", "vm": "vm1-clone001", "root": "/srv/vms/vm1-clone001", "clone_of": "vm1"},
    VERDICT,
    {**VERDICT, "status": "clean", "matches": [], "action": "allow", "source": "identity"},
    {
        "t": "scan-batch",
        "scans": [
            {"id": 20, "vm": "vm1", "path": "a", "mode": "path"},
            {"id": 21, "vm": "vm1", "path": "b", "mode": "path", "prio": "demand"},
        ],
    },
    {"t": "verdict-batch", "verdicts": [{k: v for k, v in VERDICT.items() if k != "t"}]},
    {"t": "error", "id": 5, "code": "confined", "message": "path escapes the VM root"},
    {"t": "error", "code": "auth", "message": "bad or missing shared secret"},
]


# -- codec and validation ----------------------------------------------------------------


def test_samples_cover_every_message_type() -> None:
    assert {m["t"] for m in SAMPLES} == P.MESSAGE_TYPES


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m["t"])
def test_pack_unpack_round_trip(msg: dict[str, Any]) -> None:
    data = P.pack(msg)
    (size,) = HEADER.unpack_from(data)
    assert size == len(data) - HEADER.size
    assert P.unpack(data[HEADER.size :]) == msg
    assert P.validate(msg) is msg


def test_every_message_type_round_trips_through_a_connection() -> None:
    async def main() -> None:
        a, b = conn_pair()
        try:
            for msg in SAMPLES:
                await a.send(dict(msg))
                got, fds = await b.recv()
                assert (got, fds) == (msg, [])
                await b.send(dict(msg))  # and the other way
                assert (await a.recv())[0] == msg
        finally:
            a.close()
            b.close()

    run(main)


@pytest.mark.parametrize(
    ("msg", "code", "needle"),
    [
        ([1, 2], "malformed", "must be a map"),
        ("ping", "malformed", "must be a map"),
        ({"id": 1}, "malformed", '"t" missing'),
        ({"t": 5, "id": 1}, "malformed", "t: expected str"),
        ({"t": "nope"}, "malformed", "unknown message type 'nope'"),
        ({"t": "ping"}, "malformed", "missing required field 'id'"),
        ({"t": "ping", "id": -1}, "malformed", "ping.id"),
        ({"t": "ping", "id": True}, "malformed", "ping.id"),
        ({"t": "ping", "id": "1"}, "malformed", "ping.id"),
        ({"t": "ping", "id": 1.0}, "malformed", "ping.id"),
        ({"t": "ping", "id": 1, 2: 3}, "malformed", "keys must be str"),
        ({"t": "hello", "v": "1", "shim": "s"}, "malformed", "hello.v"),
        ({"t": "hello", "v": 1}, "malformed", "'shim'"),
        ({"t": "hello", "v": 1, "shim": "s", "secret": 1}, "malformed", "hello.secret"),
        (
            {"t": "welcome", "v": 1, "appliance": "a", "credits": 1, "heartbeat": 0},
            "malformed",
            "welcome.heartbeat",
        ),
        (
            {"t": "welcome", "v": 1, "appliance": "a", "credits": -1, "heartbeat": 1},
            "malformed",
            "welcome.credits",
        ),
        ({"t": "register", "id": 1, "vm": "v", "root": 5}, "malformed", "register.root"),
        ({"t": "register", "id": 1, "vm": "", "root": "/r"}, "malformed", "register.vm"),
        (
            {"t": "register", "id": 1, "vm": "v", "root": "/r", "policy": []},
            "malformed",
            "register.policy",
        ),
        ({"t": "unregister", "id": 1}, "malformed", "'vm'"),
        (
            {"t": "scan", "id": 1, "vm": "v", "path": b"etc/passwd", "mode": "path"},
            "malformed",
            "scan.path: expected str",
        ),
        (
            {"t": "scan", "id": 1, "vm": "v", "path": ["a"], "mode": "path"},
            "malformed",
            "scan.path",
        ),
        ({"t": "scan", "id": 1, "vm": "v", "path": "a\x00b", "mode": "path"}, "malformed", "NUL"),
        ({"t": "scan", "id": 1, "vm": "v", "path": "a", "mode": "tcp"}, "malformed", "scan.mode"),
        ({"t": "scan", "id": 1, "vm": "v", "path": "a"}, "malformed", "'mode'"),
        (
            {"t": "scan", "id": 1, "vm": "v", "path": "a", "mode": "path", "prio": "later"},
            "malformed",
            "scan.prio",
        ),
        (
            {"t": "scan", "id": 1, "vm": "v", "path": "a", "mode": "stream", "size": -5},
            "malformed",
            "scan.size",
        ),
        (
            {"t": "scan", "id": 1, "vm": "v", "path": "a", "mode": "stream"},
            "malformed",
            "needs its content size",
        ),
        (
            {"t": "scan", "id": 1, "vm": "v", "path": "a", "mode": "fd"},
            "malformed",
            "exactly one descriptor",
        ),
        (
            {"t": "scan", "id": 1, "vm": "v", "path": "a", "mode": "path", "fds": 1},
            "malformed",
            "carry no descriptors",
        ),
        ({"t": "ping", "id": 1, "fds": 2}, "malformed", "carry no descriptors"),
        (
            {"t": "scan", "id": 1, "vm": "v", "path": "a", "mode": "fd", "fds": "1"},
            "malformed",
            "scan.fds",
        ),
        (
            {"t": "chunk", "id": 1, "data": b"x" * (MAX_CHUNK + 1), "end": True},
            "oversized",
            "chunk.data",
        ),
        (
            {"t": "chunk", "id": 1, "data": "text", "end": True},
            "malformed",
            "chunk.data: expected bin",
        ),
        ({"t": "chunk", "id": 1, "data": b""}, "malformed", "'end'"),
        ({"t": "chunk", "id": 1, "data": b"", "end": 1}, "malformed", "chunk.end"),
        ({"t": "credit", "n": 0}, "malformed", "credit.n"),
        ({**VERDICT, "status": "maybe"}, "malformed", "verdict.status"),
        ({**VERDICT, "matches": "Eicar"}, "malformed", "verdict.matches"),
        ({"t": "error", "message": "x"}, "malformed", "'code'"),
        ({"t": "error", "code": "auth", "message": "x", "id": -3}, "malformed", "error.id"),
    ],
)
def test_validate_rejects(msg: Any, code: str, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        P.validate(msg)
    assert info.value.code == code
    assert needle in str(info.value)


def test_validate_accepts_unknown_extra_keys_and_error_codes() -> None:
    P.validate({"t": "ping", "id": 0, "future_field": [1, 2]})
    P.validate({"t": "error", "id": 3, "code": "conflict", "message": "owned by another shim"})
    P.validate({"t": "chunk", "id": 1, "data": b"x" * MAX_CHUNK, "end": False})


def test_pack_refuses_oversized_frames() -> None:
    with pytest.raises(ProtocolError) as info:
        P.pack({"t": "status", "id": 1, "blob": b"x" * MAX_FRAME})
    assert info.value.code == "oversized"
    with pytest.raises(ProtocolError) as info:
        P.pack({"t": "status", "id": 1, "blob": b"x" * 100}, max_frame=64)
    assert info.value.code == "oversized"


def test_protocol_error_carries_code_and_message() -> None:
    err = ProtocolError("oversized")
    assert (err.code, str(err)) == ("oversized", "oversized")
    err = ProtocolError("malformed", "payload must be a map")
    assert (err.code, str(err)) == ("malformed", "payload must be a map")
    assert issubclass(ConnectionClosed, ConnectionError)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("unix:/run/offscan.sock", ("unix", "/run/offscan.sock")),
        ("/run/offscan.sock", ("unix", "/run/offscan.sock")),
        ("./offscan.sock", ("unix", "./offscan.sock")),
        ("127.0.0.1:3310", ("tcp", ("127.0.0.1", 3310))),
        ("tcp:dsva.example:3310", ("tcp", ("dsva.example", 3310))),
        ("[::1]:3310", ("tcp", ("::1", 3310))),
    ],
)
def test_parse_address(address: str, expected: tuple[str, Any]) -> None:
    assert P.parse_address(address) == expected


@pytest.mark.parametrize("address", ["localhost", "host:port", "host:0", "host:70000", "unix:"])
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(ValueError):
        P.parse_address(address)


# -- framing over real sockets -----------------------------------------------------------


def test_several_frames_in_one_read() -> None:
    msgs = [{"t": "ping", "id": i} for i in range(50)] + [SAMPLES[-1]]

    async def main() -> None:
        raw, conn = raw_pair()
        try:
            raw.sendall(b"".join(P.pack(m) for m in msgs))
            for m in msgs:
                assert await conn.recv() == (m, [])
        finally:
            raw.close()
            conn.close()

    run(main)


def test_one_frame_split_across_many_tiny_sends() -> None:
    msg = {**VERDICT, "matches": [f"Sig.{i}" for i in range(40)]}
    data = P.pack(msg) + P.pack({"t": "pong", "id": 9})

    async def main() -> None:
        raw, conn = raw_pair()
        loop = asyncio.get_running_loop()
        try:
            receiving = asyncio.ensure_future(conn.recv())
            for i in range(len(data)):
                await loop.sock_sendall(raw, data[i : i + 1])
                if i % 16 == 0:
                    await asyncio.sleep(0.001)  # let the reader see the partial frame
                    assert i >= len(data) - 20 or not receiving.done()
            assert await receiving == (msg, [])
            assert await conn.recv() == ({"t": "pong", "id": 9}, [])
        finally:
            raw.close()
            conn.close()

    run(main)


def test_large_frame_both_ways() -> None:
    blob = os.urandom(3 << 20)

    async def main() -> None:
        a, b = conn_pair()
        try:
            sending = asyncio.ensure_future(a.send({"t": "status", "id": 1, "blob": blob}))
            got, _ = await b.recv()
            await sending
            assert got["blob"] == blob
        finally:
            a.close()
            b.close()

    run(main)


def test_concurrent_senders_do_not_interleave_frames() -> None:
    async def main() -> None:
        a, b = conn_pair()
        try:
            blobs = {i: bytes([i]) * (300_000 + i) for i in range(8)}
            senders = [
                asyncio.ensure_future(a.send({"t": "status", "id": i, "blob": blob}))
                for i, blob in blobs.items()
            ]
            seen = {}
            for _ in blobs:
                msg, _ = await b.recv()
                seen[msg["id"]] = msg["blob"]
            await asyncio.gather(*senders)
            assert seen == blobs
        finally:
            a.close()
            b.close()

    run(main)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "oversized"),  # 'GET ' read as a length
        (HEADER.pack(MAX_FRAME + 1), "oversized"),  # refused from the header alone
        (HEADER.pack(0xFFFFFFFF) + b"\x00" * 64, "oversized"),
        (HEADER.pack(0), "malformed"),
        (frame(b"\xc1\xc1\xc1"), "malformed"),  # 0xc1 is never valid msgpack
        (frame(msgpack.packb([1, 2, 3])), "malformed"),
        (frame(msgpack.packb({"x": 1})), "malformed"),
        (frame(msgpack.packb({"t": "nope"})), "malformed"),
        (frame(msgpack.packb({1: "ping"})), "malformed"),
        (frame(msgpack.packb({"t": "ping", "id": 1}) + b"\x00"), "malformed"),  # trailing bytes
        (frame(b"\xa3\xff\xfe\xfd"), "malformed"),  # str with invalid UTF-8
        (
            frame(
                msgpack.packb(
                    {"t": "scan", "id": 1, "vm": "v", "path": "a", "mode": "fd", "fds": 1}
                )
            ),
            "malformed",
        ),  # announces a descriptor that never came
    ],
    ids=[
        "http",
        "too-long",
        "max-u32",
        "empty",
        "not-msgpack",
        "list",
        "no-t",
        "unknown-t",
        "int-key",
        "trailing",
        "bad-utf8",
        "missing-fd",
    ],
)
def test_malformed_input_raises_without_hanging(data: bytes, code: str) -> None:
    async def main() -> None:
        raw, conn = raw_pair()
        try:
            raw.sendall(data)  # and keep the socket open: an error must not wait for EOF
            with pytest.raises(ProtocolError) as info:
                await asyncio.wait_for(conn.recv(), QUICK)
            assert info.value.code == code
            with pytest.raises(ProtocolError):  # the connection stays failed
                await asyncio.wait_for(conn.recv(), QUICK)
        finally:
            raw.close()
            conn.close()

    run(main)


def test_custom_max_frame() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        small_tx, small_rx = Connection(a, max_frame=64), Connection(b, max_frame=64)
        try:
            with pytest.raises(ProtocolError, match="exceeds 64"):
                await small_tx.send({"t": "status", "id": 1, "x": "y" * 100})
            a.sendall(P.pack({"t": "status", "id": 1, "x": "y" * 100}))
            with pytest.raises(ProtocolError) as info:
                await asyncio.wait_for(small_rx.recv(), QUICK)
            assert info.value.code == "oversized"
        finally:
            small_tx.close()
            small_rx.close()

    run(main)


def test_eof_raises_connection_closed() -> None:
    async def main() -> None:
        raw, conn = raw_pair()
        raw.sendall(P.pack({"t": "ping", "id": 1}) + P.pack({"t": "ping", "id": 2})[:7])
        raw.close()
        try:
            assert (await conn.recv())[0]["id"] == 1  # buffered frames come first
            with pytest.raises(ConnectionClosed, match="mid-frame"):
                await asyncio.wait_for(conn.recv(), QUICK)
        finally:
            conn.close()
        with pytest.raises(ConnectionError):
            await conn.recv()
        with pytest.raises(ConnectionError):
            await conn.send({"t": "ping", "id": 3})

        raw, conn = raw_pair()
        raw.close()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(conn.recv(), QUICK)
        conn.close()
        conn.close()  # idempotent

    run(main)


def test_close_wakes_a_pending_recv() -> None:
    async def main() -> None:
        a, b = conn_pair()
        receiving = asyncio.ensure_future(b.recv())
        await asyncio.sleep(0.01)
        b.close()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(receiving, QUICK)
        a.close()

    run(main)


def test_cancelled_recv_loses_nothing() -> None:
    async def main() -> None:
        raw, conn = raw_pair()
        try:
            data = P.pack({"t": "ping", "id": 42})
            raw.sendall(data[:5])
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.recv(), 0.05)
            raw.sendall(data[5:])
            assert await asyncio.wait_for(conn.recv(), QUICK) == ({"t": "ping", "id": 42}, [])
        finally:
            raw.close()
            conn.close()

    run(main)


# -- descriptor passing ------------------------------------------------------------------


def _scan_fd_msg(path: str) -> dict[str, Any]:
    return {"t": "scan", "id": 1, "vm": "vm1", "path": path, "mode": "fd", "prio": "access"}


def test_fd_passing_over_a_socketpair(tmp_path: Any) -> None:
    target = tmp_path / "payload.bin"
    target.write_bytes(b"content the appliance reads through the passed descriptor")

    async def main() -> None:
        a, b = conn_pair()
        fd = os.open(target, os.O_RDONLY)
        try:
            msg = _scan_fd_msg("payload.bin")
            await a.send(msg, fds=[fd])
            assert msg["fds"] == 1
            got, fds = await b.recv()
            assert got == msg and len(fds) == 1
            try:
                assert os.pread(fds[0], 1000, 0) == target.read_bytes()
                assert os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino
                assert fds[0] != fd
            finally:
                os.close(fds[0])
            os.fstat(fd)  # the sender's descriptor is still open
        finally:
            os.close(fd)
            a.close()
            b.close()

    run(main)


def test_fd_frames_mixed_with_plain_frames_keep_their_descriptors(tmp_path: Any) -> None:
    files = []
    for i in range(12):
        p = tmp_path / f"f{i}"
        p.write_bytes(f"file number {i}".encode())
        files.append(p)

    async def main() -> None:
        a, b = conn_pair()
        opened = [os.open(p, os.O_RDONLY) for p in files]
        try:
            sends = []
            for i, fd in enumerate(opened):
                sends.append(a.send({**_scan_fd_msg(f"f{i}"), "id": i}, fds=[fd]))
                sends.append(a.send({"t": "ping", "id": 1000 + i}))
            await asyncio.gather(*sends)  # all written before the reader starts: one big read
            for i in range(len(files)):
                msg, fds = await b.recv()
                assert msg["id"] == i and len(fds) == 1
                assert os.pread(fds[0], 100, 0) == f"file number {i}".encode()
                os.close(fds[0])
                assert await b.recv() == ({"t": "ping", "id": 1000 + i}, [])
        finally:
            for fd in opened:
                os.close(fd)
            a.close()
            b.close()

    run(main)


def test_stray_descriptor_is_an_error_and_gets_closed(tmp_path: Any) -> None:
    target = tmp_path / "x"
    target.write_bytes(b"x")

    async def main() -> None:
        raw, conn = raw_pair()
        fd = os.open(target, os.O_RDONLY)
        raw_fd, receiver_fd = raw.fileno(), conn._fd
        before = _open_fds()
        try:
            # A frame that claims no descriptors, but carries one.
            raw.sendmsg(
                [P.pack({"t": "ping", "id": 1})],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))],
            )
            with pytest.raises(ProtocolError, match="no frame claiming") as info:
                await asyncio.wait_for(conn.recv(), QUICK)
            assert info.value.code == "malformed"
        finally:
            os.close(fd)
            raw.close()
            conn.close()
        # (Each listing includes its own directory descriptor, so compare counts.)
        assert len(_open_fds()) == len(before) - len({fd, raw_fd, receiver_fd})

    run(main)


def test_fds_need_a_unix_socket() -> None:
    async def main() -> None:
        server = await P.start_tcp_server("127.0.0.1", 0, lambda conn: asyncio.sleep(0))
        conn = await P.connect(f"127.0.0.1:{server.port}")
        try:
            assert not conn.is_unix
            with pytest.raises(ProtocolError) as info:
                await conn.send(_scan_fd_msg("x"), fds=[0])
            assert info.value.code == "unsupported"
        finally:
            conn.close()
            server.close()
            await server.wait_closed()

    run(main)


# -- servers -----------------------------------------------------------------------------


async def echo(conn: Connection) -> None:
    """Answer pings, return received descriptors' first bytes, stop on bye."""
    while True:
        msg, fds = await conn.recv()
        if msg["t"] == "bye":
            return
        if fds:
            head = os.pread(fds[0], 64, 0)
            for fd in fds:
                os.close(fd)
            await conn.send({"t": "status", "id": msg["id"], "head": head})
        else:
            await conn.send({"t": "pong", "id": msg["id"]})


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_unix_server_socket_mode(sockdir: str, mode: int) -> None:
    path = os.path.join(sockdir, "a.sock")

    async def main() -> None:
        old = os.umask(0)  # even a permissive umask must not widen the socket
        try:
            server = await P.start_unix_server(path, echo, mode=mode)
        finally:
            os.umask(old)
        try:
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == mode
            assert server.path == path and server.port is None
            conn = await P.connect(f"unix:{path}")
            try:
                assert conn.is_unix and conn.peer.startswith("unix:pid=")
                await conn.send({"t": "ping", "id": 5})
                assert await conn.recv() == ({"t": "pong", "id": 5}, [])
            finally:
                conn.close()
        finally:
            server.close()
            await server.wait_closed()
        assert not os.path.exists(path)  # close() removes its socket file

    run(main)


def test_unix_server_replaces_a_stale_socket(sockdir: str) -> None:
    path = os.path.join(sockdir, "a.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays behind, nobody listens
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    async def main() -> None:
        server = await P.start_unix_server(path, echo)
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            conn = await P.connect(path)
            await conn.send({"t": "ping", "id": 1})
            assert (await conn.recv())[0] == {"t": "pong", "id": 1}
            conn.close()
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_unix_server_leaves_live_sockets_and_other_files_alone(sockdir: str) -> None:
    path = os.path.join(sockdir, "a.sock")
    regular = os.path.join(sockdir, "not-a-socket")
    with open(regular, "w") as f:
        f.write("precious")

    async def main() -> None:
        with pytest.raises(FileExistsError, match="not a socket"):
            await P.start_unix_server(regular, echo)
        assert os.path.getsize(regular) == len("precious")
        server = await P.start_unix_server(path, echo)
        try:
            with pytest.raises(OSError, match="another server"):
                await P.start_unix_server(path, echo)
            conn = await P.connect(path)  # the first server still works
            await conn.send({"t": "ping", "id": 1})
            assert (await conn.recv())[0]["t"] == "pong"
            conn.close()
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_fd_passing_through_a_unix_server(sockdir: str, tmp_path: Any) -> None:
    target = tmp_path / "doc.txt"
    target.write_bytes(b"hello through the server")

    async def main() -> None:
        server = await P.start_unix_server(os.path.join(sockdir, "a.sock"), echo)
        conn = await P.connect(server.path or "")
        fd = os.open(target, os.O_RDONLY)
        try:
            await conn.send(_scan_fd_msg("doc.txt"), fds=[fd])
            msg, _ = await conn.recv()
            assert msg["head"] == b"hello through the server"
        finally:
            os.close(fd)
            conn.close()
            server.close()
            await server.wait_closed()

    run(main)


def test_tcp_server_ephemeral_port_and_close_ends_handlers() -> None:
    async def main() -> None:
        server = await P.start_tcp_server("127.0.0.1", 0, echo)
        assert server.port and server.port > 0 and server.path is None
        conns = [await P.connect(f"127.0.0.1:{server.port}") for _ in range(3)]
        try:
            for i, conn in enumerate(conns):
                assert conn.peer.startswith("127.0.0.1:") and not conn.is_unix
                await conn.send({"t": "ping", "id": i})
                assert (await conn.recv())[0] == {"t": "pong", "id": i}
            server.close()  # handlers are blocked in recv(); close() must end them
            await asyncio.wait_for(server.wait_closed(), QUICK)
            for conn in conns:
                with pytest.raises(ConnectionError):
                    await asyncio.wait_for(conn.recv(), QUICK)
        finally:
            for conn in conns:
                conn.close()

    run(main)


def test_a_bad_client_does_not_disturb_others(sockdir: str) -> None:
    errors: list[str] = []

    async def handler(conn: Connection) -> None:
        try:
            await echo(conn)
        except ProtocolError as exc:
            errors.append(exc.code)
            await conn.send({"t": "error", "code": exc.code, "message": str(exc)})

    async def main() -> None:
        server = await P.start_unix_server(os.path.join(sockdir, "a.sock"), handler)
        good = await P.connect(server.path or "")
        bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bad.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(bad, server.path or "")
            await loop.sock_sendall(bad, b"\xff" * 64)
            reply = await asyncio.wait_for(loop.sock_recv(bad, 1024), QUICK)  # the fatal error
            assert P.unpack(reply[HEADER.size :])["code"] == "oversized"
            assert await asyncio.wait_for(loop.sock_recv(bad, 1024), QUICK) == b""  # then EOF
            await good.send({"t": "ping", "id": 1})
            assert (await good.recv())[0] == {"t": "pong", "id": 1}
            assert errors == ["oversized"]
        finally:
            bad.close()
            good.close()
            server.close()
            await server.wait_closed()

    run(main)


# -- ApplianceClient against a small appliance -------------------------------------------


def test_client_handshake_ping_status_and_close(sockdir: str) -> None:
    async def main() -> None:
        async with appliance(sockdir, credits=3) as (fake, client):
            assert client.connected
            assert client.welcome is not None and client.welcome["appliance"] == "fake"
            assert client.credits == 3
            assert fake.hello == {"t": "hello", "v": 1, "shim": "test-shim"}
            rtt = await client.ping()
            assert 0 < rtt < QUICK
            status = asyncio.ensure_future(client.status())
            req = await fake.next()
            assert req == {"t": "status", "id": req["id"]}
            await fake.reply({"t": "status", "id": req["id"], "vms": [], "verdicts": 12})
            assert (await status)["verdicts"] == 12
            await client.close()
            assert not client.connected
            with pytest.raises(ConnectionError):
                await client.status()

    run(main)


def test_client_over_tcp_needs_the_secret() -> None:
    async def main() -> None:
        fake = FakeAppliance(secret="open sesame")
        server = await P.start_tcp_server("127.0.0.1", 0, fake.handler)
        try:
            bad = ApplianceClient(f"127.0.0.1:{server.port}", shim_id="s", secret="wrong")
            with pytest.raises(RequestError) as info:
                await bad.connect(timeout=QUICK)
            assert info.value.code == "auth" and not bad.connected
            good = ApplianceClient(
                f"tcp:127.0.0.1:{server.port}", shim_id="s", secret="open sesame"
            )
            await good.connect(timeout=QUICK)
            assert good.connected and fake.hello and fake.hello["secret"] == "open sesame"
            reg = asyncio.ensure_future(
                good.register("vm1", "/srv/vm1", policy={"x": 1}, clone_of="base")
            )
            req = await fake.next()
            assert req == {
                "t": "register",
                "id": req["id"],
                "vm": "vm1",
                "root": "/srv/vm1",
                "policy": {"x": 1},
                "clone_of": "base",
            }
            await fake.reply({"t": "ok", "id": req["id"], "vm": "vm1"})
            assert (await reg)["vm"] == "vm1"
            await good.close()
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_client_routes_out_of_order_replies(sockdir: str) -> None:
    async def main() -> None:
        async with appliance(sockdir, credits=8) as (fake, client):
            paths = [f"file{i}" for i in range(5)]
            tasks = [
                asyncio.ensure_future(client.scan_path("vm1", p, prio="demand")) for p in paths
            ]
            unreg = asyncio.ensure_future(client.unregister("vm9"))
            reqs = [await fake.next() for _ in range(6)]
            assert len({r["id"] for r in reqs}) == 6
            for req in reversed(reqs):
                if req["t"] == "unregister":
                    await fake.reply(
                        {
                            "t": "error",
                            "id": req["id"],
                            "code": "unknown-vm",
                            "message": "no VM named 'vm9'",
                        }
                    )
                else:
                    assert req["mode"] == "path" and req["prio"] == "demand"
                    status = "infected" if req["path"] == "file3" else "clean"
                    await fake.reply(fake.verdict(req, status))
            results = await asyncio.gather(*tasks)
            assert [r["path"] for r in results] == paths
            assert [r["status"] for r in results] == ["clean"] * 3 + ["infected", "clean"]
            with pytest.raises(RequestError) as info:
                await unreg
            assert info.value.code == "unknown-vm" and "vm9" in str(info.value)
            assert client.credits == 8

    run(main)


def test_client_credits_hold_back_the_extra_scan(sockdir: str) -> None:
    async def main() -> None:
        async with appliance(sockdir, credits=2) as (fake, client):
            tasks = [asyncio.ensure_future(client.scan_path("vm1", f"f{i}")) for i in range(3)]
            first, second = await fake.next(), await fake.next()
            await asyncio.sleep(0.2)
            assert fake.received.empty(), "the third scan went out without a credit"
            assert client.credits == 0
            await fake.reply(fake.verdict(first))  # returns a credit: the third scan goes out
            third = await fake.next()
            assert third["path"] == "f2"
            # An error reply to a scan returns its credit too; so does a credit grant.
            await fake.reply(
                {"t": "error", "id": second["id"], "code": "confined", "message": "no"}
            )
            await fake.reply({"t": "credit", "n": 3})
            await fake.reply(fake.verdict(third))
            assert (await tasks[0])["path"] == "f0"
            with pytest.raises(RequestError):
                await tasks[1]
            assert (await tasks[2])["path"] == "f2"
            assert client.credits == 5

    run(main)


def test_client_timeout_keeps_credit_accounting(sockdir: str) -> None:
    async def main() -> None:
        async with appliance(sockdir, credits=1) as (fake, client):
            with pytest.raises(TimeoutError):
                await client.request(
                    {"t": "scan", "vm": "v", "path": "slow", "mode": "path"}, timeout=0.1
                )
            req = await fake.next()
            assert client.credits == 0  # the appliance still holds the scan
            await fake.reply(fake.verdict(req))  # late: discarded, but the credit comes back
            await asyncio.wait_for(client.ping(), QUICK)
            assert client.credits == 1

    run(main)


def test_client_connection_loss_fails_pending_requests(sockdir: str) -> None:
    async def main() -> None:
        async with appliance(sockdir, credits=1) as (fake, client):
            scans = [asyncio.ensure_future(client.scan_path("vm1", f"f{i}")) for i in range(2)]
            status = asyncio.ensure_future(client.status())
            await fake.next()
            await fake.next()
            assert fake.conn is not None
            fake.conn.close()  # the appliance goes away with three requests outstanding
            for task in [*scans, status]:  # the second scan was still waiting for a credit
                with pytest.raises(ConnectionError):
                    await asyncio.wait_for(task, QUICK)
            assert not client.connected
            with pytest.raises(ConnectionError):
                await client.scan_path("vm1", "after")
            # And the client can reconnect.
            fake.ready.clear()
            await client.connect(timeout=QUICK)
            await asyncio.wait_for(fake.ready.wait(), QUICK)
            assert client.connected and client.credits == 1
            assert await client.ping() > 0

    run(main)


def test_client_fatal_error_frame(sockdir: str) -> None:
    async def main() -> None:
        async with appliance(sockdir) as (fake, client):
            pending = asyncio.ensure_future(client.scan_path("vm1", "x"))
            await fake.next()
            await fake.reply({"t": "error", "code": "backpressure", "message": "too many scans"})
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(pending, QUICK)
            assert info.value.code == "backpressure" and "too many scans" in str(info.value)
            assert not client.connected

    run(main)


def test_client_heartbeat_keeps_a_live_peer(sockdir: str) -> None:
    async def main() -> None:
        async with appliance(sockdir, heartbeat=0.2) as (fake, client):
            await asyncio.sleep(1.2)  # idle for 6 heartbeats: pings keep the connection up
            assert client.connected
            assert fake.pings >= 3

    run(main)


def test_client_heartbeat_keeps_a_busy_sender_alive(sockdir: str) -> None:
    async def main() -> None:
        async with appliance(sockdir, heartbeat=0.2) as (fake, client):
            # The client talks all the time (like a long upload) and the appliance has nothing
            # to say but pongs: the client must still ping, or it would think it dead.
            requests = []
            for _ in range(60):  # 1.2 s, twice the 0.6 s of silence that means death
                requests.append(asyncio.ensure_future(client.status()))
                await asyncio.sleep(0.02)
            assert client.connected
            assert fake.pings >= 2
            for r in requests:
                r.cancel()
            await asyncio.gather(*requests, return_exceptions=True)

    run(main)


def test_client_heartbeat_detects_a_silent_peer(sockdir: str) -> None:
    async def main() -> None:
        async with appliance(sockdir, heartbeat=0.1, answer_pings=False) as (fake, client):
            t0 = time.monotonic()
            pending = asyncio.ensure_future(client.scan_path("vm1", "x"))
            with pytest.raises(ConnectionError, match="silent"):
                await asyncio.wait_for(pending, QUICK)
            elapsed = time.monotonic() - t0
            assert elapsed >= 0.2, elapsed  # never declared dead before the silence window
            assert not client.connected and fake.pings >= 1

    run(main)


def test_client_scan_fd(sockdir: str, tmp_path: Any) -> None:
    target = tmp_path / "f.txt"
    target.write_bytes(b"passed by descriptor")

    async def main() -> None:
        async with appliance(sockdir) as (fake, client):
            fd = os.open(target, os.O_RDONLY)
            try:
                scan = asyncio.ensure_future(client.scan_fd("vm1", "f.txt", fd))
                req, fds = await asyncio.wait_for(fake.received.get(), QUICK)
                assert req["mode"] == "fd" and req["fds"] == 1 and len(fds) == 1
                assert os.pread(fds[0], 100, 0) == b"passed by descriptor"
                os.close(fds[0])
                await fake.reply(fake.verdict(req))
                assert (await scan)["status"] == "clean"
                os.fstat(fd)  # still ours, still open
            finally:
                os.close(fd)

    run(main)


class Unseekable:
    """A binary source that can only be read (a pipe, a socket, a decompressor)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self._data.read(n)


@pytest.mark.parametrize("kind", ["bytes", "bytesio", "file", "empty", "unseekable"])
def test_client_scan_stream(sockdir: str, tmp_path: Any, kind: str) -> None:
    content = b"" if kind == "empty" else os.urandom(2 * MAX_CHUNK + 12345)
    target = tmp_path / "stream.bin"
    target.write_bytes(content)

    async def main(f: io.BufferedReader) -> None:
        async with appliance(sockdir) as (fake, client):
            source: Any = {
                "bytes": content,
                "empty": content,
                "bytesio": io.BytesIO(content),
                "file": f,
                "unseekable": Unseekable(content),
            }[kind]
            if kind == "unseekable":
                with pytest.raises(ValueError, match="pass size="):
                    await client.scan_stream("vm1", "stream.bin", source)
                size = len(content)
            else:
                size = None
            scan = asyncio.ensure_future(client.scan_stream("vm1", "stream.bin", source, size=size))
            req = await fake.next()
            assert req["mode"] == "stream" and req["size"] == len(content)
            chunks = []
            while True:
                chunk = await fake.next()
                assert chunk["t"] == "chunk" and chunk["id"] == req["id"]
                assert len(chunk["data"]) <= MAX_CHUNK
                chunks.append(chunk)
                if chunk["end"]:
                    break
            assert b"".join(c["data"] for c in chunks) == content
            assert len(chunks) == (1 if kind == "empty" else 3)
            await fake.reply(fake.verdict(req, "infected"))
            assert (await scan)["action"] == "deny"

    with open(target, "rb") as f:
        run(lambda: main(f))


def test_client_scan_stream_cut_short_by_an_error(sockdir: str) -> None:
    content = b"z" * (40 * MAX_CHUNK)

    async def main() -> None:
        async with appliance(sockdir) as (fake, client):
            scan = asyncio.ensure_future(client.scan_stream("vm1", "huge", content))
            req = await fake.next()
            await fake.reply(
                {"t": "error", "id": req["id"], "code": "unknown-vm", "message": "who?"}
            )
            with pytest.raises(RequestError) as info:
                await scan
            assert info.value.code == "unknown-vm"
            chunks = 0
            while True:  # the client stops early and ends the stream explicitly
                chunk = await fake.next()
                chunks += 1
                if chunk["end"]:
                    break
            assert chunks < 40

    run(main)
