"""The event path through a real appliance process, and clamd on the same files.

offscan (``offscan serve``, under uvloop and under the stdlib loop), one shim connection
(the shim's ``ApplianceClient``, in this process), scans by path of 4 KiB files:
- cache hit: files already verdicted (identity memo → verdict cache; no read);
- new content: files never seen (open, SHA-256, match, cache put);
each with 1, 16 and 256 requests in flight (1: one ``scan`` at a time; more: ``scan-batch``
frames of up to 64 scans, several in flight, as the shim sends them), plus the old way (256
single ``scan`` frames in flight) for the before/after ratio in the same run.
clamd (Debian's ``clamav-daemon``, started here on a private socket with a private config and
the same EICAR database): ``clamdscan --multiscan --fdpass`` over the same files, and one
persistent ``IDSESSION`` client pipelining ``zSCAN`` commands 16 and 256 deep.

Every benchmark records events/s (best round), latency p50/p99, the CPU the server
process spent per 1,000 verdicts (``/proc``: less sensitive to a loaded machine than wall
time) and the CPU this process (the client) spent per 1,000 verdicts (``os.times``) in
``extra_info`` and in ``$OFFSCAN_BENCH_APPLIANCE_OUT`` (JSON lines; default
``/tmp/offscan-bench-appliance.jsonl``), which bench/RESULTS.md is written from.
``OFFSCAN_BENCH_QUICK=1`` shrinks the rounds. Run it with the benchmarks on (not
``--benchmark-disable``, which leaves no timings to report):
``python -m pytest -q bench/test_bench_appliance.py -k cache_hit -p no:cacheprovider``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from offscan.protocol import ApplianceClient

QUICK = os.environ.get("OFFSCAN_BENCH_QUICK") == "1"
FILES = 1000 if QUICK else 4000  # distinct cache-hit files (requests per round)
NEW_PER_ROUND = 1000 if QUICK else 4000  # new files per round
ROUNDS = 3 if QUICK else 5
FILE_SIZE = 4096  # bytes
BATCH = 64  # scans per scan-batch frame (the shim's SEND_BATCH)
IN_FLIGHT = (1, 16, 256)
OUT = os.environ.get("OFFSCAN_BENCH_APPLIANCE_OUT", "/tmp/offscan-bench-appliance.jsonl")
PATTERNS = Path(__file__).resolve().parents[1] / "patterns"
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds, from /proc: user vs system CPU (sys is where
    GIL hand-offs between threads show, as futex waits and wake-ups)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def _own_cpu() -> float:
    """utime + stime of this process (the client side of every offscan benchmark)."""
    t = os.times()
    return t.user + t.system


def _split_info(user: float, system: float, files: int) -> dict[str, float]:
    return {
        "server_user_us_per_file": round(user * 1e6 / max(1, files), 1),
        "server_sys_us_per_file": round(system * 1e6 / max(1, files), 1),
    }


def _write_files(root: Path, names: list[str], *, distinct_from: int = 0) -> None:
    body = os.urandom(FILE_SIZE - 8)
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body + (distinct_from + i).to_bytes(8, "little"))


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def appliance(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A real appliance under the given event loop, one registered VM, a client."""
    work = Path(tempfile.mkdtemp(prefix="offscan-bench-appliance-"))
    sock, ready = work / "a.sock", work / "ready"
    log = open(work / "appliance.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "offscan", "serve", "--socket", str(sock)]
        + ["--state", str(work / "state"), "--ready-file", str(ready), "--loop", request.param],
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
    hits = [f"hit/d{i % 16}/f{i}" for i in range(FILES)]
    _write_files(root, hits)
    loop = asyncio.new_event_loop()
    client = ApplianceClient(str(sock), shim_id="bench")
    loop.run_until_complete(client.connect())
    loop.run_until_complete(client.register("vm", str(root)))
    env = {"loop": loop, "client": client, "root": root, "work": work, "pid": proc.pid}
    env |= {"hits": hits, "server": f"offscan-{request.param}", "rounds": 0}
    _drive(env, hits, 256)  # the first time: matched; from then on: identity memo hits
    yield env
    loop.run_until_complete(client.close())
    loop.close()
    proc.terminate()
    proc.wait(10)
    log.close()
    shutil.rmtree(work, ignore_errors=True)


def _drive(
    env: dict[str, Any], names: list[str], in_flight: int, *, single: bool = False
) -> list[float]:
    """Scan ``names`` with ``in_flight`` requests outstanding; the latency of each."""
    client: ApplianceClient = env["client"]

    async def singles() -> list[float]:
        sem = asyncio.Semaphore(in_flight)

        async def one(name: str) -> float:
            async with sem:
                t = time.perf_counter()
                v = await client.scan_path("vm", name)
                assert v["status"] == "clean", v
                return time.perf_counter() - t

        return list(await asyncio.gather(*(one(n) for n in names)))

    async def batched() -> list[float]:
        size = min(in_flight, BATCH)
        chunks = iter([names[i : i + size] for i in range(0, len(names), size)])
        out: list[float] = []

        async def lane() -> None:
            for chunk in chunks:
                t = time.perf_counter()
                got = await client.scan_batch([("vm", n, "access", None) for n in chunk])
                dt = time.perf_counter() - t
                for v in got:
                    assert not isinstance(v, Exception) and v["status"] == "clean", v
                out.extend([dt] * len(chunk))

        await asyncio.gather(*(lane() for _ in range(max(1, in_flight // size))))
        return out

    run = singles if single or in_flight == 1 else batched
    return env["loop"].run_until_complete(run())


def _record(
    benchmark: Any,
    server: str,
    path: str,
    latencies: list[float],
    n: int,
    cpu: float,
    how: str,
    extra: dict[str, Any] | None = None,
    client_cpu: float | None = None,
) -> None:
    lat = sorted(latencies)
    best = benchmark.stats.stats.min if benchmark.stats else float("nan")
    info = {
        "server": server,
        "path": path,
        "how": how,
        "requests_per_round": n,
        "events_per_s": round(n / best, 1),
        "latency_p50_ms": round(lat[len(lat) // 2] * 1000, 3) if lat else None,
        "latency_p99_ms": round(lat[max(0, int(len(lat) * 0.99) - 1)] * 1000, 3) if lat else None,
        "server_cpu_ms_per_1000": round(cpu * 1e6 / max(1, n * benchmark.stats.stats.rounds), 1)
        if benchmark.stats
        else None,
        "client_cpu_ms_per_1000": round(
            client_cpu * 1e6 / max(1, n * benchmark.stats.stats.rounds), 1
        )
        if benchmark.stats and client_cpu is not None
        else None,
        **(extra or {}),
    }
    benchmark.extra_info.update(info)
    with open(OUT, "a") as f:
        f.write(json.dumps({"name": benchmark.name, "time": time.time(), **info}) + "\n")


@pytest.mark.parametrize("in_flight", IN_FLIGHT)
def test_event_path_cache_hit(benchmark: Any, appliance: dict[str, Any], in_flight: int) -> None:
    names = appliance["hits"] if in_flight > 1 else appliance["hits"][: FILES // 4]
    latencies: list[float] = []
    cpu0, own0 = _cpu_seconds(appliance["pid"]), _own_cpu()
    benchmark.pedantic(
        lambda: latencies.extend(_drive(appliance, names, in_flight)), rounds=ROUNDS, iterations=1
    )
    cpu, own = _cpu_seconds(appliance["pid"]) - cpu0, _own_cpu() - own0
    how = "scan" if in_flight == 1 else f"scan-batch x{min(in_flight, BATCH)}"
    server, n = appliance["server"], len(names)
    _record(benchmark, server, "cache hit", latencies, n, cpu, how, client_cpu=own)


def test_event_path_cache_hit_single_frames(benchmark: Any, appliance: dict[str, Any]) -> None:
    """The way before batches: 256 single ``scan`` frames in flight (same run, for the ratio)."""
    names = appliance["hits"]
    latencies: list[float] = []
    cpu0, own0 = _cpu_seconds(appliance["pid"]), _own_cpu()
    benchmark.pedantic(
        lambda: latencies.extend(_drive(appliance, names, 256, single=True)),
        rounds=ROUNDS,
        iterations=1,
    )
    cpu, own = _cpu_seconds(appliance["pid"]) - cpu0, _own_cpu() - own0
    server, n = appliance["server"], len(names)
    _record(benchmark, server, "cache hit", latencies, n, cpu, "scan x256", client_cpu=own)


@pytest.mark.parametrize("in_flight", IN_FLIGHT)
def test_event_path_new_content(benchmark: Any, appliance: dict[str, Any], in_flight: int) -> None:
    per_round = NEW_PER_ROUND if in_flight > 1 else NEW_PER_ROUND // 8
    root = appliance["root"]

    def fresh() -> tuple[tuple[list[str]], dict[str, Any]]:
        appliance["rounds"] += 1
        r = appliance["rounds"]
        names = [f"new/r{r}/d{i % 16}/f{i}" for i in range(per_round)]
        _write_files(root, names, distinct_from=r << 32)
        return (names,), {}

    latencies: list[float] = []
    cpu = [0.0, 0.0]  # user, sys

    def one_round(names: list[str]) -> None:
        u0, s0 = _cpu_split(appliance["pid"])
        latencies.extend(_drive(appliance, names, in_flight))
        u1, s1 = _cpu_split(appliance["pid"])
        cpu[0] += u1 - u0
        cpu[1] += s1 - s0

    benchmark.pedantic(one_round, setup=fresh, rounds=ROUNDS, iterations=1)
    how = "scan" if in_flight == 1 else f"scan-batch x{min(in_flight, BATCH)}"
    split = _split_info(cpu[0], cpu[1], per_round * ROUNDS)
    _record(
        benchmark, appliance["server"], "new content", latencies, per_round, sum(cpu), how, split
    )


# -- clamd on the same files ------------------------------------------------------------------


@pytest.fixture(scope="module")
def clamd() -> Iterator[dict[str, Any]]:
    """clamd on a private socket, with a private config and offscan's EICAR database."""
    if shutil.which("clamd") is None or shutil.which("clamdscan") is None:
        pytest.skip("clamd/clamdscan not installed (Debian: clamav-daemon, clamdscan)")
    work = Path(tempfile.mkdtemp(prefix="offscan-bench-clamd-"))
    db = work / "db"
    db.mkdir()
    for f in PATTERNS.glob("offscan.*db"):
        shutil.copy(f, db)
    conf = work / "clamd.conf"
    sock = work / "clamd.sock"
    conf.write_text(
        f"LocalSocket {sock}\nDatabaseDirectory {db}\nForeground yes\nLogFile {work}/clamd.log\n"
        f"MaxThreads 4\nUser {os.environ.get('USER', 'root')}\nMaxQueue 512\n"
    )
    proc = subprocess.Popen(
        ["clamd", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "clamd did not start"
        time.sleep(0.05)
    root = work / "files"
    hits = [f"hit/d{i % 16}/f{i}" for i in range(FILES)]
    _write_files(root, hits)
    env = {"conf": conf, "sock": sock, "root": root, "hits": hits, "pid": proc.pid, "rounds": 0}
    _idsession(env, [str(root / n) for n in hits], 16)  # fill its clean-file cache
    yield env
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(work, ignore_errors=True)


def _idsession(env: dict[str, Any], paths: list[str], depth: int) -> list[float]:
    """One persistent IDSESSION connection, ``depth`` zSCAN commands in flight; latencies."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(env["sock"]))
    s.sendall(b"zIDSESSION\0")
    sent: dict[int, float] = {}
    latencies: list[float] = []
    buf = b""
    nxt = 0
    try:
        while nxt < len(paths) or sent:
            while nxt < len(paths) and len(sent) < depth:
                s.sendall(b"zSCAN " + paths[nxt].encode() + b"\0")
                nxt += 1
                sent[nxt] = time.perf_counter()  # clamd numbers the session's commands from 1
            buf += s.recv(65536)
            *replies, buf = buf.split(b"\0")
            for reply in replies:
                rid = int(reply.split(b":", 1)[0])
                assert reply.endswith(b"OK"), reply
                latencies.append(time.perf_counter() - sent.pop(rid))
        s.sendall(b"zEND\0")
    finally:
        s.close()
    return latencies


def _clamdscan(env: dict[str, Any], paths: list[str]) -> None:
    listing = env["root"] / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    out = subprocess.run(
        ["clamdscan", "-c", str(env["conf"]), "--multiscan", "--fdpass", "--no-summary"]
        + [f"--file-list={listing}"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.parametrize(
    "how", ["clamdscan --multiscan --fdpass", "IDSESSION x16", "IDSESSION x256"]
)
def test_clamd_cache_hit(benchmark: Any, clamd: dict[str, Any], how: str) -> None:
    paths = [str(clamd["root"] / n) for n in clamd["hits"]]
    latencies: list[float] = []
    cpu0, own0 = _cpu_seconds(clamd["pid"]), _own_cpu()
    if how.startswith("clamdscan"):
        benchmark.pedantic(_clamdscan, args=(clamd, paths), rounds=ROUNDS, iterations=1)
    else:
        depth = int(how.rsplit("x", 1)[1])
        benchmark.pedantic(
            lambda: latencies.extend(_idsession(clamd, paths, depth)), rounds=ROUNDS, iterations=1
        )
    cpu, own = _cpu_seconds(clamd["pid"]) - cpu0, _own_cpu() - own0
    # own: the IDSESSION client's CPU (clamdscan is a child process: not counted, None)
    own_cpu = None if how.startswith("clamdscan") else own
    _record(benchmark, "clamd", "cache hit", latencies, len(paths), cpu, how, client_cpu=own_cpu)


@pytest.mark.parametrize(
    "how", ["clamdscan --multiscan --fdpass", "IDSESSION x16", "IDSESSION x256"]
)
def test_clamd_new_content(benchmark: Any, clamd: dict[str, Any], how: str) -> None:
    def fresh() -> tuple[tuple[list[str]], dict[str, Any]]:
        clamd["rounds"] += 1
        r = clamd["rounds"]
        names = [f"new/r{r}/d{i % 16}/f{i}" for i in range(NEW_PER_ROUND)]
        _write_files(clamd["root"], names, distinct_from=r << 32)
        return ([str(clamd["root"] / n) for n in names],), {}

    latencies: list[float] = []
    cpu = [0.0, 0.0]  # user, sys

    def one_round(paths: list[str]) -> None:
        u0, s0 = _cpu_split(clamd["pid"])
        if how.startswith("clamdscan"):
            _clamdscan(clamd, paths)
        else:
            latencies.extend(_idsession(clamd, paths, int(how.rsplit("x", 1)[1])))
        u1, s1 = _cpu_split(clamd["pid"])
        cpu[0] += u1 - u0
        cpu[1] += s1 - s0

    benchmark.pedantic(one_round, setup=fresh, rounds=ROUNDS, iterations=1)
    split = _split_info(cpu[0], cpu[1], NEW_PER_ROUND * ROUNDS)
    _record(benchmark, "clamd", "new content", latencies, NEW_PER_ROUND, sum(cpu), how, split)
