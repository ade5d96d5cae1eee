"""What the appliance does about a detection: deny, quarantine, tag the VM, run the isolation
hook.

:class:`Actions` runs a VM's policy ``actions`` in order (the first that succeeds wins), moves
files into the quarantine vault (through :class:`~offscan.quarantine.Vault`, on the scan pool),
tags the VM in the inventory (saved) and runs the operator's isolation hook as a subprocess.
It touches VM files only through the vault.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from .._fsutil import atomic_write
from .common import log
from .inventory import VMRecord
from .registry import Registry
from .status import Counters

if TYPE_CHECKING:
    from ..protocol.messages import VerdictAction
    from ..quarantine import QuarantineEntry, Vault

_THREATS = ("low", "medium", "high")


def threat_level(matches: Sequence[str]) -> str:
    """NSX-style threat level from signature names: test files low, PUA medium, else high."""
    names = " ".join(matches).lower()
    if any(k in names for k in ("eicar", "test")):
        return "low"
    if any(k in names for k in ("pua", "adware", "heuristics")):
        return "medium"
    return "high"


class ActionNotes(TypedDict, total=False):
    """What acting on a detection adds to its verdict and detection record (the protocol's
    optional ``Verdict``/``Detection`` fields of the same names)."""

    quarantine_id: str  # the file was moved into the vault
    action_errors: list[str]  # actions that failed before the one taken


def _threat_rank(tag: str) -> int:
    level = tag.partition("=")[2]
    return _THREATS.index(level) if level in _THREATS else len(_THREATS)


class Released:
    """(VM, content digest) pairs the operator restored from quarantine into that VM: their
    detections there are allowed, so a restore is not undone by the next scan of the file
    (or of the temporary file it is written through). Kept in ``STATE/released.json``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.pairs: set[tuple[str, str]] = set()
        if path is not None:
            with contextlib.suppress(OSError, ValueError, TypeError):
                self.pairs = {(str(v), str(d)) for v, d in json.loads(path.read_text())}

    def add(self, vm: str, digest: str) -> None:
        self.pairs.add((vm, digest))
        if self.path is not None:  # durable: the operator's decision must survive a restart
            atomic_write(self.path, json.dumps(sorted(self.pairs)), fsync=True, mode=0o600)

    def has(self, vm: str, digest: str) -> bool:
        return (vm, digest) in self.pairs


class Actions:
    """Policy actions, VM tags and the isolation hook."""

    def __init__(
        self,
        registry: Registry,
        counters: Counters,
        *,
        pool: Executor,
        vault: Vault | None = None,
        isolation_hook: str | None = None,
        hook_timeout: float = 10.0,
        released_file: Path | None = None,
    ) -> None:
        self.released = Released(released_file)
        self.registry = registry
        self.counters = counters
        self.pool = pool
        self.vault = vault
        self.isolation_hook = isolation_hook
        self.hook_timeout = hook_timeout

    async def act(
        self,
        vm: VMRecord,
        path: str,
        matches: Sequence[str],
        ino: int | None,
        *,
        digest: bytes | None = None,
    ) -> tuple[VerdictAction, ActionNotes]:
        """Actions in policy order, the first that succeeds wins; then tags and the hook.
        Content the operator restored from quarantine into this VM is allowed, untouched."""
        extra: ActionNotes = {}
        if digest is not None and self.released.has(vm.name, digest.hex()):
            log.info(
                "VM %s: %s matches %s but was restored by the operator", vm.name, path, matches
            )
            return "allow", extra
        action: VerdictAction = "deny"
        for act in self.registry.effective_policy(vm)["actions"]:
            if act == "pass":
                action = "allow"
                break
            if act == "deny":
                action = "deny"
                break
            if act == "quarantine":
                entry = await self._quarantine(vm, path, matches, ino, extra)
                if entry is None:
                    continue  # fall back to the next action
                extra["quarantine_id"] = entry.id
                action = "deny"
                break
        await self.tag(
            vm,
            ["virus_found", f"threat={threat_level(matches)}"],
            {"path": path, "matches": list(matches)},
        )
        return action, extra

    async def _quarantine(
        self, vm: VMRecord, path: str, matches: Sequence[str], ino: int | None, extra: ActionNotes
    ) -> QuarantineEntry | None:
        """Move the file into the vault; on failure note why in ``extra`` and return None."""
        vault = self.vault
        if vault is None:
            extra.setdefault("action_errors", []).append("quarantine: no vault (no --state)")
            return None
        try:
            entry = await asyncio.get_running_loop().run_in_executor(
                self.pool,
                lambda: vault.quarantine(
                    vm=vm.name, root=vm.root, path=path, signatures=list(matches), expect_ino=ino
                ),
            )
        except Exception as exc:  # the caller falls back to the next action
            self.counters.action_failures += 1
            log.warning("quarantine of VM %s: %s failed: %s", vm.name, path, exc)
            extra.setdefault("action_errors", []).append(f"quarantine: {exc}")
            return None
        self.counters.quarantined += 1
        return entry

    async def tag(
        self, vm: VMRecord, tags: Sequence[str], detection: dict[str, Any] | None
    ) -> None:
        new = [t for t in tags if t not in vm.tags]
        threat = [t for t in new if t.startswith("threat=")]
        if threat:  # keep the highest threat level only
            vm.tags = [
                t
                for t in vm.tags
                if not t.startswith("threat=") or _threat_rank(t) > _threat_rank(threat[0])
            ]
            if any(t.startswith("threat=") for t in vm.tags):
                new = [t for t in new if not t.startswith("threat=")]
        if not new:
            return
        vm.tags.extend(new)
        self.registry.inventory.save()
        log.warning("VM %s tagged %s", vm.name, ",".join(vm.tags))
        await self.run_hook(vm, detection)

    async def run_hook(self, vm: VMRecord, detection: dict[str, Any] | None) -> None:
        """The isolation hook: ``HOOK VM TAG...`` with JSON on stdin (NSX tag → security group)."""
        if not self.isolation_hook:
            return
        payload = json.dumps(
            {"vm": vm.name, "root": vm.root, "tags": vm.tags, "detection": detection}
        ).encode()
        cmd = [*shlex.split(self.isolation_hook), vm.name, *vm.tags]
        self.counters.hook_runs += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            log.error("isolation hook %s could not start: %s", cmd[0], exc)
            return
        try:
            out, _ = await asyncio.wait_for(proc.communicate(payload), self.hook_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("isolation hook for VM %s killed after %.0f s", vm.name, self.hook_timeout)
            return
        level = logging.INFO if proc.returncode == 0 else logging.ERROR
        log.log(
            level,
            "isolation hook for VM %s exited %s: %s",
            vm.name,
            proc.returncode,
            out.decode(errors="replace").strip()[:500],
        )
