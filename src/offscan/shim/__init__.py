"""The shim: the GI-like thin agent that protects every VM on a host without an agent in any VM.

One :class:`Shim` per host watches each VM root with its own watchdog (inotify) observer and
streams file events to the appliance over one persistent connection. The watchdog threads only
*record* a path in the :class:`Backlog` (a lock, a dict update); everything else (coalescing,
the activation walk, opening files, talking to the appliance) happens on the asyncio loop or in
the shim's own worker threads, so a writer in a VM is never held up by scanning.

Delivery is at-least-once: a path stays in the backlog until its verdict arrives. When the
appliance is away the backlog is kept (bounded, de-duplicated by ``(vm, path)``) and replayed
after reconnecting and re-registering the VMs.

This package only re-exports its modules' names (the public ones and the private ones tests
use): :mod:`.backlog`, :mod:`.spec`, :mod:`.watch`, :mod:`.walk`, :mod:`.connection`,
:mod:`.sender`, :mod:`.isolation`, :mod:`.shim` and the command-line runner :mod:`.cli`.
The argparse side (``add_shim_arguments``, ``run_shim_cli``) lives in :mod:`offscan.cli.shim`.
"""

# ruff: noqa: F401 - this module re-exports its submodules' names; __all__ lists the public API

from __future__ import annotations

from .backlog import (
    ACCESS,
    DEFAULT_MAX_BACKLOG,
    DEFAULT_QUIET,
    DEMAND,
    DROP_LOG_INTERVAL,
    FILE,
    TREE,
    WALK_WAIT_SLICE,
    Backlog,
    Key,
    Prio,
    _Entry,
    _FairQueue,
)
from .cli import (
    ShimConfig,
    run_shim,
)
from .connection import (
    CONNECT_TIMEOUT,
    DEFAULT_RECONNECT_MAX_DELAY,
    RECONNECT_MIN_DELAY,
    ClientFactory,
    Connection,
    ShimClient,
)
from .isolation import (
    DEFAULT_HOOK_TIMEOUT,
    FailClosed,
)
from .sender import (
    CONTENT_MODES,
    DEFAULT_MAX_IN_FLIGHT,
    MAX_REMOTE_RETRIES,
    Sender,
    VerdictCallback,
    _Skip,
)
from .shim import (
    ACTIVATION_HEAD,
    WALK_WORKERS,
    WATCH_CHECK_INTERVAL,
    Shim,
)
from .spec import (
    _VM_NAME,
    VMSpec,
    parse_clone_of,
)
from .walk import (
    walk_head,
    walk_tree,
)
from .watch import (
    _EVENT_FILTER,
    _OVERFLOW_LOGGER,
    _VM,
    Skips,
    _Handler,
    _overflow_watch,
    _OverflowWatch,
    _skip_reason,
    _stop_observer,
)

_clone_of = parse_clone_of  # its name before the split

__all__ = [
    "Backlog",
    "Shim",
    "ShimConfig",
    "VMSpec",
    "run_shim",
]
