"""Issue 14: hostile clients. Each test reproduces one defect of the audit against a real
appliance (a process, or in process on private sockets) and fails on the code before the fix.

1. control frames never read grow memory; 2. stream scans that never send chunks starve the
others; 3. fd mode trusts any descriptor; 4. any shim runs operator commands; 5. any
directory is a VM root; 8. files over the size limit are hashed first; plus connections per
client. Hang guards are generous timeouts, never assertions about speed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import stat
import tempfile
from pathlib import Path

import pytest
from harden_support import (
    appliance,
    connect_from,
    flood_without_reading,
    hello,
    raw_frame,
    raw_hello,
    request,
    rss_bytes,
)
from helpers import EICAR, async_wait_for, run_async, running_appliance, status

from offscan import protocol
from offscan.protocol import ApplianceClient, RequestError, admin_socket_for

MiB = 1 << 20


# -- 1. control frames are covered by backpressure ---------------------------------------------


def test_control_frames_never_read_do_not_grow_appliance_memory(tmp_path: Path) -> None:
    with running_appliance(tmp_path) as a:
        before = rss_bytes(a.p.pid)
        flooder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        flooder.connect(str(a.sock))
        try:
            raw_hello(flooder, "flooder")
            frame = raw_frame({"t": "control", "id": 7, "op": "vm-list"})
            flood_without_reading(flooder, frame, 40_000, stall=3.0)
            grown = rss_bytes(a.p.pid) - before
            # 66,000 such frames grew the appliance by 286 MB (about 4 KiB each) before.
            assert grown < 48 * MiB, f"appliance grew by {grown / MiB:.0f} MiB"

            async def another_shim() -> float:
                c = ApplianceClient(str(a.sock), shim_id="bystander")
                await c.connect(timeout=10)
                try:
                    return await c.ping()
                finally:
                    await c.close()

            run_async(another_shim, timeout=30)
        finally:
            flooder.close()
        assert status(a.sock)["connections"] >= 0  # the admin socket still answers


# -- 2. stream scans: per-client limits, stall timeout, cancellation on disconnect ------------


def _stream(rid: int, vm: str, size: int = 10) -> dict[str, object]:
    return {"t": "scan", "id": rid, "vm": vm, "path": "f", "mode": "stream", "size": size}


async def _victim_streams(port: int, root: Path) -> dict[str, object]:
    """A well-behaved shim from another address streams one file; its verdict."""
    v = await connect_from("127.0.0.1", port, "127.0.0.2")
    try:
        await hello(v, "victim")
        await request(v, {"t": "register", "id": 1, "vm": "v", "root": str(root)})
        await v.send(_stream(2, "v", len(EICAR)))
        await v.send({"t": "chunk", "id": 2, "data": EICAR, "end": True})
        while True:
            reply, _ = await v.recv()
            if reply.get("id") == 2:
                return reply
    finally:
        v.close()


def test_stalled_streams_of_a_client_that_left_free_the_stream_pool_at_once(
    tmp_path: Path,
) -> None:
    root = tmp_path / "vm"
    root.mkdir()

    async def scenario() -> dict[str, object]:
        # heartbeat 100 s: a stalled stream would hold its thread for 300 s (chunk timeout)
        async with appliance(tmp_path, tcp=True, credits=8, heartbeat=100.0) as app:
            assert app.tcp_port is not None
            att = await connect_from("127.0.0.1", app.tcp_port, "127.0.0.1")
            await hello(att, "attacker")
            await request(att, {"t": "register", "id": 1, "vm": "a", "root": str(root)})
            for i in range(8):  # every thread of the stream pool, waiting for chunks
                await att.send(_stream(100 + i, "a"))
            await async_wait_for(lambda: app.pipeline.request_kinds["stream"] == 8)
            att.close()  # the attacker leaves: its streams must end now, not in 300 s
            return await _victim_streams(app.tcp_port, root)

    verdict = run_async(scenario, timeout=60)
    assert verdict["t"] == "verdict" and verdict["status"] == "infected"


def test_one_client_cannot_hold_every_stream_slot(tmp_path: Path) -> None:
    root = tmp_path / "vm"
    root.mkdir()

    async def scenario() -> tuple[list[dict[str, object]], dict[str, object], dict[str, object]]:
        async with appliance(
            tmp_path, tcp=True, credits=64, heartbeat=100.0, streams_per_client=8
        ) as app:
            assert app.tcp_port is not None
            att = await connect_from("127.0.0.1", app.tcp_port, "127.0.0.1")
            await hello(att, "attacker")
            await request(att, {"t": "register", "id": 1, "vm": "a", "root": str(root)})
            for i in range(64):
                await att.send(_stream(100 + i, "a"))
            refused = []
            while len(refused) < 56:
                reply, _ = await att.recv()
                refused.append(reply)
            victim = await _victim_streams(app.tcp_port, root)  # while the attacker stays
            for i in range(64):  # the refused streams' chunks are discarded quietly
                await att.send({"t": "chunk", "id": 100 + i, "data": b"0123456789", "end": True})
            answered = {}
            while len(answered) < 8:
                reply, _ = await att.recv()
                answered[reply["id"]] = reply
            att.close()
            return refused, victim, next(iter(answered.values()))

    refused, victim, late = run_async(scenario, timeout=60)
    assert {r["code"] for r in refused} == {"backpressure"}
    assert victim["status"] == "infected"
    assert late["t"] == "verdict" and late["status"] == "clean"


def test_a_stream_that_never_sends_a_chunk_is_an_error_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "vm"
    root.mkdir()

    async def scenario() -> dict[str, object]:
        async with appliance(tmp_path, tcp=True, heartbeat=0.2) as app:  # chunk timeout 0.6 s
            assert app.tcp_port is not None
            c = await connect_from("127.0.0.1", app.tcp_port, "127.0.0.1")
            try:
                await hello(c, "slow")
                await request(c, {"t": "register", "id": 1, "vm": "a", "root": str(root)})
                await c.send(_stream(2, "a"))
                for beat in itertools.count(1000):  # stay alive (pings), send no chunk
                    try:
                        reply, _ = await asyncio.wait_for(c.recv(), 0.05)
                    except TimeoutError:
                        await c.send({"t": "ping", "id": beat})
                        continue
                    if reply.get("id") == 2:
                        return reply
                raise AssertionError("unreachable")
            finally:
                c.close()

    with caplog.at_level(logging.WARNING, logger="offscan"):
        reply = run_async(scenario, timeout=60)
    assert reply["t"] == "error" and reply["code"] != "internal", reply
    assert "no chunk" in str(reply["message"])
    assert not [r for r in caplog.records if r.exc_info], "a traceback reached the log"


def test_connections_per_client_are_bounded(tmp_path: Path) -> None:
    async def scenario() -> tuple[str, bool]:
        async with appliance(tmp_path, tcp=True, connections_per_client=3) as app:
            assert app.tcp_port is not None
            port = app.tcp_port
            held = [await connect_from("127.0.0.1", port, "127.0.0.1") for _ in range(3)]
            for i, c in enumerate(held):
                assert (await hello(c, f"s{i}"))["t"] == "welcome"
            extra = await connect_from("127.0.0.1", port, "127.0.0.1")
            try:
                refused = await hello(extra, "s3")
            finally:
                extra.close()
            other = await connect_from("127.0.0.1", port, "127.0.0.3")
            other_ok = (await hello(other, "elsewhere"))["t"] == "welcome"
            other.close()
            held.pop().close()
            await async_wait_for(lambda: app.client_budget.connections["ip:127.0.0.1"] == 2)
            again = await connect_from("127.0.0.1", port, "127.0.0.1")
            assert (await hello(again, "s4"))["t"] == "welcome"
            for c in [*held, again]:
                c.close()
            return str(refused.get("code")), other_ok

    code, other_ok = run_async(scenario, timeout=60)
    assert code == "backpressure" and other_ok


# -- 3. fd mode takes regular files only -------------------------------------------------------


def test_fd_mode_refuses_what_is_not_a_readable_regular_file(tmp_path: Path) -> None:
    root = tmp_path / "vm"
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "eicar.com").write_bytes(EICAR)

    async def scenario() -> dict[str, str]:
        got: dict[str, str] = {}
        async with appliance(tmp_path) as app:
            c = ApplianceClient(str(app.config.socket_path), shim_id="s")
            await c.connect()
            try:
                await c.register("vm", str(root))
                with open(root / "empty", "rb") as f:  # what the cache then knows: "" is clean
                    got["empty"] = (await c.scan_fd("vm", "empty", f.fileno()))["status"]
                r, w = os.pipe()
                os.write(w, EICAR)
                os.close(w)
                a, b = socket.socketpair()
                b.sendall(EICAR)
                b.close()
                zero = os.open("/dev/zero", os.O_RDONLY)
                wronly = os.open(root / "eicar.com", os.O_WRONLY)
                try:
                    for name, fd in (
                        ("pipe", r),
                        ("socketpair", a.fileno()),
                        ("zero", zero),
                        ("write-only", wronly),
                    ):
                        v = await c.scan_fd("vm", name, fd)
                        got[name] = f"{v['status']}: {v.get('reason')}"
                finally:
                    for fd in (r, zero, wronly):
                        os.close(fd)
                    a.close()
                with open(root / "eicar.com", "rb") as f:
                    got["eicar"] = (await c.scan_fd("vm", "eicar.com", f.fileno()))["status"]
            finally:
                await c.close()
        return got

    got = run_async(scenario)
    assert got.pop("empty") == "clean" and got.pop("eicar") == "infected"
    for name, verdict in got.items():
        assert verdict.startswith("error: "), f"{name}: {verdict}"
    assert "a pipe" in got["pipe"] and "a socket" in got["socketpair"]
    assert "character device" in got["zero"] and "not open for reading" in got["write-only"]


# -- 4. operator commands only on the admin socket; shims act on their own VMs ----------------


def test_a_shim_cannot_run_operator_commands_or_see_other_shims_vms(tmp_path: Path) -> None:
    root = tmp_path / "vm"
    root.mkdir()
    (root / "eicar.com").write_bytes(EICAR)

    async def scenario() -> None:
        async with appliance(tmp_path) as app:
            sock = str(app.config.socket_path)
            admin_path = admin_socket_for(sock)
            assert stat.S_IMODE(os.stat(admin_path).st_mode) == 0o600
            owner = ApplianceClient(sock, shim_id="owner")
            other = ApplianceClient(sock, shim_id="intruder")
            admin = ApplianceClient(admin_path, shim_id="operator")
            for c in (owner, other, admin):
                await c.connect()
            try:
                await owner.register("vm", str(root))
                for op, args in (
                    ("policy-set", {"vm": "vm", "settings": {"actions": ["pass"]}}),
                    ("vm-unregister", {"name": "vm"}),
                    ("vm-list", {}),
                ):
                    with pytest.raises(RequestError) as ei:
                        await other.control(op, **args)
                    assert ei.value.code == "auth", (op, ei.value)
                with pytest.raises(RequestError) as ei:
                    await other.unregister("vm")
                assert ei.value.code == "unknown-vm"
                with pytest.raises(RequestError):
                    await other.scan_path("vm", "eicar.com")
                assert [v["name"] for v in (await other.status())["vms"]] == []
                assert [v["name"] for v in (await owner.status())["vms"]] == ["vm"]
                assert [v["name"] for v in (await admin.status())["vms"]] == ["vm"]
                shown = await admin.control("vm-show", name="vm")
                assert shown["policy"]["actions"] != ["pass"]
                v = await owner.scan_path("vm", "eicar.com")
                assert v["status"] == "infected" and v["action"] == "deny"
            finally:
                for c in (owner, other, admin):
                    await c.close()

    run_async(scenario)


def _hello_as(uid: int, path: str) -> str:
    """Fork a child that drops to ``uid`` and says hello on ``path``; the reply's type."""
    frame = raw_frame({"t": "hello", "v": protocol.PROTOCOL_VERSION, "shim": "x"})
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: syscalls only, then _exit
        try:
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(path)
            s.sendall(frame)
            os.write(w, s.recv(4096))
        except BaseException:
            pass
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    if len(data) < 4:
        return "no reply"
    return str(protocol.unpack(data[4:])["t"])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_the_admin_socket_refuses_other_uids_even_when_its_mode_is_opened() -> None:
    # a directory the other uid can reach (pytest's tmp_path sits under a 0700 one)
    with tempfile.TemporaryDirectory(dir="/tmp") as where:
        os.chmod(where, 0o755)
        got = run_async(lambda: _admin_and_main_as_nobody(Path(where)), timeout=60)
    assert got == ("error", "welcome")


async def _admin_and_main_as_nobody(where: Path) -> tuple[str, str]:
    async with appliance(where) as app:
        sock = str(app.config.socket_path)
        admin_path = admin_socket_for(sock)
        os.chmod(admin_path, 0o666)  # a careless operator; SO_PEERCRED still says no
        os.chmod(sock, 0o666)
        loop = asyncio.get_running_loop()
        admin = await loop.run_in_executor(None, _hello_as, 65534, admin_path)
        main = await loop.run_in_executor(None, _hello_as, 65534, sock)
        return admin, main


# -- 5. VM roots only under --vm-area, opened without following symlinks ----------------------


def test_vm_roots_outside_the_areas_are_refused_with_a_reason(tmp_path: Path) -> None:
    area = tmp_path / "area"
    (area / "vm").mkdir(parents=True)
    (area / "vm" / "f.txt").write_text("fine")
    (tmp_path / "elsewhere").mkdir()
    os.symlink("/etc", area / "etc-link")

    async def scenario() -> dict[str, str]:
        got: dict[str, str] = {}
        async with appliance(tmp_path, vm_areas=[str(area)]) as app:
            c = ApplianceClient(str(app.config.socket_path), shim_id="s")
            await c.connect()
            try:
                await c.register("vm", str(area / "vm"))
                got["inside"] = (await c.scan_path("vm", "f.txt"))["status"]
                for name, root in (
                    ("etc", "/etc"),
                    ("elsewhere", str(tmp_path / "elsewhere")),
                    ("link", str(area / "etc-link")),
                    ("area-itself", str(area)),
                ):
                    try:
                        await c.register(name, root)
                        got[name] = "accepted"
                    except RequestError as exc:
                        got[name] = f"{exc.code}: {exc}"
                # the root swapped for a symlink after registration: refused, never followed
                os.rename(area / "vm", area / "vm.old")
                os.symlink("/etc", area / "vm")
                try:
                    v = await c.scan_path("vm", "hostname")
                    got["swapped"] = f"{v['status']} {v.get('digest')}"
                except RequestError as exc:
                    got["swapped"] = f"{exc.code}: {exc}"
            finally:
                await c.close()
        return got

    got = run_async(scenario)
    assert got.pop("inside") == "clean"
    assert got.pop("swapped").startswith("confined: ")
    for name, outcome in got.items():
        assert outcome.startswith("confined: ") and "outside the areas" in outcome, name


def test_the_default_areas_refuse_system_directories(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        codes = []
        async with appliance(tmp_path) as app:
            c = ApplianceClient(str(app.config.socket_path), shim_id="s")
            await c.connect()
            try:
                for i, root in enumerate(("/etc", "/", "/root", "/usr/lib")):
                    with pytest.raises(RequestError) as ei:
                        await c.register(f"vm{i}", root)
                    codes.append(ei.value.code)
                (tmp_path / "vm").mkdir()
                await c.register("ok", str(tmp_path / "vm"))  # the temp dir is a default area
            finally:
                await c.close()
        return codes

    assert run_async(scenario) == ["confined"] * 4


# -- 8. a file over the size limit is refused from its size, unread ---------------------------


def test_files_over_the_size_limit_are_refused_before_being_read(tmp_path: Path) -> None:
    root = tmp_path / "vm"
    root.mkdir()
    with open(root / "huge.img", "wb") as f:
        f.truncate(160 * MiB)  # sparse: over the 100 MiB default limit, costs no disk

    async def scenario() -> tuple[list[dict[str, object]], int]:
        async with appliance(tmp_path) as app:
            c = ApplianceClient(str(app.config.socket_path), shim_id="s")
            await c.connect()
            try:
                await c.register("vm", str(root))
                got = [await c.scan_path("vm", "huge.img")]
                with open(root / "huge.img", "rb") as f:
                    got.append(await c.scan_fd("vm", "huge.img", f.fileno()))
            finally:
                await c.close()
            return got, app.counters.bytes_read

    verdicts, bytes_read = run_async(scenario, timeout=120)
    for v in verdicts:
        assert v["status"] == "error" and "exceeds max file size" in str(v["reason"])
        assert v["digest"] is None
    assert bytes_read == 0


def test_protocol_error_codes_are_documented() -> None:
    # "auth" now also answers an operator command off the admin socket
    assert {"auth", "backpressure", "confined"} <= protocol.ERROR_CODES


# -- a flood drains with bounded memory; status reports the drain rate ------------------------


def test_status_reports_the_drain_rate(tmp_path: Path) -> None:
    root = tmp_path / "vm"
    root.mkdir()
    for i in range(40):
        (root / f"f{i}").write_bytes(os.urandom(64))

    async def scenario() -> tuple[float, float, dict[str, int]]:
        async with appliance(tmp_path) as app:
            idle = (await _status_of(app))["drain_rate"]
            c = ApplianceClient(str(app.config.socket_path), shim_id="s")
            await c.connect()
            try:
                await c.register("vm", str(root))
                await asyncio.gather(*(c.scan_path("vm", f"f{i}") for i in range(40)))
            finally:
                await c.close()
            await async_wait_for(lambda: app.drain.rate() > 0, 20)
            bounds = {
                "memo": app.memo.max_entries,
                "locations": app.locations.max_entries,
            }
            return idle, (await _status_of(app))["drain_rate"], bounds

    idle, busy, bounds = run_async(scenario, timeout=60)
    assert idle == 0.0 and busy > 0
    assert all(0 < v <= 1_000_000 for v in bounds.values())  # what a flood can grow, capped


async def _status_of(app: object) -> dict[str, object]:
    sock = admin_socket_for(str(app.config.socket_path))  # type: ignore[attr-defined]
    c = ApplianceClient(sock, shim_id="operator")
    await c.connect()
    try:
        return dict(await c.status())
    finally:
        await c.close()


def test_registrations_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from offscan.appliance import limits

    monkeypatch.setattr(limits, "MAX_VMS", 2)
    roots = [tmp_path / f"vm{i}" for i in range(3)]
    for r in roots:
        r.mkdir()

    async def scenario() -> str:
        async with appliance(tmp_path) as app:
            c = ApplianceClient(str(app.config.socket_path), shim_id="s")
            await c.connect()
            try:
                await c.register("vm0", str(roots[0]))
                await c.register("vm1", str(roots[1]))
                await c.register("vm1", str(roots[1]))  # again: not a new VM
                with pytest.raises(RequestError) as ei:
                    await c.register("vm2", str(roots[2]))
                return ei.value.code
            finally:
                await c.close()

    assert run_async(scenario) == "backpressure"
