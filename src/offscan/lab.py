"""The lab (``offscan bench ...``): measure what offloading buys, on this machine.

``agent-vs-agentless`` builds a deterministic master image and N VMs (plain copies on disk),
then runs the *agentless* setup (one ``offscan serve`` + one ``offscan shim`` for every VM)
and the *agent* setup (one ``offscan agent`` per VM) in turn on the same workload, and
measures both from the operating system: CPU seconds (``/proc/PID/stat``), peak and
proportional memory (``VmHWM``, ``Pss``), bytes read (``/proc/PID/io``), plus the scanners'
own counters and event logs (contents matched vs served from cache, time to first verdict,
time-to-protect, update bytes). It writes ``report.md``, ``results.json`` and PNG plots.

``clone-storm`` creates hundreds of clones of a protected master through the appliance's
``vm-clone`` operation while it serves, and reports time-to-protect per clone and what limits it.

Nothing here estimates: every number comes from ``/proc``, the scanners' status counters or
their ``events.jsonl``. What the numbers cannot say (page cache, a shared noisy host) is
measured where possible and written down in the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Self

from . import __version__

__all__ = [
    "LabError",
    "ProcMeter",
    "add_bench_arguments",
    "build_signatures",
    "cmd_bench",
    "plan_image",
    "run_agent_vs_agentless",
    "run_clone_storm",
]

WORKLOADS = ("boot-storm", "steady", "clone-storm", "update")
DEFAULT_FILES = 200  # files per VM: modest, so N = 100 runs in minutes on 2 cores
DEFAULT_SIGS = 5000  # generated body signatures (+ EICAR)
DEFAULT_SHARED = 0.8  # share of a VM's files identical on every VM (ESET: 70-80 %)
DEFAULT_AGENT_BATCH = 10  # agents launched together; the next batch waits for them to listen
DEFAULT_CLONE_BATCH = 1  # clones per vm-clone request: a clone waits for the rest of its batch
DEFAULT_CLONE_PARALLEL = 1  # vm-clone requests in flight at once
DEFAULT_PHASE_TIMEOUT = 600.0  # seconds a phase may take before it is reported incomplete
DEFAULT_STEADY_SECONDS = 30.0  # length of the steady-writes phase
DEFAULT_STEADY_RATE = 0.5  # files written per VM per second in the steady phase
DEFAULT_BUDGET_CPU = 0.10  # share of the host's CPU the security workload may use...
DEFAULT_BUDGET_WINDOW = 300.0  # ...over this many seconds (boot storm, update, clone storm)
DEFAULT_BUDGET_MEM = 0.10  # share of the host's RAM the scanners may hold
SAMPLE_INTERVAL = 0.5  # seconds between /proc samples of every measured process
PSS_INTERVAL = 2.0  # seconds between (costlier) smaps_rollup samples
POLL_INTERVAL = 0.1  # seconds between reads of the event logs
UPDATE_ATTEMPTS = 5  # reloads per scanning point before the lab gives up on it
START_TIMEOUT = 60.0  # seconds for a scanner process to start listening
STOP_TIMEOUT = 10.0  # seconds a process gets after SIGTERM before SIGKILL
INOTIFY_MARGIN = 8  # inotify instances left free for everything else on the host
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = 4096

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_PATH = "home/user/Downloads/eicar.com"  # planted in the first VM only
TOOL_PATH = "opt/app/bin/updater"  # shared binary that pattern version 2 detects
TOOL_MARKER = b"offscan-lab-v2-marker:remote-admin-beacon"
V2_SIGNATURE = "Offscan.Lab.RemoteAdmin-V2"


class LabError(Exception):
    """A lab run that cannot go on; the message says what to change."""


# ----------------------------------------------------------------------------- the image


@dataclass(frozen=True)
class ImageFile:
    """One file of the master image: where it lives, what kind of content, how big."""

    relpath: str
    kind: str
    size: int
    shared: bool  # identical on every VM (else each VM has its own content at this path)


# kind: (weight, min size, max size, directories); sizes are drawn log-uniformly
KINDS: dict[str, tuple[float, int, int, tuple[str, ...]]] = {
    "config": (0.25, 200, 8 << 10, ("etc", "etc/app.d", "opt/app/conf")),
    "script": (0.15, 500, 30 << 10, ("usr/bin", "opt/app/scripts", "usr/lib/python3/site")),
    "text": (0.20, 1 << 10, 60 << 10, ("usr/share/doc", "home/user/docs", "opt/app/docs")),
    "log": (0.10, 4 << 10, 400 << 10, ("var/log", "var/log/app")),
    "binary": (0.22, 16 << 10, 512 << 10, ("usr/lib", "usr/bin", "opt/app/lib")),
    "archive": (0.08, 32 << 10, 1 << 20, ("opt/app/pkg", "var/cache/pkg")),
}
_EXT = {
    "config": ".conf",
    "script": ".sh",
    "text": ".txt",
    "log": ".log",
    "binary": ".so",
    "archive": ".jar",
}
_WORDS = [
    "kernel",
    "driver",
    "config",
    "service",
    "update",
    "policy",
    "session",
    "desktop",
    "profile",
    "cache",
    "registry",
    "user",
    "network",
    "packet",
    "report",
    "invoice",
    "budget",
    "meeting",
    "archive",
    "backup",
    "system",
    "library",
    "module",
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "this",
    "that",
    "be",
    "are",
    "was",
    "it",
    "an",
    "or",
    "not",
    "have",
    "has",
    "which",
    "server",
    "client",
    "request",
    "response",
    "timeout",
    "error",
    "warning",
    "started",
    "stopped",
    "enabled",
    "disabled",
]


def plan_image(files: int, *, shared: float = DEFAULT_SHARED, seed: int = 1) -> list[ImageFile]:
    """A deterministic image layout: ``files`` files of mixed kinds and sizes, the first
    ``shared`` share of them identical across VMs (system files), the rest per VM (logs,
    user documents, host configs). Always holds :data:`TOOL_PATH` (shared)."""
    if files < 1:
        raise LabError("--files must be at least 1")
    if not 0.0 <= shared <= 1.0:
        raise LabError("--shared must be between 0 and 1")
    rng = random.Random(f"plan-{seed}")
    kinds = list(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    n_shared = max(1, round(files * shared))
    plan = [ImageFile(TOOL_PATH, "binary", 64 << 10, True)]
    for i in range(1, files):
        kind = rng.choices(kinds, weights)[0]
        _, lo, hi, dirs = KINDS[kind]
        size = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        plan.append(
            ImageFile(f"{rng.choice(dirs)}/{kind}{i:04d}{_EXT[kind]}", kind, size, i < n_shared)
        )
    return plan


class ContentMaker:
    """Makes file content of a kind and size, fast and deterministic (seeded per file)."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"corpus-{seed}")
        words = [rng.choice(_WORDS) for _ in range(200_000)]
        self.corpus = " ".join(words).encode()  # ~1.3 MB of text to slice documents from

    def make(self, kind: str, size: int, key: str) -> bytes:
        rng = random.Random(key)
        tag = f"{key}\n".encode()
        if kind in ("text", "script", "config", "log"):
            start = rng.randrange(0, max(1, len(self.corpus) - size))
            body = self.corpus[start : start + size]
            if kind == "config":
                body = b"\n".join(
                    b"key%d = %s" % (j, w) for j, w in enumerate(body.split(b" ")[: size // 12])
                )
            elif kind == "log":
                lines = body.split(b" ")
                body = b"\n".join(
                    b"2024-05-%02d host svc[%d]: %s"
                    % (1 + j % 28, 100 + j, b" ".join(lines[j : j + 8]))
                    for j in range(0, len(lines), 8)
                )
            elif kind == "script":
                body = b"#!/bin/sh\n" + body.replace(b" the ", b"\necho ")
            return (tag + body)[: max(size, len(tag))]
        if kind == "binary":
            head = b"\x7fELF\x02\x01\x01\x00" + bytes(56)
            strings = self.corpus[rng.randrange(0, len(self.corpus) - 4096) :][:4096].replace(
                b" ", b"\x00"
            )
            code = rng.randbytes(max(0, size - len(head) - len(strings) - len(tag)) * 3 // 4)
            pad = bytes(max(0, size - len(head) - len(strings) - len(tag) - len(code)))
            return (head + tag + code + pad + strings)[:size]
        return (b"PK\x03\x04" + tag + rng.randbytes(size))[:size]  # archive: incompressible


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(data)


def build_master(root: Path, plan: Sequence[ImageFile], maker: ContentMaker, seed: int) -> int:
    """Write the master image; returns its size in bytes."""
    total = 0
    for f in plan:
        data = maker.make(f.kind, f.size, f"master-{seed}-{f.relpath}")
        if f.relpath == TOOL_PATH:
            data = data[:4096] + TOOL_MARKER + data[4096 + len(TOOL_MARKER) :]
        _write(root / f.relpath, data)
        total += len(data)
    return total


@dataclass
class LabVM:
    """A VM of the lab: a directory on this host and the files expected to get verdicts."""

    name: str
    root: str
    files: list[str]
    bytes: int = 0


def build_vm(
    root: Path,
    name: str,
    index: int,
    master: Path,
    plan: Sequence[ImageFile],
    maker: ContentMaker,
    seed: int,
) -> LabVM:
    """A VM as a plain copy of the master's shared files plus its own content for the rest
    (and the EICAR test file in VM 0)."""
    files, total = [], 0
    for f in plan:
        dest = root / f.relpath
        if f.shared:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(master / f.relpath, dest)
            total += f.size
        else:
            data = maker.make(f.kind, f.size, f"vm-{seed}-{index}-{f.relpath}")
            _write(dest, data)
            total += len(data)
        files.append(f.relpath)
    if index == 0:
        _write(root / EICAR_PATH, EICAR)
        files.append(EICAR_PATH)
        total += len(EICAR)
    return LabVM(name, str(root), files, total)


# ------------------------------------------------------------------------ signatures


def _eicar_lines() -> list[str]:
    text = resources.files("offscan.patterns").joinpath("offscan.ndb").read_text()
    return [line for line in text.splitlines() if line.strip()]


def build_signatures(count: int, *, seed: int = 1, version: int = 1) -> dict[str, list[str]]:
    """A ClamAV-format database: ``count`` generated ``.ndb`` body signatures (static runs of
    8-24 random bytes, some split by ``??``, ``{n-m}`` or ``*`` gaps; offsets ``*`` or ``0``)
    plus the shipped EICAR signature. Version 2 adds 1 % more and one that detects the shared
    :data:`TOOL_PATH` binary of every VM (an update that finds a threat already on disk)."""
    rng = random.Random(f"sigs-{seed}")
    lines = _eicar_lines()
    for i in range(count):
        parts = [
            rng.randbytes(rng.randint(8, 24)).hex() for _ in range(rng.choice((1, 1, 1, 2, 3)))
        ]
        body = parts[0]
        for p in parts[1:]:
            body += rng.choice(("*", f"{{0-{rng.randint(4, 64)}}}", "??")) + p
        offset = "0" if rng.random() < 0.05 else "*"
        lines.append(f"Offscan.Lab.Gen-{i}:0:{offset}:{body}")
    if version >= 2:
        extra = random.Random(f"sigs-v2-{seed}")
        for i in range(max(10, count // 100)):
            lines.append(f"Offscan.Lab.V2-{i}:0:*:{extra.randbytes(16).hex()}")
        lines.append(f"{V2_SIGNATURE}:0:*:{TOOL_MARKER.hex()}")
    return {"lab.ndb": lines}


def write_database(directory: Path, db: dict[str, list[str]]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, lines in db.items():
        (directory / name).write_text("\n".join(lines) + "\n")
        paths.append(str(directory / name))
    return paths


# ----------------------------------------------------------------------- measurement


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


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p99/max/mean of a sample (None when empty)."""
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    import numpy as np

    a = np.asarray(values, dtype=float)
    return {
        "n": int(a.size),
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


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


# ---------------------------------------------------------------------- processes


class ProcSet:
    """The child processes of one setup: launched in their own session (a Ctrl-C reaches
    the lab, which stops them in order), measured by a :class:`ProcMeter`, always stopped."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.launched: dict[str, float] = {}  # label -> wall time of launch
        self.meter = ProcMeter()
        self.meter.start()

    def launch(
        self, label: str, argv: Sequence[str], *, stdin: bool = False, stdout: bool = False
    ) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{label}.log", "ab") as log:  # the child keeps its own copy
            t = time.time()
            p = subprocess.Popen(
                [sys.executable, *argv],
                stdout=subprocess.PIPE if stdout else log,
                stderr=log,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[label] = p
        self.launched[label] = t
        self.meter.add(label, p.pid)
        return p

    def check(self) -> None:
        """Raise if a process died (with the tail of its log)."""
        for label, p in self.procs.items():
            if p.poll() is not None:
                raise LabError(
                    f"{label} exited with status {p.returncode}:\n{self.log_tail(label)}"
                )

    def log_tail(self, label: str, lines: int = 15) -> str:
        try:
            return "\n".join(
                (self.logs / f"{label}.log").read_text(errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return "(no log)"

    def stop(self, labels: Iterable[str] | None = None) -> None:
        """SIGTERM, wait, SIGKILL what is left."""
        todo = [(k, self.procs[k]) for k in (labels if labels is not None else list(self.procs))]
        for _, p in todo:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for _, p in todo:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.meter.stop()


def wait_ready(
    procs: ProcSet, label: str, ready: Path, timeout: float = START_TIMEOUT
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        p = procs.procs[label]
        if p.poll() is not None:
            raise LabError(
                f"{label} exited with status {p.returncode} before listening:\n{procs.log_tail(label)}"
            )
        if time.monotonic() > deadline:
            raise LabError(
                f"{label} did not start within {timeout:.0f} s:\n{procs.log_tail(label)}"
            )
        time.sleep(0.02)
    for _ in range(50):
        with contextlib.suppress(ValueError):
            return json.loads(ready.read_text())  # type: ignore[no-any-return]
        time.sleep(0.01)  # written but not yet complete
    raise LabError(f"{label}: unreadable ready file {ready}")


# ------------------------------------------------------------------------ event logs


class EventTail:
    """Reads the JSON lines appended to an ``events.jsonl`` since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._rest = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


class VerdictTracker:
    """Follows verdict events until every expected (VM, path) has one given after ``since``."""

    def __init__(self, expected: dict[str, Iterable[str]], since: float = 0.0) -> None:
        self.expected = {vm: set(paths) for vm, paths in expected.items()}
        self.since = since
        self.missing = sum(len(p) for p in self.expected.values())
        self.total = self.missing
        self.first: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.seen: dict[tuple[str, str], float] = {}
        self.statuses: dict[str, int] = {}
        self.sources: dict[str, int] = {}
        self.verdicts = 0
        self.infected: dict[tuple[str, str], list[str]] = {}
        self.latency_ms: list[float] = []
        self.last_time = 0.0

    def expect(self, vm: str, paths: Iterable[str]) -> None:
        want = self.expected.setdefault(vm, set())
        for p in paths:
            if p not in want and (vm, p) not in self.seen:
                want.add(p)
                self.missing += 1
                self.total += 1

    def feed(self, events: Iterable[dict[str, Any]]) -> None:
        for e in events:
            if e.get("event") != "verdict" or e.get("time", 0) < self.since:
                continue
            vm, path, t = e["vm"], e["path"], e["time"]
            self.verdicts += 1
            self.last_time = max(self.last_time, t)
            self.statuses[e["status"]] = self.statuses.get(e["status"], 0) + 1
            self.sources[e["source"]] = self.sources.get(e["source"], 0) + 1
            if "latency_ms" in e:
                self.latency_ms.append(float(e["latency_ms"]))
            if e["status"] == "infected":
                self.infected[(vm, path)] = list(e.get("matches") or [])
            if vm in self.expected:
                self.first[vm] = min(self.first.get(vm, t), t)
            want = self.expected.get(vm)
            if want is not None and path in want and (vm, path) not in self.seen:
                self.seen[(vm, path)] = t
                self.missing -= 1
                if all((vm, p) in self.seen for p in want):
                    self.done[vm] = t

    @property
    def complete(self) -> bool:
        return self.missing == 0


async def follow(
    tails: Sequence[EventTail],
    tracker: VerdictTracker,
    *,
    timeout: float,
    procs: ProcSet | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    until: Callable[[], bool] | None = None,
) -> bool:
    """Feed the tracker until it is complete (or ``until()``); False on timeout."""
    deadline = time.monotonic() + timeout
    done = until or (lambda: tracker.complete)
    while True:
        for t in tails:
            tracker.feed(t.read())
        if on_progress is not None:
            on_progress(tracker.total - tracker.missing, tracker.total)
        if done():
            return True
        if time.monotonic() > deadline:
            return False
        if procs is not None:
            procs.check()
        await asyncio.sleep(POLL_INTERVAL)


async def appliance_status(sock: str, *, timeout: float = 30.0) -> dict[str, Any]:
    from .protocol import ApplianceClient

    c = ApplianceClient(sock, shim_id=f"lab-status-{os.getpid()}")
    await c.connect(timeout=timeout)
    try:
        return await asyncio.wait_for(c.status(), timeout)
    finally:
        await c.close()


async def appliance_control(
    sock: str, op: str, *, timeout: float = 600.0, **args: Any
) -> dict[str, Any]:
    from .protocol import ApplianceClient

    c = ApplianceClient(sock, shim_id=f"lab-operator-{os.getpid()}")
    await c.connect(timeout=30.0)
    try:
        return await c.control(op, timeout=timeout, **args)
    finally:
        await c.close()


async def gather_limited(coros: Iterable[Any], limit: int = 32) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros))


# --------------------------------------------------------------------- shim worker


def _shim_worker(argv: Sequence[str]) -> int:
    """A :class:`~offscan.shim.Shim` in a process of its own that takes more VMs on stdin
    (one JSON object per line: name, root, clone_of) and prints, per VM, when it was handed
    over and when ``add_vm`` returned. The clone storms use it so the shim's CPU is measured
    apart from the lab's; ``offscan shim`` takes its VMs on the command line only."""
    import logging

    from .shim import Shim, VMSpec

    p = argparse.ArgumentParser(prog="offscan-lab-shim")
    p.add_argument("--appliance", required=True)
    p.add_argument("--shim-id", default="lab-shim")
    p.add_argument("--vm", action="append", default=[], type=VMSpec.parse)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )

    async def main() -> None:
        shim = Shim(args.appliance, args.vm, shim_id=args.shim_id)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, shim.stop)
        runner = asyncio.create_task(shim.run())
        adding: set[asyncio.Task[None]] = set()

        async def add(spec: VMSpec) -> None:
            t = time.time()
            await shim.add_vm(spec)
            sys.stdout.write(
                json.dumps({"vm": spec.name, "added": t, "activated": time.time()}) + "\n"
            )
            sys.stdout.flush()

        def start(line: str) -> None:
            d = json.loads(line)
            task = loop.create_task(add(VMSpec(d["name"], d["root"], clone_of=d.get("clone_of"))))
            adding.add(task)
            task.add_done_callback(adding.discard)

        def reader() -> None:
            for line in sys.stdin:
                if line.strip():
                    loop.call_soon_threadsafe(start, line)

        threading.Thread(target=reader, name="lab-shim-stdin", daemon=True).start()
        await runner

    asyncio.run(main())
    return 0


class ShimWorker:
    """The lab's handle on a :func:`_shim_worker` process."""

    def __init__(
        self, procs: ProcSet, label: str, sock: str, vms: Sequence[tuple[str, str]]
    ) -> None:
        argv = [
            "-c",
            "import sys; from offscan.lab import _shim_worker; sys.exit(_shim_worker(sys.argv[1:]))",
            "--appliance",
            sock,
            "--shim-id",
            "lab-shim",
        ]
        for name, root in vms:
            argv += ["--vm", f"{name}={root}"]
        self.proc = procs.launch(label, argv, stdin=True, stdout=True)
        self.reports: dict[str, dict[str, float]] = {}
        self._thread = threading.Thread(target=self._read, name="lab-shim-reports", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(ValueError, OSError):
            for line in self.proc.stdout:
                with contextlib.suppress(ValueError):
                    d = json.loads(line)
                    self.reports[d["vm"]] = d

    def add(self, name: str, root: str, clone_of: str | None) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(
            (json.dumps({"name": name, "root": root, "clone_of": clone_of}) + "\n").encode()
        )
        self.proc.stdin.flush()


# --------------------------------------------------------------------- the bench


@dataclass
class BenchConfig:
    """Parameters of ``offscan bench agent-vs-agentless``."""

    vms: int = 10
    files: int = DEFAULT_FILES
    sigs: int = DEFAULT_SIGS
    shared: float = DEFAULT_SHARED
    workload: str = "boot-storm"
    points: list[int] = field(default_factory=list)
    out: str = "offscan-lab"
    seed: int = 1
    agent_batch: int = DEFAULT_AGENT_BATCH
    clone_batch: int = DEFAULT_CLONE_BATCH
    duration: float = DEFAULT_STEADY_SECONDS
    rate: float = DEFAULT_STEADY_RATE
    budget_cpu: float = DEFAULT_BUDGET_CPU
    budget_mem: float = DEFAULT_BUDGET_MEM
    budget_window: float = DEFAULT_BUDGET_WINDOW
    timeout: float = DEFAULT_PHASE_TIMEOUT
    work: str | None = None
    keep: bool = False
    raise_inotify_limit: bool = False
    repeat: int = 1  # runs of every (setup, N), interleaved, to show run-to-run spread
    clones: int = 500  # clone-storm
    parallel: int = DEFAULT_CLONE_PARALLEL  # clone-storm: vm-clone requests in flight
    command: str = ""


class Lab:
    """What every run of a bench shares: the work directory, the master image, the
    signature databases (and for the update workload signed bundles and a trusted key)."""

    def __init__(self, cfg: BenchConfig, console: Any) -> None:
        self.cfg = cfg
        self.console = console
        self.work = Path(tempfile.mkdtemp(prefix="offscan-lab-", dir=cfg.work))
        self.plan = plan_image(cfg.files, shared=cfg.shared, seed=cfg.seed)
        self.maker = ContentMaker(cfg.seed)
        self.master = self.work / "master"
        self.master_bytes = build_master(self.master, self.plan, self.maker, cfg.seed)
        self.db_v1 = build_signatures(cfg.sigs, seed=cfg.seed)
        self.db_v2 = build_signatures(cfg.sigs, seed=cfg.seed, version=2)
        self.db_dir = self.work / "db"
        write_database(self.db_dir, self.db_v1)
        self.signatures = sum(len(v) for v in self.db_v1.values())
        self._bundles: dict[str, bytes] | None = None
        self.trust: Path | None = None
        self.store_v1: Path | None = None

    def bundles(self) -> dict[str, bytes]:
        """Signed v1 full, v2 delta and v2 full bundles; a v1 store to seed scanners with."""
        if self._bundles is None:
            from .updates import (
                PatternStore,
                build_delta,
                build_full,
                generate_key,
                load_private_key,
            )

            key, pub, _ = generate_key(self.work / "publisher")
            signer = load_private_key(key)
            self.trust = pub
            self._bundles = {
                "v1-full.osb": build_full(self.db_v1, 1).signed(signer).to_bytes(),
                "v2-delta-1.osb": build_delta(self.db_v1, self.db_v2, 2, 1)
                .signed(signer)
                .to_bytes(),
                "v2-full.osb": build_full(self.db_v2, 2).signed(signer).to_bytes(),
            }
            self.store_v1 = self.work / "store-v1"
            PatternStore(self.store_v1, str(pub)).apply(self._bundles["v1-full.osb"], source="lab")
        return self._bundles

    def seed_store(self, state: Path) -> None:
        """Give a scanner pattern version 1 on disk, as if it had shipped with it."""
        assert self.store_v1 is not None
        state.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.store_v1, state / "patterns", symlinks=True)

    def close(self) -> None:
        if self.cfg.keep:
            self.console.print(f"kept the work directory {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


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


COUNTERS = (
    "verdicts",
    "contents_matched",
    "served_from_cache",
    "served_identity",
    "served_digest",
    "served_clone",
    "joined_in_flight",
    "bytes_read",
    "bytes_matched",
    "detections",
    "errors",
    "revalidations",
    "revalidation_bytes",
    "revalidation_rescans",
    "swaps",
)


def sum_counters(statuses: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: sum(int(s.get(k) or 0) for s in statuses) for k in COUNTERS}
    out["pattern_versions"] = sorted({str(s.get("pattern_version")) for s in statuses})
    out["points"] = len(statuses)
    return out


def diff_counters(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out = dict(after)
    for k in COUNTERS:
        out[k] = after[k] - before.get(k, 0)
    return out


class Setup:
    """One side of the comparison while it runs: its processes, scanning points and logs."""

    def __init__(self, kind: str, lab: Lab, rundir: Path) -> None:
        self.kind = kind
        self.lab = lab
        self.rundir = rundir
        self.procs = ProcSet(rundir / "logs")
        self.sockets: list[str] = []
        self.tails: list[EventTail] = []
        self.t0: dict[str, float] = {}  # VM -> when protection was asked for
        self.worker: ShimWorker | None = None
        self.server: Any = None
        self.scan_args: list[str] = ["-d", str(lab.db_dir)]

    def use_updates(self) -> None:
        from .updates import UpdateServer

        bundles = self.lab.bundles()
        pub = self.rundir / "published"
        pub.mkdir(parents=True)
        (pub / "v1-full.osb").write_bytes(bundles["v1-full.osb"])
        self.server = UpdateServer(pub, host="127.0.0.1", port=0)
        self.server.start()
        self.scan_args = [
            "--updates",
            self.server.url,
            "--trust",
            str(self.lab.trust),
            "--poll",
            "3600",
        ]

    def publish(self, name: str) -> None:
        pub = self.rundir / "published"
        tmp = pub / f".{name}.tmp"
        tmp.write_bytes(self.lab.bundles()[name])
        os.replace(tmp, pub / name)

    async def start_appliance(self) -> str:
        state = self.rundir / "state"
        if self.server is not None:
            self.lab.seed_store(state)
        sock = str(self.rundir / "a.sock")
        ready = self.rundir / "appliance.ready"
        self.procs.launch(
            "appliance",
            [
                "-m",
                "offscan",
                "serve",
                "--socket",
                sock,
                "--state",
                str(state),
                "--ready-file",
                str(ready),
                *self.scan_args,
            ],
        )
        await wait_ready_async(self.procs, "appliance", ready)
        self.sockets.append(sock)
        self.tails.append(EventTail(state / "events.jsonl"))
        return sock

    def start_shim(self, vms: Sequence[LabVM]) -> None:
        argv = ["-m", "offscan", "shim", "--appliance", self.sockets[0], "--shim-id", "lab-shim"]
        for vm in vms:
            argv += ["--vm", f"{vm.name}={vm.root}"]
        self.procs.launch("shim", argv)
        for vm in vms:
            self.t0[vm.name] = self.procs.launched["shim"]

    async def start_agents(
        self,
        vms: Sequence[LabVM],
        *,
        batch: int,
        before_launch: Callable[[LabVM], Any] | None = None,
    ) -> None:
        """Launch one agent per VM, ``batch`` at a time; the next batch starts when the
        previous one listens (a storm of imports and compiles would only thrash 2 cores)."""
        for i in range(0, len(vms), max(1, batch)):
            group = vms[i : i + max(1, batch)]
            readies = []
            for vm in group:
                if before_launch is not None:
                    await before_launch(vm)
                state = self.rundir / "s" / vm.name
                if self.server is not None:
                    self.lab.seed_store(state / "appliance")
                ready = state / "ready.json"
                label = f"agent-{vm.name}"
                self.procs.launch(
                    label,
                    [
                        "-m",
                        "offscan",
                        "agent",
                        "--vm",
                        f"{vm.name}={vm.root}",
                        "--state",
                        str(state),
                        "--ready-file",
                        str(ready),
                        *self.scan_args,
                    ],
                )
                self.t0[vm.name] = self.procs.launched[label]
                self.sockets.append(str(state / "agent.sock"))
                self.tails.append(EventTail(state / "appliance" / "events.jsonl"))
                readies.append((label, ready))
            for label, ready in readies:
                await wait_ready_async(self.procs, label, ready)

    async def statuses(self) -> list[dict[str, Any]]:
        return await gather_limited([appliance_status(s) for s in self.sockets])

    def close(self) -> None:
        try:
            self.procs.close()
        finally:
            if self.server is not None:
                self.server.close()
                self.server = None


async def wait_ready_async(
    procs: ProcSet, label: str, ready: Path, timeout: float = START_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        p = procs.procs[label]
        if p.poll() is not None:
            raise LabError(
                f"{label} exited with status {p.returncode} before listening:\n{procs.log_tail(label)}"
            )
        if time.monotonic() > deadline:
            raise LabError(
                f"{label} did not start within {timeout:.0f} s:\n{procs.log_tail(label)}"
            )
        await asyncio.sleep(0.02)


def registration_times(statuses: Sequence[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in statuses:
        for vm in s.get("vms") or []:
            out[vm["name"]] = float(vm["registered_at"])
    return out


def protection_times(
    tracker: VerdictTracker, start: dict[str, float], names: Iterable[str] | None = None
) -> dict[str, Any]:
    """Time to first verdict and to every file verdicted, per VM, from ``start[vm]``."""
    ttfv, ttp, never, partly = [], [], 0, 0
    for vm in names if names is not None else tracker.expected:
        if vm in tracker.first and vm in start:
            ttfv.append(tracker.first[vm] - start[vm])
        elif vm not in tracker.first:
            never += 1
        if vm in tracker.done and vm in start:
            ttp.append(tracker.done[vm] - start[vm])
        elif vm not in tracker.done:
            partly += 1
    # VMs that never got there are not in the percentiles: they are counted apart, and a
    # report must show them (an unprotected VM is worse than any latency)
    return {
        "first_verdict_s": summarize(ttfv),
        "all_files_s": summarize(ttp),
        "vms_without_verdict": never,
        "vms_not_fully_verdicted": partly,
    }


class Progress:
    """A rich progress display: runs done, and verdicts of the current phase."""

    def __init__(self, console: Any, runs: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(
            SpinnerColumn(),
            TextColumn("{task.description:<44}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.runs = self.bar.add_task("runs", total=runs)
        self.phase = self.bar.add_task("", total=1, visible=False)

    def __enter__(self) -> Self:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:  # noqa: PYI036 - passed through to rich
        self.bar.__exit__(*exc)

    def start_phase(self, text: str, total: int = 1) -> None:
        self.bar.reset(self.phase, total=max(1, total), completed=0, description=text, visible=True)

    def update(self, done: int, total: int) -> None:
        self.bar.update(self.phase, completed=done, total=max(1, total))

    def run_done(self) -> None:
        self.bar.advance(self.runs)


def build_vms(lab: Lab, root: Path, n: int) -> list[LabVM]:
    vms = [
        build_vm(
            root / f"vm-{i:03d}", f"vm-{i:03d}", i, lab.master, lab.plan, lab.maker, lab.cfg.seed
        )
        for i in range(n)
    ]
    os.sync()  # written back before measuring, so writeback does not land in a setup's run
    return vms


async def run_point(
    lab: Lab, kind: str, n: int, progress: Progress, *, rep: int = 0
) -> dict[str, Any]:
    """Run one setup (``agentless`` or ``agent``) with ``n`` VMs on the configured workload."""
    cfg = lab.cfg
    rundir = lab.work / f"{'al' if kind == 'agentless' else 'ag'}{n}r{rep}"
    rundir.mkdir()
    setup = Setup(kind, lab, rundir)
    result: dict[str, Any] = {"setup": kind, "n": n, "repeat": rep, "workload": cfg.workload}
    try:
        storm = cfg.workload == "clone-storm"
        progress.start_phase(f"N={n} {kind}: building {n if not storm else 1} VM(s)")
        if storm:
            vms = [LabVM("master", str(lab.master), [f.relpath for f in lab.plan])]
        else:
            vms = await asyncio.to_thread(build_vms, lab, rundir / "vms", n)
        result["vm_bytes"] = sum(vm.bytes for vm in vms) if not storm else lab.master_bytes
        if cfg.workload == "update":
            setup.use_updates()
        tracker = VerdictTracker({vm.name: vm.files for vm in vms})
        start = Mark.now(setup.procs)
        progress.start_phase(
            f"N={n} {kind}: {'master activation' if storm else 'boot storm'}", tracker.total
        )
        launcher: asyncio.Task[None] | None = None
        if kind == "agentless":
            sock = await setup.start_appliance()
            if storm:
                setup.worker = ShimWorker(
                    setup.procs, "shim", sock, [(vm.name, vm.root) for vm in vms]
                )
                setup.t0["master"] = setup.procs.launched["shim"]
            else:
                setup.start_shim(vms)
        else:
            launcher = asyncio.create_task(setup.start_agents(vms, batch=cfg.agent_batch))
        ok = await follow(
            setup.tails,
            tracker,
            timeout=cfg.timeout,
            procs=setup.procs,
            on_progress=progress.update,
            until=lambda: tracker.complete and (launcher is None or launcher.done()),
        )
        if launcher is not None:
            await launcher  # raises what failed
        boot = Mark.now(setup.procs)
        statuses = await setup.statuses()
        counters = sum_counters(statuses)
        reg = registration_times(statuses)
        result["boot"] = {
            "complete": ok,
            "missing": tracker.missing,
            "expected": tracker.total,
            **phase_costs(start, boot, peak_rss_sum=setup.procs.meter.peak_rss_sum),
            "counters": counters,
            "verdict_statuses": dict(tracker.statuses),
            "verdict_sources": dict(tracker.sources),
            "detections": sorted(f"{vm}:{p}" for vm, p in tracker.infected),
            "from_launch": protection_times(tracker, setup.t0),
            "from_registration": protection_times(tracker, reg),
            "from_storm_start": protection_times(
                tracker, {vm: start.time for vm in tracker.expected}
            ),
            "per_vm": {
                vm: {
                    "start": setup.t0.get(vm),
                    "registered": reg.get(vm),
                    "first_verdict": tracker.first.get(vm),
                    "all_files": tracker.done.get(vm),
                }
                for vm in tracker.expected
            },
            "storm_start": start.time,
            "verdict_latency_ms": summarize(tracker.latency_ms),
        }
        result["boot"]["setup_wall_s"] = (tracker.last_time or boot.time) - start.time
        primary = "boot"
        if cfg.workload == "steady":
            result["steady"] = await steady_phase(setup, vms, boot, counters, progress)
            primary = "steady"
        elif cfg.workload == "update":
            result["update"] = await update_phase(setup, vms, boot, counters, progress)
            primary = "update"
        elif storm:
            result["clone_storm"] = await storm_phase(setup, n, boot, counters, progress)
            primary = "clone_storm"
        result["primary"] = primary
        return result
    finally:
        setup.close()
        if not cfg.keep:
            await asyncio.to_thread(shutil.rmtree, rundir, True)


class WriteTracker:
    """Writes done by a workload and the first verdict after each of them."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str, float]] = []
        self.last_write: dict[tuple[str, str], float] = {}
        self.pending: set[tuple[str, str]] = set()
        self.verdicts: dict[tuple[str, str], list[float]] = {}
        self.statuses: dict[str, int] = {}
        self.sources: dict[str, int] = {}

    def wrote(self, vm: str, path: str) -> None:
        t = time.time()
        self.writes.append((vm, path, t))
        self.last_write[(vm, path)] = t
        self.pending.add((vm, path))

    def feed(self, events: Iterable[dict[str, Any]]) -> None:
        for e in events:
            if e.get("event") != "verdict":
                continue
            key = (e["vm"], e["path"])
            if key not in self.last_write:
                continue
            self.verdicts.setdefault(key, []).append(e["time"])
            self.statuses[e["status"]] = self.statuses.get(e["status"], 0) + 1
            self.sources[e["source"]] = self.sources.get(e["source"], 0) + 1
            if e["time"] >= self.last_write[key]:
                self.pending.discard(key)

    def latencies(self) -> list[float]:
        import bisect

        out = []
        for vm, path, t in self.writes:
            times = sorted(self.verdicts.get((vm, path), []))
            i = bisect.bisect_left(times, t)
            if i < len(times):
                out.append(times[i] - t)
        return out


async def steady_phase(
    setup: Setup, vms: Sequence[LabVM], boot: Mark, counters: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    """VMs write new and modified files at ``--rate`` files per VM per second for
    ``--duration`` seconds (Poisson arrivals, same schedule for both setups): half are
    downloads identical across VMs, 30 % new documents, 20 % appends to a log."""
    cfg = setup.lab.cfg
    rng = random.Random(f"steady-{cfg.seed}")
    maker = setup.lab.maker
    pool = [
        maker.make(
            rng.choice(("binary", "archive", "text")),
            int(math.exp(rng.uniform(math.log(8 << 10), math.log(256 << 10)))),
            f"download-{cfg.seed}-{k}",
        )
        for k in range(20)
    ]
    schedule: list[tuple[float, int, str, int, int]] = []
    for i in range(len(vms)):
        t, j = rng.expovariate(cfg.rate), 0
        while t < cfg.duration:
            r = rng.random()
            schedule.append(
                (
                    t,
                    i,
                    "shared" if r < 0.5 else "new" if r < 0.8 else "append",
                    j,
                    rng.randrange(1 << 30),
                )
            )
            t += rng.expovariate(cfg.rate)
            j += 1
    schedule.sort()
    writes = WriteTracker()
    progress.start_phase(f"N={len(vms)} {setup.kind}: steady writes", len(schedule))
    t_start = time.time()
    tails = setup.tails
    for tail in tails:
        tail.read()  # skip the boot phase's events

    async def writer() -> None:
        for t, i, op, j, arg in schedule:
            delay = t_start + t - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            vm = vms[i]
            if op == "shared":
                rel = f"home/user/Downloads/dl-{j:04d}.bin"
                _write(Path(vm.root) / rel, pool[arg % len(pool)])
            elif op == "new":
                rel = f"home/user/docs/new-{j:04d}.txt"
                _write(
                    Path(vm.root) / rel,
                    maker.make("text", 2048 + arg % 40_000, f"steady-{vm.name}-{j}"),
                )
            else:
                rel = "var/log/steady.log"
                _append(Path(vm.root) / rel, maker.make("log", 2048, f"append-{vm.name}-{j}"))
            writes.wrote(vm.name, rel)

    task = asyncio.create_task(writer())
    deadline = time.monotonic() + cfg.duration + cfg.timeout
    while True:
        for tail in tails:
            writes.feed(tail.read())
        done = len(writes.writes) - len(writes.pending)
        progress.update(done, len(schedule))
        if task.done() and not writes.pending:
            break
        if time.monotonic() > deadline:
            break
        setup.procs.check()
        await asyncio.sleep(POLL_INTERVAL)
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    end = Mark.now(setup.procs)
    after = sum_counters(await setup.statuses())
    lat = writes.latencies()
    return {
        "complete": not writes.pending,
        "missing": len(writes.pending),
        "writes": len(writes.writes),
        "rate_per_vm": cfg.rate,
        "duration_s": cfg.duration,
        **phase_costs(boot, end, peak_rss_sum=setup.procs.meter.peak_rss_sum),
        "counters": diff_counters(counters, after),
        "write_to_verdict_s": summarize(lat),
        "verdict_statuses": writes.statuses,
        "verdict_sources": writes.sources,
        "budget_window_s": end.time - boot.time,
    }


async def update_phase(
    setup: Setup, vms: Sequence[LabVM], boot: Mark, counters: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    """Publish pattern version 2 (a delta adding 1 % signatures, one of which detects a
    shared binary on every VM) and ``reload`` every scanning point at once; measure the
    bytes the update server sent, the time until every point runs v2, and the time until
    every VM's copy of the newly detected file is reported."""
    cfg = setup.lab.cfg
    progress.start_phase(f"N={len(vms)} {setup.kind}: pattern update", len(setup.sockets))
    for tail in setup.tails:
        tail.read()
    sent0 = setup.server.stats["bytes_sent"]
    t_pub = time.time()
    setup.publish("v2-delta-1.osb")
    setup.publish("v2-full.osb")
    done_at: list[float] = []

    failures: list[str] = []

    async def reload(sock: str) -> dict[str, Any]:
        # A point whose fetch failed keeps the old version and tries again at its next poll;
        # the lab polls it again at once, a bounded number of times, and counts the failures.
        for _ in range(UPDATE_ATTEMPTS):
            r = await appliance_control(sock, "reload", timeout=cfg.timeout)
            if str(r.get("pattern_version")) == "2":
                break
            failures.append(str(r.get("error")))
        done_at.append(time.time())
        progress.update(len(done_at), len(setup.sockets))
        return r

    replies = await asyncio.gather(*(reload(s) for s in setup.sockets))
    t_all = max(done_at) - t_pub
    sent = setup.server.stats["bytes_sent"] - sent0
    tracker = VerdictTracker({vm.name: [TOOL_PATH] for vm in vms}, since=t_pub)
    found: dict[str, float] = {}

    def feed_infected(events: Iterable[dict[str, Any]]) -> None:
        for e in events:
            if (
                e.get("event") == "verdict"
                and e.get("path") == TOOL_PATH
                and e.get("status") == "infected"
                and e["time"] >= t_pub
            ):
                found.setdefault(e["vm"], e["time"])

    progress.start_phase(f"N={len(vms)} {setup.kind}: new detection reported", len(vms))
    deadline = time.monotonic() + cfg.timeout
    while len(found) < len(vms) and time.monotonic() < deadline:
        for tail in setup.tails:
            events = tail.read()
            feed_infected(events)
            tracker.feed(events)
        progress.update(len(found), len(vms))
        await asyncio.sleep(POLL_INTERVAL)
    end = Mark.now(setup.procs)
    statuses = await setup.statuses()
    after = sum_counters(statuses)
    return {
        "complete": len(found) == len(vms),
        "missing": len(vms) - len(found),
        **phase_costs(boot, end, peak_rss_sum=setup.procs.meter.peak_rss_sum),
        "counters": diff_counters(counters, after),
        "update_bytes": sent,
        "update_bytes_per_point": sent / max(1, len(setup.sockets)),
        "scanning_points": len(setup.sockets),
        "all_points_on_v2_s": t_all,
        "point_reload_s": summarize([t - t_pub for t in done_at]),
        "reload_failures": len(failures),
        "reload_errors": sorted(set(failures)),
        "points_not_on_v2": sum(1 for r in replies if str(r.get("pattern_version")) != "2"),
        "new_detection_reported_s": summarize([t - t_pub for t in found.values()]),
        "all_vms_reported_s": (max(found.values()) - t_pub) if len(found) == len(vms) else None,
        "verdict_sources": dict(tracker.sources),
        "compile_seconds": summarize(
            [float((s.get("last_swap") or {}).get("compile_seconds") or 0) for s in statuses]
        ),
    }


async def storm_phase(
    setup: Setup, n: int, boot: Mark, counters: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    """``n`` clones of the protected master, created as fast as the setup allows: agentless
    through the appliance's ``vm-clone`` (in-kernel copy, clones inherit the master's
    verdicts) handed to the running shim; agents as copies made by the lab, one new agent each."""
    lab = setup.lab
    files = [f.relpath for f in lab.plan]
    tracker = VerdictTracker({})
    progress.start_phase(f"N={n} {setup.kind}: clone storm", n * len(files))
    for tail in setup.tails:
        tail.read()
    into = setup.rundir / "clones"
    copy_cpu = 0.0
    t_start = time.time()
    storm: dict[str, Any] = {}
    if setup.kind == "agentless":
        assert setup.worker is not None
        follower = asyncio.create_task(
            follow(
                setup.tails,
                tracker,
                timeout=lab.cfg.timeout,
                procs=setup.procs,
                on_progress=progress.update,
                until=lambda: tracker.complete and tracker.total >= n * len(files),
            )
        )
        storm = await agentless_storm(
            setup.sockets[0], setup.worker, n, lab.cfg.clone_batch, into, files, tracker
        )
        ok = await follower
        reg = registration_times(await setup.statuses())
        start = {name: reg.get(name, t_start) for name in storm["clones"]}
    else:
        from .cache import IdentityMemo
        from .clones import clone_tree

        clones = [
            LabVM(f"clone-{i:03d}", str(into / f"clone-{i:03d}"), files) for i in range(1, n + 1)
        ]

        async def copy(vm: LabVM) -> None:
            nonlocal copy_cpu

            def work() -> float:
                r0 = time.thread_time()
                clone_tree(str(lab.master), vm.root, IdentityMemo(), IdentityMemo())
                return time.thread_time() - r0

            copy_cpu += await asyncio.to_thread(work)
            tracker.expect(vm.name, vm.files)

        launcher = asyncio.create_task(
            setup.start_agents(clones, batch=lab.cfg.agent_batch, before_launch=copy)
        )
        ok = await follow(
            setup.tails,
            tracker,
            timeout=lab.cfg.timeout,
            procs=setup.procs,
            on_progress=progress.update,
            until=lambda: launcher.done() and tracker.complete,
        )
        await launcher
        start = {vm.name: setup.t0[vm.name] for vm in clones}
        storm = {"clones": [vm.name for vm in clones], "copy_cpu_s": copy_cpu}
    end = Mark.now(setup.procs)
    after = sum_counters(await setup.statuses())
    costs = phase_costs(boot, end, peak_rss_sum=setup.procs.meter.peak_rss_sum)
    if copy_cpu:
        costs["cpu_s"] += copy_cpu  # the lab made the agents' copies: charge them to that setup
        costs["per_process"]["lab-copies"] = {
            "cpu_s": copy_cpu,
            "user_s": 0.0,
            "sys_s": 0.0,
            "hwm": 0,
            "pss": 0,
            "rchar": 0,
            "read_bytes": 0,
        }
    names = list(storm["clones"])
    return {
        "complete": ok,
        "missing": tracker.missing,
        "clones": n,
        "storm_wall_s": (tracker.last_time or end.time) - t_start,
        **costs,
        "counters": diff_counters(counters, after),
        "verdict_sources": dict(tracker.sources),
        "time_to_protect": protection_times(tracker, start, names),
        **{k: v for k, v in storm.items() if k != "clones"},
    }


async def agentless_storm(
    sock: str,
    worker: ShimWorker,
    n: int,
    batch: int,
    into: Path,
    files: Sequence[str],
    tracker: VerdictTracker,
    base: str = "master",
    parallel: int = 1,
) -> dict[str, Any]:
    """Clone ``base`` ``n`` times through the appliance, ``batch`` clones per ``vm-clone``
    request and ``parallel`` requests in flight, handing each batch to the shim as soon as
    its reply arrives."""
    from .protocol import ApplianceClient

    client = ApplianceClient(sock, shim_id=f"lab-operator-{os.getpid()}")
    await client.connect(timeout=30.0)
    made: list[str] = []
    requests: list[dict[str, Any]] = []
    sizes = [min(max(1, batch), n - i) for i in range(0, n, max(1, batch))]
    queue = list(enumerate(sizes))

    async def requester() -> None:
        while queue:
            k, b = queue.pop(0)
            t = time.time()
            r = await client.control(
                "vm-clone", timeout=600, base=base, count=b, into=str(into), prefix=f"c{k:03d}-"
            )
            t_reply = time.time()
            for c in r["clones"]:
                tracker.expect(c["name"], files)
                worker.add(c["name"], c["root"], base)
                made.append(c["name"])
            requests.append(
                {
                    "count": b,
                    "sent": t,
                    "reply": t_reply,
                    "seconds": r["seconds"],
                    "bytes_copied": r["bytes_copied"],
                    "inherited": r["inherited"],
                    "reflinked": r["reflinked"],
                    "files": r["files"],
                }
            )

    try:
        await asyncio.gather(*(requester() for _ in range(max(1, parallel))))
    finally:
        await client.close()
    requests.sort(key=lambda r: r["sent"])
    return {"clones": made, "requests": requests}


# ------------------------------------------------------------------------- analysis


def host_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        from .engine import Matcher
        from .signatures import PatternDB

        native = bool(Matcher(PatternDB.from_text([("x.ndb", "X:0:*:41424344")])).native)
    except Exception:  # noqa: BLE001 - informational only
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


def primary_metrics(run: dict[str, Any]) -> dict[str, float]:
    """The cost of a run's main phase: CPU seconds, memory (sum of Pss; sum of VmHWM where
    Pss is unavailable), bytes read (rchar) and the VM count it is divided by."""
    p = run[run["primary"]]
    return {
        "n": run["n"],
        "cpu_s": p["cpu_s"],
        "mem": p["pss_sum"] or p["hwm_sum"],
        "hwm": p["hwm_sum"],
        "rchar": p["rchar"],
    }


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> dict[str, Any]:
    """Least-squares ``y = a + b*n`` (numpy polyfit). With a single N the fixed part cannot
    be told from the per-VM part: then ``a = 0`` and the fit says so."""
    import numpy as np

    if len(set(xs)) >= 2:
        x, y = np.asarray(xs, float), np.asarray(ys, float)
        b, a = np.polyfit(x, y, 1)
        # Costs are not negative: a negative slope or intercept is noise around a flat or
        # proportional cost, so refit with that coefficient held at zero.
        if b < 0:
            return {
                "a": float(y.mean()),
                "b": 0.0,
                "method": "polyfit; slope < 0 (noise) held at 0",
            }
        if a < 0:
            return {
                "a": 0.0,
                "b": float((x * y).sum() / (x * x).sum()),
                "method": "polyfit; intercept < 0 (noise) held at 0",
            }
        return {"a": float(a), "b": float(b), "method": "polyfit"}
    return {
        "a": 0.0,
        "b": float(ys[0]) / max(1.0, float(xs[0])),
        "method": "one point: proportional",
    }


def fits_for(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for setup in ("agentless", "agent"):
        ms = [primary_metrics(r) for r in runs if r.get("setup") == setup and "primary" in r]
        if not ms:
            continue
        xs = [m["n"] for m in ms]
        out[setup] = {
            k: {**fit_line(xs, [m[k] for m in ms]), "points": [[m["n"], m[k]] for m in ms]}
            for k in ("cpu_s", "mem", "hwm", "rchar")
        }
    return out


def budget_for(cfg: BenchConfig, runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    cores = os.cpu_count() or 1
    window = cfg.budget_window
    if cfg.workload == "steady":
        walls = [r["steady"]["budget_window_s"] for r in runs if "steady" in r]
        window = max(walls) if walls else cfg.duration
    return {
        "cpu_share": cfg.budget_cpu,
        "window_s": window,
        "cores": cores,
        "cpu_s": cfg.budget_cpu * cores * window,
        "mem_share": cfg.budget_mem,
        "mem_bytes": cfg.budget_mem * mem_total(),
    }


def fit_capacity(fit: dict[str, Any], budget: float) -> float:
    """Largest N with a + b*N <= budget (inf if the cost does not grow with N)."""
    a, b = fit["a"], fit["b"]
    if b <= 0:
        return math.inf if a <= budget else 0.0
    return max(0.0, (budget - a) / b)


def consolidation(
    fits: dict[str, dict[str, Any]], budget: dict[str, float], max_n: int
) -> dict[str, Any]:
    """How many VMs fit on this host within the security budget, per setup, and the ratio."""
    out: dict[str, Any] = {"budget": budget}
    for setup, f in fits.items():
        n_cpu = fit_capacity(f["cpu_s"], budget["cpu_s"])
        n_mem = fit_capacity(f["mem"], budget["mem_bytes"])
        n = min(n_cpu, n_mem)
        out[setup] = {
            "n_cpu": None if math.isinf(n_cpu) else math.floor(n_cpu),
            "n_mem": None if math.isinf(n_mem) else math.floor(n_mem),
            "n_fit": None if math.isinf(n) else math.floor(n),
            "limited_by": "cpu" if n_cpu <= n_mem else "memory",
            "extrapolated": bool(n > max_n),
        }
    al, ag = out.get("agentless"), out.get("agent")
    if al and ag and al["n_fit"] is not None and ag["n_fit"]:
        out["ratio"] = al["n_fit"] / ag["n_fit"]
    else:
        out["ratio"] = None
    return out


# -------------------------------------------------------------------------- plots

COLORS = {"agentless": "#1f77b4", "agent": "#d62728"}


def _figure(ncols: int, width: float = 5.0, height: float = 4.0) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def plot_cost_per_vm(fits: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Cost per VM vs N for both setups: measured points and the fitted a/N + b."""
    import numpy as np

    fig, axes = _figure(3)
    panels = (
        ("cpu_s", "CPU seconds per VM", 1.0),
        ("mem", "memory per VM (MiB, sum of Pss)", 1 / 2**20),
        ("rchar", "bytes read per VM (MiB, rchar)", 1 / 2**20),
    )
    for ax, (key, label, scale) in zip(axes, panels):
        for setup, f in fits.items():
            pts = f[key]["points"]
            xs = np.array([p[0] for p in pts], float)
            ys = np.array([p[1] for p in pts], float) / xs * scale
            ax.plot(xs, ys, "o", color=COLORS[setup], label=f"{setup} (measured)")
            grid = np.linspace(max(1.0, xs.min()), xs.max(), 200)
            a, b = f[key]["a"], f[key]["b"]
            ax.plot(
                grid,
                (a / grid + b) * scale,
                "-",
                color=COLORS[setup],
                alpha=0.6,
                label=f"{setup} fit: {a * scale:.3g}/N + {b * scale:.3g}",
            )
        ax.set_xlabel("VMs on the host (N)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def plot_consolidation(
    fits: dict[str, dict[str, Any]], cons: dict[str, Any], path: Path, title: str
) -> None:
    """Total CPU and memory vs N, the budget lines, and where each setup crosses them."""
    import numpy as np

    budget = cons["budget"]
    fig, axes = _figure(2, 6.0, 4.5)
    max_n = max(p[0] for f in fits.values() for p in f["cpu_s"]["points"])
    caps = [cons[s][k] for s in fits for k in ("n_cpu", "n_mem") if cons[s][k] is not None]
    x_max = max([max_n * 1.1, *[c * 1.15 for c in caps if c <= 5 * max_n]])
    grid = np.linspace(0, x_max, 300)
    for ax, key, limit, label, scale in (
        (
            axes[0],
            "cpu_s",
            budget["cpu_s"],
            (
                f"CPU seconds (budget {budget['cpu_share']:.0%} of "
                f"{budget['cores']} cores over {budget['window_s']:.0f} s)"
            ),
            1.0,
        ),
        (
            axes[1],
            "mem",
            budget["mem_bytes"],
            f"memory, GiB (sum of Pss; budget {budget['mem_share']:.0%} of RAM)",
            1 / 2**30,
        ),
    ):
        for setup, f in fits.items():
            pts = f[key]["points"]
            ax.plot(
                [p[0] for p in pts],
                [p[1] * scale for p in pts],
                "o",
                color=COLORS[setup],
                label=f"{setup} (measured)",
            )
            cap = cons[setup]["n_cpu" if key == "cpu_s" else "n_mem"]
            ax.plot(
                grid,
                (f[key]["a"] + f[key]["b"] * grid) * scale,
                "-",
                color=COLORS[setup],
                alpha=0.6,
                label=f"{setup} fit: budget reached at N = {cap if cap is not None else 'never'}",
            )
            if cap is not None and cap <= x_max:
                ax.axvline(cap, color=COLORS[setup], ls=":", alpha=0.7)
                ax.annotate(
                    f"{cap}",
                    (cap, limit * scale),
                    color=COLORS[setup],
                    fontsize=8,
                    xytext=(3, 5),
                    textcoords="offset points",
                )
        ax.axhline(limit * scale, color="black", ls="--", lw=1, label="budget")
        ax.set_xlabel("VMs on the host (N)")
        ax.set_ylabel(label, fontsize=8)
        ax.set_xlim(0, x_max)
        top = (
            max([limit * 3, *(p[1] * 1.2 for f in fits.values() for p in f[key]["points"])]) * scale
        )
        ax.set_ylim(0, top)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ratio = cons.get("ratio")
    fig.suptitle(title + (f" — consolidation ratio {ratio:.1f}x" if ratio else ""))
    fig.tight_layout()
    fig.savefig(path)


def _median_by_n(
    runs: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], float]
) -> tuple[list[int], list[float]]:
    """One point per N: the median over repeated runs."""
    import statistics

    ns = sorted({r["n"] for r in runs})
    return ns, [statistics.median(value(r) for r in runs if r["n"] == n) for n in ns]


def plot_protection(runs: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """p50/p99 time to first verdict and to every file verdicted vs N; for boot storms also
    measured from the start of the whole storm (agents are launched in batches)."""
    storm = any("clone_storm" in r for r in runs)
    panels = [
        ("from_launch", "first_verdict_s", "time to first verdict (s)"),
        ("from_launch", "all_files_s", "time until every file has a verdict (s)"),
    ]
    if not storm and all("from_storm_start" in r.get("boot", {}) for r in runs):
        panels.append(
            ("from_storm_start", "all_files_s", "every file verdicted, from the storm's start (s)")
        )
    fig, axes = _figure(len(panels))
    for ax, (ref, key, label) in zip(axes, panels):
        for setup in ("agentless", "agent"):
            rs = [r for r in runs if r.get("setup") == setup and "boot" in r]
            if not rs:
                continue
            for q, style in (("p50", "o-"), ("p99", "s--")):

                def value(r: dict[str, Any], q: str = q, key: str = key, ref: str = ref) -> float:
                    src = (
                        r["clone_storm"]["time_to_protect"]
                        if "clone_storm" in r
                        else r["boot"][ref]
                    )
                    v = src[key][q]
                    return float("nan") if v is None else float(v)

                xs, ys = _median_by_n(rs, value)
                ax.plot(xs, ys, style, color=COLORS[setup], label=f"{setup} {q}")
        ax.set_xlabel("VMs (N)")
        ax.set_ylabel(label, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def plot_update(runs: Sequence[dict[str, Any]], path: Path) -> None:
    fig, axes = _figure(2)
    for setup in ("agentless", "agent"):
        rs = sorted(
            (r for r in runs if r.get("setup") == setup and "update" in r), key=lambda r: r["n"]
        )
        if not rs:
            continue
        axes[0].plot(
            *_median_by_n(rs, lambda r: r["update"]["update_bytes"] / 1024),
            "o-",
            color=COLORS[setup],
            label=setup,
        )
        axes[1].plot(
            *_median_by_n(rs, lambda r: r["update"]["all_points_on_v2_s"]),
            "o-",
            color=COLORS[setup],
            label=setup,
        )
    axes[0].set_ylabel("update bytes sent (KiB)")
    axes[1].set_ylabel("seconds until every scanning point runs v2")
    for ax in axes:
        ax.set_xlabel("VMs (N)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    fig.suptitle("pattern update v1 -> v2 (delta)")
    fig.tight_layout()
    fig.savefig(path)


# -------------------------------------------------------------------------- report


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _s(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _spread(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    """Median, and [min–max] when there are several values."""
    import statistics

    vs = [v * scale for v in values]
    med = f"{statistics.median(vs):.{digits}f}"
    return med if len(vs) < 2 else f"{med} [{min(vs):.{digits}f}–{max(vs):.{digits}f}]"


def _nrep(run: dict[str, Any], repeats: int) -> str:
    return str(run["n"]) if repeats < 2 else f"{run['n']} #{run.get('repeat', 0) + 1}"


def _pq(d: dict[str, Any]) -> str:
    return f"{_s(d.get('p50'))} / {_s(d.get('p99'))}"


def render_report(results: dict[str, Any], out: Path) -> None:
    """Write report.md and the plots from a results dict (as saved in results.json)."""
    meta, cfg = results["meta"], results["config"]
    runs = [r for r in results["runs"] if "primary" in r]
    fits = fits_for(runs)
    bcfg = BenchConfig(**{k: v for k, v in cfg.items() if k in BenchConfig.__dataclass_fields__})
    budget = budget_for(bcfg, runs)
    max_n = max((r["n"] for r in runs), default=1)
    cons: dict[str, Any] = (
        consolidation(fits, budget, max_n) if fits else {"ratio": None, "budget": budget}
    )
    results["analysis"] = {"fits": fits, "consolidation": cons}
    wl = cfg["workload"]
    phase_name = {
        "boot-storm": "boot storm (launch → every file verdicted)",
        "steady": "steady writes",
        "update": "pattern update",
        "clone-storm": "clone storm",
    }[wl]
    plots = []
    if fits:
        plot_cost_per_vm(fits, out / "cost_per_vm.png", f"cost per VM, {phase_name}")
        plot_consolidation(fits, cons, out / "consolidation.png", f"security budget, {phase_name}")
        plots += ["cost_per_vm.png", "consolidation.png"]
    if runs:
        plot_protection(
            runs,
            out / "time_to_protect.png",
            "time-to-protect (new clones)"
            if wl == "clone-storm"
            else "time-to-protect from VM start (boot storm)",
        )
        plots.append("time_to_protect.png")
    if wl == "update" and runs:
        plot_update(runs, out / "update.png")
        plots.append("update.png")

    L: list[str] = []
    L.append(f"# offscan lab: agent vs agentless — {wl}\n")
    L.append(
        f"Run {meta['started']} on `{meta['host']['hostname']}`: {meta['host']['cpus']} CPUs "
        f"({meta['host']['cpu_model'] or 'unknown model'}), {meta['host']['mem_total'] / 2**30:.1f} GiB RAM, "
        f"Linux {meta['host']['kernel']}, Python {meta['host']['python']}, offscan {meta['host']['offscan']} "
        f"({'native' if meta['host']['native_engine'] else 'pure-Python'} engine). "
        f"The whole run took {meta.get('duration_s', 0):.0f} s.\n"
    )
    L.append(f"Command: `{cfg.get('command') or 'offscan bench agent-vs-agentless'}`\n")
    L.append(
        (
            f"Image: a master of {cfg['files']} files ({meta.get('master_bytes', 0) / 2**20:.1f} MiB); every clone "
            f"is an exact copy of it, made during the storm (agentless: the appliance's `vm-clone`, {cfg['clone_batch']} "
            f"per request, handed to the running shim; agents: a copy made by the lab, whose CPU is charged to the "
            f"agents, and a new agent per clone, {cfg['agent_batch']} at a time). "
            if wl == "clone-storm"
            else f"Image: {cfg['files']} files per VM ({meta.get('master_bytes', 0) / 2**20:.1f} MiB master), "
            f"{cfg['shared']:.0%} identical on every VM, the rest per-VM content (the first VM also holds the "
            f"EICAR test file). VMs are plain copies on disk for both setups. "
        )
        + f"{meta.get('signatures', 0)} signatures ({cfg['sigs']} generated .ndb + EICAR); seed {cfg['seed']}. "
        f"Agentless = one `offscan serve` + one shim for all VMs; agent = one `offscan agent` per VM, "
        f"started {cfg['agent_batch']} at a time.\n"
    )
    noisy = [r for r in runs if r[r["primary"]]["background_share"] > 0.10]
    bg = max((r[r["primary"]]["background_share"] for r in runs), default=0.0)
    L.append(
        f"Host noise: load average {meta.get('loadavg_before', '?')} before, {meta.get('loadavg_after', '?')} after; "
        f"CPU used by other processes during the measured phases: up to {bg:.0%} of the host"
        + (
            f" ({len(noisy)} of {len(runs)} runs above 10 %: the machine was shared with other work, so "
            "wall-clock times and latencies are pessimistic; CPU seconds and memory are per process and "
            "unaffected except through cache and scheduling effects)."
            if noisy
            else " (quiet)."
        )
        + "\n"
    )
    incomplete = [
        r
        for r in results["runs"]
        if "error" in r or not r.get(r.get("primary", "boot"), {}).get("complete", False)
    ]
    if incomplete:
        L.append(
            "**Incomplete runs:** "
            + "; ".join(
                f"{r['setup']} N={r['n']}: {r.get('error') or 'missing ' + str(r.get(r.get('primary', 'boot'), {}).get('missing')) + ' verdicts'}"
                for r in incomplete
            )
            + "\n"
        )

    L.append("## Summary\n")
    if cons.get("ratio") is not None or fits:
        b: dict[str, Any] = cons["budget"]
        L.append(
            f"Security budget: {b['cpu_share']:.0%} of the host's CPU over {b['window_s']:.0f} s "
            f"({b['cpu_s']:.0f} CPU-s on {b['cores']} cores) for the {phase_name}, and {b['mem_share']:.0%} of RAM "
            f"({b['mem_bytes'] / 2**30:.2f} GiB) for the scanners' memory (sum of Pss).\n"
        )
        for setup in ("agentless", "agent"):
            c = cons.get(setup)
            if c:
                L.append(
                    f"- **{setup}**: {c['n_fit'] if c['n_fit'] is not None else 'unbounded'} VMs fit "
                    f"(CPU allows {c['n_cpu'] if c['n_cpu'] is not None else '∞'}, memory "
                    f"{c['n_mem'] if c['n_mem'] is not None else '∞'}; limited by {c['limited_by']}"
                    + (", extrapolated beyond the measured N" if c["extrapolated"] else "")
                    + ")"
                )
        if cons.get("ratio") is not None:
            L.append(
                f"\n**Consolidation ratio: {cons['ratio']:.1f}x** more VMs per host agentless than with an agent per VM "
                "at this budget"
                + (
                    f" (the agentless figure extrapolates the fit beyond N = {max_n}; counting only measured "
                    f"points the ratio is at least {max_n / max(1, cons['agent']['n_fit']):.1f}x)"
                    if cons["agentless"]["extrapolated"] and cons["agent"]["n_fit"] < max_n
                    else ""
                )
                + ".\n"
            )
        elif cons.get("agentless", {}).get("n_fit") is None and fits.get("agentless"):
            L.append(
                "\nThe agentless cost did not grow measurably with N in these measurements (the fit is flat), "
                "so no VM count exhausts the budget: measure larger N for a ratio.\n"
            )
    repeats = max((r.get("repeat", 0) for r in runs), default=0) + 1
    L.append(
        f"Cost per VM ({phase_name}"
        + (f"; median of {repeats} interleaved runs, min–max in brackets" if repeats > 1 else "")
        + "):\n"
    )
    L.append(
        "| N | setup | CPU s / VM | memory / VM (Σ Pss, MiB) | peak RSS / VM (Σ VmHWM, MiB) "
        "| bytes read / VM (rchar, MiB) | contents matched | served from cache |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for n in sorted({r["n"] for r in runs}):
        for setup in ("agentless", "agent"):
            rs = [r for r in runs if r["n"] == n and r["setup"] == setup]
            if not rs:
                continue
            L.append(
                f"| {n} | {setup} "
                + "".join(
                    f"| {_spread([fn(r[r['primary']]) / n for r in rs], scale, digits)} "
                    for fn, scale, digits in (
                        (lambda p: p["cpu_s"], 1.0, 3),
                        (lambda p: p["pss_sum"], 1 / 2**20, 1),
                        (lambda p: p["hwm_sum"], 1 / 2**20, 1),
                        (lambda p: p["rchar"], 1 / 2**20, 1),
                    )
                )
                + f"| {_spread([r[r['primary']]['counters']['contents_matched'] for r in rs], 1.0, 0)} "
                + f"| {_spread([r[r['primary']]['counters']['served_from_cache'] for r in rs], 1.0, 0)} |"
            )
    L.append("")
    for name in plots:
        L.append(f"![{name}]({name})\n")

    L.append("## Measurements per N\n")
    L.append(
        f"Main phase: {phase_name}. CPU = utime+stime of every process of the setup; memory = sum over "
        "processes of Pss (largest seen) and of VmHWM; reads = rchar and read_bytes from /proc/PID/io; "
        "counters from each scanning point's status.\n"
    )
    L.append(
        "| N | setup | procs | wall s | CPU s | CPU s/VM | max VmHWM MiB | Σ VmHWM MiB | Σ Pss MiB | Pss/VM MiB | rchar MiB | read_bytes MiB | file bytes read (counter) MiB | verdicts | contents matched | served from cache | detections | errors | other load |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ordered = sorted(runs, key=lambda r: (r["n"], r["setup"] != "agentless", r.get("repeat", 0)))
    for r in ordered:
        p = r[r["primary"]]
        c = p["counters"]
        L.append(
            f"| {_nrep(r, repeats)} | {r['setup']} | {p['processes']} | {p['wall_s']:.1f} | {p['cpu_s']:.2f} | {p['cpu_s'] / r['n']:.3f} "
            f"| {_mb(p['hwm_max'])} | {_mb(p['hwm_sum'])} | {_mb(p['pss_sum'])} | {_mb(p['pss_sum'] / r['n'])} "
            f"| {_mb(p['rchar'])} | {_mb(p['read_bytes'])} "
            f"| {_mb(c['bytes_read'])} | {c['verdicts']} | {c['contents_matched']} | {c['served_from_cache']} "
            f"| {c['detections']} | {c['errors']} | {p['background_share']:.0%} |"
        )
    L.append("")
    if wl != "clone-storm":
        L.append("### Time to protect (boot storm)\n")
        L.append(
            "From the moment a VM's protection was started (agentless: the shim process launched with every VM; "
            "agent: that VM's agent launched) and from its registration with its scanner, to its first verdict "
            "and to every one of its files having a verdict; and from the start of the whole storm (the first "
            "process launched: the appliance, or the first agent), which counts the agents' wait for their "
            "batch. p50 / p99 over the VMs, seconds.\n"
        )
        L.append(
            "| N | setup | first verdict from start | all files from start | first verdict from registration "
            "| all files from registration | all files from the storm's start | setup wall s |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        for r in ordered:
            bt = r["boot"]
            L.append(
                f"| {_nrep(r, repeats)} | {r['setup']} | {_pq(bt['from_launch']['first_verdict_s'])} | {_pq(bt['from_launch']['all_files_s'])} "
                f"| {_pq(bt['from_registration']['first_verdict_s'])} | {_pq(bt['from_registration']['all_files_s'])} "
                f"| {_pq(bt['from_storm_start']['all_files_s']) if 'from_storm_start' in bt else '-'} "
                f"| {bt['setup_wall_s']:.1f} |"
            )
        L.append("")
    if wl == "steady":
        L.append("### Steady writes\n")
        L.append(
            "| N | setup | writes | write → verdict p50 / p99 s | CPU s | host CPU share | contents matched | served from cache |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        for r in ordered:
            s = r["steady"]
            share = s["cpu_s"] / (s["wall_s"] * (meta["host"]["cpus"] or 1))
            L.append(
                f"| {_nrep(r, repeats)} | {r['setup']} | {s['writes']} | {_pq(s['write_to_verdict_s'])} | {s['cpu_s']:.2f} | {share:.1%} "
                f"| {s['counters']['contents_matched']} | {s['counters']['served_from_cache']} |"
            )
        L.append("")
    if wl == "update":
        L.append("### Pattern update v1 → v2\n")
        L.append(
            "Published as a signed delta (and a full bundle); every scanning point got a `reload` at once. "
            "Bytes are what the update server sent (headers included).\n"
        )
        L.append(
            "| N | setup | scanning points | update bytes | all points on v2 (s) | failed fetches (retried) "
            "| compile p50 s | every VM's newly detected file reported (s) | revalidations | contents matched |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in ordered:
            u = r["update"]
            L.append(
                f"| {_nrep(r, repeats)} | {r['setup']} | {u['scanning_points']} | {u['update_bytes']} | {u['all_points_on_v2_s']:.2f} "
                f"| {u.get('reload_failures', len(u.get('reload_errors') or []))} "
                f"| {_s(u['compile_seconds']['p50'])} | {_s(u['all_vms_reported_s'])} | {u['counters']['revalidations']} "
                f"| {u['counters']['contents_matched']} |"
            )
        L.append("")
        errors = sorted({e for r in runs for e in (r["update"].get("reload_errors") or [])})
        if errors:
            L.append(
                "Failed fetches were retried at once (a point that fails keeps the old version until its next "
                f"poll; the lab polls again, up to {UPDATE_ATTEMPTS} times). Errors seen: "
                + "; ".join(f"`{e}`" for e in errors)
                + "\n"
            )
    if wl == "clone-storm":
        L.append("### Clone storm\n")
        L.append(
            "Time-to-protect per clone, from its registration (agentless: the appliance recorded the clone; "
            "agent: the clone's copy was done and its agent launched), p50 / p99 / max, seconds.\n"
        )
        L.append("| N | setup | first verdict | all files | storm wall s | CPU s | sources |")
        L.append("|---|---|---|---|---|---|---|")
        for r in ordered:
            cs = r["clone_storm"]
            t = cs["time_to_protect"]
            L.append(
                f"| {_nrep(r, repeats)} | {r['setup']} | {_pq(t['first_verdict_s'])} / {_s(t['first_verdict_s']['max'])} "
                f"| {_pq(t['all_files_s'])} / {_s(t['all_files_s']['max'])} | {cs['storm_wall_s']:.1f} | {cs['cpu_s']:.2f} "
                f"| {', '.join(f'{k} {v}' for k, v in sorted(cs['verdict_sources'].items()))} |"
            )
        L.append("")

    if fits:
        L.append("## Fits\n")
        L.append(
            "Total cost of the main phase = a + b·N (numpy.polyfit, degree 1, over the measured N); "
            "a is the fixed cost, b the cost of each further VM.\n"
        )
        L.append("| setup | metric | a (fixed) | b (per VM) | method |")
        L.append("|---|---|---|---|---|")
        for setup, f in fits.items():
            for key, unit, scale in (
                ("cpu_s", "CPU s", 1.0),
                ("mem", "Σ Pss MiB", 1 / 2**20),
                ("hwm", "Σ VmHWM MiB", 1 / 2**20),
                ("rchar", "rchar MiB", 1 / 2**20),
            ):
                L.append(
                    f"| {setup} | {unit} | {f[key]['a'] * scale:.3f} | {f[key]['b'] * scale:.4f} | {f[key]['method']} |"
                )
        L.append("")

    L.append("## How this was measured, and caveats\n")
    L.append(CAVEATS)
    (out / "report.md").write_text("\n".join(L) + "\n")


CAVEATS = """\
- **CPU** is utime + stime (+ reaped children) of every process of a setup, read from
  `/proc/PID/stat` at the phase boundaries (a process started during a phase counts from zero).
  Python start-up, the signature compile and idle housekeeping are part of it: that is what each
  agent really costs. The lab's own CPU (building VMs, reading event logs) is not counted, except
  in the agent clone storm where the lab copies the clones and that CPU is charged to the agents.
- **Memory**: VmHWM (peak RSS) per process and its sum, and Pss from `/proc/PID/smaps_rollup`.
  RSS counts shared pages (the Python binary, numpy, the extension) once *per process*, so a sum
  of VmHWM over-states N agents; Pss splits shared pages between the processes mapping them and
  is what the budget uses. The largest simultaneous sum of RSS is in results.json (peak_rss_sum).
- **Bytes read**: `rchar` (bytes returned by read-like syscalls) is the headline number. The VMs
  were just written, so their files are in the page cache: `read_bytes` (bytes fetched from
  storage) stays near zero for both setups, and rchar measures work done, not disk traffic.
  rchar also counts socket reads (the shim protocol, small) and the files each Python process
  imports at start-up (a real per-agent cost). The appliance's own `bytes_read` counter (file
  content read by the pipeline: hashing, matching, revalidation) is shown next to it.
- Agentless hashes every file it has not seen (SHA-256, to find identical content) and matches
  each distinct content once; agents match every file of their own VM. Identical files on
  different VMs therefore cost a hash, not a match.
- **Time-to-protect** comes from the verdict timestamps in each scanner's `events.jsonl` and the
  registration time in its inventory; all clocks are this host's wall clock. Agents are launched
  in batches (the next batch once the previous listens), so later agents start later: their
  time is measured from their own launch, and the setup's wall time shows the whole storm.
- **Consolidation** fits total cost = a + b·N and solves for the largest N within the budget;
  beyond the largest measured N it is an extrapolation (flagged). The CPU budget window is a
  model parameter (`--budget-window`; for the steady workload it is the phase's length).
- **Noise**: the machine may be shared. Other processes' CPU during each phase is measured
  (host busy time from `/proc/stat` minus the setup's and the lab's) and shown per run.
- One host, 2 cores: the shim, the appliance and the agents compete with the lab and with each
  other; results at other core counts will differ (agents parallelize across cores, the
  appliance's event loop is one thread).
"""


# --------------------------------------------------------------------- entry points


def _loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def run_agent_vs_agentless(cfg: BenchConfig, console: Any = None) -> dict[str, Any]:
    """Run the comparison for every N in ``cfg.points`` and write the report; returns the
    results (also in ``cfg.out/results.json``)."""
    from rich.console import Console

    console = console or Console()
    if cfg.workload not in WORKLOADS:
        raise LabError(f"unknown workload {cfg.workload!r}: choose one of {', '.join(WORKLOADS)}")
    points = sorted(set(cfg.points or [cfg.vms]))
    if points[0] < 1:
        raise LabError("--points and --vms must be at least 1")
    cfg.points = points
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = InotifyBudget()
    budget.ensure(points[-1] + 1, allow_raise=cfg.raise_inotify_limit)
    t_run = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "host": host_info(),
            "loadavg_before": _loadavg(),
        },
        "config": asdict(cfg),
        "runs": [],
    }
    lab: Lab | None = None
    try:
        console.print(f"building the master image ({cfg.files} files) and {cfg.sigs} signatures…")
        lab = Lab(cfg, console)
        results["meta"].update(
            master_bytes=lab.master_bytes, signatures=lab.signatures, work=str(lab.work)
        )
        repeat = max(1, cfg.repeat)
        with Progress(console, 2 * len(points) * repeat) as progress:
            for rep in range(repeat):  # interleaved, so a slow spell of the host hits every N
                for n in points:
                    for kind in ("agentless", "agent"):
                        try:
                            run = asyncio.run(run_point(lab, kind, n, progress, rep=rep))
                        except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
                            run = {
                                "setup": kind,
                                "n": n,
                                "repeat": rep,
                                "error": f"{type(exc).__name__}: {exc}",
                            }
                            console.print(f"[red]{kind} N={n} failed:[/red] {run['error']}")
                        results["runs"].append(run)
                        _save(out, results)
                        progress.run_done()
                        _print_run(console, run)
    finally:
        if lab is not None:
            lab.close()
        budget.restore()
    results["meta"]["duration_s"] = time.monotonic() - t_run
    results["meta"]["loadavg_after"] = _loadavg()
    render_report(results, out)
    _save(out, results)
    cons = results["analysis"]["consolidation"]
    if cons.get("ratio"):
        console.print(f"consolidation ratio {cons['ratio']:.1f}x; report in {out / 'report.md'}")
    else:
        console.print(f"report in {out / 'report.md'}")
    return results


def _save(out: Path, results: dict[str, Any]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out / "results.json")


def _print_run(console: Any, run: dict[str, Any]) -> None:
    if "primary" not in run:
        return
    p = run[run["primary"]]
    c = p["counters"]
    console.print(
        f"  {run['setup']:>9} N={run['n']:<4} {run['primary']}: {p['wall_s']:.1f} s, CPU {p['cpu_s']:.1f} s "
        f"({p['cpu_s'] / run['n']:.3f}/VM), Σ Pss {p['pss_sum'] / 2**20:.0f} MiB, rchar {p['rchar'] / 2**20:.0f} MiB, "
        f"matched {c['contents_matched']}, cached {c['served_from_cache']}"
        + (
            ""
            if p.get("complete", True)
            else f" [red]INCOMPLETE ({p.get('missing')} missing)[/red]"
        )
    )


def run_clone_storm(cfg: BenchConfig, console: Any = None) -> dict[str, Any]:
    """``offscan bench clone-storm``: one appliance and one shim protect a master; then
    ``cfg.clones`` clones are made through ``vm-clone`` (``cfg.clone_batch`` per request) and
    handed to the shim while the appliance serves. Reports time-to-protect per clone and what
    limits it; writes report.md, results.json and plots to ``cfg.out``."""
    from rich.console import Console

    console = console or Console()
    if cfg.clones < 1:
        raise LabError("--clones must be at least 1")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = InotifyBudget()
    budget.ensure(cfg.clones + 1, allow_raise=cfg.raise_inotify_limit)
    cfg.shared = 1.0
    results: dict[str, Any] = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "host": host_info(),
            "loadavg_before": _loadavg(),
        },
        "config": asdict(cfg),
    }
    t_run = time.monotonic()
    lab: Lab | None = None
    try:
        console.print(f"building the master image ({cfg.files} files) and {cfg.sigs} signatures…")
        lab = Lab(cfg, console)
        results["meta"].update(master_bytes=lab.master_bytes, signatures=lab.signatures)
        with Progress(console, 1) as progress:
            results["storm"] = asyncio.run(_clone_storm(lab, progress))
            progress.run_done()
    finally:
        if lab is not None:
            lab.close()
        budget.restore()
    results["meta"]["duration_s"] = time.monotonic() - t_run
    results["meta"]["loadavg_after"] = _loadavg()
    render_storm_report(results, out)
    _save(out, results)
    t = results["storm"]["time_to_protect"]["first_verdict_s"]
    console.print(
        f"{cfg.clones} clones: time to first verdict p50 {_s(t['p50'])} s, p99 {_s(t['p99'])} s, "
        f"max {_s(t['max'])} s; report in {out / 'report.md'}"
    )
    return results


async def _clone_storm(lab: Lab, progress: Progress) -> dict[str, Any]:
    cfg = lab.cfg
    rundir = lab.work / "storm"
    rundir.mkdir()
    setup = Setup("agentless", lab, rundir)
    files = [f.relpath for f in lab.plan]
    try:
        sock = await setup.start_appliance()
        worker = setup.worker = ShimWorker(setup.procs, "shim", sock, [("master", str(lab.master))])
        tracker = VerdictTracker({"master": files})
        progress.start_phase("protecting the master", len(files))
        ok = await follow(
            setup.tails,
            tracker,
            timeout=cfg.timeout,
            procs=setup.procs,
            on_progress=progress.update,
        )
        if not ok:
            raise LabError(f"the master's activation did not finish in {cfg.timeout:.0f} s")
        master_s = (tracker.last_time or time.time()) - setup.procs.launched["shim"]
        base = Mark.now(setup.procs)
        before = sum_counters(await setup.statuses())

        storm = VerdictTracker({})
        total = cfg.clones * len(files)
        progress.start_phase(f"storm: {cfg.clones} clones", total)
        t_start = time.time()
        follower = asyncio.create_task(
            follow(
                setup.tails,
                storm,
                timeout=cfg.timeout,
                procs=setup.procs,
                on_progress=progress.update,
                until=lambda: storm.complete and storm.total >= total,
            )
        )
        created = await agentless_storm(
            sock,
            worker,
            cfg.clones,
            cfg.clone_batch,
            rundir / "clones",
            files,
            storm,
            parallel=cfg.parallel,
        )
        t_created = time.time()
        ok = await follower
        end = Mark.now(setup.procs)
        statuses = await setup.statuses()
        after = sum_counters(statuses)
        reg = registration_times(statuses)
        for _ in range(50):  # the worker's last reports may still be in the pipe
            if all(n in worker.reports for n in created["clones"]):
                break
            await asyncio.sleep(0.05)
    finally:
        setup.close()
        if not cfg.keep:
            await asyncio.to_thread(shutil.rmtree, rundir, True)

    names = created["clones"]
    per_clone = []
    for name in names:
        rep = worker.reports.get(name, {})
        r = reg.get(name)
        per_clone.append(
            {
                "vm": name,
                "registered": r,
                "handed_to_shim": rep.get("added"),
                "activated": rep.get("activated"),
                "first_verdict": storm.first.get(name),
                "all_files": storm.done.get(name),
            }
        )

    def span(a: str, b: str) -> list[float]:
        return [c[b] - c[a] for c in per_clone if c.get(a) is not None and c.get(b) is not None]

    costs = phase_costs(base, end, peak_rss_sum=setup.procs.meter.peak_rss_sum)
    wall = (storm.last_time or end.time) - t_start
    reqs = created["requests"]
    copy_total = sum(r["seconds"] for r in reqs)
    creation_span = (max(r["reply"] for r in reqs) - min(r["sent"] for r in reqs)) if reqs else 0.0
    per = costs["per_process"]
    app, shim = per.get("appliance", {}), per.get("shim", {})
    cores = os.cpu_count() or 1
    seconds = max(1, math.ceil(wall))
    verdict_rate = _per_second([t - t_start for t in storm.seen.values()], seconds)
    demand = _per_second([r - t_start for r in reg.values() if r >= t_start], seconds)
    files_n = len(files)
    return {
        "complete": ok,
        "missing": storm.missing,
        "clones": cfg.clones,
        "files_per_clone": files_n,
        "batch": cfg.clone_batch,
        "parallel": cfg.parallel,
        "master_activation_s": master_s,
        "storm_wall_s": wall,
        "creation_span_s": creation_span,
        "created_at_s": t_created - t_start,
        "drain_after_creation_s": max(0.0, wall - (t_created - t_start)),
        "time_to_protect": {
            "first_verdict_s": summarize(span("registered", "first_verdict")),
            "all_files_s": summarize(span("registered", "all_files")),
            "vms_without_verdict": sum(1 for c in per_clone if c["first_verdict"] is None),
            "vms_not_fully_verdicted": sum(1 for c in per_clone if c["all_files"] is None),
        },
        "breakdown": {
            "registered_to_handed_s": summarize(span("registered", "handed_to_shim")),
            "activation_s": summarize(span("handed_to_shim", "activated")),
            "handed_to_first_verdict_s": summarize(span("handed_to_shim", "first_verdict")),
        },
        "cloning": {
            "requests": len(reqs),
            "copy_seconds_total": copy_total,
            "copy_seconds_per_clone": copy_total / max(1, cfg.clones),
            "copies_in_progress": copy_total / creation_span if creation_span else None,
            "clones_per_second": cfg.clones / creation_span if creation_span else None,
            "bytes_copied": sum(r["bytes_copied"] for r in reqs),
            "reflinked": sum(r["reflinked"] for r in reqs),
            "inherited": sum(r["inherited"] for r in reqs),
            "files": sum(r["files"] for r in reqs),
        },
        "throughput": {
            "verdicts": storm.verdicts,
            "verdicts_per_s": storm.verdicts / wall if wall > 0 else None,
            "peak_verdicts_per_s": max(verdict_rate, default=0),
            "appliance_cpu_share_of_core": app.get("cpu_s", 0.0) / wall if wall > 0 else None,
            "appliance_user_share_of_core": app.get("user_s", 0.0) / wall if wall > 0 else None,
            "appliance_sys_share_of_core": app.get("sys_s", 0.0) / wall if wall > 0 else None,
            "shim_cpu_share_of_core": shim.get("cpu_s", 0.0) / wall if wall > 0 else None,
            "host_cpu_share": (costs["cpu_s"] + costs["background_cpu_s"] + costs["lab_cpu_s"])
            / (wall * cores)
            if wall > 0
            else None,
            # what each part could sustain alone, from its own cost per unit of work
            "capacity_clones_per_s": {
                "copy": 1 / (copy_total / cfg.clones) if copy_total else None,
                "appliance_user_cpu": (storm.verdicts / app["user_s"] / files_n)
                if app.get("user_s")
                else None,
                "shim_cpu": (storm.verdicts / shim["cpu_s"] / files_n)
                if shim.get("cpu_s")
                else None,
            },
        },
        "series": {
            "verdicts_per_s": verdict_rate,
            "clone_files_registered_per_s": [d * files_n for d in demand],
        },
        **costs,
        "counters": diff_counters(before, after),
        "verdict_sources": dict(storm.sources),
        "verdict_statuses": dict(storm.statuses),
        "verdict_latency_ms": summarize(storm.latency_ms),
        "per_clone": per_clone,
        "requests": reqs,
        "t_start": t_start,
    }


def _per_second(offsets: Iterable[float], seconds: int) -> list[int]:
    counts = [0] * seconds
    for t in offsets:
        i = int(t)
        if 0 <= i < seconds:
            counts[i] += 1
    return counts


def storm_limits(s: dict[str, Any]) -> list[str]:
    """What limits time-to-protect in a storm, in words, from the measured shares."""
    out = []
    b, th, cl = s["breakdown"], s["throughput"], s["cloning"]
    wait, first = b["registered_to_handed_s"], b["handed_to_first_verdict_s"]
    if wait["p99"] is not None and first["p99"] is not None:
        big = (
            f"waiting for the rest of its vm-clone batch of {s['batch']} to be copied"
            if wait["p99"] >= first["p99"]
            else "activation in the shim and the appliance's queue"
        )
        out.append(
            f"**First verdict**: p99 {wait['p99']:.3f} s from registration to being handed to the shim "
            f"(the rest of its batch copied, then the reply) + p99 {first['p99']:.3f} s from hand-over to "
            f"its first verdict (register, inotify watch, first files queued ahead of older clones' walks); "
            f"the larger part is {big}."
        )
    cap = th["capacity_clones_per_s"]
    if cl["clones_per_second"] is not None:
        out.append(
            f"**Creation rate**: {cl['clones_per_second']:.1f} clones/s. Copying one clone "
            f"({cl['bytes_copied'] / max(1, s['clones']) / 2**20:.1f} MiB, {cl['reflinked']} files reflinked) took "
            f"{cl['copy_seconds_per_clone'] * 1000:.0f} ms on average, and a copy was running "
            f"{min(cl['copies_in_progress'], 1.0) if s['parallel'] == 1 else cl['copies_in_progress']:.0%}"
            + (" of the time" if s["parallel"] == 1 else " (copies in progress on average)")
            + " while clones were being created: without reflink (ext4) `copy_file_range` moves every byte "
            "inside the kernel, so cloning is bound by memory/disk bandwidth."
        )
    if th["verdicts_per_s"] is not None:
        app_u, app_s, shim = (
            th["appliance_user_share_of_core"],
            th["appliance_sys_share_of_core"],
            th["shim_cpu_share_of_core"],
        )
        out.append(
            f"**Serving**: {th['verdicts']} verdicts in {s['storm_wall_s']:.1f} s (mean {th['verdicts_per_s']:.0f}/s, "
            f"peak {th['peak_verdicts_per_s']}/s in one second). The appliance used {app_u:.0%} of a core in user "
            f"space (its event loop and clone bookkeeping) and {app_s:.0%} in the kernel (mostly the copies); the "
            f"shim {shim:.0%}; the host was {th['host_cpu_share']:.0%} busy. Clone files are served from the "
            f"master's verdicts without being read (source 'clone': {s['verdict_sources'].get('clone', 0)} of "
            f"{th['verdicts']}), so serving costs per request, not per byte."
        )
    demand, served = s["series"]["clone_files_registered_per_s"], s["series"]["verdicts_per_s"]
    if demand and served:
        backlog, worst, when = 0, 0, 0
        for i, (d, v) in enumerate(zip(demand, served)):
            backlog = max(0, backlog + d - v)
            if backlog > worst:
                worst, when = backlog, i
        slowest = min(range(len(served) - 1), key=lambda i: served[i]) if len(served) > 1 else 0
        out.append(
            f"**Tail**: the largest backlog of clone files waiting for a verdict was {worst} at "
            f"{when} s into the storm (about {worst / max(1.0, th['verdicts_per_s'] or 1.0):.1f} s of serving); "
            f"the slowest full second served {served[slowest]} verdicts (at {slowest} s). Dips like this, "
            "while clones keep arriving, make the tail of 'every file verdicted'; what the appliance's "
            "loop was doing in that second is not measured here (a profile of the appliance would say)."
        )
    parts = {k: v for k, v in cap.items() if v}
    if parts:
        names = {
            "copy": "copying",
            "appliance_user_cpu": "the appliance's user CPU (one event loop)",
            "shim_cpu": "the shim's CPU",
        }
        limit = min(parts, key=lambda k: parts[k])
        drain = s["drain_after_creation_s"]
        out.append(
            "**Capacity of each part alone** (from its own cost per clone): "
            + ", ".join(f"{names[k]} {v:.1f} clones/s" for k, v in parts.items())
            + f". The tightest is {names[limit]}. Protection finished {drain:.1f} s after the last clone was "
            "created"
            + (
                ": the scanners kept up with creation, so time-to-protect is bound by how fast "
                "clones appear, not by the appliance."
                if drain < max(1.0, 0.05 * s["storm_wall_s"])
                else ": the scanners fell behind creation; the backlog drained afterwards."
            )
        )
    return out


def plot_storm(s: dict[str, Any], path_ttp: Path, path_limits: Path) -> None:
    import numpy as np

    fig, axes = _figure(2)
    pc = s["per_clone"]
    for key, label, color in (
        ("first_verdict", "first verdict", "#1f77b4"),
        ("all_files", "all files", "#ff7f0e"),
    ):
        vals = np.sort(
            [
                c[key] - c["registered"]
                for c in pc
                if c[key] is not None and c["registered"] is not None
            ]
        )
        if vals.size:
            axes[0].plot(vals, np.arange(1, vals.size + 1) / vals.size, color=color, label=label)
    axes[0].axvline(1.0, color="black", ls="--", lw=1, label="goal: p99 < 1 s (first verdict)")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("seconds from registration (log)")
    axes[0].set_ylabel("share of clones")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].set_title("time-to-protect per clone (CDF)")
    t0 = s["t_start"]
    for key, label, color in (
        ("registered", "registered", "gray"),
        ("first_verdict", "first verdict", "#1f77b4"),
        ("all_files", "all files verdicted", "#ff7f0e"),
    ):
        ts = np.sort([c[key] - t0 for c in pc if c[key] is not None])
        if ts.size:
            axes[1].step(ts, np.arange(1, ts.size + 1), where="post", color=color, label=label)
    axes[1].set_xlabel("seconds since the storm began")
    axes[1].set_ylabel("clones")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    axes[1].set_title("clones over time")
    fig.tight_layout()
    fig.savefig(path_ttp)

    fig2, (ax1, ax2) = _figure(2)
    sec = np.arange(len(s["series"]["verdicts_per_s"]))
    ax1.step(
        sec,
        s["series"]["clone_files_registered_per_s"],
        where="post",
        color="gray",
        label="files of clones registered per s (demand)",
    )
    ax1.step(
        sec,
        s["series"]["verdicts_per_s"],
        where="post",
        color="#1f77b4",
        label="verdicts per s (served)",
    )
    ax1.set_xlabel("seconds since the storm began")
    ax1.set_ylabel("files per second")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax1.set_title("demand vs appliance throughput")
    reqs = s["requests"]
    ax2.plot(
        [r["reply"] - t0 for r in reqs],
        [r["seconds"] / r["count"] * 1000 for r in reqs],
        ".",
        ms=3,
        label="copy per clone (appliance, in-kernel)",
    )
    act = sorted(
        (c["activated"] - t0, (c["activated"] - c["handed_to_shim"]) * 1000)
        for c in pc
        if c["activated"] is not None and c["handed_to_shim"] is not None
    )
    if act:
        ax2.plot(
            [a[0] for a in act], [a[1] for a in act], ".", ms=3, label="shim activation per clone"
        )
    ax2.set_xlabel("seconds since the storm began")
    ax2.set_ylabel("milliseconds (log)")
    ax2.set_yscale("log")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    ax2.set_title("copy vs activation time")
    fig2.tight_layout()
    fig2.savefig(path_limits)


def render_storm_report(results: dict[str, Any], out: Path) -> None:
    meta, cfg, s = results["meta"], results["config"], results["storm"]
    plot_storm(s, out / "time_to_protect.png", out / "limits.png")
    t = s["time_to_protect"]
    goal = (
        t["first_verdict_s"]["p99"] is not None
        and t["first_verdict_s"]["p99"] < 1.0
        and not t["vms_without_verdict"]
    )
    c = s["counters"]
    L = [f"# offscan lab: clone storm — {s['clones']} clones\n"]
    L.append(
        f"Run {meta['started']} on `{meta['host']['hostname']}`: {meta['host']['cpus']} CPUs "
        f"({meta['host']['cpu_model'] or 'unknown model'}), {meta['host']['mem_total'] / 2**30:.1f} GiB RAM, "
        f"Linux {meta['host']['kernel']}, offscan {meta['host']['offscan']} "
        f"({'native' if meta['host']['native_engine'] else 'pure-Python'} engine); {meta.get('duration_s', 0):.0f} s in all.\n"
    )
    L.append(f"Command: `{cfg.get('command') or 'offscan bench clone-storm'}`\n")
    L.append(
        f"One `offscan serve` and one shim process (the `Shim` class, fed new VMs on stdin) protect a master of "
        f"{s['files_per_clone']} files ({meta.get('master_bytes', 0) / 2**20:.1f} MiB, {meta.get('signatures', 0)} "
        f"signatures; activation took {s['master_activation_s']:.2f} s). Then {s['clones']} clones are made with the "
        f"appliance's `vm-clone` operation, {s['batch']} per request and {s['parallel']} request(s) in flight, "
        "each batch handed to the shim as soon as its reply arrives, the next request sent at once.\n"
    )
    L.append(
        f"Host noise: load average {meta.get('loadavg_before')} before, {meta.get('loadavg_after')} after; other "
        f"processes used {s['background_share']:.0%} of the host during the storm"
        + (
            " (the machine was shared: times are pessimistic)."
            if s["background_share"] > 0.10
            else "."
        )
        + "\n"
    )
    if not s["complete"]:
        L.append(
            f"**Incomplete:** {s['missing']} clone files had no verdict after {cfg['timeout']:.0f} s.\n"
        )
    L.append("## Time-to-protect per clone\n")
    L.append(
        "From the clone's registration (the moment the appliance recorded it, inside `vm-clone`), seconds.\n"
    )
    L.append("| | p50 | p99 | max |")
    L.append("|---|---|---|---|")
    for key, label in (
        ("first_verdict_s", "first verdict for its files"),
        ("all_files_s", "every file verdicted"),
    ):
        d = t[key]
        L.append(f"| {label} | {_s(d['p50'], 3)} | {_s(d['p99'], 3)} | {_s(d['max'], 3)} |")
    L.append("")
    if t["vms_without_verdict"] or t["vms_not_fully_verdicted"]:
        L.append(
            f"**{t['vms_without_verdict']} clone(s) never got a verdict and {t['vms_not_fully_verdicted']} "
            f"were not fully verdicted within {cfg['timeout']:.0f} s; they are not in the percentiles above.**\n"
        )
    L.append(
        f"Goal p99 < 1 s to first verdict: **{'met' if goal else 'not met'}** "
        f"(p99 {_s(t['first_verdict_s']['p99'], 3)} s"
        + (
            ", and every clone protected)."
            if not t["vms_without_verdict"]
            else ", but not every clone was protected)."
        )
        + "\n"
    )
    L.append("![time to protect](time_to_protect.png)\n")
    L.append("## What limits it\n")
    for line in storm_limits(s):
        L.append(f"- {line}")
    L.append("")
    L.append("Breakdown per clone (p50 / p99 / max, seconds):\n")
    L.append("| step | p50 | p99 | max |")
    L.append("|---|---|---|---|")
    for key, label in (
        (
            "registered_to_handed_s",
            "registered → handed to the shim (rest of its batch copied, reply)",
        ),
        ("activation_s", "shim add_vm: register, watch (inotify), queue first files"),
        ("handed_to_first_verdict_s", "handed to the shim → first verdict"),
    ):
        d = s["breakdown"][key]
        L.append(f"| {label} | {_s(d['p50'], 3)} | {_s(d['p99'], 3)} | {_s(d['max'], 3)} |")
    L.append("")
    L.append("![demand, throughput, copy and activation times](limits.png)\n")
    L.append("## Costs during the storm\n")
    per = s["per_process"]
    L.append("| process | CPU s | VmHWM MiB | Pss MiB | rchar MiB |")
    L.append("|---|---|---|---|---|")
    for label, p in per.items():
        L.append(
            f"| {label} | {p['cpu_s']:.2f} | {_mb(p['hwm'])} | {_mb(p['pss'])} | {_mb(p['rchar'])} |"
        )
    L.append("")
    L.append(
        f"Appliance counters over the storm: {c['verdicts']} verdicts, {c['contents_matched']} contents matched, "
        f"{c['served_clone']} served from the master's verdicts by clone identity, {c['served_identity']} by identity, "
        f"{c['served_digest']} by digest; {c['bytes_read'] / 2**20:.1f} MiB of file content read; "
        f"{s['cloning']['bytes_copied'] / 2**20:.0f} MiB copied in-kernel for the clones. "
        f"Verdict latency inside the appliance p50 {_s(s['verdict_latency_ms']['p50'])} ms, "
        f"p99 {_s(s['verdict_latency_ms']['p99'])} ms.\n"
    )
    L.append("## Caveats\n")
    L.append(
        "- Clones are directories on one ext4 filesystem: without reflink support every clone is a full "
        "in-kernel copy (copy_file_range), which is the appliance's CPU time (system time) and disk traffic. "
        "On btrfs/xfs the copy shares extents and costs almost nothing.\n"
        "- The shim watches each VM root with its own inotify instance (watchdog); the kernel's "
        "`fs.inotify.max_user_instances` (128 by default) caps how many VMs one user's shims can watch, so a "
        "storm of hundreds of clones needs that limit raised (`--raise-inotify-limit` does it for the run).\n"
        "- The appliance's rchar includes the bytes `copy_file_range` copied for the clones (the kernel "
        "counts them as read); its own `bytes_read` counter (file content read to hash or match) is the "
        "scanning work.\n"
        "- Times are wall-clock verdict timestamps from the appliance's events.jsonl and registration times "
        "from its inventory (same clock). The lab's own work (reading the event log) runs on the same 2 cores."
    )
    (out / "report.md").write_text("\n".join(L) + "\n")


# ----------------------------------------------------------------------------- CLI


def _points(text: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated VM counts, got {text!r}"
        ) from None


def _share(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError("expected a share between 0 and 1")
    return v


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Define ``offscan bench agent-vs-agentless`` and ``offscan bench clone-storm``."""
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCH")

    def common(p: argparse.ArgumentParser, default_out: str) -> None:
        p.add_argument(
            "--files",
            type=int,
            default=DEFAULT_FILES,
            help=f"files per VM (default {DEFAULT_FILES})",
        )
        p.add_argument(
            "--sigs",
            type=int,
            default=DEFAULT_SIGS,
            help=f"generated .ndb signatures, plus EICAR (default {DEFAULT_SIGS})",
        )
        p.add_argument(
            "-o",
            "--output",
            dest="out",
            default=default_out,
            metavar="DIR",
            help=f"where report.md, results.json and the plots go (default ./{default_out})",
        )
        p.add_argument(
            "--seed", type=int, default=1, help="seed of the image and signatures (default 1)"
        )
        p.add_argument(
            "--timeout",
            type=float,
            default=DEFAULT_PHASE_TIMEOUT,
            metavar="SECONDS",
            help="longest a phase may take before it is reported incomplete",
        )
        p.add_argument(
            "--work", metavar="DIR", help="where the VMs and scanner state go (default: a temp dir)"
        )
        p.add_argument(
            "--keep", action="store_true", help="keep the work directory (VMs, logs, event logs)"
        )
        p.add_argument(
            "--raise-inotify-limit",
            action="store_true",
            help="as root, raise fs.inotify.max_user_instances for the run if it is too low "
            "(the shim needs one instance per VM); restored afterwards",
        )

    p = sub.add_parser(
        "agent-vs-agentless",
        help="one appliance + one shim vs one agent per VM, measured",
        description="Build N VMs from a master image and measure the agentless setup against "
        "an agent per VM on the same workload; writes a report with plots.",
    )
    p.add_argument("--vms", type=int, default=10, help="VMs (default 10; --points overrides)")
    p.add_argument(
        "--points",
        type=_points,
        metavar="N,N,...",
        help="run for each VM count (e.g. 1,10,25,50,100)",
    )
    p.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="boot-storm",
        help="boot-storm (every file scanned at activation), steady (writes at --rate), "
        "clone-storm (N clones of a protected master), update (a pattern update lands)",
    )
    p.add_argument(
        "--shared",
        type=_share,
        default=DEFAULT_SHARED,
        help=f"share of files identical across VMs (default {DEFAULT_SHARED})",
    )
    p.add_argument(
        "--agent-batch",
        type=int,
        default=DEFAULT_AGENT_BATCH,
        help=f"agents started together (default {DEFAULT_AGENT_BATCH})",
    )
    p.add_argument(
        "--clone-batch",
        type=int,
        default=DEFAULT_CLONE_BATCH,
        help=f"clones per vm-clone request (default {DEFAULT_CLONE_BATCH})",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_STEADY_SECONDS,
        metavar="SECONDS",
        help=f"steady workload: length of the writes (default {DEFAULT_STEADY_SECONDS:.0f})",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_STEADY_RATE,
        help=f"steady workload: files written per VM per second (default {DEFAULT_STEADY_RATE})",
    )
    p.add_argument(
        "--budget-cpu",
        type=_share,
        default=DEFAULT_BUDGET_CPU,
        help=f"share of the host's CPU security may use (default {DEFAULT_BUDGET_CPU})",
    )
    p.add_argument(
        "--budget-window",
        type=float,
        default=DEFAULT_BUDGET_WINDOW,
        metavar="SECONDS",
        help=f"over this long (default {DEFAULT_BUDGET_WINDOW:.0f}; steady: the phase's length)",
    )
    p.add_argument(
        "--budget-mem",
        type=_share,
        default=DEFAULT_BUDGET_MEM,
        help=f"share of the host's RAM security may hold (default {DEFAULT_BUDGET_MEM})",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every (setup, N) this many times, interleaved, to show the host's run-to-run spread",
    )
    common(p, "offscan-lab")

    q = sub.add_parser(
        "clone-storm",
        help="hundreds of clones while the appliance serves: time-to-protect",
        description="Protect a master, then clone it many times through the appliance as fast "
        "as the machine allows; report time-to-protect per clone and what limits it.",
    )
    q.add_argument("--clones", type=int, default=500, help="clones to create (default 500)")
    q.add_argument(
        "--batch",
        dest="clone_batch",
        type=int,
        default=DEFAULT_CLONE_BATCH,
        help=f"clones per vm-clone request (default {DEFAULT_CLONE_BATCH}: a clone is registered when "
        "its copy is done, but reaches the shim with its whole batch)",
    )
    q.add_argument(
        "--parallel",
        type=int,
        default=DEFAULT_CLONE_PARALLEL,
        help=f"vm-clone requests in flight (default {DEFAULT_CLONE_PARALLEL}; 2 copies on both cores)",
    )
    common(q, "offscan-clone-storm")


def _command_line(args: argparse.Namespace) -> str:
    """The bench command as the user would type it (options that differ from the defaults)."""
    defaults = BenchConfig()
    words = ["offscan", "bench", args.bench_command]
    for key, value in vars(args).items():
        if (
            key not in BenchConfig.__dataclass_fields__
            or value is None
            or key in ("out", "command")
        ):
            continue
        if value == getattr(defaults, key) or value is False:
            continue
        flag = (
            "--batch"
            if key == "clone_batch" and args.bench_command == "clone-storm"
            else f"--{key.replace('_', '-')}"
        )
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, ",".join(str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``offscan bench ...``; 0 when every phase completed, 1 if one did not, 2 on errors."""
    from rich.console import Console

    console = Console()
    fields_ = BenchConfig.__dataclass_fields__
    cfg = BenchConfig(
        **{k: v for k, v in vars(args).items() if k in fields_ and v is not None and k != "command"}
    )
    cfg.command = _command_line(args)
    previous = signal.getsignal(signal.SIGTERM)

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, terminate)
    try:
        if args.bench_command == "clone-storm":
            res = run_clone_storm(cfg, console)
            return 0 if res["storm"]["complete"] else 1
        res = run_agent_vs_agentless(cfg, console)
        bad = [r for r in res["runs"] if "error" in r or not r[r["primary"]].get("complete", False)]
        return 1 if bad else 0
    except LabError as exc:
        console.print(f"[red]offscan bench:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted: every process stopped and the work directory removed")
        return 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
