"""How the lab's reports write numbers: MiB, seconds, medians with their range, p50 / p99.

Pure string formatting, shared by the agent-vs-agentless and the clone-storm reports.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any


def mib(x: float | None) -> str:
    """Bytes as MiB with one decimal ("-" for None)."""
    return "-" if x is None else f"{x / 2**20:.1f}"


def num(x: float | None, digits: int = 2) -> str:
    """A number with ``digits`` decimals ("-" for None)."""
    return "-" if x is None else f"{x:.{digits}f}"


def spread(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    """Median, and [min–max] when there are several values."""
    vs = [v * scale for v in values]
    med = f"{statistics.median(vs):.{digits}f}"
    return med if len(vs) < 2 else f"{med} [{min(vs):.{digits}f}–{max(vs):.{digits}f}]"


def nrep(run: Mapping[str, Any], repeats: int) -> str:
    """A run's N, and which repetition it is when there are several."""
    return str(run["n"]) if repeats < 2 else f"{run['n']} #{run.get('repeat', 0) + 1}"


def pq(d: Mapping[str, Any]) -> str:
    """A summary's "p50 / p99"."""
    return f"{num(d.get('p50'))} / {num(d.get('p99'))}"
