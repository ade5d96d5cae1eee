"""The ``clone-storm`` bench's run: protect a master, then clone it many times while it serves.

One appliance and one shim worker protect the master; then ``cfg.clones`` clones are made
through the appliance's ``vm-clone`` and handed to the shim as they arrive. Measures the storm
from ``/proc``, the appliance's counters and its event log, and returns the raw record's
:func:`~offscan.lab.analysis.storm_summary`. Writes inside the lab's work directory only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

from .analysis import StormRecord, per_clone_times, storm_summary
from .config import LabError
from .eventlogs import VerdictTracker, follow
from .measure import Mark, phase_costs
from .progress import Progress
from .setups import Lab, Setup
from .status import diff_counters, registration_times, sum_counters
from .worker import ShimWorker
from .workloads import agentless_storm

REPORT_WAIT = 50  # polls of 50 ms for the worker's last reports, which may still be in the pipe


async def _protect_master(setup: Setup, files: list[str], progress: Progress) -> float:
    """Wait until every file of the master has a verdict; seconds from the shim's launch."""
    cfg = setup.lab.cfg
    tracker = VerdictTracker({"master": files})
    progress.start_phase("protecting the master", len(files))
    ok = await follow(
        setup.tails, tracker, timeout=cfg.timeout, procs=setup.procs, on_progress=progress.update
    )
    if not ok:
        raise LabError(f"the master's activation did not finish in {cfg.timeout:.0f} s")
    return (tracker.last_time or time.time()) - setup.procs.launched["shim"]


async def _storm(
    setup: Setup, sock: str, worker: ShimWorker, files: list[str], progress: Progress
) -> tuple[VerdictTracker, dict[str, Any], float, float, bool]:
    """Make the clones and follow their verdicts until every file of every clone has one:
    (the verdicts' tracker, what was made, start, when the last clone was made, complete)."""
    cfg = setup.lab.cfg
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
        setup.rundir / "clones",
        files,
        storm,
        parallel=cfg.parallel,
    )
    t_created = time.time()
    ok = await follower
    return storm, created, t_start, t_created, ok


async def _await_reports(worker: ShimWorker, names: Sequence[str]) -> None:
    for _ in range(REPORT_WAIT):  # the worker's last reports may still be in the pipe
        if all(n in worker.reports for n in names):
            break
        await asyncio.sleep(0.05)


async def measure_clone_storm(lab: Lab, progress: Progress) -> dict[str, Any]:
    """Run the storm of ``lab.cfg``; the ``storm`` part of the results."""
    cfg = lab.cfg
    rundir = lab.work / "storm"
    rundir.mkdir()
    setup = Setup("agentless", lab, rundir)
    files = [f.relpath for f in lab.plan]
    try:
        sock = await setup.start_appliance()
        worker = setup.worker = ShimWorker(setup.procs, "shim", sock, [("master", str(lab.master))])
        master_s = await _protect_master(setup, files, progress)
        base = Mark.now(setup.procs)
        before = sum_counters(await setup.statuses())
        storm, created, t_start, t_created, ok = await _storm(setup, sock, worker, files, progress)
        end = Mark.now(setup.procs)
        statuses = await setup.statuses()
        after = sum_counters(statuses)
        reg = registration_times(statuses)
        await _await_reports(worker, created["clones"])
    finally:
        setup.close()
        if not cfg.keep:
            await asyncio.to_thread(shutil.rmtree, rundir, True)
    record = StormRecord(
        clones=cfg.clones,
        batch=cfg.clone_batch,
        parallel=cfg.parallel,
        files_per_clone=len(files),
        complete=ok,
        missing=storm.missing,
        master_activation_s=master_s,
        t_start=t_start,
        t_created=t_created,
        wall_s=(storm.last_time or end.time) - t_start,
        per_clone=per_clone_times(created["clones"], worker.reports, reg, storm.first, storm.done),
        verdict_times=list(storm.seen.values()),
        registered=reg,
        requests=created["requests"],
        verdicts=storm.verdicts,
        costs=phase_costs(base, end, peak_rss_sum=setup.procs.meter.peak_rss_sum),
        counters=diff_counters(before, after),
        verdict_sources=storm.sources,
        verdict_statuses=storm.statuses,
        verdict_latency_ms=storm.latency_ms,
        cores=os.cpu_count() or 1,
    )
    return storm_summary(record)
