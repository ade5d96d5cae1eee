"""The lab's parameters: :class:`BenchConfig`, its defaults, the workloads and :class:`LabError`.

Pure data, no I/O. Every other module of the lab may import it; it imports nothing of the lab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WORKLOADS = ("boot-storm", "steady", "clone-storm", "update")
BENCHES = ("agent-vs-agentless", "clone-storm", "fleet")  # the ``offscan bench`` subcommands
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
UPDATE_ATTEMPTS = 5  # reloads per scanning point before the lab gives up on it


class LabError(Exception):
    """A lab run that cannot go on; the message says what to change."""


@dataclass
class BenchConfig:
    """Parameters of ``offscan bench agent-vs-agentless`` (and of ``clone-storm``)."""

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
    hosts: int = 3  # fleet: appliances (one per simulated host), --vms clone VMs each
    command: str = ""
