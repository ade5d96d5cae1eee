"""The workloads a setup runs in ``agent-vs-agentless``: boot storm, steady, clone storm, update.

:func:`run_point` runs one setup with N VMs: the boot storm (every VM activated, every file
verdicted), then the configured workload's own phase (:func:`steady_phase`,
:func:`update_phase`, :func:`storm_phase`), measuring each from ``/proc`` and the scanners'
counters and event logs. Writes VMs and scanner state inside the run's directory of the lab's
work directory, and removes it afterwards unless ``--keep``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .analysis import summarize
from .config import UPDATE_ATTEMPTS, BenchConfig
from .eventlogs import POLL_INTERVAL, VerdictTracker, WriteTracker, follow, protection_times
from .image import TOOL_PATH, ContentMaker, LabVM, append_file, write_file
from .measure import Mark, phase_costs
from .progress import Progress
from .setups import Lab, Setup, build_vms
from .status import appliance_control, diff_counters, registration_times, sum_counters
from .worker import ShimWorker

# One write of the steady workload: (second, VM index, kind of write, sequence, random arg).
SteadyWrite = tuple[float, int, str, int, int]


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
        result["boot"], boot, counters = await boot_phase(setup, vms, n, progress, storm=storm)
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


# ------------------------------------------------------------------------------ boot storm


async def _launch(setup: Setup, vms: Sequence[LabVM], *, storm: bool) -> asyncio.Task[None] | None:
    """Start the setup's scanners for ``vms``; the agents' launcher task, if any."""
    if setup.kind == "agentless":
        sock = await setup.start_appliance()
        if storm:
            setup.worker = ShimWorker(setup.procs, "shim", sock, [(vm.name, vm.root) for vm in vms])
            setup.t0["master"] = setup.procs.launched["shim"]
        else:
            setup.start_shim(vms)
        return None
    return asyncio.create_task(setup.start_agents(vms, batch=setup.lab.cfg.agent_batch))


async def boot_phase(
    setup: Setup, vms: Sequence[LabVM], n: int, progress: Progress, *, storm: bool
) -> tuple[dict[str, Any], Mark, dict[str, Any]]:
    """Start the setup and wait until every file of every VM has a verdict (for the clone
    storm workload: the master's). Returns the phase's results, its end and the counters."""
    tracker = VerdictTracker({vm.name: vm.files for vm in vms})
    start = Mark.now(setup.procs)
    progress.start_phase(
        f"N={n} {setup.kind}: {'master activation' if storm else 'boot storm'}", tracker.total
    )
    launcher = await _launch(setup, vms, storm=storm)
    ok = await follow(
        setup.tails,
        tracker,
        timeout=setup.lab.cfg.timeout,
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
    result = {
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
        "from_storm_start": protection_times(tracker, {vm: start.time for vm in tracker.expected}),
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
        "setup_wall_s": (tracker.last_time or boot.time) - start.time,
    }
    return result, boot, counters


# ---------------------------------------------------------------------------------- steady


def steady_schedule(
    cfg: BenchConfig, n_vms: int, maker: ContentMaker
) -> tuple[list[bytes], list[SteadyWrite]]:
    """The steady workload's downloads (identical across VMs) and its sorted schedule of
    writes: Poisson arrivals at ``cfg.rate`` per VM for ``cfg.duration`` seconds, half of them
    downloads, 30 % new documents, 20 % appends to a log. A pure function of the seed."""
    rng = random.Random(f"steady-{cfg.seed}")
    pool = [
        maker.make(
            rng.choice(("binary", "archive", "text")),
            int(math.exp(rng.uniform(math.log(8 << 10), math.log(256 << 10)))),
            f"download-{cfg.seed}-{k}",
        )
        for k in range(20)
    ]
    schedule: list[SteadyWrite] = []
    for i in range(n_vms):
        t, j = rng.expovariate(cfg.rate), 0
        while t < cfg.duration:
            r = rng.random()
            op = "shared" if r < 0.5 else "new" if r < 0.8 else "append"
            schedule.append((t, i, op, j, rng.randrange(1 << 30)))
            t += rng.expovariate(cfg.rate)
            j += 1
    schedule.sort()
    return pool, schedule


def _steady_write(
    vm: LabVM, op: str, j: int, arg: int, pool: Sequence[bytes], maker: ContentMaker
) -> str:
    """Do one write of the steady workload in ``vm``; returns the path written."""
    if op == "shared":
        rel = f"home/user/Downloads/dl-{j:04d}.bin"
        write_file(Path(vm.root) / rel, pool[arg % len(pool)])
    elif op == "new":
        rel = f"home/user/docs/new-{j:04d}.txt"
        write_file(
            Path(vm.root) / rel, maker.make("text", 2048 + arg % 40_000, f"steady-{vm.name}-{j}")
        )
    else:
        rel = "var/log/steady.log"
        append_file(Path(vm.root) / rel, maker.make("log", 2048, f"append-{vm.name}-{j}"))
    return rel


async def steady_phase(
    setup: Setup, vms: Sequence[LabVM], boot: Mark, counters: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    """VMs write new and modified files at ``--rate`` files per VM per second for
    ``--duration`` seconds (Poisson arrivals, same schedule for both setups): half are
    downloads identical across VMs, 30 % new documents, 20 % appends to a log."""
    cfg = setup.lab.cfg
    maker = setup.lab.maker
    pool, schedule = steady_schedule(cfg, len(vms), maker)
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
            writes.wrote(vm.name, _steady_write(vm, op, j, arg, pool, maker))

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
    return {
        "complete": not writes.pending,
        "missing": len(writes.pending),
        "writes": len(writes.writes),
        "rate_per_vm": cfg.rate,
        "duration_s": cfg.duration,
        **phase_costs(boot, end, peak_rss_sum=setup.procs.meter.peak_rss_sum),
        "counters": diff_counters(counters, after),
        "write_to_verdict_s": summarize(writes.latencies()),
        "verdict_statuses": writes.statuses,
        "verdict_sources": writes.sources,
        "budget_window_s": end.time - boot.time,
    }


# ---------------------------------------------------------------------------------- update


async def _reload_all(
    setup: Setup, progress: Progress
) -> tuple[list[dict[str, Any]], list[float], list[str]]:
    """``reload`` every scanning point at once until it runs v2 (at most UPDATE_ATTEMPTS
    times each): the replies, when each point was done, and the failed fetches' errors."""
    timeout = setup.lab.cfg.timeout
    done_at: list[float] = []
    failures: list[str] = []

    async def reload(sock: str) -> dict[str, Any]:
        # A point whose fetch failed keeps the old version and tries again at its next poll;
        # the lab polls it again at once, a bounded number of times, and counts the failures.
        for _ in range(UPDATE_ATTEMPTS):
            r = await appliance_control(sock, "reload", timeout=timeout)
            if str(r.get("pattern_version")) == "2":
                break
            failures.append(str(r.get("error")))
        done_at.append(time.time())
        progress.update(len(done_at), len(setup.sockets))
        return r

    replies = await asyncio.gather(*(reload(s) for s in setup.sockets))
    return list(replies), done_at, failures


async def _new_detections(
    setup: Setup, vms: Sequence[LabVM], t_pub: float, progress: Progress
) -> tuple[dict[str, float], VerdictTracker]:
    """Wait until every VM's copy of the newly detected tool is reported infected after
    ``t_pub`` (or the timeout): VM -> when, and the tracker of the tool's verdicts."""
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
    deadline = time.monotonic() + setup.lab.cfg.timeout
    while len(found) < len(vms) and time.monotonic() < deadline:
        for tail in setup.tails:
            events = tail.read()
            feed_infected(events)
            tracker.feed(events)
        progress.update(len(found), len(vms))
        await asyncio.sleep(POLL_INTERVAL)
    return found, tracker


async def update_phase(
    setup: Setup, vms: Sequence[LabVM], boot: Mark, counters: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    """Publish pattern version 2 (a delta adding 1 % signatures, one of which detects a
    shared binary on every VM) and ``reload`` every scanning point at once; measure the
    bytes the update server sent, the time until every point runs v2, and the time until
    every VM's copy of the newly detected file is reported."""
    server = setup.server
    assert server is not None  # use_updates() started it
    progress.start_phase(f"N={len(vms)} {setup.kind}: pattern update", len(setup.sockets))
    for tail in setup.tails:
        tail.read()
    sent0 = server.stats["bytes_sent"]
    t_pub = time.time()
    setup.publish("v2-delta-1.osb")
    setup.publish("v2-full.osb")
    replies, done_at, failures = await _reload_all(setup, progress)
    t_all = max(done_at) - t_pub
    sent = server.stats["bytes_sent"] - sent0
    found, tracker = await _new_detections(setup, vms, t_pub, progress)
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
            [
                float(sw.get("compile_seconds") or 0) if (sw := s.get("last_swap")) else 0.0
                for s in statuses
            ]
        ),
    }


# ----------------------------------------------------------------------------- clone storm


async def _agentless_clones(
    setup: Setup,
    n: int,
    files: list[str],
    tracker: VerdictTracker,
    progress: Progress,
    t_start: float,
) -> tuple[bool, dict[str, float], dict[str, Any]]:
    """The agentless side of the storm: ``n`` clones through the appliance's ``vm-clone``,
    handed to the running shim. (complete, VM -> start of protection, what was made)."""
    assert setup.worker is not None
    cfg = setup.lab.cfg
    follower = asyncio.create_task(
        follow(
            setup.tails,
            tracker,
            timeout=cfg.timeout,
            procs=setup.procs,
            on_progress=progress.update,
            until=lambda: tracker.complete and tracker.total >= n * len(files),
        )
    )
    into = setup.rundir / "clones"
    storm = await agentless_storm(
        setup.sockets[0], setup.worker, n, cfg.clone_batch, into, files, tracker
    )
    ok = await follower
    reg = registration_times(await setup.statuses())
    return ok, {name: reg.get(name, t_start) for name in storm["clones"]}, storm


async def _agent_clones(
    setup: Setup, n: int, files: list[str], tracker: VerdictTracker, progress: Progress
) -> tuple[bool, dict[str, float], dict[str, Any]]:
    """The agent side of the storm: ``n`` copies of the master made by the lab (their CPU
    charged to the setup), one new agent each. (complete, VM -> launch, what was made)."""
    from ..cache import IdentityMemo
    from ..clones import clone_tree

    lab, into = setup.lab, setup.rundir / "clones"
    clones = [LabVM(f"clone-{i:03d}", str(into / f"clone-{i:03d}"), files) for i in range(1, n + 1)]
    copy_cpu = 0.0

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
    return ok, start, {"clones": [vm.name for vm in clones], "copy_cpu_s": copy_cpu}


async def storm_phase(
    setup: Setup, n: int, boot: Mark, counters: dict[str, Any], progress: Progress
) -> dict[str, Any]:
    """``n`` clones of the protected master, created as fast as the setup allows: agentless
    through the appliance's ``vm-clone`` (in-kernel copy, clones inherit the master's
    verdicts) handed to the running shim; agents as copies made by the lab, one new agent each."""
    files = [f.relpath for f in setup.lab.plan]
    tracker = VerdictTracker({})
    progress.start_phase(f"N={n} {setup.kind}: clone storm", n * len(files))
    for tail in setup.tails:
        tail.read()
    t_start = time.time()
    if setup.kind == "agentless":
        ok, start, storm = await _agentless_clones(setup, n, files, tracker, progress, t_start)
    else:
        ok, start, storm = await _agent_clones(setup, n, files, tracker, progress)
    copy_cpu = float(storm.get("copy_cpu_s", 0.0))
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
    from ..protocol import ApplianceClient, admin_socket_for

    client = ApplianceClient(admin_socket_for(sock), shim_id=f"lab-operator-{os.getpid()}")
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
