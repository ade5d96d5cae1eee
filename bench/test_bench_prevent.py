"""open() latency under on-access prevention: offscan's shim vs ClamAV's clamonacc, same run.

Three setups on one private tmpfs (the VM root), one after the other in the same session:
- ``none``: nothing watches; the kernel's own open();
- ``offscan``: a real ``offscan serve`` and ``offscan shim --prevent`` (mount mode);
- ``clamonacc``: a private ``clamd`` (own socket, own config, the same EICAR signatures as
  offscan's shipped database) and ``clamonacc --fdpass`` with ``OnAccessPrevention yes``.

Three cases per setup, each an ``os.open`` + ``os.close`` timed by this process (which neither
watcher exempts): a cached clean 4 KiB file opened again and again, a new 4 KiB file opened
right after it was written, a new 10 MiB file likewise (new content every time, so no cache
can answer). p50/p99 go to each benchmark's ``extra_info`` and, with ``OFFSCAN_BENCH_JSON``
set, to that file; bench/RESULTS.md has the numbers. ``OFFSCAN_BENCH_QUICK=1`` takes fewer
samples. Needs root (fanotify permission events, mount); clamonacc's setup is skipped where
clamd or clamonacc is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from offscan.shim.fanotify import unavailable

QUICK = os.environ.get("OFFSCAN_BENCH_QUICK") == "1"
SAMPLES = {
    "cached": 100 if QUICK else 1000,
    "new_4k": 50 if QUICK else 300,
    "new_10m": 5 if QUICK else 30,
}
SIZES = {"cached": 4096, "new_4k": 4096, "new_10m": 10 << 20}  # bytes
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
PATTERNS = Path(__file__).resolve().parents[1] / "patterns"
START_TIMEOUT = 120.0  # seconds a setup may take to start holding opens (hang guard)
RESULTS: dict[str, dict[str, dict[str, float]]] = {}

if os.geteuid() != 0:
    pytest.skip("fanotify permission events and mount need root", allow_module_level=True)
if (_why := unavailable()) is not None:
    pytest.skip(f"fanotify permission events unavailable: {_why}", allow_module_level=True)


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="offscan-bench-prevent-"))
    root = base / "vm"
    root.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1g,mode=0755", "offscan-bench", str(root)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    (root / "cached.bin").write_bytes(os.urandom(SIZES["cached"]))
    try:
        yield base
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)
        if os.environ.get("OFFSCAN_BENCH_JSON"):
            Path(os.environ["OFFSCAN_BENCH_JSON"]).write_text(json.dumps(RESULTS, indent=1))
        shutil.rmtree(base, ignore_errors=True)


def _denies_eicar(root: Path) -> bool:
    probe = root / "probe-eicar.com"
    if not probe.exists():
        probe.write_bytes(EICAR)
    try:
        os.close(os.open(probe, os.O_RDONLY))
    except PermissionError:
        return True
    return False


def _wait_holding(root: Path, procs: list[subprocess.Popen[bytes]], logs: list[Path]) -> None:
    """Until the setup denies an EICAR open (so it holds opens); then remove the probe."""
    deadline = time.monotonic() + START_TIMEOUT
    while not _denies_eicar(root):
        dead = [log.read_text(errors="replace")[-2000:] for p, log in zip(procs, logs) if p.poll()]
        assert not dead and time.monotonic() < deadline, "\n".join(dead) or "setup did not start"
        time.sleep(0.2)
        (root / "probe-eicar.com").unlink(missing_ok=True)  # a new file: no cached verdict
    (root / "probe-eicar.com").unlink()


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in reversed(procs):  # the watcher first: its held opens are answered as it exits
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextlib.contextmanager
def _offscan(work: Path) -> Iterator[None]:
    root, sock, ready = work / "vm", work / "a.sock", work / "a.ready"
    py = [sys.executable, "-m", "offscan"]
    procs = [
        _start(
            [*py, "serve", "--socket", str(sock), "--state", str(work / "state")]
            + ["--ready-file", str(ready)],
            work / "appliance.log",
        )
    ]
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.exists():
            assert procs[0].poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        procs.append(
            _start(
                [*py, "shim", "--prevent", "--appliance", str(sock), "--vm", f"vm={root}"],
                work / "shim.log",
            )
        )
        _wait_holding(root, procs, [work / "appliance.log", work / "shim.log"])
        yield
    finally:
        _stop(procs)


CLAMD_CONF = """\
Foreground yes
LocalSocket {work}/clamd.sock
DatabaseDirectory {work}/clamdb
LogFile {work}/clamd.log
PidFile {work}/clamd.pid
OnAccessIncludePath {work}/vm
OnAccessPrevention yes
OnAccessExcludeUID 65534
OnAccessMaxFileSize 64M
MaxFileSize 64M
MaxScanSize 64M
"""


@contextlib.contextmanager
def _clamonacc(work: Path) -> Iterator[None]:
    if not (shutil.which("clamd") and shutil.which("clamonacc")):
        pytest.skip("clamd or clamonacc not installed")
    db = work / "clamdb"
    db.mkdir(exist_ok=True)
    for name in ("offscan.ndb", "offscan.hdb"):  # the same signatures offscan serves
        shutil.copy(PATTERNS / name, db / name)
    conf = work / "clamd.conf"
    conf.write_text(CLAMD_CONF.format(work=work))
    procs = [_start(["clamd", f"--config-file={conf}"], work / "clamd.out")]
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (work / "clamd.sock").exists():
            assert procs[0].poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        procs.append(
            _start(
                ["clamonacc", "--foreground", "--fdpass", f"--config-file={conf}"]
                + [f"--log={work / 'clamonacc.log'}"],
                work / "clamonacc.out",
            )
        )
        _wait_holding(work / "vm", procs, [work / "clamd.out", work / "clamonacc.out"])
        yield
    finally:
        _stop(procs)


SETUPS: dict[str, Callable[[Path], contextlib.AbstractContextManager[None]]] = {
    "none": lambda work: contextlib.nullcontext(),
    "offscan": _offscan,
    "clamonacc": _clamonacc,
}


@pytest.fixture(scope="module", params=list(SETUPS))
def setup(request: pytest.FixtureRequest, work: Path) -> Iterator[str]:
    with SETUPS[request.param](work):
        yield request.param


def _open_once(path: Path) -> float:
    t0 = time.perf_counter_ns()
    fd = os.open(path, os.O_RDONLY)
    t1 = time.perf_counter_ns()
    os.close(fd)
    return (t1 - t0) / 1000.0  # µs


def _measure(root: Path, case: str) -> list[float]:
    n, size = SAMPLES[case], SIZES[case]
    if case == "cached":
        path = root / "cached.bin"
        for _ in range(3):
            _open_once(path)  # warm: its verdict is cached from here on
        return [_open_once(path) for _ in range(n)]
    out = []
    for i in range(n):
        path = root / f"new-{case}-{i}.bin"
        path.write_bytes(os.urandom(size))  # new content: no cache anywhere knows it
        out.append(_open_once(path))
        path.unlink()
    return out


def _percentile(sorted_values: list[float], q: float) -> float:
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def _round_trips(sock: Path, root: Path, n: int) -> list[float]:
    """``scan_fd`` of new 4 KiB files straight to the appliance, in µs (no shim, no fanotify):
    the floor under offscan's new-file opens."""
    import asyncio

    from offscan.protocol import ApplianceClient

    async def run() -> list[float]:
        client = ApplianceClient(str(sock), shim_id="bench-rtt")
        await client.connect()
        out = []
        try:
            await client.register("rtt", str(root))
            for i in range(n):
                path = root / f"rtt-{i}.bin"
                path.write_bytes(os.urandom(4096))
                fd = os.open(path, os.O_RDONLY)
                t0 = time.perf_counter_ns()
                await client.scan_fd("rtt", path.name, fd)
                out.append((time.perf_counter_ns() - t0) / 1000.0)
                os.close(fd)
                path.unlink()
        finally:
            await client.close()
        return out

    return asyncio.run(run())


def test_appliance_round_trip_new_4k(benchmark: Any, setup: str, work: Path) -> None:
    """Reference row: what one verdict on new content costs at the appliance alone."""
    if setup != "offscan":
        pytest.skip("the appliance runs in the offscan setup only")
    root = work / "rtt"  # not under the prevented root: nothing holds these opens
    root.mkdir(exist_ok=True)
    samples: list[float] = []
    benchmark.pedantic(
        lambda: samples.extend(_round_trips(work / "a.sock", root, SAMPLES["new_4k"])), rounds=1
    )
    _record(benchmark, "appliance_rtt_new_4k", setup, samples)


def _record(benchmark: Any, case: str, setup: str, samples: list[float]) -> None:
    values = sorted(samples)
    stats = {
        "p50_us": round(_percentile(values, 0.50), 1),
        "p99_us": round(_percentile(values, 0.99), 1),
        "samples": len(values),
    }
    benchmark.extra_info.update(stats)
    RESULTS.setdefault(case, {})[setup] = stats
    print(
        f"\n{setup:>10} {case:>8}: p50 {stats['p50_us']:>9.1f} µs  p99 {stats['p99_us']:>9.1f} µs"
    )


@pytest.mark.parametrize("case", list(SAMPLES))
def test_open_latency(benchmark: Any, setup: str, case: str, work: Path) -> None:
    samples: list[float] = []
    benchmark.pedantic(lambda: samples.extend(_measure(work / "vm", case)), rounds=1)
    _record(benchmark, case, setup, samples)
