"""The rules of VM registration: who may register, scan and unregister a VM, and the policy
each VM runs under.

:class:`Registry` wraps the :class:`~.inventory.Inventory` (which it saves after every change)
and the policy file's layers; it reads the quarantine vault's location to refuse VM roots that
overlap it, and touches no other file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .. import policy as policies
from .common import RequestFailed, log
from .inventory import Inventory, VMRecord

if TYPE_CHECKING:
    from ..protocol.messages import PreventionStats, VMInfo
    from ..quarantine import Vault


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


PREVENTION_STALE = 10.0  # seconds a shim's prevention report is shown (it reports every 1 s)
_PREVENTION_COUNTS = (
    "held",
    "allowed",
    "denied",
    "timeouts",
    "unreachable",
    "memo_hits",
    "exempt",
)


def _prevention_stats(value: Any) -> PreventionStats | None:
    """A shim's PreventionStats, checked field by field (None if it is not one)."""
    if not isinstance(value, dict):
        return None
    counts: dict[str, int] = {}
    for key in _PREVENTION_COUNTS:
        n = value.get(key)
        if type(n) is not int or n < 0:
            return None
        counts[key] = n
    mode, reason, enabled = value.get("mode"), value.get("reason"), value.get("enabled")
    if not isinstance(enabled, bool) or mode not in ("mount", "directories", "watch"):
        return None
    if reason is not None and not isinstance(reason, str):
        return None
    stats: PreventionStats = {
        "enabled": enabled,
        "mode": str(mode),
        "reason": None if reason is None else reason[:300],
        "held": counts["held"],
        "allowed": counts["allowed"],
        "denied": counts["denied"],
        "timeouts": counts["timeouts"],
        "unreachable": counts["unreachable"],
        "memo_hits": counts["memo_hits"],
        "exempt": counts["exempt"],
    }
    return stats


class Registry:
    """Registered VMs, their owners and their effective policies."""

    def __init__(
        self,
        inventory: Inventory,
        *,
        default_policy: Mapping[str, Any] | None = None,
        vm_policies: Mapping[str, dict[str, Any]] | None = None,
        vault: Vault | None = None,
        vm_areas: Sequence[str] = (),
    ) -> None:
        self.inventory = inventory
        self.vm_areas = tuple(vm_areas)  # allowed prefixes of VM roots (empty: anywhere)
        self.default_policy: dict[str, Any] = dict(default_policy or {})
        self.vm_policies: dict[str, dict[str, Any]] = dict(vm_policies or {})
        self.vault = vault
        # On-access counters per VM as its shim last reported them, with when (monotonic):
        # not persisted, and shown only while fresh (a dead shim holds no opens any more).
        self.prevention: dict[str, tuple[float, PreventionStats]] = {}

    @property
    def vms(self) -> dict[str, VMRecord]:
        return self.inventory.vms

    def register(
        self, shim: str, vm: str, root: str, policy: dict[str, Any], clone_of: str | None
    ) -> dict[str, Any]:
        if not os.path.isabs(root):
            raise RequestFailed("malformed", f"VM root {root!r} must be an absolute path")
        old = self.vms.get(vm)
        if old and old.owner not in (None, shim):
            raise RequestFailed(
                "conflict", f"VM {vm!r} is registered by another shim ({old.owner})"
            )
        if clone_of is not None and clone_of not in self.vms:
            raise RequestFailed("unknown-vm", f"clone_of: no VM named {clone_of!r}")
        if clone_of == vm:
            raise RequestFailed("malformed", "a VM cannot be a clone of itself")
        try:
            policy = policies.validate(policy or (old.policy if old else {}))
        except policies.PolicyError as exc:
            raise RequestFailed("malformed", str(exc)) from None
        real = os.path.realpath(root)
        self.check_area(real)
        if self.vault and (self.vault.inside(real) or _is_within(str(self.vault.directory), real)):
            raise RequestFailed("malformed", "a VM root must not overlap the quarantine vault")
        rec = VMRecord(
            vm,
            real,
            shim,
            policy,
            clone_of or (old.clone_of if old else None),
            old.tags if old else [],
            old.registered_at if old else time.time(),
        )
        self.vms[vm] = rec
        self.inventory.save(vm)  # one appended line, however many VMs there are
        log.info(
            "VM %s registered by %s: root %s%s",
            vm,
            shim,
            rec.root,
            f", clone of {clone_of}" if clone_of else "",
        )
        return {"vm": vm, "root": rec.root, "policy": self.effective_policy(rec)}

    def check_area(self, real: str) -> None:
        """Refuse (``confined``) a resolved VM root outside every ``--vm-area``."""
        if self.vm_areas and not any(_is_within(real, a) and real != a for a in self.vm_areas):
            raise RequestFailed(
                "confined",
                f"VM root {real!r} is outside the areas this appliance allows "
                f"({', '.join(self.vm_areas)}; serve --vm-area DIR adds one)",
            )

    def unregister(self, shim: str, vm: str) -> dict[str, Any]:
        rec = self.owned(shim, vm)
        del self.vms[rec.name]
        self.inventory.save(rec.name)
        log.info("VM %s unregistered", vm)
        return {"vm": vm}

    def report(self, shim: str, vms: Mapping[str, Any]) -> dict[str, Any]:
        """Take a shim's ``report``: the prevention counters of the VMs it owns (others are
        ignored; only the known keys, of the right types, are kept)."""
        taken = 0
        for name, stats in vms.items():
            rec = self.vms.get(name) if isinstance(name, str) else None
            cleaned = _prevention_stats(stats)
            if rec is None or rec.owner != shim or cleaned is None:
                continue
            self.prevention[name] = (time.monotonic(), cleaned)
            taken += 1
        for name in [n for n in self.prevention if n not in self.vms]:
            del self.prevention[name]  # unregistered meanwhile
        return {"vms": taken}

    def owned(self, shim: str, vm: str) -> VMRecord:
        """The VM ``vm`` if ``shim`` registered it; RequestFailed("unknown-vm") otherwise."""
        rec = self.vms.get(vm)
        if rec is None:
            raise RequestFailed("unknown-vm", f"no VM named {vm!r}; register it first")
        if rec.owner != shim:
            raise RequestFailed("unknown-vm", f"VM {vm!r} belongs to another shim")
        return rec

    def named(self, name: str) -> VMRecord:
        """The VM ``name`` whoever owns it (operator commands)."""
        rec = self.vms.get(name)
        if rec is None:
            raise RequestFailed("unknown-vm", f"no VM named {name!r}")
        return rec

    def effective_policy(
        self, rec: VMRecord, _seen: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """Defaults < policy file [default] < base VM's effective policy < the VM's own."""
        base: dict[str, Any] = {}
        if rec.clone_of and rec.clone_of not in _seen and rec.clone_of in self.vms:
            base = self.effective_policy(self.vms[rec.clone_of], _seen | {rec.name})
        return policies.merge(self.default_policy, base, self.vm_policies.get(rec.name), rec.policy)

    def describe(self, rec: VMRecord, *, clones: bool = False) -> VMInfo:
        """A VM as status and ``vm-show`` report it: its record with the effective policy
        (and, with ``clones``, the names of the VMs cloned from it). Field by field, in the
        record's order, so that the type checker holds the record to the protocol's VMInfo."""
        out: VMInfo = {
            "name": rec.name,
            "root": rec.root,
            "owner": rec.owner,
            "policy": self.effective_policy(rec),
            "clone_of": rec.clone_of,
            "tags": list(rec.tags),  # a copy, as asdict made: later tags do not change it
            "registered_at": rec.registered_at,
        }
        if clones:
            out["clones"] = sorted(v.name for v in self.vms.values() if v.clone_of == rec.name)
        reported = self.prevention.get(rec.name)
        if reported is not None and time.monotonic() - reported[0] <= PREVENTION_STALE:
            out["prevention"] = reported[1]
        return out
