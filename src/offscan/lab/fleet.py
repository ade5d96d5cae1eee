"""The ``fleet`` bench's runs: several appliances (one per simulated host) and one Redis protect
N clone VMs each, all copies of one master.

Three runs on the same VMs, each with fresh appliance state: ``isolated`` (every appliance
alone: the master's contents are matched once per host), ``shared`` (the appliances share the
verdict tier in Redis: matched once for the fleet), and ``failover`` (shared tier, each shim
lists its own appliance then the next host's; appliance 0 is killed with SIGKILL a third of the
way through its host's storm, then a second wave of files lands in host 0's VMs). Measures from the appliances' status counters, their event logs and
``/proc``; writes inside the lab's work directory only, and starts ``redis-server`` there.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import LabError
from .eventlogs import EventTail, VerdictTracker
from .image import LabVM, build_vm
from .measure import Mark, phase_costs
from .procs import ProcSet, wait_ready_async
from .setups import Lab
from .status import appliance_status

MODES = ("isolated", "shared", "failover")
SUN_PATH_MAX = 100  # bytes of a unix socket path we use (the kernel's limit is 107)
KILL_AT = 1 / 3  # share of host 0's files judged when the failover run kills appliance 0
SECOND_WAVE = 10  # files per host-0 VM written after the kill
POLL = 0.05  # seconds between reads of the event logs
FLEET_KEY = b"offscan-lab-fleet-key-0123456789"
# status.shared_cache counters the report adds up over the fleet
SHARED_KEYS = (
    "round_trips",
    "keys_looked_up",
    "hits",
    "writes",
    "lock_waits",
    "served_by_peer",
    "takeovers",
    "forged",
    "skipped",
    "outages",
)


class RedisProc:
    """``redis-server`` on a unix socket in ``workdir``, no persistence; always stopped."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise LabError("the fleet bench needs redis-server (apt install redis-server)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.sock = workdir / "redis.sock"
        self._short: str | None = None
        if len(str(self.sock)) > SUN_PATH_MAX:  # a unix socket path must fit sun_path
            self._short = tempfile.mkdtemp(prefix="offscan-redis-")
            self.sock = Path(self._short) / "redis.sock"
        with open(workdir / "redis.log", "ab") as log:
            self.p = subprocess.Popen(
                [exe, "--port", "0", "--unixsocket", str(self.sock), "--unixsocketperm", "700"]
                + ["--save", "", "--appendonly", "no", "--dir", str(workdir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.url = f"unix://{self.sock}"

    async def wait(self, timeout: float = 30.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            if self.p.poll() is not None:
                tail = (self.workdir / "redis.log").read_text(errors="replace")[-800:]
                raise LabError(f"redis-server exited with status {self.p.returncode}:\n{tail}")
            with contextlib.suppress(redis.RedisError, OSError):
                if redis.Redis(unix_socket_path=str(self.sock), socket_timeout=2).ping():
                    return
            if time.monotonic() > deadline:
                raise LabError("redis-server did not start")
            await asyncio.sleep(0.05)

    def info(self) -> dict[str, Any]:
        """Redis's own command and memory counters (what the fleet cost it)."""
        import redis

        try:
            r = redis.Redis(unix_socket_path=str(self.sock), socket_timeout=5)
            stats, mem = r.info("stats"), r.info("memory")
            return {
                "commands": stats.get("total_commands_processed", 0),
                "keys": r.dbsize(),
                "used_memory": mem.get("used_memory", 0),
            }
        except (redis.RedisError, OSError):
            return {}

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if self._short is not None:
            shutil.rmtree(self._short, ignore_errors=True)


def build_fleet_vms(lab: Lab, hosts: int, n: int) -> list[list[LabVM]]:
    """``n`` clone VMs per host (plain copies of the master), named ``h<H>-vm-<I>``."""
    root = lab.work / "vms"
    out = []
    for h in range(hosts):
        vms = []
        for i in range(n):
            name = f"h{h}-vm-{i:03d}"
            index = h * n + i  # VM 0 of the fleet also holds the EICAR file
            vms.append(
                build_vm(root / name, name, index, lab.master, lab.plan, lab.maker, lab.cfg.seed)
            )
        out.append(vms)
    return out


class FleetRun:
    """One run: ``hosts`` appliances (and Redis unless isolated), a shim per host."""

    def __init__(self, lab: Lab, mode: str, fleet: list[list[LabVM]]) -> None:
        self.lab = lab
        self.mode = mode
        self.fleet = fleet
        self.rundir = lab.work / f"run-{mode}"
        self.procs = ProcSet(self.rundir / "logs")
        self.redis: RedisProc | None = None
        self.socks: list[str] = []
        self.tails: list[EventTail] = []
        # sockets (and their ".admin" twins) must fit sun_path: a long --work gets a short dir
        self.sockdir = self.rundir
        self._short: str | None = None
        if len(str(self.rundir / "a00.sock.admin")) > SUN_PATH_MAX:
            self._short = tempfile.mkdtemp(prefix="offscan-fleet-")
            self.sockdir = Path(self._short)

    async def start(self) -> None:
        extra: list[str] = []
        if self.mode != "isolated":
            self.redis = RedisProc(self.rundir / "redis")
            await self.redis.wait()
            self.procs.meter.add("redis", self.redis.p.pid)  # its CPU counts too
            key = self.rundir / "fleet.key"
            key.write_bytes(FLEET_KEY)
            extra = ["--cache-redis", self.redis.url, "--cache-key", str(key)]
        for h in range(len(self.fleet)):
            state = self.rundir / f"appliance{h}"
            sock, ready = str(self.sockdir / f"a{h}.sock"), self.rundir / f"a{h}.ready"
            argv = ["-m", "offscan", "serve", "--socket", sock, "--state", str(state)]
            argv += ["--ready-file", str(ready), "-d", str(self.lab.db_dir), *extra]
            self.procs.launch(f"appliance{h}", argv)
            self.socks.append(sock)
            self.tails.append(EventTail(state / "events.jsonl"))
        for h in range(len(self.fleet)):
            await wait_ready_async(self.procs, f"appliance{h}", self.rundir / f"a{h}.ready")

    def start_shims(self) -> float:
        """One shim per host (failover: its appliance, then the next host's); launch time."""
        hosts = len(self.fleet)
        for h, vms in enumerate(self.fleet):
            argv = ["-m", "offscan", "shim", "--appliance", self.socks[h]]
            if self.mode == "failover" and hosts > 1:
                argv += ["--appliance", self.socks[(h + 1) % hosts]]
            argv += ["--shim-id", f"lab-shim-{h}"]
            for vm in vms:
                argv += ["--vm", f"{vm.name}={vm.root}"]
            self.procs.launch(f"shim{h}", argv)
        return min(self.procs.launched[f"shim{h}"] for h in range(hosts))

    async def storm(self, timeout: float) -> dict[str, Any]:
        """Follow every appliance's verdicts until every file of every VM has one (or
        ``timeout``). The failover run kills appliance 0 once a third of host 0's files have
        a verdict (or, in a run too small to catch mid-way, when they all have) and then
        writes a second wave of files into host 0's VMs, which only the failover target can
        judge. Long because it is one loop that follows, kills once and times the resumption."""
        expected: dict[str, Iterable[str]] = {vm.name: vm.files for vms in self.fleet for vm in vms}
        tracker = VerdictTracker(expected)
        host0 = {vm.name for vm in self.fleet[0]}
        host0_files = sum(len(vm.files) for vm in self.fleet[0])
        base = Mark.now(self.procs)
        t_launch = self.start_shims()
        t_kill: float | None = None
        resumed: float | None = None
        deadline = time.monotonic() + timeout
        while not (tracker.complete and (t_kill is not None or self.mode != "failover")):
            if time.monotonic() > deadline:
                break
            for i, tail in enumerate(self.tails):
                events = tail.read()
                tracker.feed(events)
                if t_kill is not None and resumed is None and i != 0:
                    times = [e["time"] for e in events if e.get("vm") in host0]
                    resumed = min((t for t in times if t >= t_kill), default=None)
            if self.mode == "failover" and t_kill is None:
                judged0 = sum(1 for vm, _ in tracker.seen if vm in host0)
                if judged0 >= host0_files * KILL_AT or tracker.complete:
                    self.procs.procs["appliance0"].kill()
                    t_kill = time.time()
                    self._second_wave(tracker)
            await asyncio.sleep(POLL)
        for tail in self.tails:
            tracker.feed(tail.read())
        end = Mark.now(self.procs)
        return {
            "complete": tracker.complete,
            "files": tracker.total,
            "verdicts_lost": tracker.missing,
            "time_to_protect_s": (tracker.last_time or end.time) - t_launch,
            "killed_at_s": None if t_kill is None else t_kill - t_launch,
            "time_to_resume_s": None if t_kill is None or resumed is None else resumed - t_kill,
            "statuses": dict(tracker.statuses),
            "costs": phase_costs(base, end, peak_rss_sum=self.procs.meter.peak_rss_sum),
        }

    def _second_wave(self, tracker: VerdictTracker) -> None:
        """After the kill: copies of a few master files written into host 0's VMs."""
        plan = self.lab.plan[:SECOND_WAVE]
        for vm in self.fleet[0]:
            names = []
            for f in plan:
                rel = f"after-failover/{f.relpath}"
                dest = Path(vm.root) / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.lab.master / f.relpath, dest)
                names.append(rel)
            tracker.expect(vm.name, names)

    async def counters(self) -> dict[str, Any]:
        """The live appliances' counters, added up (a killed appliance's are gone)."""
        keys = ("contents_matched", "bytes_read", "bytes_matched", "served_from_cache")
        shared_keys = SHARED_KEYS
        total: dict[str, Any] = dict.fromkeys(keys, 0)
        total.update(dict.fromkeys(shared_keys, 0))
        per_host: list[dict[str, Any] | None] = []
        for h, sock in enumerate(self.socks):
            if self.procs.procs[f"appliance{h}"].poll() is not None:
                per_host.append(None)
                continue
            st = await appliance_status(sock)
            row = {k: st[k] for k in keys}  # type: ignore[literal-required]
            shared: dict[str, Any] = dict(st.get("shared_cache") or {})
            row.update({k: shared.get(k, 0) for k in shared_keys})
            per_host.append(row)
            for k, v in row.items():
                total[k] += v
        return {"total": total, "per_host": per_host}

    def close(self) -> None:
        try:
            # shims first, while their appliances still answer: each prints its stats line
            # (failovers, the appliance in use) at exit, which the results read
            self.procs.stop([k for k in self.procs.procs if k.startswith("shim")])
            self.procs.close()
        finally:
            if self.redis is not None:
                self.redis.stop()
            if self._short is not None:
                shutil.rmtree(self._short, ignore_errors=True)


async def measure_fleet_run(lab: Lab, mode: str, fleet: list[list[LabVM]]) -> dict[str, Any]:
    """One run of the fleet bench (``mode`` in :data:`MODES`); its part of the results."""
    run = FleetRun(lab, mode, fleet)
    try:
        await run.start()
        storm = await run.storm(lab.cfg.timeout)
        counters = await run.counters()
        redis_info = run.redis.info() if run.redis is not None else {}
    finally:
        run.close()
    shims = [_shim_stats(run.procs.log_tail(f"shim{h}", 100_000)) for h in range(len(fleet))]
    if not lab.cfg.keep:
        await asyncio.to_thread(shutil.rmtree, run.rundir, True)
    return {
        "mode": mode,
        "hosts": len(fleet),
        "vms_per_host": len(fleet[0]) if fleet else 0,
        **storm,
        "counters": counters,
        "redis": redis_info,
        "shims": shims,
        "failovers": sum(s.get("failovers", 0) for s in shims),
        "failbacks": sum(s.get("failbacks", 0) for s in shims),
    }


def _shim_stats(tail: str) -> dict[str, int]:
    """The numbers of a shim's stats line (printed at exit)."""
    for line in reversed(tail.splitlines()):
        if line.startswith("offscan shim: "):
            pairs = (kv.split("=", 1) for kv in line.split()[2:] if "=" in kv)
            return {k: int(v) for k, v in pairs if v.isdigit()}
    return {}
