"""The benches' entry points: run one, write its report, results and plots, return a status.

:func:`run_agent_vs_agentless` and :func:`run_clone_storm` take a :class:`BenchConfig` (the
command line is parsed in ``offscan.cli.bench``), run every measurement, then write
``results.json``, ``report.md`` and the plots into ``cfg.out``; :func:`run_bench` runs either
with SIGTERM treated as Ctrl-C and turns the outcome into the command's exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from .._fsutil import atomic_write
from .analysis import analyze
from .clone_storm import measure_clone_storm
from .config import WORKLOADS, BenchConfig, LabError
from .fmt import num
from .measure import InotifyBudget, host_info, loadavg, mem_total
from .plots import write_bench_plots, write_storm_plots
from .progress import Progress
from .report import render_report
from .setups import Lab
from .storm_report import render_storm_report
from .workloads import run_point

if TYPE_CHECKING:
    from rich.console import Console

EXIT_COMPLETE, EXIT_INCOMPLETE, EXIT_SETUP_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def _save(out: Path, results: dict[str, Any], *, final: bool) -> None:
    """Write ``results.json`` atomically: a reader (or a crash) sees a previous or this one."""
    # Checkpoints after each run are not synced: the writeback of an fsync would land in the
    # next run's measured phase, and the final save replaces them. The final one is synced.
    atomic_write(out / "results.json", json.dumps(results, indent=1, default=str), fsync=final)


def _write_report(out: Path, text: str) -> None:
    # fsync: report.md is the run's artifact, written once the measuring is over.
    atomic_write(out / "report.md", text, fsync=True)


def _new_results(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "host": host_info(),
            "loadavg_before": loadavg(),
        },
        "config": asdict(cfg),
    }


def _print_run(console: Console, run: dict[str, Any]) -> None:
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


def _run_points(
    lab: Lab, points: list[int], results: dict[str, Any], out: Path, console: Console
) -> None:
    """Every (repetition, N, setup) in turn, each run saved as soon as it is done."""
    repeat = max(1, lab.cfg.repeat)
    with Progress(console, 2 * len(points) * repeat) as progress:
        for rep in range(repeat):  # interleaved, so a slow spell of the host hits every N
            for n in points:
                for kind in ("agentless", "agent"):
                    try:
                        run = asyncio.run(run_point(lab, kind, n, progress, rep=rep))
                    except Exception as exc:  # one failed run must not lose the others
                        run = {
                            "setup": kind,
                            "n": n,
                            "repeat": rep,
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                        console.print(f"[red]{kind} N={n} failed:[/red] {run['error']}")
                    results["runs"].append(run)
                    _save(out, results, final=False)
                    progress.run_done()
                    _print_run(console, run)


def run_agent_vs_agentless(cfg: BenchConfig, console: Console | None = None) -> dict[str, Any]:
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
    results = {**_new_results(cfg), "runs": []}
    lab: Lab | None = None
    try:
        console.print(f"building the master image ({cfg.files} files) and {cfg.sigs} signatures…")
        lab = Lab(cfg, console)
        results["meta"].update(
            master_bytes=lab.master_bytes, signatures=lab.signatures, work=str(lab.work)
        )
        _run_points(lab, points, results, out, console)
    finally:
        if lab is not None:
            lab.close()
        budget.restore()
    results["meta"]["duration_s"] = time.monotonic() - t_run
    results["meta"]["loadavg_after"] = loadavg()
    analysis = results["analysis"] = analyze(
        results, cores=os.cpu_count() or 1, mem_total=mem_total()
    )
    plots = write_bench_plots(results, analysis, out)
    _write_report(out, render_report(results, analysis, plots))
    _save(out, results, final=True)
    cons = analysis["consolidation"]
    if cons.get("ratio"):
        console.print(f"consolidation ratio {cons['ratio']:.1f}x; report in {out / 'report.md'}")
    else:
        console.print(f"report in {out / 'report.md'}")
    return results


def run_clone_storm(cfg: BenchConfig, console: Console | None = None) -> dict[str, Any]:
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
    results = _new_results(cfg)
    t_run = time.monotonic()
    lab: Lab | None = None
    try:
        console.print(f"building the master image ({cfg.files} files) and {cfg.sigs} signatures…")
        lab = Lab(cfg, console)
        results["meta"].update(master_bytes=lab.master_bytes, signatures=lab.signatures)
        with Progress(console, 1) as progress:
            results["storm"] = asyncio.run(measure_clone_storm(lab, progress))
            progress.run_done()
    finally:
        if lab is not None:
            lab.close()
        budget.restore()
    results["meta"]["duration_s"] = time.monotonic() - t_run
    results["meta"]["loadavg_after"] = loadavg()
    write_storm_plots(results["storm"], out)
    _write_report(out, render_storm_report(results))
    _save(out, results, final=True)
    t = results["storm"]["time_to_protect"]["first_verdict_s"]
    console.print(
        f"{cfg.clones} clones: time to first verdict p50 {num(t['p50'])} s, p99 {num(t['p99'])} s, "
        f"max {num(t['max'])} s; report in {out / 'report.md'}"
    )
    return results


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the bench runs (so it cleans up as on Ctrl-C);
    the previous handler is restored afterwards. Only in the main thread, where signals are."""
    previous = signal.getsignal(signal.SIGTERM)

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def run_bench(bench: str, cfg: BenchConfig, console: Console | None = None) -> int:
    """Run bench ``bench`` (``agent-vs-agentless`` or ``clone-storm``) with ``cfg``: 0 when
    every phase completed, 1 if one did not, 2 on a setup error, 130 when interrupted."""
    from rich.console import Console

    console = console or Console()
    with _sigterm_as_interrupt():
        try:
            if bench == "fleet":
                from .fleet_report import fleet_complete, run_fleet

                return EXIT_COMPLETE if fleet_complete(run_fleet(cfg, console)) else EXIT_INCOMPLETE
            if bench == "clone-storm":
                res = run_clone_storm(cfg, console)
                return EXIT_COMPLETE if res["storm"]["complete"] else EXIT_INCOMPLETE
            res = run_agent_vs_agentless(cfg, console)
            bad = [
                r for r in res["runs"] if "error" in r or not r[r["primary"]].get("complete", False)
            ]
            return EXIT_INCOMPLETE if bad else EXIT_COMPLETE
        except LabError as exc:
            console.print(f"[red]offscan bench:[/red] {exc}")
            return EXIT_SETUP_ERROR
        except KeyboardInterrupt:
            console.print("interrupted: every process stopped and the work directory removed")
            return EXIT_INTERRUPTED
