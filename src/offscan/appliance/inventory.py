"""What the appliance knows about VMs and where their contents live.

:class:`VMRecord` is one registered VM, :class:`Inventory` the persisted set of them
(``STATE/inventory.json``, the only file this module writes, atomically and durably) and
:class:`LocationIndex` the in-memory map from a content digest to the files last seen holding
it. Registration rules (ownership, policies) are in :mod:`.registry`.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._fsutil import atomic_write
from ..cache import Identity
from .common import log


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

    def add(self, digest: bytes, vm: str, path: str, ident: Identity) -> None:
        locs = self._by_digest.get(digest)
        if locs is None:
            locs = self._by_digest[digest] = {}
        else:
            self._by_digest.move_to_end(digest)
        if (vm, path) not in locs:
            self._count += 1
        locs[(vm, path)] = ident
        while self._count > self.max_entries and self._by_digest:
            _, dropped = self._by_digest.popitem(last=False)
            self._count -= len(dropped)

    def get(self, digest: bytes) -> list[tuple[str, str, Identity]]:
        return [(vm, path, ident) for (vm, path), ident in self._by_digest.get(digest, {}).items()]

    def __len__(self) -> int:
        return self._count


class Inventory:
    """VMs known to the appliance, persisted (atomically) in the state directory."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.vms: dict[str, VMRecord] = {}
        if path and path.exists():
            try:
                for rec in json.loads(path.read_text())["vms"]:
                    self.vms[rec["name"]] = VMRecord(**rec)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("inventory %s unreadable (%s); starting empty", path, exc)

    def save(self) -> None:
        if not self.path:
            return
        data = json.dumps({"vms": [asdict(v) for v in self.vms.values()]}, indent=1)
        # fsync=True, deliberately: a registration lost to a power cut is a VM left unprotected
        # (its shim is refused as unknown) and an operator's tag or policy silently undone.
        # Saves happen on registrations and operator commands, not per scan, so the cost of a
        # sync is paid rarely.
        atomic_write(self.path, data, fsync=True)
