"""The lab's arithmetic: summaries, fits, the consolidation ratio and a clone storm's figures.

Pure: plain data in, plain data out (the dicts saved in ``results.json``). No I/O, no clock, no
processes: what the host is (its cores, its memory) is passed in by the caller, so a saved run
can be analysed again anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import BenchConfig

# The main phase of each workload, as the report and the plots name it.
PHASE_NAMES = {
    "boot-storm": "boot storm (launch → every file verdicted)",
    "steady": "steady writes",
    "update": "pattern update",
    "clone-storm": "clone storm",
}


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


def measured_runs(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The runs of a results dict that got as far as measuring their main phase."""
    return [r for r in results["runs"] if "primary" in r]


def config_of(results: Mapping[str, Any]) -> BenchConfig:
    """The :class:`BenchConfig` a results dict was made with (unknown keys ignored)."""
    cfg = results["config"]
    return BenchConfig(**{k: v for k, v in cfg.items() if k in BenchConfig.__dataclass_fields__})


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


def budget_for(
    cfg: BenchConfig, runs: Sequence[dict[str, Any]], *, cores: int, mem_total: int
) -> dict[str, float]:
    """The security budget: ``cfg``'s shares of a host with ``cores`` CPUs and ``mem_total``
    bytes of RAM, over the budget window (for the steady workload: the phase's length)."""
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
        "mem_bytes": cfg.budget_mem * mem_total,
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


def analyze(results: Mapping[str, Any], *, cores: int, mem_total: int) -> dict[str, Any]:
    """The ``analysis`` of an agent-vs-agentless results dict: the fits per setup and the
    consolidation within the budget of a host with ``cores`` CPUs and ``mem_total`` bytes."""
    runs = measured_runs(results)
    fits = fits_for(runs)
    budget = budget_for(config_of(results), runs, cores=cores, mem_total=mem_total)
    max_n = max((r["n"] for r in runs), default=1)
    cons: dict[str, Any] = (
        consolidation(fits, budget, max_n) if fits else {"ratio": None, "budget": budget}
    )
    return {"fits": fits, "consolidation": cons}


# ----------------------------------------------------------------------------- clone storm


@dataclass(frozen=True)
class StormRecord:
    """What a clone storm measured, raw; :func:`storm_summary` turns it into the results."""

    clones: int
    batch: int
    parallel: int
    files_per_clone: int
    complete: bool
    missing: int  # clone files without a verdict at the end
    master_activation_s: float
    t_start: float  # wall time the storm began
    t_created: float  # wall time the last vm-clone reply arrived
    wall_s: float  # storm start to its last verdict
    per_clone: list[dict[str, Any]]  # see :func:`per_clone_times`
    verdict_times: list[float]  # wall time of each expected (clone, file)'s first verdict
    registered: dict[str, float]  # VM -> registration time, from the appliance's status
    requests: list[dict[str, Any]]  # one per vm-clone request, in the order sent
    verdicts: int
    costs: dict[str, Any]  # :func:`~offscan.lab.measure.phase_costs` of the storm
    counters: dict[str, Any]  # the appliance's counters over the storm
    verdict_sources: dict[str, int]
    verdict_statuses: dict[str, int]
    verdict_latency_ms: list[float]
    cores: int


def per_second(offsets: Iterable[float], seconds: int) -> list[int]:
    """How many of ``offsets`` (seconds) fall in each of the first ``seconds`` seconds."""
    counts = [0] * seconds
    for t in offsets:
        i = int(t)
        if 0 <= i < seconds:
            counts[i] += 1
    return counts


def per_clone_times(
    names: Iterable[str],
    reports: Mapping[str, Mapping[str, float]],
    registered: Mapping[str, float],
    first: Mapping[str, float],
    done: Mapping[str, float],
) -> list[dict[str, Any]]:
    """Per clone: registered, handed to the shim, activated, first verdict, every file."""
    out = []
    for name in names:
        rep = reports.get(name, {})
        out.append(
            {
                "vm": name,
                "registered": registered.get(name),
                "handed_to_shim": rep.get("added"),
                "activated": rep.get("activated"),
                "first_verdict": first.get(name),
                "all_files": done.get(name),
            }
        )
    return out


def _span(per_clone: Sequence[Mapping[str, Any]], a: str, b: str) -> list[float]:
    return [c[b] - c[a] for c in per_clone if c.get(a) is not None and c.get(b) is not None]


def _storm_cloning(rec: StormRecord, copy_total: float, creation_span: float) -> dict[str, Any]:
    reqs = rec.requests
    return {
        "requests": len(reqs),
        "copy_seconds_total": copy_total,
        "copy_seconds_per_clone": copy_total / max(1, rec.clones),
        "copies_in_progress": copy_total / creation_span if creation_span else None,
        "clones_per_second": rec.clones / creation_span if creation_span else None,
        "bytes_copied": sum(r["bytes_copied"] for r in reqs),
        "reflinked": sum(r["reflinked"] for r in reqs),
        "inherited": sum(r["inherited"] for r in reqs),
        "files": sum(r["files"] for r in reqs),
    }


def _storm_throughput(
    rec: StormRecord, copy_total: float, verdict_rate: Sequence[int]
) -> dict[str, Any]:
    wall, costs, files_n = rec.wall_s, rec.costs, rec.files_per_clone
    per = costs["per_process"]
    app, shim = per.get("appliance", {}), per.get("shim", {})
    return {
        "verdicts": rec.verdicts,
        "verdicts_per_s": rec.verdicts / wall if wall > 0 else None,
        "peak_verdicts_per_s": max(verdict_rate, default=0),
        "appliance_cpu_share_of_core": app.get("cpu_s", 0.0) / wall if wall > 0 else None,
        "appliance_user_share_of_core": app.get("user_s", 0.0) / wall if wall > 0 else None,
        "appliance_sys_share_of_core": app.get("sys_s", 0.0) / wall if wall > 0 else None,
        "shim_cpu_share_of_core": shim.get("cpu_s", 0.0) / wall if wall > 0 else None,
        "host_cpu_share": (costs["cpu_s"] + costs["background_cpu_s"] + costs["lab_cpu_s"])
        / (wall * rec.cores)
        if wall > 0
        else None,
        # what each part could sustain alone, from its own cost per unit of work
        "capacity_clones_per_s": {
            "copy": 1 / (copy_total / rec.clones) if copy_total else None,
            "appliance_user_cpu": (rec.verdicts / app["user_s"] / files_n)
            if app.get("user_s")
            else None,
            "shim_cpu": (rec.verdicts / shim["cpu_s"] / files_n) if shim.get("cpu_s") else None,
        },
    }


def storm_summary(rec: StormRecord) -> dict[str, Any]:
    """The ``storm`` of a clone-storm results dict: time-to-protect per clone and its
    breakdown, the cloning and serving rates, what each part could sustain, the series."""
    pc, wall, t_start, reqs = rec.per_clone, rec.wall_s, rec.t_start, rec.requests
    copy_total = sum(r["seconds"] for r in reqs)
    creation_span = (max(r["reply"] for r in reqs) - min(r["sent"] for r in reqs)) if reqs else 0.0
    seconds = max(1, math.ceil(wall))
    verdict_rate = per_second([t - t_start for t in rec.verdict_times], seconds)
    demand = per_second([r - t_start for r in rec.registered.values() if r >= t_start], seconds)
    return {
        "complete": rec.complete,
        "missing": rec.missing,
        "clones": rec.clones,
        "files_per_clone": rec.files_per_clone,
        "batch": rec.batch,
        "parallel": rec.parallel,
        "master_activation_s": rec.master_activation_s,
        "storm_wall_s": wall,
        "creation_span_s": creation_span,
        "created_at_s": rec.t_created - t_start,
        "drain_after_creation_s": max(0.0, wall - (rec.t_created - t_start)),
        "time_to_protect": {
            "first_verdict_s": summarize(_span(pc, "registered", "first_verdict")),
            "all_files_s": summarize(_span(pc, "registered", "all_files")),
            "vms_without_verdict": sum(1 for c in pc if c["first_verdict"] is None),
            "vms_not_fully_verdicted": sum(1 for c in pc if c["all_files"] is None),
        },
        "breakdown": {
            "registered_to_handed_s": summarize(_span(pc, "registered", "handed_to_shim")),
            "activation_s": summarize(_span(pc, "handed_to_shim", "activated")),
            "handed_to_first_verdict_s": summarize(_span(pc, "handed_to_shim", "first_verdict")),
        },
        "cloning": _storm_cloning(rec, copy_total, creation_span),
        "throughput": _storm_throughput(rec, copy_total, verdict_rate),
        "series": {
            "verdicts_per_s": verdict_rate,
            "clone_files_registered_per_s": [d * rec.files_per_clone for d in demand],
        },
        **rec.costs,
        "counters": rec.counters,
        "verdict_sources": dict(rec.verdict_sources),
        "verdict_statuses": dict(rec.verdict_statuses),
        "verdict_latency_ms": summarize(rec.verdict_latency_ms),
        "per_clone": pc,
        "requests": reqs,
        "t_start": t_start,
    }
