"""The fleet's shared verdict tier (offscan.cache.redis_tier) against a real redis-server:
several appliance processes match a content once between them, a forged entry is never
trusted, and Redis killed or stalled mid-stream loses no verdict."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from pathlib import Path
from typing import Any

import msgpack
import pytest
from fleet_support import fleet_appliances, fleet_key, needs_redis, redis_server
from helpers import EICAR, ApplianceProc, async_wait_for, run, run_async, status, wait_for

from offscan.appliance import Appliance
from offscan.cache import CachedVerdict
from offscan.cache.redis_entries import EntryKey, decode_entry, encode_entry, judged_by
from offscan.protocol import ApplianceClient
from offscan.signatures import PatternDB

pytestmark = needs_redis

KEY = b"0123456789abcdef-fleet-key"


def contents(n: int, size: int = 64 * 1024) -> list[bytes]:
    """``n`` distinct contents, the first one infected."""
    out = [EICAR + b"\n"]
    out += [os.urandom(size) for _ in range(n - 1)]
    return out


def write_vm(root: Path, data: list[bytes]) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, d in enumerate(data):
        (root / f"f{i}.bin").write_bytes(d)
        names.append(f"f{i}.bin")
    return names


async def scan_all(sock: Path, vm: str, root: Path, names: list[str]) -> list[dict[str, Any]]:
    async with ApplianceClient(str(sock), shim_id=f"shim-{vm}") as c:
        await c.register(vm, str(root))
        return list(await asyncio.gather(*(c.scan_path(vm, n) for n in names)))


def entry_names(r: Any, data: list[bytes], version: str) -> list[bytes]:
    return [EntryKey(hashlib.sha256(d).digest(), len(d), version).name for d in data]


# -- entries ----------------------------------------------------------------------------------


def test_entry_is_bound_to_its_key_and_the_fleet_key() -> None:
    digest = hashlib.sha256(b"x").digest()
    v = CachedVerdict("clean", (), "7", digest, 1, 1.0)
    key = EntryKey(digest, 1, "7")
    value = encode_entry(key, v, KEY, "a:1")
    assert decode_entry(key, value, KEY) == v
    assert judged_by(value) == "a:1"
    assert decode_entry(key, value, b"another-fleet-key-0000") is None
    assert decode_entry(EntryKey(digest, 2, "7"), value, KEY) is None  # moved to another size
    assert decode_entry(EntryKey(digest, 1, "8"), value, KEY) is None  # or another version
    tampered = value[:-1] + bytes([value[-1] ^ 1])
    assert decode_entry(key, tampered, KEY) is None
    assert decode_entry(key, b"", KEY) is None


def test_serve_refuses_redis_without_a_key_and_a_short_key(tmp_path: Path) -> None:
    sock = tmp_path / "a.sock"
    out = run("serve", "--socket", sock, "--cache-redis", "unix:///nowhere")
    assert out.returncode == 2
    assert "--cache-key" in out.stderr and "Traceback" not in out.stderr
    short = tmp_path / "k"
    short.write_bytes(b"short")
    out = run("serve", "--socket", sock, "--cache-redis", "redis://x", "--cache-key", short)
    assert out.returncode == 2 and "at least 16" in out.stderr, out.stderr
    out = run("serve", "--socket", sock, "--cache-redis", "http://x", "--cache-key", short)
    assert out.returncode == 2 and "scheme" in out.stderr, out.stderr


# -- two appliances, one content ----------------------------------------------------------------


def test_two_appliances_match_each_content_once(tmp_path: Path) -> None:
    """The same contents reach two appliances at the same time: matched once between them
    (cluster-wide single-flight), both give the same verdicts; a third appliance started
    afterwards serves them all from Redis without reading a byte through the matcher."""
    data = contents(12)
    key = fleet_key(tmp_path / "fleet.key", KEY)
    with redis_server(tmp_path / "redis") as redis:
        with fleet_appliances(tmp_path, redis.url, key, 2) as (a, b):
            ra, rb = tmp_path / "vm-a", tmp_path / "vm-b"
            names = write_vm(ra, data)
            write_vm(rb, data)

            async def both() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
                va, vb = await asyncio.gather(
                    scan_all(a.sock, "vm-a", ra, names), scan_all(b.sock, "vm-b", rb, names)
                )
                return va, vb

            va, vb = run_async(both, timeout=60)
            assert [v["status"] for v in va] == [v["status"] for v in vb]
            assert va[0]["status"] == "infected" and all(v["status"] == "clean" for v in va[1:])
            sa, sb = status(a.sock), status(b.sock)
            assert sa["contents_matched"] + sb["contents_matched"] == len(data), (sa, sb)
            assert sa["shared_cache"]["state"] == sb["shared_cache"]["state"] == "up"
            assert sa["shared_cache"]["forged"] == sb["shared_cache"]["forged"] == 0
            version = sa["pattern_version"]
            wait_for(lambda: status(a.sock)["shared_cache"]["outbox"] == 0, 20, "outbox sent")
            r = redis.client()
            assert all(r.exists(n) for n in entry_names(r, data, version))
            assert not r.keys(b"*:lock")  # every lock released
        c_dir = tmp_path / "c"
        c_dir.mkdir()
        with fleet_appliances(c_dir, redis.url, key, 1) as (c,):
            rc = tmp_path / "vm-c"
            write_vm(rc, data)
            vc = run_async(scan_all(c.sock, "vm-c", rc, names), timeout=60)
            assert [v["status"] for v in vc] == [v["status"] for v in va]
            sc = status(c.sock)
            assert sc["contents_matched"] == 0 and sc["bytes_matched"] == 0
            assert sc["shared_cache"]["hits"] == len(data)
            # batched: fewer round trips than keys (lookups pile up behind one round trip)
            shared = sc["shared_cache"]
            assert shared["round_trips"] < shared["keys_looked_up"] + shared["writes"]


def test_a_lock_left_by_a_dead_appliance_is_taken_over(tmp_path: Path) -> None:
    """A content whose lock another appliance holds and never finishes (it died): the waiting
    appliance takes over once the lock expires and the verdict still arrives."""
    key = fleet_key(tmp_path / "fleet.key", KEY)
    data = [EICAR + b" take over"]
    with redis_server(tmp_path / "redis") as redis:
        with fleet_appliances(tmp_path, redis.url, key, 1) as (a,):
            root = tmp_path / "vm"
            names = write_vm(root, data)
            version = status(a.sock)["pattern_version"]
            lock = EntryKey(hashlib.sha256(data[0]).digest(), len(data[0]), version).lock
            redis.client().set(lock, b"dead-appliance", px=1500)
            (v,) = run_async(scan_all(a.sock, "vm", root, names), timeout=60)
            assert v["status"] == "infected"
            shared = status(a.sock)["shared_cache"]
            assert shared["lock_waits"] >= 1 and shared["takeovers"] == 1
            assert status(a.sock)["contents_matched"] == 1


# -- trust --------------------------------------------------------------------------------------


def _forge(r: Any, content: bytes, version: str, key: bytes) -> None:
    ek = EntryKey(hashlib.sha256(content).digest(), len(content), version)
    clean = CachedVerdict("clean", (), version, ek.digest, ek.size, 1.0)
    r.set(ek.name, encode_entry(ek, clean, key, "attacker"))


def test_a_forged_entry_is_not_trusted(tmp_path: Path) -> None:
    """Someone who can write to Redis but lacks the fleet key writes "clean" for malware: the
    appliance ignores it (counted), matches the content and finds it. The control: the same
    entry signed with the fleet key is served as is, so the check is what stops the forgery."""
    key = fleet_key(tmp_path / "fleet.key", KEY)
    bad = [EICAR + b" forged", EICAR + b" also", EICAR + b" signed", EICAR + b" a list"]
    with redis_server(tmp_path / "redis") as redis:
        with fleet_appliances(tmp_path, redis.url, key, 1) as (a,):
            root = tmp_path / "vm"
            names = write_vm(root, bad)
            version = status(a.sock)["pattern_version"]
            r = redis.client()
            _forge(r, bad[0], version, b"not-the-fleet-key-at-all")
            ek = EntryKey(hashlib.sha256(bad[1]).digest(), len(bad[1]), version)
            r.set(ek.name, msgpack.packb(["clean"]) * 20)  # no MAC at all
            _forge(r, bad[2], version, KEY)  # a fleet member's entry (the control)
            listed = EntryKey(hashlib.sha256(bad[3]).digest(), len(bad[3]), version)
            r.rpush(listed.name, b"clean")  # not even a string: the commands on it fail
            got = run_async(scan_all(a.sock, "vm", root, names), timeout=60)
            assert [v["status"] for v in got] == ["infected", "infected", "clean", "infected"]
            st = status(a.sock)
            assert st["shared_cache"]["forged"] >= 3  # each look at a forged entry counts
            assert st["shared_cache"]["state"] == "up"  # a bad entry is not an outage
            assert st["contents_matched"] == 3
            assert st["detections"] == 3
            # the fleet's own verdicts replace the forgeries
            wait_for(lambda: status(a.sock)["shared_cache"]["outbox"] == 0, 20, "outbox sent")
            for content in [*bad[:2], bad[3]]:
                ek = EntryKey(hashlib.sha256(content).digest(), len(content), version)
                healed = decode_entry(ek, r.get(ek.name), KEY)
                assert healed is not None and healed.infected


# -- Redis down or slow -------------------------------------------------------------------------


def test_redis_killed_mid_stream_loses_no_verdict(tmp_path: Path) -> None:
    """Redis is killed between two halves of a stream of scans and comes back later: every
    request gets its verdict, the tier reports the outage, reconnects by itself and writes the
    verdicts reached while it was down."""
    key = fleet_key(tmp_path / "fleet.key", KEY)
    data = contents(16, size=16 * 1024)
    with redis_server(tmp_path / "redis") as redis:
        with fleet_appliances(tmp_path, redis.url, key, 1) as (a,):
            root = tmp_path / "vm"
            names = write_vm(root, data)
            version = status(a.sock)["pattern_version"]
            first = run_async(scan_all(a.sock, "vm", root, names[:8]), timeout=60)
            redis.kill9()
            second = run_async(scan_all(a.sock, "vm", root, names[8:]), timeout=60)
            got = first + second
            assert len(got) == len(data)
            assert got[0]["status"] == "infected"
            assert all(v["status"] == "clean" for v in got[1:])
            st = status(a.sock)
            assert st["contents_matched"] == len(data)
            assert st["shared_cache"]["state"] == "down"
            assert st["shared_cache"]["outages"] == 1
            assert "unreachable" in a.output()
            redis.start()
            wait_for(lambda: status(a.sock)["shared_cache"]["state"] == "up", 30, "reconnect")
            wait_for(lambda: status(a.sock)["shared_cache"]["outbox"] == 0, 30, "outbox sent")
            r = redis.client()
            names8 = entry_names(r, data[8:], version)
            assert all(r.exists(n) for n in names8), "verdicts of the outage not written"
            assert a.output().count("unreachable") == 1  # logged once


def test_a_stalled_redis_degrades_within_the_timeout(tmp_path: Path) -> None:
    """Redis stops answering (DEBUG SLEEP): scans keep getting verdicts from the local tier
    while it stalls, and the tier comes back when Redis does."""
    key = fleet_key(tmp_path / "fleet.key", KEY)
    data = contents(6, size=8 * 1024)
    with redis_server(tmp_path / "redis") as redis:
        with fleet_appliances(tmp_path, redis.url, key, 1, "--cache-redis-timeout", "0.2") as (a,):
            root = tmp_path / "vm"
            names = write_vm(root, data)
            sleeper = redis.client()
            import threading

            stall = threading.Thread(target=lambda: sleeper.execute_command("DEBUG", "SLEEP", 4))
            stall.start()
            try:
                got = run_async(scan_all(a.sock, "vm", root, names), timeout=60)
            finally:
                stall.join()
            assert [v["status"] for v in got] == ["infected"] + ["clean"] * 5
            assert status(a.sock)["shared_cache"]["errors"] >= 1  # round trips that timed out
            wait_for(lambda: status(a.sock)["shared_cache"]["state"] == "up", 30, "reconnect")
            wait_for(lambda: status(a.sock)["shared_cache"]["outbox"] == 0, 30, "outbox sent")


def test_an_appliance_starts_with_redis_down_and_joins_later(tmp_path: Path) -> None:
    key = fleet_key(tmp_path / "fleet.key", KEY)
    rdir = tmp_path / "redis"
    rdir.mkdir()
    url = f"unix://{rdir / 'redis.sock'}"
    (tmp_path / "a").mkdir()
    a = ApplianceProc(tmp_path / "a", "--cache-redis", url, "--cache-key", str(key))
    try:
        assert status(a.sock)["shared_cache"]["state"] == "down"
        with redis_server(rdir):
            wait_for(lambda: status(a.sock)["shared_cache"]["state"] == "up", 30, "joined")
    finally:
        assert a.stop(signal.SIGTERM) == 0


def test_cluster_url(tmp_path: Path) -> None:
    """``redis+cluster://`` talks to a Redis Cluster (one node holding every slot)."""
    from fleet_support import free_port

    key = fleet_key(tmp_path / "fleet.key", KEY)
    data = contents(4, size=4096)
    with redis_server(tmp_path / "redis", port=free_port(cluster=True), cluster=True) as redis:
        with fleet_appliances(tmp_path, redis.url, key, 2) as (a, b):
            ra, rb = tmp_path / "vm-a", tmp_path / "vm-b"
            names = write_vm(ra, data)
            write_vm(rb, data)
            va = run_async(scan_all(a.sock, "vm-a", ra, names), timeout=60)
            wait_for(lambda: status(a.sock)["shared_cache"]["outbox"] == 0, 20, "outbox sent")
            vb = run_async(scan_all(b.sock, "vm-b", rb, names), timeout=60)
            assert [v["status"] for v in va] == [v["status"] for v in vb]
            sb = status(b.sock)
            assert sb["contents_matched"] == 0 and sb["shared_cache"]["hits"] == len(data)


# -- revalidation after a pattern update, once across the fleet ---------------------------------

NEW_SIG = b"fleet-new-signature-0123"


def test_revalidation_after_an_update_happens_once_across_the_fleet(tmp_path: Path) -> None:
    """Two appliances know the same contents under version 1; both swap to version 2 (one
    signature added). Each content is read through the delta matcher by one appliance only, the
    other takes its verdict from Redis; a content the new signature matches becomes infected
    on both."""
    key = fleet_key(tmp_path / "fleet.key", KEY)
    data = contents(10, size=32 * 1024) + [b"hello " + NEW_SIG + b" world"]
    base_files = [(p.name, p.read_text()) for p in base_sources()]
    added_text = ("new.ndb", f"Fleet.New:0:*:{NEW_SIG.hex()}\n")
    v2 = PatternDB.from_text([*base_files, added_text])
    added = PatternDB.from_text([added_text])
    with redis_server(tmp_path / "redis") as redis:

        async def main() -> None:
            apps = []
            for i in range(2):
                d = tmp_path / f"app{i}"
                d.mkdir()
                apps.append(
                    Appliance(
                        socket_path=str(d / "a.sock"),
                        state_dir=str(d / "state"),
                        cache_redis=redis.url,
                        cache_key=str(key),
                        cache_redis_timeout=5.0,
                    )
                )
            for app in apps:
                await app.start()
            try:
                roots = []
                for i, app in enumerate(apps):
                    root = tmp_path / f"vm{i}"
                    names = write_vm(root, data)
                    roots.append(root)
                    assert app.config.socket_path
                    got = await scan_all(Path(app.config.socket_path), f"vm{i}", root, names)
                    assert [v["status"] for v in got] == ["infected"] + ["clean"] * 10
                assert sum(app.counters.contents_matched for app in apps) == len(data)
                await asyncio.gather(*(app.swap(v2, "v2", added=added) for app in apps))
                total = len(data)

                def done() -> bool:
                    return all(
                        all(app.cache.get(d_, s_, "v2") for d_, s_ in digests(data)) for app in apps
                    )

                await async_wait_for(done, 30, "revalidated on both")
                assert sum(app.counters.revalidations for app in apps) == total
                read = sum(app.counters.revalidation_bytes for app in apps)
                assert read == sum(len(d_) for d_ in data)  # each content read once
                for app in apps:
                    last = app.cache.get(*digests(data)[-1], "v2")
                    assert last is not None and last.matches == ("Fleet.New",)
            finally:
                for app in apps:
                    await app.stop()

        run_async(main, timeout=90)


def digests(data: list[bytes]) -> list[tuple[bytes, int]]:
    return [(hashlib.sha256(d).digest(), len(d)) for d in data]


def base_sources() -> list[Path]:
    import offscan

    root = Path(offscan.__file__).resolve().parent / "patterns"
    if not root.is_dir():
        root = Path(__file__).resolve().parents[1] / "patterns"
    return sorted(p for p in root.iterdir() if p.suffix in (".ndb", ".hdb"))


def test_metrics_report_the_shared_tier(tmp_path: Path) -> None:
    """``/metrics`` carries the tier's counters, whether Redis is up, and its outbox."""
    import urllib.request

    key = fleet_key(tmp_path / "fleet.key", KEY)
    data = contents(3, size=4096)
    root = tmp_path / "vm"
    names = write_vm(root, data)
    with redis_server(tmp_path / "redis") as redis:

        async def main() -> str:
            app = Appliance(
                socket_path=str(tmp_path / "a.sock"),
                cache_redis=redis.url,
                cache_key=str(key),
                cache_redis_timeout=5.0,
                metrics=("127.0.0.1", 0),
            )
            await app.start()
            try:
                await scan_all(tmp_path / "a.sock", "vm", root, names)
                url = f"http://127.0.0.1:{app.metrics_port}/metrics"
                return await asyncio.to_thread(
                    lambda: urllib.request.urlopen(url, timeout=10).read().decode()
                )
            finally:
                await app.stop()

        text = run_async(main, timeout=60)
    assert "offscan_shared_cache_up 1" in text
    assert 'offscan_shared_cache_total{event="misses"} 3' in text
    assert 'offscan_shared_cache_total{event="forged"} 0' in text
    assert "offscan_shared_cache_outbox" in text


def _self_signed(d: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, made by openssl."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_rediss_url_speaks_tls(tmp_path: Path) -> None:
    """``rediss://`` reaches a TLS-only redis-server, certificate checked against a CA."""
    import subprocess

    from fleet_support import REDIS, free_port

    assert REDIS is not None
    cert, pem = _self_signed(tmp_path)
    port = free_port()
    log = open(tmp_path / "redis-tls.log", "ab")
    server = subprocess.Popen(
        [REDIS, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
        + ["--tls-cert-file", str(cert), "--tls-key-file", str(pem)]
        + ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--save", ""],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        key = fleet_key(tmp_path / "fleet.key", KEY)
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
        data = contents(2, size=4096)
        with fleet_appliances(tmp_path, url, key, 1) as (a,):
            wait_for(lambda: status(a.sock)["shared_cache"]["state"] == "up", 30, "TLS up")
            root = tmp_path / "vm"
            names = write_vm(root, data)
            got = run_async(scan_all(a.sock, "vm", root, names), timeout=60)
            assert [v["status"] for v in got] == ["infected", "clean"]
            wait_for(lambda: status(a.sock)["shared_cache"]["writes"] == 2, 30, "written")
    finally:
        server.terminate()
        server.wait(10)
        log.close()
