"""Following what the scanners log: their ``events.jsonl`` and the verdicts in it.

:class:`EventTail` reads the lines appended to an event log, :class:`VerdictTracker` follows the
verdicts of the files a phase expects, :class:`WriteTracker` those of a workload's writes, and
:func:`follow` drives the trackers until a phase is done. Reads the event logs only.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .analysis import summarize

if TYPE_CHECKING:
    from .procs import ProcSet

POLL_INTERVAL = 0.1  # seconds between reads of the event logs


class EventTail:
    """Reads the JSON lines appended to an ``events.jsonl`` since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._rest = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


class VerdictTracker:
    """Follows verdict events until every expected (VM, path) has one given after ``since``."""

    def __init__(self, expected: dict[str, Iterable[str]], since: float = 0.0) -> None:
        self.expected = {vm: set(paths) for vm, paths in expected.items()}
        self.since = since
        self.missing = sum(len(p) for p in self.expected.values())
        self.total = self.missing
        self.first: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.seen: dict[tuple[str, str], float] = {}
        # verdicts of paths not (yet) expected: a clone's inherited verdicts are logged while
        # the appliance registers it, so the log can show them before expect() is called
        self.early: dict[tuple[str, str], float] = {}
        self.statuses: dict[str, int] = {}
        self.sources: dict[str, int] = {}
        self.verdicts = 0
        self.infected: dict[tuple[str, str], list[str]] = {}
        self.latency_ms: list[float] = []
        self.last_time = 0.0

    def expect(self, vm: str, paths: Iterable[str]) -> None:
        want = self.expected.setdefault(vm, set())
        for p in paths:
            if p not in want and (vm, p) not in self.seen:
                want.add(p)
                self.total += 1
                t = self.early.pop((vm, p), None)
                if t is None:
                    self.missing += 1
                else:  # already verdicted: counted as seen at its own time
                    self.seen[(vm, p)] = t
                    self.first[vm] = min(self.first.get(vm, t), t)
        if want and vm not in self.done and all((vm, p) in self.seen for p in want):
            self.done[vm] = max(self.seen[(vm, p)] for p in want)

    def feed(self, events: Iterable[dict[str, Any]]) -> None:
        for e in events:
            if e.get("event") != "verdict" or e.get("time", 0) < self.since:
                continue
            vm, path, t = e["vm"], e["path"], e["time"]
            self.verdicts += 1
            self.last_time = max(self.last_time, t)
            self.statuses[e["status"]] = self.statuses.get(e["status"], 0) + 1
            self.sources[e["source"]] = self.sources.get(e["source"], 0) + 1
            if "latency_ms" in e:
                self.latency_ms.append(float(e["latency_ms"]))
            if e["status"] == "infected":
                self.infected[(vm, path)] = list(e.get("matches") or [])
            if vm in self.expected:
                self.first[vm] = min(self.first.get(vm, t), t)
            want = self.expected.get(vm)
            if want is None or path not in want:
                self.early.setdefault((vm, path), t)
            elif (vm, path) not in self.seen:
                self.seen[(vm, path)] = t
                self.missing -= 1
                if all((vm, p) in self.seen for p in want):
                    self.done[vm] = t

    @property
    def complete(self) -> bool:
        return self.missing == 0


async def follow(
    tails: Sequence[EventTail],
    tracker: VerdictTracker,
    *,
    timeout: float,
    procs: ProcSet | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    until: Callable[[], bool] | None = None,
) -> bool:
    """Feed the tracker until it is complete (or ``until()``); False on timeout."""
    deadline = time.monotonic() + timeout
    done = until or (lambda: tracker.complete)
    while True:
        for t in tails:
            tracker.feed(t.read())
        if on_progress is not None:
            on_progress(tracker.total - tracker.missing, tracker.total)
        if done():
            return True
        if time.monotonic() > deadline:
            return False
        if procs is not None:
            procs.check()
        await asyncio.sleep(POLL_INTERVAL)


class WriteTracker:
    """Writes done by a workload and the first verdict after each of them."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, str, float]] = []
        self.last_write: dict[tuple[str, str], float] = {}
        self.pending: set[tuple[str, str]] = set()
        self.verdicts: dict[tuple[str, str], list[float]] = {}
        self.statuses: dict[str, int] = {}
        self.sources: dict[str, int] = {}

    def wrote(self, vm: str, path: str) -> None:
        t = time.time()
        self.writes.append((vm, path, t))
        self.last_write[(vm, path)] = t
        self.pending.add((vm, path))

    def feed(self, events: Iterable[dict[str, Any]]) -> None:
        for e in events:
            if e.get("event") != "verdict":
                continue
            key = (e["vm"], e["path"])
            if key not in self.last_write:
                continue
            self.verdicts.setdefault(key, []).append(e["time"])
            self.statuses[e["status"]] = self.statuses.get(e["status"], 0) + 1
            self.sources[e["source"]] = self.sources.get(e["source"], 0) + 1
            if e["time"] >= self.last_write[key]:
                self.pending.discard(key)

    def latencies(self) -> list[float]:
        """Seconds from each write to the first verdict of that file given after it."""
        out = []
        for vm, path, t in self.writes:
            times = sorted(self.verdicts.get((vm, path), []))
            i = bisect.bisect_left(times, t)
            if i < len(times):
                out.append(times[i] - t)
        return out


def protection_times(
    tracker: VerdictTracker, start: dict[str, float], names: Iterable[str] | None = None
) -> dict[str, Any]:
    """Time to first verdict and to every file verdicted, per VM, from ``start[vm]``."""
    ttfv: list[float] = []
    ttp: list[float] = []
    never, partly = 0, 0
    for vm in names if names is not None else tracker.expected:
        if vm in tracker.first and vm in start:
            ttfv.append(tracker.first[vm] - start[vm])
        elif vm not in tracker.first:
            never += 1
        if vm in tracker.done and vm in start:
            ttp.append(tracker.done[vm] - start[vm])
        elif vm not in tracker.done:
            partly += 1
    # VMs that never got there are not in the percentiles: they are counted apart, and a
    # report must show them (an unprotected VM is worse than any latency)
    return {
        "first_verdict_s": summarize(ttfv),
        "all_files_s": summarize(ttp),
        "vms_without_verdict": never,
        "vms_not_fully_verdicted": partly,
    }
