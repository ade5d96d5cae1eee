"""Operator commands (``offscan vm|policy|quarantine|reload``) as a table, like clamd's.

:data:`HANDLERS` maps each ``control`` op to a handler; :func:`dispatch` looks it up and runs
it. Handlers change the inventory (saved), the policies, the quarantine vault (restore and
delete, on the scan pool) and, for ``vm-clone``, create clone directories under the operator's
``--into``; they answer with a :data:`Reply` or raise RequestFailed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .. import policy as policies
from ..clones import clone_tree
from ..signatures import SignatureError
from .common import RequestFailed, log
from .inventory import VMRecord

if TYPE_CHECKING:
    from ..quarantine import Vault
    from .facade import Appliance

T = TypeVar("T")


@dataclass(frozen=True)
class Command:
    """One operator command: its op and its arguments, checked as they are read."""

    op: str
    args: dict[str, Any]

    def arg(self, name: str, kind: type[T]) -> T:
        v = self.args.get(name)
        if not isinstance(v, kind):
            raise RequestFailed(
                "malformed", f"{self.op}: argument {name!r} must be a {kind.__name__}"
            )
        return v


# A command's own reply keys, spread into its ``ok`` frame. Read-only, so that a reply typed
# as the protocol has it (``vm-show``: a VMInfo) is one; the other ops' replies have no
# TypedDict in the protocol and are plain dicts.
Reply = Mapping[str, Any]
Handler = Callable[["Appliance", Command], Awaitable[Reply]]
VaultHandler = Callable[["Appliance", "Vault", Command], Awaitable[Reply]]

NO_VAULT = "no quarantine vault (start the appliance with --state)"


async def dispatch(app: Appliance, op: str, args: dict[str, Any]) -> Reply:
    """Run operator command ``op``; an unknown op is RequestFailed("unsupported")."""
    handler = HANDLERS.get(op)
    if handler is None:
        if op.startswith("quarantine-") and app.vault is None:
            raise RequestFailed("unsupported", NO_VAULT)
        raise RequestFailed("unsupported", f"unknown operator command {op!r}")
    return await handler(app, Command(op, args))


# -- patterns ---------------------------------------------------------------------------------


async def _reload(app: Appliance, cmd: Command) -> Reply:
    try:
        return await app.patterns.reload()
    except SignatureError as exc:
        raise RequestFailed(
            "refused", f"database not reloaded, old one keeps serving: {exc}"
        ) from None


# -- VMs --------------------------------------------------------------------------------------


async def _vm_list(app: Appliance, cmd: Command) -> Reply:
    return {"vms": [app.registry.describe(v, clones=True) for v in app.inventory.vms.values()]}


async def _vm_show(app: Appliance, cmd: Command) -> Reply:
    return app.registry.describe(app.registry.named(cmd.arg("name", str)), clones=True)


async def _vm_unregister(app: Appliance, cmd: Command) -> Reply:
    rec = app.registry.named(cmd.arg("name", str))
    del app.inventory.vms[rec.name]
    app.inventory.save()
    log.info("VM %s unregistered by the operator", rec.name)
    return {"vm": rec.name}


async def _vm_untag(app: Appliance, cmd: Command) -> Reply:
    rec = app.registry.named(cmd.arg("name", str))
    drop = cmd.args.get("tags") or list(rec.tags)
    rec.tags = [t for t in rec.tags if t not in drop]
    app.inventory.save()
    log.info("VM %s untagged %s; tags now %s", rec.name, drop, rec.tags)
    await app.actions.run_hook(rec, None)  # lets the policy engine release the VM
    return {"vm": rec.name, "tags": rec.tags}


async def _vm_clone(app: Appliance, cmd: Command) -> Reply:
    base = app.registry.named(cmd.arg("base", str))
    count, into = cmd.arg("count", int), cmd.arg("into", str)
    prefix = cmd.args.get("prefix") or f"{cmd.arg('base', str)}-clone"
    return await clone(app, base, count, into, prefix)


async def clone(
    app: Appliance, base: VMRecord, count: int, into: str, prefix: str
) -> dict[str, Any]:
    """Make ``count`` clones of ``base`` under ``into``; clones inherit its verdicts unread
    and are registered unclaimed (the first shim that registers a name watches it)."""
    if not 1 <= count <= 10_000:
        raise RequestFailed("malformed", "count must be between 1 and 10000")
    if not os.path.isabs(into):
        raise RequestFailed("malformed", "--into must be an absolute directory")
    app.registry.check_area(os.path.join(os.path.realpath(into), prefix))
    loop = asyncio.get_running_loop()
    clock, vms = app.clock, app.inventory.vms
    made, t0 = [], clock.monotonic()
    totals = {"files": 0, "inherited": 0, "bytes_copied": 0, "reflinked": 0}
    first = _next_clone_number(vms, prefix, into)  # numbering continues after earlier clones
    for i in range(first, first + count):
        name = _clone_name(prefix, i)
        if name in vms:
            raise RequestFailed("conflict", f"VM {name!r} already exists")
        dest = os.path.join(os.path.realpath(into), name)
        try:
            st = await loop.run_in_executor(
                None, clone_tree, base.root, dest, app.memo, app.inherited
            )
        except OSError as exc:
            raise RequestFailed("internal", f"cloning {base.name} into {dest}: {exc}") from None
        for k in totals:
            totals[k] += getattr(st, k)
        vms[name] = VMRecord(name, dest, None, {}, base.name)
        made.append({"name": name, "root": dest, "files": st.files, "inherited": st.inherited})
    app.inventory.save()
    await _offer_clones(app, base, made)
    secs = clock.monotonic() - t0
    log.info(
        "cloned %s x%d into %s in %.2f s (%d files, %d inherit verdicts)",
        base.name,
        count,
        into,
        secs,
        totals["files"],
        totals["inherited"],
    )
    return {"base": base.name, "clones": made, "seconds": round(secs, 3), **totals}


def _clone_name(prefix: str, i: int) -> str:
    return f"{prefix}{i:03d}" if not prefix.endswith("-") else f"{prefix}{i}"


def _next_clone_number(vms: Mapping[str, VMRecord], prefix: str, into: str) -> int:
    """1, or one past the highest number an existing clone (VM or directory) has."""
    taken = set(vms)
    with contextlib.suppress(OSError):
        taken |= set(os.listdir(into))
    n = 0
    for name in taken:
        rest = name[len(prefix) :] if name.startswith(prefix) else ""
        if rest.isdigit() and _clone_name(prefix, int(rest)) == name:
            n = max(n, int(rest))
    return n + 1


async def _offer_clones(app: Appliance, base: VMRecord, made: list[dict[str, Any]]) -> None:
    """Tell the connected shim that protects ``base`` about its new clones (``adopt``): it
    watches them at once, with no restart."""
    if base.owner is None:
        return
    for session in list(app.live_sessions):
        if session.shim == base.owner:
            for c in made:
                await session.push(
                    {"t": "adopt", "vm": c["name"], "root": c["root"], "clone_of": base.name}
                )


# -- policies ---------------------------------------------------------------------------------


async def _policy_set(app: Appliance, cmd: Command) -> Reply:
    rec = app.registry.named(cmd.arg("vm", str))
    try:
        settings = policies.validate(cmd.arg("settings", dict))
    except policies.PolicyError as exc:
        raise RequestFailed("malformed", str(exc)) from None
    rec.policy = {**rec.policy, **settings}
    app.inventory.save()
    log.info("policy of VM %s set: %s", rec.name, settings)
    return {"vm": rec.name, "policy": await _push_policy(app, rec)}


async def _policy_unset(app: Appliance, cmd: Command) -> Reply:
    rec = app.registry.named(cmd.arg("vm", str))
    for key in cmd.args.get("keys") or []:
        rec.policy.pop(key, None)
    app.inventory.save()
    return {"vm": rec.name, "policy": await _push_policy(app, rec)}


async def _push_policy(app: Appliance, rec: VMRecord) -> dict[str, Any]:
    """The VM's new effective policy, pushed to the connected shim that owns it (and to the
    owners of its clones, which inherit it), so that e.g. ``fail_mode`` applies at once."""
    names = {rec.name} | {v.name for v in app.inventory.vms.values() if v.clone_of == rec.name}
    for name in sorted(names):
        vm = app.inventory.vms[name]
        policy = app.registry.effective_policy(vm)
        for session in list(app.live_sessions):
            if vm.owner is not None and session.shim == vm.owner:
                await session.push({"t": "policy", "vm": name, "policy": policy})
    return app.registry.effective_policy(rec)


# -- quarantine -------------------------------------------------------------------------------


def _needs_vault(fn: VaultHandler) -> Handler:
    """A quarantine command: refused without a vault; the vault's errors become "refused"."""

    async def handler(app: Appliance, cmd: Command) -> Reply:
        vault = app.vault
        if vault is None:
            raise RequestFailed("unsupported", NO_VAULT)
        from ..quarantine import QuarantineError

        try:
            return await fn(app, vault, cmd)
        except QuarantineError as exc:
            raise RequestFailed("refused", str(exc)) from None

    return handler


@_needs_vault
async def _quarantine_list(app: Appliance, vault: Vault, cmd: Command) -> Reply:
    return {"entries": [asdict(e) for e in vault.list()]}


@_needs_vault
async def _quarantine_restore(app: Appliance, vault: Vault, cmd: Command) -> Reply:
    entry = vault.get(cmd.arg("id", str))
    rec = app.inventory.vms.get(entry.vm)
    root = rec.root if rec else entry.root
    overwrite = bool(cmd.args.get("overwrite"))
    app.actions.released.add(entry.vm, entry.digest)  # before the file reappears in the VM
    where = await asyncio.get_running_loop().run_in_executor(
        app.pool, lambda: vault.restore(entry.id, root=root, overwrite=overwrite)
    )
    log.info("quarantine %s restored to VM %s: %s", entry.id, entry.vm, where)
    return {"qid": entry.id, "restored": where}


@_needs_vault
async def _quarantine_delete(app: Appliance, vault: Vault, cmd: Command) -> Reply:
    qid = cmd.arg("id", str)
    vault.delete(qid)
    return {"qid": qid}


HANDLERS: dict[str, Handler] = {
    "reload": _reload,
    "vm-list": _vm_list,
    "vm-show": _vm_show,
    "vm-unregister": _vm_unregister,
    "vm-untag": _vm_untag,
    "vm-clone": _vm_clone,
    "policy-set": _policy_set,
    "policy-unset": _policy_unset,
    "quarantine-list": _quarantine_list,
    "quarantine-restore": _quarantine_restore,
    "quarantine-delete": _quarantine_delete,
}
