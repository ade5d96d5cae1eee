"""Sustained cache hits against a real ``offscan serve``, for profiling (not a benchmark test).

Starts ``offscan serve`` on a temporary socket, writes 4,000 files of 4 KiB, scans them once
(new content), then scans them again and again as cache hits through ``scan-batch`` (4 lanes
of 64, as the shim sends them) for ``SECONDS``; prints hits/s and the CPU the server and this
client spent per hit. While it runs, ``$TMP/offscan-hits-driver.pid`` holds the server's pid,
written after the first round, for a profiler::

    python bench/hits_driver.py 14 uvloop &
    sleep 3; py-spy record --nonblocking --gil --threads -r 250 -f raw -d 10 \\
        -o /tmp/hits.txt --pid "$(cat /tmp/offscan-hits-driver.pid)"
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from offscan.protocol import ApplianceClient

FILES = 4000
LANES, BATCH = 4, 64  # 256 scans in flight
PID_FILE = Path(tempfile.gettempdir()) / "offscan-hits-driver.pid"


def _cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def _drive(sock: Path, root: Path, names: list[str], seconds: float, pid: int) -> str:
    client = ApplianceClient(str(sock), shim_id="driver")
    await client.connect()
    try:
        await client.register("vm", str(root))

        async def one_round() -> None:
            chunks = iter([names[i : i + BATCH] for i in range(0, len(names), BATCH)])

            async def lane() -> None:
                for chunk in chunks:
                    got = await client.scan_batch([("vm", n, "access", None) for n in chunk])
                    assert all(not isinstance(v, Exception) and v["status"] == "clean" for v in got)

            await asyncio.gather(*(lane() for _ in range(LANES)))

        await one_round()  # new content; from here on, identity-memo hits
        PID_FILE.write_text(str(pid))
        t0, own0, server0, hits = time.monotonic(), os.times(), _cpu(pid), 0
        while time.monotonic() - t0 < seconds:
            await one_round()
            hits += len(names)
        wall, own1 = time.monotonic() - t0, os.times()
        own = (own1.user + own1.system) - (own0.user + own0.system)
        user, system = (b - a for a, b in zip(server0, _cpu(pid), strict=True))
        return (
            f"{hits / wall:,.0f} hits/s; server CPU {(user + system) * 1e6 / hits:.1f} µs/hit "
            f"(user {user * 1e6 / hits:.1f}, sys {system * 1e6 / hits:.1f}); "
            f"client CPU {own * 1e6 / hits:.1f} µs/hit"
        )
    finally:
        await client.close()


def main() -> None:
    usage = "usage: python bench/hits_driver.py [SECONDS] [uvloop|asyncio]"
    try:
        seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    except ValueError:
        raise SystemExit(f"{usage}\nSECONDS must be a number, not {sys.argv[1]!r}") from None
    loop = sys.argv[2] if len(sys.argv) > 2 else "uvloop"
    if len(sys.argv) > 3 or loop not in ("uvloop", "asyncio") or not seconds > 0:
        raise SystemExit(usage)
    work = Path(tempfile.mkdtemp(prefix="offscan-hits-driver-"))
    sock, ready = work / "a.sock", work / "ready"
    log = open(work / "appliance.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "offscan", "serve", "--socket", str(sock), "--loop", loop]
        + ["--state", str(work / "state"), "--ready-file", str(ready)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit((work / "appliance.log").read_text())
            time.sleep(0.05)
        root = work / "vm"
        body = os.urandom(4088)
        names = [f"hit/d{i % 16}/f{i}" for i in range(FILES)]
        for i, name in enumerate(names):
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body + i.to_bytes(8, "little"))
        print(asyncio.run(_drive(sock, root, names, seconds, proc.pid)))
    finally:
        PID_FILE.unlink(missing_ok=True)
        proc.terminate()
        proc.wait(10)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
