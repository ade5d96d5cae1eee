"""The event path through a real appliance process: events/s and verdict latency.

Two paths, each a batch of concurrent scan requests over one shim connection:
- cache hit: files already verdicted (identity memo → verdict cache; no read);
- new content: files never seen (open, SHA-256, match, cache put).
Latency p50/p99 of the requests in a batch go to ``extra_info`` (and bench/RESULTS.md).
``OFFSCAN_BENCH_QUICK=1`` shrinks the batches.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from offscan.protocol import ApplianceClient

QUICK = os.environ.get("OFFSCAN_BENCH_QUICK") == "1"
BATCH = 200 if QUICK else 2000  # requests per round
ROUNDS = 3 if QUICK else 5
FILE_SIZE = 4096  # bytes


@pytest.fixture(scope="module")
def appliance():
    work = Path(tempfile.mkdtemp(prefix="offscan-bench-appliance-"))
    sock, ready = work / "a.sock", work / "ready"
    log = open(work / "appliance.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offscan",
            "serve",
            "--socket",
            str(sock),
            "--state",
            str(work / "state"),
            "--ready-file",
            str(ready),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (
            work / "appliance.log"
        ).read_text()
        time.sleep(0.05)
    root = work / "vm"
    root.mkdir()
    loop = asyncio.new_event_loop()
    client = ApplianceClient(str(sock), shim_id="bench")
    loop.run_until_complete(client.connect())
    loop.run_until_complete(client.register("vm", str(root)))
    yield {"loop": loop, "client": client, "root": root, "work": work}
    loop.run_until_complete(client.close())
    loop.close()
    proc.terminate()
    proc.wait(10)
    log.close()
    shutil.rmtree(work, ignore_errors=True)


def _batch(env, names: list[str]) -> list[float]:
    client, loop = env["client"], env["loop"]

    async def one(name: str) -> float:
        t = time.perf_counter()
        v = await client.scan_path("vm", name)
        assert v["status"] == "clean", v
        return time.perf_counter() - t

    async def run() -> list[float]:
        return list(await asyncio.gather(*(one(n) for n in names)))

    return loop.run_until_complete(run())


def _record(benchmark, latencies: list[float], n: int) -> None:
    lat = sorted(latencies)
    benchmark.extra_info.update(
        {
            "requests_per_round": n,
            "events_per_s": round(n / benchmark.stats.stats.min, 1) if benchmark.stats else None,
            "latency_p50_ms": round(lat[len(lat) // 2] * 1000, 3),
            "latency_p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 3),
        }
    )
    if os.environ.get("OFFSCAN_BENCH_JSON"):
        with open(os.environ["OFFSCAN_BENCH_JSON"] + ".appliance", "a") as f:
            f.write(json.dumps({"name": benchmark.name, **benchmark.extra_info}) + "\n")


def test_event_path_cache_hit(benchmark, appliance):
    names = [f"hit/f{i}" for i in range(BATCH)]
    (appliance["root"] / "hit").mkdir()
    body = os.urandom(FILE_SIZE)
    for i, n in enumerate(names):
        (appliance["root"] / n).write_bytes(body + i.to_bytes(4, "little"))
    _batch(appliance, names)  # first time: matched; from now on: identity memo hits
    latencies: list[float] = []
    benchmark.pedantic(
        lambda: latencies.extend(_batch(appliance, names)), rounds=ROUNDS, iterations=1
    )
    _record(benchmark, latencies, BATCH)


def test_event_path_new_content(benchmark, appliance):
    counter = iter(range(10**9))
    (appliance["root"] / "new").mkdir()

    def fresh() -> tuple[tuple[list[str]], dict]:
        r = next(counter)
        names = [f"new/r{r}-f{i}" for i in range(BATCH)]
        for n in names:
            (appliance["root"] / n).write_bytes(os.urandom(FILE_SIZE))
        return (names,), {}

    latencies: list[float] = []
    benchmark.pedantic(
        lambda names: latencies.extend(_batch(appliance, names)),
        setup=fresh,
        rounds=ROUNDS,
        iterations=1,
    )
    _record(benchmark, latencies, BATCH)


def test_event_path_latency_one_in_flight(benchmark, appliance):
    """Verdict latency without queueing: one request at a time, new content each time."""
    (appliance["root"] / "seq").mkdir()
    n = 50 if QUICK else 300
    names = [f"seq/f{i}" for i in range(n * ROUNDS)]
    for name in names:
        (appliance["root"] / name).write_bytes(os.urandom(FILE_SIZE))
    it = iter(range(len(names)))
    latencies: list[float] = []

    def sequential() -> None:
        for _ in range(n):
            latencies.extend(_batch(appliance, [names[next(it)]]))

    benchmark.pedantic(sequential, rounds=ROUNDS, iterations=1)
    _record(benchmark, latencies, n)
