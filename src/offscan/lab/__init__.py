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

The package, one module per concern: :mod:`.config` (BenchConfig, defaults), :mod:`.image`
and :mod:`.signatures` (what is scanned, with what), :mod:`.measure` (``/proc``),
:mod:`.procs` (child processes), :mod:`.eventlogs` and :mod:`.status` (what the scanners
say), :mod:`.worker` (the storms' shim process), :mod:`.setups` (agent vs agentless),
:mod:`.workloads` and :mod:`.clone_storm` (the runs), :mod:`.analysis` (pure arithmetic),
:mod:`.plots`, :mod:`.report` and :mod:`.storm_report` (the outputs), :mod:`.runner` (the entry
points). Its command line is ``offscan.cli.bench``.
"""

from __future__ import annotations

from .analysis import (
    PHASE_NAMES,
    StormRecord,
    analyze,
    budget_for,
    consolidation,
    fit_capacity,
    fit_line,
    fits_for,
    primary_metrics,
    storm_summary,
    summarize,
)
from .clone_storm import measure_clone_storm
from .config import (
    BENCHES,
    DEFAULT_AGENT_BATCH,
    DEFAULT_BUDGET_CPU,
    DEFAULT_BUDGET_MEM,
    DEFAULT_BUDGET_WINDOW,
    DEFAULT_CLONE_BATCH,
    DEFAULT_CLONE_PARALLEL,
    DEFAULT_FILES,
    DEFAULT_PHASE_TIMEOUT,
    DEFAULT_SHARED,
    DEFAULT_SIGS,
    DEFAULT_STEADY_RATE,
    DEFAULT_STEADY_SECONDS,
    UPDATE_ATTEMPTS,
    WORKLOADS,
    BenchConfig,
    LabError,
)
from .eventlogs import (
    POLL_INTERVAL,
    EventTail,
    VerdictTracker,
    WriteTracker,
    follow,
    protection_times,
)
from .image import (
    EICAR,
    EICAR_PATH,
    KINDS,
    TOOL_MARKER,
    TOOL_PATH,
    ContentMaker,
    ImageFile,
    LabVM,
    build_master,
    build_vm,
    plan_image,
)
from .measure import (
    CLK_TCK,
    INOTIFY_MARGIN,
    PAGE,
    PSS_INTERVAL,
    SAMPLE_INTERVAL,
    InotifyBudget,
    Mark,
    ProcMeter,
    ProcStats,
    host_cpu,
    host_info,
    inotify_in_use,
    mem_total,
    phase_costs,
    read_proc,
    read_pss,
)
from .plots import (
    COLORS,
    plot_consolidation,
    plot_cost_per_vm,
    plot_protection,
    plot_storm,
    plot_update,
    write_bench_plots,
    write_storm_plots,
)
from .procs import START_TIMEOUT, STOP_TIMEOUT, ProcSet, wait_ready, wait_ready_async
from .progress import Progress
from .report import CAVEATS, render_report
from .runner import run_agent_vs_agentless, run_bench, run_clone_storm
from .setups import Lab, Setup, build_vms
from .signatures import V2_SIGNATURE, build_signatures, write_database
from .status import (
    COUNTERS,
    appliance_control,
    appliance_status,
    diff_counters,
    gather_limited,
    registration_times,
    sum_counters,
)
from .storm_report import render_storm_report, storm_limits
from .worker import ShimWorker, run_shim_worker
from .workloads import agentless_storm, run_point, steady_phase, storm_phase, update_phase

__all__ = [
    "BENCHES",
    "CAVEATS",
    "CLK_TCK",
    "COLORS",
    "COUNTERS",
    "DEFAULT_AGENT_BATCH",
    "DEFAULT_BUDGET_CPU",
    "DEFAULT_BUDGET_MEM",
    "DEFAULT_BUDGET_WINDOW",
    "DEFAULT_CLONE_BATCH",
    "DEFAULT_CLONE_PARALLEL",
    "DEFAULT_FILES",
    "DEFAULT_PHASE_TIMEOUT",
    "DEFAULT_SHARED",
    "DEFAULT_SIGS",
    "DEFAULT_STEADY_RATE",
    "DEFAULT_STEADY_SECONDS",
    "EICAR",
    "EICAR_PATH",
    "INOTIFY_MARGIN",
    "KINDS",
    "PAGE",
    "PHASE_NAMES",
    "POLL_INTERVAL",
    "PSS_INTERVAL",
    "SAMPLE_INTERVAL",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "TOOL_MARKER",
    "TOOL_PATH",
    "UPDATE_ATTEMPTS",
    "V2_SIGNATURE",
    "WORKLOADS",
    "BenchConfig",
    "ContentMaker",
    "EventTail",
    "ImageFile",
    "InotifyBudget",
    "Lab",
    "LabError",
    "LabVM",
    "Mark",
    "ProcMeter",
    "ProcSet",
    "ProcStats",
    "Progress",
    "Setup",
    "ShimWorker",
    "StormRecord",
    "VerdictTracker",
    "WriteTracker",
    "agentless_storm",
    "analyze",
    "appliance_control",
    "appliance_status",
    "budget_for",
    "build_master",
    "build_signatures",
    "build_vm",
    "build_vms",
    "measure_clone_storm",
    "consolidation",
    "diff_counters",
    "fit_capacity",
    "fit_line",
    "fits_for",
    "follow",
    "gather_limited",
    "host_cpu",
    "host_info",
    "inotify_in_use",
    "mem_total",
    "phase_costs",
    "plan_image",
    "plot_consolidation",
    "plot_cost_per_vm",
    "plot_protection",
    "plot_storm",
    "plot_update",
    "primary_metrics",
    "protection_times",
    "read_proc",
    "read_pss",
    "registration_times",
    "render_report",
    "render_storm_report",
    "run_agent_vs_agentless",
    "run_bench",
    "run_clone_storm",
    "run_point",
    "run_shim_worker",
    "steady_phase",
    "storm_limits",
    "storm_phase",
    "storm_summary",
    "sum_counters",
    "summarize",
    "update_phase",
    "wait_ready",
    "wait_ready_async",
    "write_bench_plots",
    "write_database",
    "write_storm_plots",
]
