"""Operator commands against a running appliance: ``status``, ``vm``, ``policy``,
``quarantine`` and ``reload``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from ._common import (
    EXIT_CLEAN,
    EXIT_ERROR,
    add_appliance_arguments,
    admin_address,
    control,
    socket_address,
)

if TYPE_CHECKING:
    from ..protocol.messages import ApplianceStatus, PatternsSource, PreventionStats

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(sub: Subparsers) -> None:
    _register_status(sub)
    _register_vm(sub)
    _register_policy(sub)
    _register_quarantine(sub)
    p = sub.add_parser(
        "reload", help="make the appliance fetch pattern updates now (or re-read -d databases)"
    )
    add_appliance_arguments(p)
    p.set_defaults(run=run_reload)


def _register_status(sub: Subparsers) -> None:
    p = sub.add_parser("status", help="show a running appliance's VMs, queue and cache")
    p.add_argument(
        "--appliance",
        "--socket",
        dest="appliance",
        required=True,
        metavar="SOCKET|HOST:PORT",
        help="the appliance's socket (status is read from its admin socket next to it) or, "
        "for a remote appliance, HOST:PORT (then only the counters, no VMs)",
    )
    p.add_argument(
        "--admin-socket", metavar="PATH", help="the admin socket, if not SOCKET + '.admin'"
    )
    p.add_argument(
        "--secret",
        default=os.environ.get("OFFSCAN_SECRET"),
        help="shared secret for a TCP appliance (default: $OFFSCAN_SECRET)",
    )
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(run=run_status)


def _register_vm(sub: Subparsers) -> None:
    p = sub.add_parser("vm", help="VM inventory: clone, list, show, unregister, untag")
    p.set_defaults(run=run_vm)
    vsub = p.add_subparsers(dest="vm_command", required=True, metavar="ACTION")
    q = vsub.add_parser(
        "clone", help="make N clones of a registered master; they inherit its verdicts"
    )
    q.add_argument("base", help="the registered VM to clone")
    q.add_argument("--count", type=int, required=True, help="how many clones (1..10000)")
    q.add_argument(
        "--into", required=True, metavar="DIR", help="directory for the clones (in a --vm-area)"
    )
    q.add_argument(
        "--prefix",
        help="clone names: PREFIX001... (default BASE-clone; numbering continues "
        "after the clones that exist)",
    )
    add_appliance_arguments(q)
    q = vsub.add_parser("list", help="every registered VM, its root, owner and tags")
    add_appliance_arguments(q)
    for action, what in (
        ("show", "one VM: root, owner, tags, effective policy, clones"),
        ("unregister", "forget a VM (its shim stops being answered for it)"),
    ):
        q = vsub.add_parser(action, help=what)
        q.add_argument("name", help="the VM's name")
        add_appliance_arguments(q)
    q = vsub.add_parser("untag", help="remove tags (all by default) and rerun the isolation hook")
    q.add_argument("name", help="the VM's name")
    q.add_argument("tags", nargs="*", help="the tags to remove (default: all)")
    add_appliance_arguments(q)


def _register_policy(sub: Subparsers) -> None:
    p = sub.add_parser("policy", help="per-VM policy at run time")
    p.set_defaults(run=run_policy)
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    q = psub.add_parser(
        "set", help="e.g. policy set vm1 actions=quarantine,deny exclude_ext=iso max_size=1000000"
    )
    q.add_argument("vm", help="the VM's name")
    q.add_argument("settings", nargs="+", metavar="KEY=VALUE", help="policy settings to set")
    add_appliance_arguments(q)
    q = psub.add_parser("unset", help="drop the VM's own setting (inherit again)")
    q.add_argument("vm", help="the VM's name")
    q.add_argument("keys", nargs="+", help="the policy keys to drop")
    add_appliance_arguments(q)
    q = psub.add_parser("show", help="the VM's effective policy")
    q.add_argument("vm", help="the VM's name")
    add_appliance_arguments(q)


def _register_quarantine(sub: Subparsers) -> None:
    p = sub.add_parser("quarantine", help="the quarantine vault: list, restore, delete")
    p.set_defaults(run=run_quarantine)
    qsub = p.add_subparsers(dest="quarantine_command", required=True, metavar="ACTION")
    q = qsub.add_parser("list", help="the files in the vault")
    add_appliance_arguments(q)
    for action, what in (
        ("restore", "put a quarantined file back where it was"),
        ("delete", "delete a quarantined file for good"),
    ):
        q = qsub.add_parser(action, help=what)
        q.add_argument("id", help="the quarantine id (from quarantine list)")
        if action == "restore":
            q.add_argument(
                "--overwrite", action="store_true", help="replace a file now at that path"
            )
        add_appliance_arguments(q)


def run_status(args: argparse.Namespace) -> int:
    import asyncio

    from ..protocol import ApplianceClient, ProtocolError, RequestError, parse_address

    try:
        remote = parse_address(socket_address(args.appliance))[0] == "tcp"
    except ValueError as exc:
        print(f"offscan: {exc}", file=sys.stderr)
        return EXIT_ERROR
    address = socket_address(args.appliance) if remote and not args.admin_socket else None
    address = address or admin_address(args)

    async def fetch() -> ApplianceStatus:
        client = ApplianceClient(address, shim_id=f"status-{os.getpid()}", secret=args.secret)
        await client.connect()
        try:
            return await client.status()
        finally:
            await client.close()

    try:
        st = asyncio.run(fetch())
    except (OSError, ConnectionError, TimeoutError, RequestError, ProtocolError) as exc:
        print(f"offscan: cannot get status from {address}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(st, indent=1))
        return EXIT_CLEAN
    print(f"appliance {st['appliance']} (offscan {st['version']}), up {st['uptime']:.0f} s")
    print(f"patterns  {st['pattern_version']}: {st['patterns']}")
    src: PatternsSource = st.get("patterns_source") or {}
    if src.get("fetched_from"):
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(src["fetched_at"]))
            if src.get("fetched_at")
            else "?"
        )
        print(f"          fetched {when} from {src['fetched_from']}")
    if st.get("update_error"):
        print(f"          last update failed: {st['update_error']}")
    print(
        f"queue     {st['queue_depth']} waiting, {st['in_flight']} in flight, "
        f"draining {st.get('drain_rate', 0.0):g} verdicts/s, {st['connections']} connection(s)"
    )
    print(
        f"verdicts  {st['verdicts']}: {st['contents_matched']} contents matched, "
        f"{st['served_from_cache']} served from cache (hit ratio {st['hit_ratio']:.1%}), "
        f"{st['detections']} detection(s), {st['errors']} error(s), {st['refused']} refused"
    )
    print(f"VMs       {len(st['vms'])}")
    for vm in st["vms"]:
        extra = f" clone of {vm['clone_of']}" if vm.get("clone_of") else ""
        tags = f" tags={','.join(vm['tags'])}" if vm.get("tags") else ""
        print(f"  {vm['name']:<20} {vm['root']}{extra}{tags}")
        print(f"  {'':<20} {_prevention_line(vm.get('prevention'))}")
    for d in st["recent_detections"]:
        print(f"detected  {d['vm']}:{d['path']}: {', '.join(d['matches'])} ({d['action']})")
    return EXIT_CLEAN


def _prevention_line(p: PreventionStats | None) -> str:
    """One VM's on-access prevention, as its shim last reported it."""
    if p is None or (not p["enabled"] and p["reason"] is None):
        return "prevention off"
    if not p["enabled"]:
        return f"prevention unavailable ({p['reason']}): watch mode"
    return (
        f"prevention on ({p['mode']}): {p['held']} held, {p['allowed']} allowed, "
        f"{p['denied']} denied, {p['timeouts']} timeouts, {p['unreachable']} unreachable, "
        f"{p['memo_hits']} from memo, {p['exempt']} exempt"
    )


def _print_vm(vm: dict[str, Any]) -> None:
    extra = f" clone of {vm['clone_of']}" if vm.get("clone_of") else ""
    owner = vm.get("owner") or "unclaimed"
    tags = ",".join(vm.get("tags") or []) or "-"
    print(f"{vm['name']:<22} {vm['root']}  owner={owner} tags={tags}{extra}")


def run_vm(args: argparse.Namespace) -> int:
    a = args.vm_command
    if a == "clone":
        rc, r = control(
            args,
            "vm-clone",
            base=args.base,
            count=args.count,
            into=os.path.abspath(args.into),
            prefix=args.prefix,
        )
        if rc == 0 and not args.json:
            print(
                f"{len(r['clones'])} clones of {r['base']} in {r['seconds']:.2f} s: {r['files']} files, "
                f"{r['inherited']} inherit the master's verdicts, {r['bytes_copied'] / 1e6:.1f} MB copied "
                f"in-kernel ({r['reflinked']} reflinked)"
            )
            for c in r["clones"]:
                print(f"  {c['name']}  {c['root']}")
        return rc
    if a == "list":
        rc, r = control(args, "vm-list")
        if rc == 0 and not args.json:
            for vm in r["vms"]:
                _print_vm(vm)
        return rc
    if a == "show":
        rc, r = control(args, "vm-show", name=args.name)
        if rc == 0 and not args.json:
            _print_vm(r)
            print(f"  policy: {json.dumps(r['policy'])}")
            if r.get("clones"):
                print(f"  clones: {', '.join(r['clones'])}")
        return rc
    if a == "unregister":
        return control(args, "vm-unregister", name=args.name)[0]
    rc, r = control(args, "vm-untag", name=args.name, tags=args.tags)
    if rc == 0 and not args.json:
        print(f"{r['vm']}: tags now {','.join(r['tags']) or '-'}")
    return rc


def run_policy(args: argparse.Namespace) -> int:
    a = args.policy_command
    if a == "set":
        settings = {}
        for item in args.settings:
            key, eq, value = item.partition("=")
            if not eq:
                print(f"offscan: expected KEY=VALUE, got {item!r}", file=sys.stderr)
                return EXIT_ERROR
            settings[key] = value
        rc, r = control(args, "policy-set", vm=args.vm, settings=settings)
    elif a == "unset":
        rc, r = control(args, "policy-unset", vm=args.vm, keys=args.keys)
    else:
        rc, r = control(args, "vm-show", name=args.vm)
    if rc == 0 and not args.json:
        print(f"{args.vm}: {json.dumps(r['policy'])}")
    return rc


def run_quarantine(args: argparse.Namespace) -> int:
    a = args.quarantine_command
    if a == "list":
        rc, r = control(args, "quarantine-list")
        if rc == 0 and not args.json:
            for e in r["entries"]:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
                print(
                    f"{e['id']}  {when}  {e['vm']}:{e['path']}  {','.join(e['signatures'])}  {e['digest'][:16]}"
                )
        return rc
    if a == "restore":
        rc, r = control(args, "quarantine-restore", id=args.id, overwrite=args.overwrite)
        if rc == 0 and not args.json:
            print(f"restored {r['qid']} to {r['restored']}")
        return rc
    return control(args, "quarantine-delete", id=args.id)[0]


def run_reload(args: argparse.Namespace) -> int:
    rc, r = control(args, "reload")
    if rc == 0 and not args.json:
        print(f"pattern version {r['pattern_version']}")
    if rc == 0 and r.get("error"):  # the old patterns keep serving, but the update failed
        print(f"offscan reload: update failed: {r['error']}", file=sys.stderr)
        return EXIT_ERROR
    return rc
