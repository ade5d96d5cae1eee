"""The agent-vs-agentless report: ``report.md`` as text, from a results dict and its analysis.

:func:`render_report` is a composition of one function per section, each taking a
:class:`ReportView` of the results (built once, never modified) and returning its lines. Pure:
it reads its inputs and returns a string; the caller writes the file and the plots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .analysis import PHASE_NAMES, measured_runs
from .config import UPDATE_ATTEMPTS
from .fmt import mib, nrep, num, pq, spread


@dataclass(frozen=True)
class ReportView:
    """What the sections of a report read: the results, their analysis and the plot names."""

    meta: Mapping[str, Any]
    cfg: Mapping[str, Any]
    all_runs: Sequence[dict[str, Any]]  # every run, failed ones included
    runs: list[dict[str, Any]]  # the runs that measured their main phase
    ordered: list[dict[str, Any]]  # those by N, agentless first, then by repetition
    fits: dict[str, dict[str, Any]]
    cons: dict[str, Any]
    wl: str
    phase_name: str
    max_n: int
    repeats: int
    plots: Sequence[str]

    @classmethod
    def of(
        cls, results: Mapping[str, Any], analysis: Mapping[str, Any], plots: Sequence[str]
    ) -> ReportView:
        runs = measured_runs(results)
        wl = results["config"]["workload"]
        return cls(
            meta=results["meta"],
            cfg=results["config"],
            all_runs=results["runs"],
            runs=runs,
            ordered=sorted(
                runs, key=lambda r: (r["n"], r["setup"] != "agentless", r.get("repeat", 0))
            ),
            fits=analysis["fits"],
            cons=analysis["consolidation"],
            wl=wl,
            phase_name=PHASE_NAMES[wl],
            max_n=max((r["n"] for r in runs), default=1),
            repeats=max((r.get("repeat", 0) for r in runs), default=0) + 1,
            plots=plots,
        )


def render_report(
    results: Mapping[str, Any], analysis: Mapping[str, Any], plots: Sequence[str] = ()
) -> str:
    """``report.md`` of an agent-vs-agentless results dict (as saved in results.json) and its
    :func:`~offscan.lab.analysis.analyze`; ``plots`` are the image files to show, in order."""
    rv = ReportView.of(results, analysis, plots)
    sections = [_header, _setup_text, _noise, _incomplete, _summary, _cost_per_vm, _measurements]
    if rv.wl != "clone-storm":
        sections.append(_boot_times)
    if rv.wl == "steady":
        sections.append(_steady)
    if rv.wl == "update":
        sections.append(_update)
    if rv.wl == "clone-storm":
        sections.append(_clone_storm)
    if rv.fits:
        sections.append(_fits)
    sections.append(_caveats)
    return "\n".join(line for section in sections for line in section(rv)) + "\n"


def _header(rv: ReportView) -> list[str]:
    """Title, the host and the command line."""
    meta, cfg, wl = rv.meta, rv.cfg, rv.wl
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
    return L


def _setup_text(rv: ReportView) -> list[str]:
    """What was built and compared: the image, signatures and the two setups."""
    meta, cfg, wl = rv.meta, rv.cfg, rv.wl
    L: list[str] = []
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
    return L


def _noise(rv: ReportView) -> list[str]:
    """How busy the rest of the host was during the measured phases."""
    meta, runs = rv.meta, rv.runs
    L: list[str] = []
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
    return L


def _incomplete(rv: ReportView) -> list[str]:
    """The runs that failed or did not finish their main phase (or nothing)."""
    L: list[str] = []
    incomplete = [
        r
        for r in rv.all_runs
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
    return L


def _summary(rv: ReportView) -> list[str]:
    """The budget, how many VMs each setup fits within it, and the ratio."""
    fits, cons, phase_name, max_n = rv.fits, rv.cons, rv.phase_name, rv.max_n
    L: list[str] = []
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
    return L


def _cost_per_vm(rv: ReportView) -> list[str]:
    """The cost per VM of every N and setup (median and range over repeats), the plots."""
    runs, phase_name, repeats = rv.runs, rv.phase_name, rv.repeats
    L: list[str] = []
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
                    f"| {spread([fn(r[r['primary']]) / n for r in rs], scale, digits)} "
                    for fn, scale, digits in (
                        (lambda p: p["cpu_s"], 1.0, 3),
                        (lambda p: p["pss_sum"], 1 / 2**20, 1),
                        (lambda p: p["hwm_sum"], 1 / 2**20, 1),
                        (lambda p: p["rchar"], 1 / 2**20, 1),
                    )
                )
                + f"| {spread([r[r['primary']]['counters']['contents_matched'] for r in rs], 1.0, 0)} "
                + f"| {spread([r[r['primary']]['counters']['served_from_cache'] for r in rs], 1.0, 0)} |"
            )
    L.append("")
    for name in rv.plots:
        L.append(f"![{name}]({name})\n")
    return L


def _measurements(rv: ReportView) -> list[str]:
    """Every run's main phase: processes, CPU, memory, reads, counters, load."""
    phase_name, repeats = rv.phase_name, rv.repeats
    L: list[str] = []
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
    for r in rv.ordered:
        p = r[r["primary"]]
        c = p["counters"]
        L.append(
            f"| {nrep(r, repeats)} | {r['setup']} | {p['processes']} | {p['wall_s']:.1f} | {p['cpu_s']:.2f} | {p['cpu_s'] / r['n']:.3f} "
            f"| {mib(p['hwm_max'])} | {mib(p['hwm_sum'])} | {mib(p['pss_sum'])} | {mib(p['pss_sum'] / r['n'])} "
            f"| {mib(p['rchar'])} | {mib(p['read_bytes'])} "
            f"| {mib(c['bytes_read'])} | {c['verdicts']} | {c['contents_matched']} | {c['served_from_cache']} "
            f"| {c['detections']} | {c['errors']} | {p['background_share']:.0%} |"
        )
    L.append("")
    return L


def _boot_times(rv: ReportView) -> list[str]:
    """Time to protect in the boot storm, from launch, registration and storm start."""
    repeats = rv.repeats
    L: list[str] = []
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
    for r in rv.ordered:
        bt = r["boot"]
        L.append(
            f"| {nrep(r, repeats)} | {r['setup']} | {pq(bt['from_launch']['first_verdict_s'])} | {pq(bt['from_launch']['all_files_s'])} "
            f"| {pq(bt['from_registration']['first_verdict_s'])} | {pq(bt['from_registration']['all_files_s'])} "
            f"| {pq(bt['from_storm_start']['all_files_s']) if 'from_storm_start' in bt else '-'} "
            f"| {bt['setup_wall_s']:.1f} |"
        )
    L.append("")
    return L


def _steady(rv: ReportView) -> list[str]:
    """The steady-writes phase: writes, write-to-verdict latency, CPU share."""
    meta, repeats = rv.meta, rv.repeats
    L: list[str] = []
    L.append("### Steady writes\n")
    L.append(
        "| N | setup | writes | write → verdict p50 / p99 s | CPU s | host CPU share | contents matched | served from cache |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for r in rv.ordered:
        s = r["steady"]
        share = s["cpu_s"] / (s["wall_s"] * (meta["host"]["cpus"] or 1))
        L.append(
            f"| {nrep(r, repeats)} | {r['setup']} | {s['writes']} | {pq(s['write_to_verdict_s'])} | {s['cpu_s']:.2f} | {share:.1%} "
            f"| {s['counters']['contents_matched']} | {s['counters']['served_from_cache']} |"
        )
    L.append("")
    return L


def _update(rv: ReportView) -> list[str]:
    """The pattern update: bytes, time until every point runs v2, new detections."""
    runs, repeats = rv.runs, rv.repeats
    L: list[str] = []
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
    for r in rv.ordered:
        u = r["update"]
        L.append(
            f"| {nrep(r, repeats)} | {r['setup']} | {u['scanning_points']} | {u['update_bytes']} | {u['all_points_on_v2_s']:.2f} "
            f"| {u.get('reload_failures', len(u.get('reload_errors') or []))} "
            f"| {num(u['compile_seconds']['p50'])} | {num(u['all_vms_reported_s'])} | {u['counters']['revalidations']} "
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
    return L


def _clone_storm(rv: ReportView) -> list[str]:
    """The clone-storm workload: time-to-protect per clone, wall time, sources."""
    repeats = rv.repeats
    L: list[str] = []
    L.append("### Clone storm\n")
    L.append(
        "Time-to-protect per clone, from its registration (agentless: the appliance recorded the clone; "
        "agent: the clone's copy was done and its agent launched), p50 / p99 / max, seconds.\n"
    )
    L.append("| N | setup | first verdict | all files | storm wall s | CPU s | sources |")
    L.append("|---|---|---|---|---|---|---|")
    for r in rv.ordered:
        cs = r["clone_storm"]
        t = cs["time_to_protect"]
        L.append(
            f"| {nrep(r, repeats)} | {r['setup']} | {pq(t['first_verdict_s'])} / {num(t['first_verdict_s']['max'])} "
            f"| {pq(t['all_files_s'])} / {num(t['all_files_s']['max'])} | {cs['storm_wall_s']:.1f} | {cs['cpu_s']:.2f} "
            f"| {', '.join(f'{k} {v}' for k, v in sorted(cs['verdict_sources'].items()))} |"
        )
    L.append("")
    return L


def _fits(rv: ReportView) -> list[str]:
    """The fitted a + b·N of every setup and metric."""
    fits = rv.fits
    L: list[str] = []
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
    return L


def _caveats(rv: ReportView) -> list[str]:
    """How this was measured, and what the numbers cannot say."""
    return ["## How this was measured, and caveats\n", CAVEATS]


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
