"""The lab's plots: PNG files of costs, consolidation, time-to-protect, updates, clone storms.

Each ``plot_*`` function draws one figure from results (never modifying them) and writes it
with :func:`save_figure`; :func:`write_bench_plots` and :func:`write_storm_plots` make every plot
of a report in its output directory. Uses matplotlib's Agg canvas, no display.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fsutil import atomic_write
from .analysis import PHASE_NAMES, measured_runs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COLORS = {"agentless": "#1f77b4", "agent": "#d62728"}


def _figure(ncols: int, width: float = 5.0, height: float = 4.0) -> tuple[Figure, list[Axes]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG at ``path``, atomically (a reader never sees half a plot)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    # fsync: a plot is a final artifact of the run, written once the measuring is over.
    atomic_write(path, buf.getvalue(), fsync=True)


def write_bench_plots(
    results: Mapping[str, Any], analysis: Mapping[str, Any], out: Path
) -> list[str]:
    """Every plot of an agent-vs-agentless report, in ``out``; returns their file names."""
    runs = measured_runs(results)
    fits, cons = analysis["fits"], analysis["consolidation"]
    wl = results["config"]["workload"]
    phase_name = PHASE_NAMES[wl]
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
    return plots


def write_storm_plots(s: Mapping[str, Any], out: Path) -> None:
    """The plots of a clone-storm report, in ``out``."""
    plot_storm(s, out / "time_to_protect.png", out / "limits.png")


def plot_storm(s: Mapping[str, Any], path_ttp: Path, path_limits: Path) -> None:
    """Both plots of a clone storm: time-to-protect, and what limits it."""
    plot_storm_protection(s, path_ttp)
    plot_storm_limits(s, path_limits)


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
    save_figure(fig, path)


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
    save_figure(fig, path)


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
    save_figure(fig, path)


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
    save_figure(fig, path)


def plot_storm_protection(s: Mapping[str, Any], path: Path) -> None:
    """A clone storm's time-to-protect per clone (CDF) and clones protected over time."""
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
    save_figure(fig, path)


def plot_storm_limits(s: Mapping[str, Any], path: Path) -> None:
    """A clone storm's demand vs throughput, and copy vs activation time per clone."""
    import numpy as np

    pc = s["per_clone"]
    t0 = s["t_start"]
    fig, (ax1, ax2) = _figure(2)
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
    fig.tight_layout()
    save_figure(fig, path)
