"""Shared helpers for the matcher benchmarks: memory probes and the end-of-run summary table.

Every benchmark records (group, engine, build seconds, memory, scan times) through the
``record`` fixture; the terminal summary prints MB/s per engine side by side with the ratios
native/yara, native/twin and native/hyperscan, all from the same run. Set
``OFFSCAN_BENCH_JSON=path`` to also write the numbers as JSON (used for bench/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import pytest

MB = 1_000_000  # bytes; throughput is reported in MB/s (10^6 bytes per second)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def rss_bytes() -> int:
    """Resident set size of this process now (VmRSS from /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so an RSS delta measured next
    counts only memory the following code really touches (not pages reused from earlier tests)."""
    gc.collect()
    if hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


@dataclass
class Record:
    group: str
    engine: str
    size_bytes: int
    build_s: float
    memory_bytes: int
    memory_kind: str  # "rss growth" (in process) or "peak rss" (a child process)
    times: list[float] = field(default_factory=list)  # wall seconds per round
    cpu_times: list[float] = field(default_factory=list)  # CPU seconds per round

    @property
    def mb_per_s(self) -> float:
        """Throughput of the fastest round, wall clock."""
        return self.size_bytes / MB / min(self.times) if self.times else float("nan")

    @property
    def cpu_mb_per_s(self) -> float:
        """Throughput per CPU second of the cheapest round: less sensitive to other
        processes taking the CPU on a shared machine (all engines scan on one thread)."""
        return self.size_bytes / MB / min(self.cpu_times) if self.cpu_times else float("nan")


RESULTS: list[Record] = []


@pytest.fixture
def record() -> Callable[..., Record]:
    """Register one engine's numbers for the summary table."""

    def _record(**kw: object) -> Record:
        r = Record(**kw)  # type: ignore[arg-type]
        RESULTS.append(r)
        return r

    return _record


def _ratio(a: Record | None, b: Record | None) -> str:
    if a is None or b is None or not a.times or not b.times:
        return "n/a"
    return f"{a.mb_per_s / b.mb_per_s:.2f}x (cpu {a.cpu_mb_per_s / b.cpu_mb_per_s:.2f}x)"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("offscan matcher benchmark (best of rounds; MB = 10^6 bytes)")
    groups: dict[str, list[Record]] = {}
    for r in RESULTS:
        groups.setdefault(r.group, []).append(r)
    for group, recs in groups.items():
        tr.write_line(f"{group}:")
        tr.write_line(
            f"  {'engine':<16} {'MB/s':>9} {'cpu MB/s':>9} {'build s':>8} {'memory MiB':>11}  rounds"
        )
        for r in recs:
            tr.write_line(
                f"  {r.engine:<16} {r.mb_per_s:>9.1f} {r.cpu_mb_per_s:>9.1f} {r.build_s:>8.2f} "
                f"{r.memory_bytes / 2**20:>11.1f}  {len(r.times)}"
                + ("  (peak RSS of the process)" if r.memory_kind == "peak rss" else "")
            )
        by = {r.engine: r for r in recs}
        native = by.get("offscan-native")
        tr.write_line(
            f"  native/yara {_ratio(native, by.get('yara-python'))}, "
            f"native/twin {_ratio(native, by.get('offscan-twin'))}, "
            f"native/hyperscan {_ratio(native, by.get('hyperscan'))}"
        )
    out = os.environ.get("OFFSCAN_BENCH_JSON")
    if out:
        with open(out, "w") as f:
            json.dump(
                [
                    asdict(r) | {"mb_per_s": r.mb_per_s, "cpu_mb_per_s": r.cpu_mb_per_s}
                    for r in RESULTS
                ],
                f,
                indent=1,
            )
        tr.write_line(f"numbers written to {out}")
