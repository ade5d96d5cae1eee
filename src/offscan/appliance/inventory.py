"""What the appliance knows about VMs and where their contents live.

:class:`VMRecord` is one registered VM, :class:`Inventory` the persisted set of them
(``STATE/inventory.json`` and its change log ``STATE/inventory.log``, the only files this
module writes, durably) and
:class:`LocationIndex` the in-memory map from a content digest to the files last seen holding
it. Registration rules (ownership, policies) are in :mod:`.registry`.
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._fsutil import atomic_write, write_all
from ..cache import Identity
from .common import log

COMPACT_RATIO = 4  # change-log lines per VM beyond which the snapshot is rewritten
COMPACT_MIN_LINES = 1024  # never compact a shorter log


@dataclass
class VMRecord:
    name: str
    root: str
    owner: str | None  # shim that registered it (only it may scan there); None: unclaimed
    policy: dict[str, Any] = field(default_factory=dict)
    clone_of: str | None = None
    tags: list[str] = field(default_factory=list)
    registered_at: float = field(default_factory=time.time)


class LocationIndex:
    """Where each content was last seen: digest -> {(vm, path): identity}, bounded. Lets a
    pattern update revalidate a cached verdict by reading one copy, and report every copy."""

    def __init__(self, max_entries: int = 1_000_000) -> None:
        self.max_entries = max_entries
        self._by_digest: OrderedDict[bytes, dict[tuple[str, str], Identity]] = OrderedDict()
        self._count = 0
        self.generation = 0  # evictions: hot hits (hot.py) record a location only once

    def add(self, digest: bytes, vm: str, path: str, ident: Identity) -> None:
        self.add_many([(digest, (vm, path), ident)])

    def add_many(self, seen: list[tuple[bytes, tuple[str, str], Identity]]) -> None:
        """:meth:`add` for each ``(digest, (vm, path), identity)``, in order (the cache-hit
        path's batches): one call, the bound enforced once at the end."""
        by_digest = self._by_digest
        move = by_digest.move_to_end
        for digest, where, ident in seen:
            locs = by_digest.get(digest)
            if locs is None:
                locs = by_digest[digest] = {}
            else:
                move(digest)
            if where not in locs:
                self._count += 1
            locs[where] = ident
        while self._count > self.max_entries and by_digest:
            _, dropped = by_digest.popitem(last=False)
            self._count -= len(dropped)
            self.generation += 1

    def roomy(self, fraction: float) -> bool:
        """Whether at most ``fraction`` of :attr:`max_entries` locations are held."""
        return self._count <= fraction * self.max_entries

    def get(self, digest: bytes) -> list[tuple[str, str, Identity]]:
        return [(vm, path, ident) for (vm, path), ident in self._by_digest.get(digest, {}).items()]

    def __len__(self) -> int:
        return self._count


class Inventory:
    """VMs known to the appliance, persisted in the state directory as a snapshot
    (``inventory.json``, replaced atomically) plus an append-only change log
    (``inventory.log``, one JSON line per changed or removed VM, fsynced).

    A change costs one appended line, whatever the number of VMs: a storm of N clone
    registrations is O(N) in all, not O(N²) of whole-inventory rewrites. Once the log holds
    more than :data:`COMPACT_RATIO` lines per VM (and at least :data:`COMPACT_MIN_LINES`), the
    snapshot is rewritten and the log emptied. Loading replays the log over the snapshot (the
    last line about a VM wins: replay is idempotent, so a crash between the two steps of a
    compaction loses nothing); a torn last line (a crash mid-append) is dropped.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.log_path = path.with_name(path.name.removesuffix(".json") + ".log") if path else None
        self.vms: dict[str, VMRecord] = {}
        self._saved: dict[str, dict[str, Any]] = {}  # what the snapshot + log say, per VM
        self._log_fd = -1
        self._log_lines = 0
        self.compactions = 0
        if path is None:
            return
        if path.exists():
            try:
                for rec in json.loads(path.read_text())["vms"]:
                    self.vms[rec["name"]] = VMRecord(**rec)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("inventory %s unreadable (%s); starting empty", path, exc)
        self._replay()
        self._saved = {name: asdict(v) for name, v in self.vms.items()}

    def _replay(self) -> None:
        assert self.log_path is not None
        if not self.log_path.exists():
            return
        lines = self.log_path.read_bytes().split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                change = json.loads(line)
                if change["op"] == "put":
                    rec = VMRecord(**change["vm"])
                    self.vms[rec.name] = rec
                else:
                    self.vms.pop(change["name"], None)
                self._log_lines += 1
            except (ValueError, KeyError, TypeError) as exc:
                where = "torn last line" if i >= len(lines) - 2 else f"line {i + 1}"
                log.warning("inventory log %s: %s dropped (%s)", self.log_path, where, exc)

    def save(self, *names: str) -> None:
        """Persist the VMs named (added, changed or removed), or, with no names, whatever
        changed since the last save (found by comparing every record: O(N) in memory, still
        one line per changed VM on disk). Durable when it returns."""
        if not self.path:
            return
        if not names:
            names = tuple(set(self.vms) | set(self._saved))
        lines = []
        for name in names:
            rec = self.vms.get(name)
            now = asdict(rec) if rec is not None else None
            if now == self._saved.get(name):
                continue
            if now is None:
                del self._saved[name]
                lines.append(json.dumps({"op": "del", "name": name}))
            else:
                self._saved[name] = now
                lines.append(json.dumps({"op": "put", "vm": now}))
        if lines:
            self._append(lines)

    def _append(self, lines: list[str]) -> None:
        assert self.log_path is not None
        if self._log_fd < 0:
            self._log_fd = os.open(
                self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        write_all(self._log_fd, ("\n".join(lines) + "\n").encode())
        # fsync, deliberately: a registration lost to a power cut is a VM left unprotected
        # (its shim is refused as unknown) and an operator's tag or policy silently undone.
        # One small append per change keeps that cheap, even in a clone storm.
        os.fsync(self._log_fd)
        self._log_lines += len(lines)
        if self._log_lines > max(COMPACT_RATIO * len(self.vms), COMPACT_MIN_LINES):
            self.compact()

    def compact(self) -> None:
        """Rewrite the snapshot with every VM and empty the log."""
        if not self.path or not self.log_path:
            return
        data = json.dumps({"vms": [asdict(v) for v in self.vms.values()]}, indent=1)
        atomic_write(self.path, data, fsync=True)  # durable before the log is emptied
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        atomic_write(self.log_path, b"", fsync=True, mode=0o600)
        self._saved = {name: asdict(v) for name, v in self.vms.items()}
        self._log_lines = 0
        self.compactions += 1

    def close(self) -> None:
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
