"""How a request ends: the verdict record, the JSON event log, and the detection bookkeeping.

:class:`EventLog` appends one JSON line per verdict or refusal to ``STATE/events.jsonl`` (the only
file this module writes). :class:`Verdicts` finishes a request: it has the actions run on a
detection (:mod:`.actions`), then builds the verdict, counts it, logs the event and keeps the
recent detections for ``status``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .._fsutil import write_all
from ..cache import CachedVerdict
from ..engine import ScanResult
from .common import SYSTEM_CLOCK, Clock, RequestFailed, log
from .inventory import VMRecord
from .status import Counters

if TYPE_CHECKING:
    from ..confine import ConfinementError
    from ..metrics import Histogram
    from ..protocol.messages import (
        ApplianceVerdictSource,
        Detection,
        VerdictAction,
        VerdictRecord,
    )
    from .actions import ActionNotes, Actions

RECENT_DETECTIONS = 50
MAX_PENDING_BYTES = 1 << 20  # event-log bytes gathered before a group commit is forced

_encode = json.JSONEncoder(separators=(",", ":")).encode  # what json.dumps(..) would make

Judged = ScanResult | CachedVerdict  # what a verdict is built from: a scan now, or the cache


class EventLog:
    """One JSON line per verdict (and per refused request), group-committed to the OS.

    Lines are gathered and written with one ``write(2)`` per group: when whoever is about to
    send verdicts calls :meth:`flush` (a session does, before every reply frame), at the end
    of the event loop's current iteration otherwise, or once :data:`MAX_PENDING_BYTES` are
    waiting. A verdict counts as *logged* once its line reached the OS; replies are sent only
    after their lines were flushed, so every verdict a shim received is logged (it survives
    the appliance being killed). Not fsynced, by design: syncing would cost a disk flush per
    group, and the verdict cache, not this log, is what a restart relies on."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd = (
            os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            if path
            else None
        )
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._scheduled = False
        self.writes = 0  # write(2) calls made (group commits)
        self.lines = 0  # lines written

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def write(self, event: dict[str, Any]) -> None:
        if self._fd is not None:
            self.write_line(_encode(event) + "\n")

    def write_line(self, line: str) -> None:
        """Queue one pre-encoded line (ending in a newline) for the next group commit."""
        if self._fd is None:
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= MAX_PENDING_BYTES:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:  # no event loop (a tool using the parts directly): now
                self.flush()

    def write_lines(self, lines: list[str]) -> None:
        """Queue many pre-encoded lines at once (a batch's verdicts: one write with the next
        flush)."""
        if self._fd is None or not lines:
            return
        self._pending.extend(lines)
        self._pending_bytes += sum(map(len, lines))
        if self._pending_bytes >= MAX_PENDING_BYTES:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:  # no event loop: now
                self.flush()

    def flush(self) -> None:
        """Write every queued line to the OS (one write). Cheap when nothing is queued."""
        self._scheduled = False
        if not self._pending or self._fd is None:
            return
        lines, self._pending = self._pending, []
        self._pending_bytes = 0
        write_all(self._fd, "".join(lines).encode())
        self.writes += 1
        self.lines += len(lines)

    def close(self) -> None:
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None


class Verdicts:
    """Finishes requests: actions on a detection, then the verdict record and its event."""

    def __init__(
        self, events: EventLog, counters: Counters, actions: Actions, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.events = events
        self.counters = counters
        self.actions = actions
        self.clock = clock
        self.latency: Histogram | None = None  # set when metrics are on
        self.detections: list[Detection] = []

    async def finish(
        self,
        vm: VMRecord,
        path: str,
        res: Judged,
        source: ApplianceVerdictSource,
        digest: bytes | None,
        t0: float,
        *,
        version: str,
        ino: int | None = None,
    ) -> VerdictRecord:
        """Record the verdict; on a detection run the VM's actions and tag it. ``version`` is
        that of the engine the request ran on; a cached verdict carries its own."""
        extra: ActionNotes = {}
        action: VerdictAction = "allow"
        if res.status == "infected":
            action, extra = await self.actions.act(vm, path, res.matches, ino, digest=digest)
        # the version that judged it: a cached verdict's own, else the engine the scan ran on
        judged_by = getattr(res, "pattern_version", None) or version
        return self.record(vm, path, res, source, digest, t0, action, extra, judged_by)

    def record(
        self,
        vm: VMRecord,
        path: str,
        res: Judged,
        source: ApplianceVerdictSource,
        digest: bytes | None,
        t0: float,
        action: VerdictAction,
        extra: ActionNotes,
        version: str,
    ) -> VerdictRecord:
        """The verdict sent to the shim; also counted, timed and written to the event log."""
        verdict: VerdictRecord = {
            "vm": vm.name,
            "path": path,
            "status": res.status,
            "matches": list(res.matches),
            "reason": getattr(res, "reason", None),
            "action": action,
            "source": source,
            "digest": digest.hex() if digest else None,
            "pattern_version": version,
            **extra,
        }
        self.counters.verdicts += 1
        if res.status == "error":
            self.counters.errors += 1
        now = self.clock.time()
        latency = self.clock.monotonic() - t0
        if self.latency is not None:
            self.latency.observe(latency)
        event: dict[str, Any] = {
            "time": now,
            "event": "verdict",
            **verdict,
            "latency_ms": round(latency * 1000, 3),
        }
        self.events.write(event)
        if res.status == "infected":
            self._detected(vm, path, res.matches, action, extra, now)
        return verdict

    def _detected(
        self,
        vm: VMRecord,
        path: str,
        matches: tuple[str, ...],
        action: VerdictAction,
        extra: ActionNotes,
        now: float,
    ) -> None:
        self.counters.detections += 1
        det: Detection = {
            "time": now,
            "vm": vm.name,
            "path": path,
            "matches": list(matches),
            "action": action,
            **extra,
        }
        self.detections.append(det)
        del self.detections[:-RECENT_DETECTIONS]
        log.warning("DETECTION: VM %s: %s: %s (%s)", vm.name, path, ", ".join(matches), action)

    def refused(self, vm: VMRecord, shim: str, path: str, exc: ConfinementError) -> NoReturn:
        """A request that tried to leave its VM's root: counted, logged, and answered with
        RequestFailed("confined")."""
        self.counters.refused += 1
        log.warning("refused: VM %s (shim %s): %s", vm.name, shim, exc)
        self.events.write(
            {
                "time": self.clock.time(),
                "event": "refused",
                "vm": vm.name,
                "path": path,
                "reason": str(exc),
            }
        )
        raise RequestFailed("confined", str(exc)) from None
