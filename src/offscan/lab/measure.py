"""Measuring from the operating system: ``/proc`` counters of processes and of the host.

:class:`ProcMeter` samples a set of processes in a background thread; :class:`Mark` is a phase
boundary and :func:`phase_costs` the cost of a phase between two of them. Also the host's facts
for the report and the inotify budget a run needs. Reads ``/proc`` only, except that
:class:`InotifyBudget` may raise (and restore) ``fs.inotify.max_user_instances`` when allowed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .analysis import summarize
from .config import LabError

if TYPE_CHECKING:
    from .procs import ProcSet

SAMPLE_INTERVAL = 0.5  # seconds between /proc samples of every measured process
PSS_INTERVAL = 2.0  # seconds between (costlier) smaps_rollup samples
INOTIFY_MARGIN = 8  # inotify instances left free for everything else on the host
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = 4096


@dataclass
class ProcStats:
    """What the kernel says about one process (bytes and CPU seconds)."""

    cpu: float = 0.0  # utime + stime (+ waited-for children), seconds
    cpu_user: float = 0.0  # utime + cutime: Python code, hashing, matching
    cpu_sys: float = 0.0  # stime + cstime: the kernel on its behalf (I/O, copies, inotify)
    hwm: int = 0  # VmHWM: peak resident set
    rss: int = 0  # VmRSS now
    pss: int = 0  # largest Pss seen (shared pages split between the processes mapping them)
    rchar: int = 0  # bytes returned by read-like syscalls (page-cache hits, sockets included)
    read_bytes: int = 0  # bytes the process caused to be fetched from storage
    alive: bool = True


def read_proc(pid: int, *, pss: bool = False) -> ProcStats | None:
    """One process's counters from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        with open(f"/proc/{pid}/io") as f:
            io = dict(line.split(": ") for line in f.read().splitlines() if ": " in line)
    except (OSError, ValueError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    # /proc/PID/stat fields 14-17 (utime, stime, cutime, cstime) are indexes 11-14 after ")"
    utime, stime, cutime, cstime = (int(x) / CLK_TCK for x in fields[11:15])
    st = ProcStats(
        cpu=utime + stime + cutime + cstime,
        cpu_user=utime + cutime,
        cpu_sys=stime + cstime,
        rchar=int(io.get("rchar", 0)),
        read_bytes=int(io.get("read_bytes", 0)),
    )
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            st.hwm = int(line.split()[1]) * 1024
        elif line.startswith("VmRSS:"):
            st.rss = int(line.split()[1]) * 1024
    if pss:
        st.pss = read_pss(pid)
    return st


def read_pss(pid: int) -> int:
    """A process's Pss now (``smaps_rollup``), 0 if unavailable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def host_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already counted in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


def mem_total() -> int:
    """The host's RAM in bytes (``MemTotal``), 0 if unknown."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


class ProcMeter:
    """Samples a set of processes from /proc in a background thread.

    Keeps each process's latest counters (so a process that exits keeps its last reading),
    its largest Pss, and the largest *simultaneous* sum of RSS over all processes.
    """

    def __init__(
        self, interval: float = SAMPLE_INTERVAL, pss_interval: float = PSS_INTERVAL
    ) -> None:
        self.interval = interval
        self.pss_interval = pss_interval
        self.pids: dict[str, int] = {}
        self.last: dict[str, ProcStats] = {}
        self.peak_rss_sum = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_pss = 0.0

    def add(self, label: str, pid: int) -> None:
        with self._lock:
            self.pids[label] = pid
        self.sample(labels=[label])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="offscan-lab-meter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(
        self, *, labels: Iterable[str] | None = None, pss: bool | None = None
    ) -> dict[str, ProcStats]:
        """Read every (or the named) process now; returns the latest stats per label."""
        now = time.monotonic()
        if pss is None:
            pss = now - self._last_pss >= self.pss_interval
        if pss and labels is None:
            self._last_pss = now
        with self._lock:
            pids = dict(self.pids) if labels is None else {k: self.pids[k] for k in labels}
        for label, pid in pids.items():
            st = read_proc(pid, pss=pss)
            with self._lock:
                old = self.last.get(label)
                if st is None:
                    if old is not None:
                        old.alive = False
                    continue
                if old is not None:
                    st.pss = max(st.pss, old.pss)
                self.last[label] = st
        with self._lock:
            self.peak_rss_sum = max(
                self.peak_rss_sum, sum(s.rss for s in self.last.values() if s.alive)
            )
            return {k: ProcStats(**asdict(v)) for k, v in self.last.items()}

    def snapshot(self) -> dict[str, ProcStats]:
        """Fresh counters for every process, Pss included (at phase boundaries)."""
        return self.sample(pss=True)


def inotify_in_use(uid: int | None = None) -> int:
    """inotify instances held by processes of ``uid`` (default: ours)."""
    uid = os.getuid() if uid is None else uid
    n = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) == "anon_inode:inotify":
                        n += 1
        except OSError:
            continue
    return n


class InotifyBudget:
    """The shim watches each VM root with its own inotify instance (watchdog), and the kernel
    caps instances per user (``fs.inotify.max_user_instances``, 128 by default): a VM past the
    cap is never activated. Check before a run; raise the cap for the run only if allowed."""

    PATH = "/proc/sys/fs/inotify/max_user_instances"

    def __init__(self) -> None:
        self.raised_from: int | None = None

    @staticmethod
    def limit() -> int:
        try:
            return int(Path(InotifyBudget.PATH).read_text())
        except (OSError, ValueError):
            return 1 << 30

    def ensure(self, needed: int, *, allow_raise: bool) -> None:
        limit, used = self.limit(), inotify_in_use()
        want = used + needed + INOTIFY_MARGIN
        if want <= limit:
            return
        if allow_raise and os.geteuid() == 0:
            self.raised_from = limit
            Path(self.PATH).write_text(str(want + 64))
            return
        raise LabError(
            f"this run needs {needed} inotify instances (one per watched VM root) but "
            f"fs.inotify.max_user_instances is {limit} and {used} are in use: raise it "
            f"(sysctl fs.inotify.max_user_instances={want + 64}, as root) or pass "
            "--raise-inotify-limit (root only; restored after the run), or use fewer VMs"
        )

    def restore(self) -> None:
        if self.raised_from is not None:
            with contextlib.suppress(OSError):
                Path(self.PATH).write_text(str(self.raised_from))
            self.raised_from = None


def host_info() -> dict[str, Any]:
    """The host a run measured: name, kernel, Python, CPUs, RAM, engine, inotify limit."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        from ..engine import Matcher
        from ..signatures import PatternDB

        native = bool(Matcher(PatternDB.from_text([("x.ndb", "X:0:*:41424344")])).native)
    except Exception:  # informational only: any failure reads as "not native"
        native = False
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_total": mem_total(),
        "offscan": __version__,
        "native_engine": native,
        "inotify_max_user_instances": InotifyBudget.limit(),
    }


def loadavg() -> str:
    """The host's 1, 5 and 15 minute load averages, as ``/proc/loadavg`` gives them."""
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def _own_cpu() -> float:
    st = read_proc(os.getpid())
    return st.cpu if st else 0.0


@dataclass
class Mark:
    """A phase boundary: process counters, host CPU, the lab's own CPU and the wall time."""

    procs: dict[str, ProcStats]
    host_busy: float
    lab_cpu: float
    time: float

    @classmethod
    def now(cls, procs: ProcSet | None) -> Mark:
        snap = procs.meter.snapshot() if procs is not None else {}
        return cls(snap, host_cpu()[0], _own_cpu(), time.time())


def phase_costs(before: Mark, after: Mark, *, peak_rss_sum: int) -> dict[str, Any]:
    """CPU, memory and bytes read of every process between two marks (a process started in
    between counts from zero), and how busy the rest of the host was meanwhile."""
    per: dict[str, dict[str, float]] = {}
    for label, st in after.procs.items():
        b = before.procs.get(label)
        per[label] = {
            "cpu_s": st.cpu - (b.cpu if b else 0.0),
            "user_s": st.cpu_user - (b.cpu_user if b else 0.0),
            "sys_s": st.cpu_sys - (b.cpu_sys if b else 0.0),
            "hwm": st.hwm,
            "pss": st.pss,
            "rchar": st.rchar - (b.rchar if b else 0),
            "read_bytes": st.read_bytes - (b.read_bytes if b else 0),
        }
    cpu = sum(p["cpu_s"] for p in per.values())
    wall = max(1e-9, after.time - before.time)
    host = after.host_busy - before.host_busy
    lab = after.lab_cpu - before.lab_cpu
    hwms = [p["hwm"] for p in per.values()]
    return {
        "wall_s": wall,
        "processes": len(per),
        "cpu_s": cpu,
        "hwm_sum": sum(hwms),
        "hwm_max": max(hwms, default=0),
        "hwm_per_process": summarize(hwms),
        "pss_sum": sum(p["pss"] for p in per.values()),
        "peak_rss_sum": peak_rss_sum,
        "rchar": sum(p["rchar"] for p in per.values()),
        "read_bytes": sum(p["read_bytes"] for p in per.values()),
        "host_busy_s": host,
        "lab_cpu_s": lab,
        "background_cpu_s": max(0.0, host - cpu - lab),
        "background_share": max(0.0, host - cpu - lab) / (wall * (os.cpu_count() or 1)),
        "per_process": per,
    }
