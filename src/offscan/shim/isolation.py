"""Fail-closed VMs: isolate them while the appliance is unreachable, release them after.

A VM whose effective policy says ``fail_mode = "closed"`` is tagged ``unprotected`` while the
shim cannot reach the appliance, and the operator's isolation hook runs (``CMD VM unprotected``
with a JSON description on stdin); once the appliance is back and the VM's backlog has been
scanned, the tag is dropped and the hook runs again (``CMD VM``). Fail-open VMs just keep
queueing. This module runs the hook command and reads the shim's state, nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
from collections.abc import Mapping

from .backlog import Backlog
from .connection import Connection
from .watch import _VM

log = logging.getLogger("offscan.shim")

KEEPER_INTERVAL = 0.1  # seconds between checks of the fail-closed VMs
DEFAULT_HOOK_TIMEOUT = 10.0  # seconds an isolation hook may run before it is killed


class FailClosed:
    """Keeps the fail-closed VMs of one shim isolated exactly while they are unprotected."""

    def __init__(
        self,
        *,
        shim_id: str,
        hook: str | None,
        hook_timeout: float = DEFAULT_HOOK_TIMEOUT,
        vms: Mapping[str, _VM],
        link: Connection,
        backlog: Backlog,
    ) -> None:
        self.shim_id = shim_id
        self.hook = hook
        self.hook_timeout = hook_timeout
        self._vms = vms
        self._link = link
        self._backlog = backlog
        self._isolated: set[str] = set()  # fail-closed VMs currently tagged "unprotected"

    def isolated(self) -> list[str]:
        """Fail-closed VMs currently isolated as unprotected."""
        return sorted(self._isolated)

    def _fail_mode(self, vm: _VM) -> str:
        policy = self._link.policies.get(vm.name) or vm.spec.policy or {}
        return str(policy.get("fail_mode", "open"))

    async def run(self) -> None:
        """Check every fail-closed VM every :data:`KEEPER_INTERVAL` seconds, until cancelled."""
        while True:
            await asyncio.sleep(KEEPER_INTERVAL)
            for vm in list(self._vms.values()):
                if self._fail_mode(vm) != "closed":
                    continue
                if not self._link.online and vm.name not in self._isolated:
                    self._isolated.add(vm.name)
                    log.error(
                        "VM %s is unprotected (appliance unreachable); isolating (fail closed)",
                        vm.name,
                    )
                    await self._run_hook(vm.name, ["unprotected"], "appliance unreachable")
                elif (
                    self._link.online
                    and vm.name in self._isolated
                    and self._backlog.count_vm(vm.name) == 0
                ):
                    self._isolated.discard(vm.name)
                    log.warning(
                        "VM %s protected again (backlog scanned); releasing isolation", vm.name
                    )
                    await self._run_hook(vm.name, [], "appliance back, backlog scanned")

    async def _run_hook(self, vm: str, tags: list[str], reason: str) -> None:
        if not self.hook:
            return
        payload = json.dumps(
            {"vm": vm, "tags": tags, "reason": reason, "shim": self.shim_id}
        ).encode()
        cmd = [*shlex.split(self.hook), vm, *tags]
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await asyncio.wait_for(proc.communicate(payload), self.hook_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("isolation hook for VM %s killed after %.0f s", vm, self.hook_timeout)
        except OSError as exc:
            log.error("isolation hook %s could not run: %s", cmd[0], exc)
