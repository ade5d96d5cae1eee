"""The clone-storm report: ``report.md`` as text, and what limits time-to-protect, in words.

:func:`render_storm_report` is a composition of one function per section, each taking the
results dict (never modified) and returning its lines; :func:`storm_limits` is one paragraph
per limit. Pure: the caller writes the file and the plots.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .fmt import mib, num


def storm_limits(s: Mapping[str, Any]) -> list[str]:
    """What limits time-to-protect in a storm, in words, from the measured shares."""
    parts = (_first_verdict_limit, _creation_limit, _serving_limit, _tail_limit, _capacity_limit)
    return [line for part in parts for line in part(s)]


def render_storm_report(results: Mapping[str, Any]) -> str:
    """``report.md`` of a clone-storm results dict (as saved in results.json)."""
    sections = (
        _storm_header,
        _storm_noise,
        _storm_protection,
        _storm_limits,
        _storm_costs,
        _storm_caveats,
    )
    return "\n".join(line for section in sections for line in section(results)) + "\n"


def _first_verdict_limit(s: Mapping[str, Any]) -> list[str]:
    """The part of the first verdict's wait that dominates."""
    out: list[str] = []
    b = s["breakdown"]
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
    return out


def _creation_limit(s: Mapping[str, Any]) -> list[str]:
    """How fast clones were made, and what bounds the copying."""
    out: list[str] = []
    cl = s["cloning"]
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
    return out


def _serving_limit(s: Mapping[str, Any]) -> list[str]:
    """How fast the appliance served verdicts, and at what CPU cost."""
    out: list[str] = []
    th = s["throughput"]
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
    return out


def _tail_limit(s: Mapping[str, Any]) -> list[str]:
    """The largest backlog of clone files and the slowest second."""
    out: list[str] = []
    th = s["throughput"]
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
    return out


def _capacity_limit(s: Mapping[str, Any]) -> list[str]:
    """What each part could sustain alone, and whether the scanners kept up."""
    out: list[str] = []
    cap = s["throughput"]["capacity_clones_per_s"]
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


def _storm_header(results: Mapping[str, Any]) -> list[str]:
    """Title, the host, the command line and what the storm did."""
    meta, cfg, s = results["meta"], results["config"], results["storm"]
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
    return L


def _storm_noise(results: Mapping[str, Any]) -> list[str]:
    """How busy the rest of the host was; whether the storm completed."""
    meta, cfg, s = results["meta"], results["config"], results["storm"]
    L: list[str] = []
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
    return L


def _storm_protection(results: Mapping[str, Any]) -> list[str]:
    """Time-to-protect per clone and whether the goal was met."""
    cfg, s = results["config"], results["storm"]
    t = s["time_to_protect"]
    goal = (
        t["first_verdict_s"]["p99"] is not None
        and t["first_verdict_s"]["p99"] < 1.0
        and not t["vms_without_verdict"]
    )
    L: list[str] = []
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
        L.append(f"| {label} | {num(d['p50'], 3)} | {num(d['p99'], 3)} | {num(d['max'], 3)} |")
    L.append("")
    if t["vms_without_verdict"] or t["vms_not_fully_verdicted"]:
        L.append(
            f"**{t['vms_without_verdict']} clone(s) never got a verdict and {t['vms_not_fully_verdicted']} "
            f"were not fully verdicted within {cfg['timeout']:.0f} s; they are not in the percentiles above.**\n"
        )
    L.append(
        f"Goal p99 < 1 s to first verdict: **{'met' if goal else 'not met'}** "
        f"(p99 {num(t['first_verdict_s']['p99'], 3)} s"
        + (
            ", and every clone protected)."
            if not t["vms_without_verdict"]
            else ", but not every clone was protected)."
        )
        + "\n"
    )
    L.append("![time to protect](time_to_protect.png)\n")
    return L


def _storm_limits(results: Mapping[str, Any]) -> list[str]:
    """What limits it, in words, and the per-clone breakdown."""
    s = results["storm"]
    L: list[str] = []
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
        L.append(f"| {label} | {num(d['p50'], 3)} | {num(d['p99'], 3)} | {num(d['max'], 3)} |")
    L.append("")
    L.append("![demand, throughput, copy and activation times](limits.png)\n")
    return L


def _storm_costs(results: Mapping[str, Any]) -> list[str]:
    """Every process's cost during the storm and the appliance's counters."""
    s = results["storm"]
    c = s["counters"]
    L: list[str] = []
    L.append("## Costs during the storm\n")
    per = s["per_process"]
    L.append("| process | CPU s | VmHWM MiB | Pss MiB | rchar MiB |")
    L.append("|---|---|---|---|---|")
    for label, p in per.items():
        L.append(
            f"| {label} | {p['cpu_s']:.2f} | {mib(p['hwm'])} | {mib(p['pss'])} | {mib(p['rchar'])} |"
        )
    L.append("")
    L.append(
        f"Appliance counters over the storm: {c['verdicts']} verdicts, {c['contents_matched']} contents matched, "
        f"{c['served_clone']} served from the master's verdicts by clone identity, {c['served_identity']} by identity, "
        f"{c['served_digest']} by digest; {c['bytes_read'] / 2**20:.1f} MiB of file content read; "
        f"{s['cloning']['bytes_copied'] / 2**20:.0f} MiB copied in-kernel for the clones. "
        f"Verdict latency inside the appliance p50 {num(s['verdict_latency_ms']['p50'])} ms, "
        f"p99 {num(s['verdict_latency_ms']['p99'])} ms.\n"
    )
    return L


def _storm_caveats(results: Mapping[str, Any]) -> list[str]:
    """What the storm's numbers cannot say."""
    L: list[str] = []
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
    return L
