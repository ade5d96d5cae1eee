"""Helpers for the fleet tests: a real ``redis-server`` on a private unix socket (or TCP port,
for a one-node Redis Cluster), a fleet key file, and appliances that share the tier.

Every server is a child of the test process, started with no persistence, and always stopped
by the fixture or ``with`` block that started it.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ApplianceProc, wait_for

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")


def free_port(*, cluster: bool = False) -> int:
    """A free TCP port on 127.0.0.1; with ``cluster``, one whose cluster bus port (+10000)
    is free too (and below 65536)."""
    if not cluster:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 50000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair for a Redis Cluster node")


class RedisServer:
    """``redis-server`` on ``sock`` (or on 127.0.0.1:``port``), no persistence; ``kill9`` and
    ``start`` again reuse the same address."""

    def __init__(self, work: Path, *, port: int = 0, cluster: bool = False) -> None:
        assert REDIS is not None
        self.work = work
        self.sock = work / "redis.sock"
        self.port = port
        self.cluster = cluster
        self.p: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        if self.cluster:
            return f"redis+cluster://127.0.0.1:{self.port}"
        return f"unix://{self.sock}"

    def start(self) -> None:
        args = [
            str(REDIS),
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
            "--dir",
            str(self.work),
        ]
        if not self.port:
            args += ["--unixsocket", str(self.sock), "--unixsocketperm", "700"]
        else:
            args += ["--bind", "127.0.0.1"]
        if self.cluster:
            conf = self.work / "nodes.conf"
            conf.unlink(missing_ok=True)
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(conf)]
        log = open(self.work / "redis.log", "ab")
        with log:
            self.p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._answers, 20, "redis-server start")
        if self.cluster:
            self.client().execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            wait_for(
                lambda: b"cluster_state:ok" in self.client().execute_command("CLUSTER", "INFO"),
                20,
                "one-node cluster ready",
            )

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        if self.port:
            return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        return redis.Redis(unix_socket_path=str(self.sock), socket_timeout=5)

    def _answers(self) -> bool:
        import redis

        assert self.p is not None
        if self.p.poll() is not None:
            raise AssertionError(f"redis-server exited: {(self.work / 'redis.log').read_text()}")
        try:
            return bool(self.client().ping())
        except (redis.RedisError, OSError):
            return False

    def kill9(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait()
        self.sock.unlink(missing_ok=True)

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@contextlib.contextmanager
def redis_server(work: Path, **kwargs: object) -> Iterator[RedisServer]:
    work.mkdir(parents=True, exist_ok=True)
    r = RedisServer(work, **kwargs)  # type: ignore[arg-type]
    try:
        yield r
    finally:
        r.stop()


def fleet_key(path: Path, key: bytes = b"0123456789abcdef-fleet-key") -> Path:
    path.write_bytes(key)
    path.chmod(0o600)
    return path


# Tests that count matches need Redis counted up throughout: a loaded CI machine may take
# longer than the 0.25 s default for a round trip. Tests of a stall pass their own timeout
# (argparse keeps the last one given).
TEST_TIMEOUT = "5"


def fleet_args(url: str, key: Path, *extra: str) -> tuple[str, ...]:
    return (
        "--cache-redis",
        url,
        "--cache-key",
        str(key),
        "--cache-redis-timeout",
        TEST_TIMEOUT,
        *extra,
    )


@contextlib.contextmanager
def fleet_appliances(
    work: Path, url: str, key: Path, n: int, *extra: str
) -> Iterator[list[ApplianceProc]]:
    """``n`` appliance processes sharing the tier at ``url``, each in ``work/applN``."""
    apps: list[ApplianceProc] = []
    try:
        for i in range(n):
            d = work / f"app{i}"
            d.mkdir(parents=True, exist_ok=True)
            apps.append(ApplianceProc(d, *fleet_args(url, key, *extra), name=f"app{i}"))
        yield apps
    finally:
        for a in apps:
            a.stop()
