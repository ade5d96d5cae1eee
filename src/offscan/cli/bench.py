"""``offscan bench``: the lab: agent vs agentless, clone storm.

Every argument of ``offscan bench agent-vs-agentless`` and ``offscan bench clone-storm`` is
defined here and turned into a :class:`~offscan.lab.BenchConfig`; the lab itself
(``offscan.lab``) takes that and never sees argparse.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..lab import BenchConfig

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(sub: Subparsers) -> None:
    p = sub.add_parser("bench", help="the lab: agent vs agentless, clone storm, fleet")
    add_bench_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``offscan bench ...``; 0 when every phase completed, 1 if one did not, 2 on errors."""
    from ..lab import run_bench

    work = getattr(args, "work", None)
    if work and not os.path.isdir(work):  # before minutes of building the master image
        print(f"offscan bench: --work {work}: no such directory", file=sys.stderr)
        return 2
    return run_bench(args.bench_command, config_from_args(args))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The :class:`BenchConfig` of parsed ``offscan bench`` arguments, with its command line."""
    from ..lab import BenchConfig

    fields_ = BenchConfig.__dataclass_fields__
    cfg = BenchConfig(
        **{k: v for k, v in vars(args).items() if k in fields_ and v is not None and k != "command"}
    )
    cfg.command = _command_line(args)
    return cfg


def _points(text: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated VM counts, got {text!r}"
        ) from None


def _share(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError("expected a share between 0 and 1")
    return v


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Define ``offscan bench agent-vs-agentless`` and ``offscan bench clone-storm``."""
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    _add_agent_vs_agentless(sub)
    _add_clone_storm(sub)
    _add_fleet(sub)


def _common_arguments(p: argparse.ArgumentParser, default_out: str) -> None:
    """The options both benches take: image, signatures, output, seed, timeout, work dir."""
    from ..lab.config import DEFAULT_FILES, DEFAULT_PHASE_TIMEOUT, DEFAULT_SIGS

    p.add_argument(
        "--files",
        type=int,
        default=DEFAULT_FILES,
        help=f"files per VM (default {DEFAULT_FILES})",
    )
    p.add_argument(
        "--sigs",
        type=int,
        default=DEFAULT_SIGS,
        help=f"generated .ndb signatures, plus EICAR (default {DEFAULT_SIGS})",
    )
    p.add_argument(
        "-o",
        "--output",
        dest="out",
        default=default_out,
        metavar="DIR",
        help=f"where report.md, results.json and the plots go (default ./{default_out})",
    )
    p.add_argument(
        "--seed", type=int, default=1, help="seed of the image and signatures (default 1)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_PHASE_TIMEOUT,
        metavar="SECONDS",
        help="longest a phase may take before it is reported incomplete",
    )
    p.add_argument(
        "--work", metavar="DIR", help="where the VMs and scanner state go (default: a temp dir)"
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the work directory (VMs, logs, event logs)"
    )
    p.add_argument(
        "--raise-inotify-limit",
        action="store_true",
        help="as root, raise fs.inotify.max_user_instances for the run if it is too low "
        "(the shim needs one instance per VM); restored afterwards",
    )


def _add_agent_vs_agentless(sub: Subparsers) -> None:
    from ..lab.config import (
        DEFAULT_AGENT_BATCH,
        DEFAULT_CLONE_BATCH,
        DEFAULT_SHARED,
        WORKLOADS,
    )

    p = sub.add_parser(
        "agent-vs-agentless",
        help="one appliance + one shim vs one agent per VM, measured",
        description="Build N VMs from a master image and measure the agentless setup against "
        "an agent per VM on the same workload; writes a report with plots.",
    )
    p.add_argument("--vms", type=int, default=10, help="VMs (default 10; --points overrides)")
    p.add_argument(
        "--points",
        type=_points,
        metavar="N,N,...",
        help="run for each VM count (e.g. 1,10,25,50,100)",
    )
    p.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="boot-storm",
        help="boot-storm (every file scanned at activation), steady (writes at --rate), "
        "clone-storm (N clones of a protected master), update (a pattern update lands)",
    )
    p.add_argument(
        "--shared",
        type=_share,
        default=DEFAULT_SHARED,
        help=f"share of files identical across VMs (default {DEFAULT_SHARED})",
    )
    p.add_argument(
        "--agent-batch",
        type=int,
        default=DEFAULT_AGENT_BATCH,
        help=f"agents started together (default {DEFAULT_AGENT_BATCH})",
    )
    p.add_argument(
        "--clone-batch",
        type=int,
        default=DEFAULT_CLONE_BATCH,
        help=f"clones per vm-clone request (default {DEFAULT_CLONE_BATCH})",
    )
    _workload_arguments(p)
    _common_arguments(p, "offscan-lab")


def _workload_arguments(p: argparse.ArgumentParser) -> None:
    """agent-vs-agentless: the steady workload's shape, the budget, the repetitions."""
    from ..lab.config import (
        DEFAULT_BUDGET_CPU,
        DEFAULT_BUDGET_MEM,
        DEFAULT_BUDGET_WINDOW,
        DEFAULT_STEADY_RATE,
        DEFAULT_STEADY_SECONDS,
    )

    p.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_STEADY_SECONDS,
        metavar="SECONDS",
        help=f"steady workload: length of the writes (default {DEFAULT_STEADY_SECONDS:.0f})",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_STEADY_RATE,
        help=f"steady workload: files written per VM per second (default {DEFAULT_STEADY_RATE})",
    )
    p.add_argument(
        "--budget-cpu",
        type=_share,
        default=DEFAULT_BUDGET_CPU,
        help=f"share of the host's CPU security may use (default {DEFAULT_BUDGET_CPU})",
    )
    p.add_argument(
        "--budget-window",
        type=float,
        default=DEFAULT_BUDGET_WINDOW,
        metavar="SECONDS",
        help=f"over this long (default {DEFAULT_BUDGET_WINDOW:.0f}; steady: the phase's length)",
    )
    p.add_argument(
        "--budget-mem",
        type=_share,
        default=DEFAULT_BUDGET_MEM,
        help=f"share of the host's RAM security may hold (default {DEFAULT_BUDGET_MEM})",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run every (setup, N) this many times, interleaved, to show the host's run-to-run spread",
    )


def _add_clone_storm(sub: Subparsers) -> None:
    from ..lab.config import DEFAULT_CLONE_BATCH, DEFAULT_CLONE_PARALLEL

    q = sub.add_parser(
        "clone-storm",
        help="hundreds of clones while the appliance serves: time-to-protect",
        description="Protect a master, then clone it many times through the appliance as fast "
        "as the machine allows; report time-to-protect per clone and what limits it.",
    )
    q.add_argument("--clones", type=int, default=500, help="clones to create (default 500)")
    q.add_argument(
        "--batch",
        dest="clone_batch",
        type=int,
        default=DEFAULT_CLONE_BATCH,
        help=f"clones per vm-clone request (default {DEFAULT_CLONE_BATCH}: a clone is registered when "
        "its copy is done, but reaches the shim with its whole batch)",
    )
    q.add_argument(
        "--parallel",
        type=int,
        default=DEFAULT_CLONE_PARALLEL,
        help=f"vm-clone requests in flight (default {DEFAULT_CLONE_PARALLEL}; 2 copies on both cores)",
    )
    _common_arguments(q, "offscan-clone-storm")


def _add_fleet(sub: Subparsers) -> None:
    f = sub.add_parser(
        "fleet",
        help="several appliances + one Redis: shared verdict tier and shim failover",
        description="Several appliances (one per simulated host) protect N clone VMs each "
        "from one master: isolated, with the verdict tier shared through Redis, and a "
        "failover run (an appliance killed mid-storm). Needs redis-server.",
    )
    f.add_argument("--hosts", type=int, default=3, help="appliances (default 3)")
    f.add_argument("--vms", type=int, default=5, help="clone VMs per host (default 5)")
    _common_arguments(f, "offscan-fleet")


def _command_line(args: argparse.Namespace) -> str:
    """The bench command as the user would type it (options that differ from the defaults)."""
    from ..lab import BenchConfig

    defaults = BenchConfig()
    words = ["offscan", "bench", args.bench_command]
    for key, value in vars(args).items():
        if (
            key not in BenchConfig.__dataclass_fields__
            or value is None
            or key in ("out", "command")
        ):
            continue
        if value == getattr(defaults, key) or value is False:
            continue
        flag = (
            "--batch"
            if key == "clone_batch" and args.bench_command == "clone-storm"
            else f"--{key.replace('_', '-')}"
        )
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, ",".join(str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)
