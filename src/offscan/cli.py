"""The ``offscan`` command line: ``scan`` now; ``demo``, ``serve``, ``shim``... as they land.

Each subcommand lives in a ``cmd_<name>`` function taking the parsed arguments and returning
the exit status, registered in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from typing import Callable, Iterator, Sequence

from . import __version__
from .engine import (
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_SCAN_TIMEOUT,
    DEFAULT_WINDOW_SIZE,
    Matcher,
    ScanResult,
    parse_size,
)
from .signatures import SignatureError, load_database

EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR = 0, 1, 2
DEFAULT_SOCKET = "/run/offscan/appliance.sock"

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    _COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offscan", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"offscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scan", help="scan files and directories (clamscan-like)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("-d", "--database", action="append", default=[], metavar="DB",
                   help="signature file or directory (repeatable; default: shipped patterns/)")
    p.add_argument("-r", "--recursive", action="store_true", help="scan directories recursively")
    p.add_argument("--allmatch", action="store_true", help="report every matching signature")
    p.add_argument("--infected", action="store_true", help="print infected files only")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.add_argument("--no-summary", action="store_true", help="do not print the summary")
    p.add_argument("--impl", choices=["auto", "c", "py"], default="auto",
                   help="matcher core (default: native when built)")
    p.add_argument("--max-filesize", type=parse_size, default=DEFAULT_MAX_FILE_SIZE, metavar="SIZE")
    p.add_argument("--max-scantime", type=float, default=DEFAULT_SCAN_TIMEOUT, metavar="SECONDS")
    p.add_argument("--window-size", type=parse_size, default=DEFAULT_WINDOW_SIZE, metavar="SIZE",
                   help=argparse.SUPPRESS)
    p = sub.add_parser("serve", help="run the appliance (one per host)")
    p.add_argument("--socket", metavar="PATH", help="unix socket for local shims")
    p.add_argument("--listen", metavar="HOST:PORT", help="TCP listener for remote shims (needs a secret)")
    p.add_argument("--secret", default=os.environ.get("OFFSCAN_SECRET"),
                   help="shared secret for TCP clients (default: $OFFSCAN_SECRET)")
    p.add_argument("-d", "--database", action="append", default=[], metavar="DB")
    p.add_argument("--state", metavar="DIR", help="state directory: inventory, verdict cache, event log")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent reads+scans (default 4)")
    p.add_argument("--socket-mode", type=lambda v: int(v, 8), default=0o600, metavar="OCTAL",
                   help="unix socket permissions (default 600)")
    p.add_argument("--policies", metavar="TOML", help="policy file ([default] and [vm.NAME] tables)")
    p.add_argument("--isolation-hook", metavar="CMD",
                   help="run as CMD VM TAG... with JSON on stdin when a VM's tags change")
    p.add_argument("--hook-timeout", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("--quarantine", metavar="DIR", help="quarantine vault (default: STATE/quarantine)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="Prometheus metrics endpoint")
    p.add_argument("--updates", metavar="URL", help="pattern update server (offscan patterns serve)")
    p.add_argument("--trust", metavar="PUB", help="Ed25519 public key that must sign pattern bundles")
    p.add_argument("--poll", type=float, default=60.0, metavar="SECONDS", help="update poll interval")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")

    p = sub.add_parser("status", help="show a running appliance's VMs, queue and cache")
    p.add_argument("--appliance", "--socket", dest="appliance", required=True, metavar="SOCKET|HOST:PORT")
    p.add_argument("--secret", default=os.environ.get("OFFSCAN_SECRET"))
    p.add_argument("--json", action="store_true")

    from .shim import add_shim_arguments

    add_shim_arguments(sub.add_parser("shim", help="watch VM directories and offload scans to the appliance"))

    def appliance_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--appliance", "--socket", dest="appliance", metavar="SOCKET|HOST:PORT",
                       default=os.environ.get("OFFSCAN_APPLIANCE", DEFAULT_SOCKET),
                       help=f"the appliance (default: $OFFSCAN_APPLIANCE or {DEFAULT_SOCKET})")
        q.add_argument("--secret", default=os.environ.get("OFFSCAN_SECRET"))
        q.add_argument("--json", action="store_true", help="print the appliance's reply as JSON")

    p = sub.add_parser("vm", help="VM inventory: clone, list, show, unregister, untag")
    vsub = p.add_subparsers(dest="vm_command", required=True, metavar="ACTION")
    q = vsub.add_parser("clone", help="make N clones of a registered master; they inherit its verdicts")
    q.add_argument("base")
    q.add_argument("--count", type=int, required=True)
    q.add_argument("--into", required=True, metavar="DIR")
    q.add_argument("--prefix", help="clone names: PREFIX001... (default BASE-clone)")
    appliance_arg(q)
    q = vsub.add_parser("list")
    appliance_arg(q)
    for action in ("show", "unregister"):
        q = vsub.add_parser(action)
        q.add_argument("name")
        appliance_arg(q)
    q = vsub.add_parser("untag", help="remove tags (all by default) and rerun the isolation hook")
    q.add_argument("name")
    q.add_argument("tags", nargs="*")
    appliance_arg(q)

    p = sub.add_parser("policy", help="per-VM policy at run time")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    q = psub.add_parser("set", help="e.g. policy set vm1 actions=quarantine,deny exclude_ext=iso max_size=1000000")
    q.add_argument("vm")
    q.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    appliance_arg(q)
    q = psub.add_parser("unset", help="drop the VM's own setting (inherit again)")
    q.add_argument("vm")
    q.add_argument("keys", nargs="+")
    appliance_arg(q)
    q = psub.add_parser("show")
    q.add_argument("vm")
    appliance_arg(q)

    p = sub.add_parser("quarantine", help="the quarantine vault: list, restore, delete")
    qsub = p.add_subparsers(dest="quarantine_command", required=True, metavar="ACTION")
    q = qsub.add_parser("list")
    appliance_arg(q)
    for action in ("restore", "delete"):
        q = qsub.add_parser(action)
        q.add_argument("id")
        if action == "restore":
            q.add_argument("--overwrite", action="store_true")
        appliance_arg(q)

    from .images import add_scan_image_arguments

    add_scan_image_arguments(sub.add_parser("scan-image", help="scan a directory tree, tar or OCI image layout"))

    from .agent import add_agent_arguments

    add_agent_arguments(sub.add_parser("agent", help="agent mode: a full scanner for one VM (the baseline)"))

    p = sub.add_parser("reload", help="make the appliance fetch pattern updates now (or re-read -d databases)")
    appliance_arg(p)

    from .lab import add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="the lab: agent vs agentless, clone storm"))

    from .updates import add_patterns_arguments

    add_patterns_arguments(sub.add_parser("patterns", help="signed pattern bundles: build, diff, keygen, sign, verify, serve"))

    p = sub.add_parser("demo", help="50 clones protected by one appliance, end to end")
    p.add_argument("--clones", type=int, default=50)
    p.add_argument("--files", type=int, default=300, help="files in the master image")
    p.add_argument("--keep", metavar="DIR", help="build in DIR and keep it (default: temp, removed)")
    return parser


def _walk(path: str, recursive: bool, errors: list[ScanResult]) -> Iterator[str]:
    """Files under ``path``. Symlinks named on the command line are followed; symlinks met
    while recursing are not (as clamscan's defaults), which also rules out symlink loops."""
    if not os.path.isdir(path):
        yield path
        return
    if not recursive:
        errors.append(ScanResult(path, "error", reason="is a directory (use -r)"))
        return

    def onerror(exc: OSError) -> None:
        errors.append(ScanResult(exc.filename, "error", reason=exc.strerror or str(exc)))

    for root, dirs, files in os.walk(path, onerror=onerror):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue  # vanished while walking
            if stat.S_ISREG(st.st_mode):  # symlinks, FIFOs, devices, sockets are skipped
                yield full


@command
def cmd_scan(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    try:
        db = load_database(*args.database)
    except SignatureError as exc:
        print(f"offscan: {exc}", file=sys.stderr)
        return EXIT_ERROR
    matcher = Matcher(db, impl=args.impl, window_size=args.window_size,
                      max_file_size=args.max_filesize, max_scan_time=args.max_scantime)
    out = sys.stdout
    scanned = infected = errors_n = 0
    data = 0
    errors: list[ScanResult] = []

    def report(r: ScanResult) -> None:
        nonlocal scanned, infected, errors_n, data
        if r.status == "error":
            errors_n += 1
        else:
            scanned += 1
            data += r.bytes_scanned
        if r.infected:
            infected += 1
        if args.json:
            out.write(json.dumps(r.to_json()) + "\n")
        elif r.status == "error":
            print(f"{r.path}: {r.reason} ERROR", file=out)
        elif r.infected:
            for name in r.matches:
                out.write(f"{r.path}: {name} FOUND\n")
        elif not args.infected:
            out.write(f"{r.path}: OK\n")

    for path in args.paths:
        for f in _walk(path, args.recursive, errors):
            report(matcher.scan_path(f, allmatch=args.allmatch))
        while errors:
            report(errors.pop(0))
        out.flush()
    if not args.no_summary and not args.json:
        elapsed = time.monotonic() - t0
        print(
            "\n----------- SCAN SUMMARY -----------\n"
            f"Known viruses: {db.signature_count}\n"
            f"Engine version: offscan {__version__} ({'native' if matcher.native else 'python'})\n"
            f"Scanned files: {scanned}\n"
            f"Infected files: {infected}\n"
            + (f"Total errors: {errors_n}\n" if errors_n else "")
            + f"Data scanned: {data / 1e6:.2f} MB\n"
            f"Time: {elapsed:.3f} sec",
            file=out,
        )
    if errors_n:
        return EXIT_ERROR
    return EXIT_FOUND if infected else EXIT_CLEAN


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"offscan: --listen wants HOST:PORT, got {text!r}")
    return host, int(port)


def _setup_logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


@command
def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from .appliance import Appliance, serve

    _setup_logging(args.verbose)
    if not args.socket and not args.listen:
        print("offscan: serve needs --socket PATH and/or --listen HOST:PORT", file=sys.stderr)
        return EXIT_ERROR
    try:
        appliance = Appliance(
            socket_path=args.socket,
            listen=_address(args.listen) if args.listen else None,
            secret=args.secret,
            databases=args.database,
            state_dir=args.state,
            concurrency=args.concurrency,
            socket_mode=args.socket_mode,
            policy_file=args.policies,
            isolation_hook=args.isolation_hook,
            hook_timeout=args.hook_timeout,
            quarantine_dir=args.quarantine,
            metrics=_address(args.metrics) if args.metrics else None,
            updates=args.updates,
            trust=args.trust,
            poll=args.poll,
        )
    except (SignatureError, ValueError, OSError, RuntimeError) as exc:
        print(f"offscan: {exc}", file=sys.stderr)
        return EXIT_ERROR
    asyncio.run(serve(appliance, ready_file=args.ready_file))
    return EXIT_CLEAN


@command
def cmd_status(args: argparse.Namespace) -> int:
    import asyncio

    from .protocol import ApplianceClient, ProtocolError, RequestError

    async def fetch() -> dict:
        client = ApplianceClient(args.appliance, shim_id=f"status-{os.getpid()}", secret=args.secret)
        await client.connect()
        try:
            return await client.status()
        finally:
            await client.close()

    try:
        st = asyncio.run(fetch())
    except (OSError, ConnectionError, TimeoutError, RequestError, ProtocolError) as exc:
        print(f"offscan: cannot get status from {args.appliance}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(st, indent=1))
        return EXIT_CLEAN
    print(f"appliance {st['appliance']} (offscan {st['version']}), up {st['uptime']:.0f} s")
    print(f"patterns  {st['pattern_version']}: {st['patterns']}")
    src = st.get("patterns_source") or {}
    if src.get("fetched_from"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(src["fetched_at"])) if src.get("fetched_at") else "?"
        print(f"          fetched {when} from {src['fetched_from']}")
    if st.get("update_error"):
        print(f"          last update failed: {st['update_error']}")
    print(f"queue     {st['queue_depth']} waiting, {st['in_flight']} in flight, {st['connections']} connection(s)")
    print(f"verdicts  {st['verdicts']}: {st['contents_matched']} contents matched, "
          f"{st['served_from_cache']} served from cache (hit ratio {st['hit_ratio']:.1%}), "
          f"{st['detections']} detection(s), {st['errors']} error(s), {st['refused']} refused")
    print(f"VMs       {len(st['vms'])}")
    for vm in st["vms"]:
        extra = f" clone of {vm['clone_of']}" if vm.get("clone_of") else ""
        tags = f" tags={','.join(vm['tags'])}" if vm.get("tags") else ""
        print(f"  {vm['name']:<20} {vm['root']}{extra}{tags}")
    for d in st["recent_detections"]:
        print(f"detected  {d['vm']}:{d['path']}: {', '.join(d['matches'])} ({d['action']})")
    return EXIT_CLEAN


def _control(args: argparse.Namespace, op: str, **kw: object) -> tuple[int, dict]:
    import asyncio

    from .protocol import ApplianceClient, ProtocolError, RequestError

    async def call() -> dict:
        client = ApplianceClient(args.appliance, shim_id=f"operator-{os.getpid()}", secret=args.secret)
        await client.connect()
        try:
            return await client.control(op, timeout=600, **kw)
        finally:
            await client.close()

    try:
        reply = asyncio.run(call())
    except RequestError as exc:
        print(f"offscan: {exc}", file=sys.stderr)
        return EXIT_ERROR, {}
    except (OSError, ConnectionError, TimeoutError, ProtocolError) as exc:
        print(f"offscan: cannot reach appliance at {args.appliance}: {exc}", file=sys.stderr)
        return EXIT_ERROR, {}
    reply = {k: v for k, v in reply.items() if k not in ("t", "id")}
    if args.json:
        print(json.dumps(reply, indent=1))
    return EXIT_CLEAN, reply


def _print_vm(vm: dict) -> None:
    extra = f" clone of {vm['clone_of']}" if vm.get("clone_of") else ""
    owner = vm.get("owner") or "unclaimed"
    tags = ",".join(vm.get("tags") or []) or "-"
    print(f"{vm['name']:<22} {vm['root']}  owner={owner} tags={tags}{extra}")


@command
def cmd_vm(args: argparse.Namespace) -> int:
    a = args.vm_command
    if a == "clone":
        rc, r = _control(args, "vm-clone", base=args.base, count=args.count,
                         into=os.path.abspath(args.into), prefix=args.prefix)
        if rc == 0 and not args.json:
            print(f"{len(r['clones'])} clones of {r['base']} in {r['seconds']:.2f} s: {r['files']} files, "
                  f"{r['inherited']} inherit the master's verdicts, {r['bytes_copied'] / 1e6:.1f} MB copied "
                  f"in-kernel ({r['reflinked']} reflinked)")
            for c in r["clones"]:
                print(f"  {c['name']}  {c['root']}")
        return rc
    if a == "list":
        rc, r = _control(args, "vm-list")
        if rc == 0 and not args.json:
            for vm in r["vms"]:
                _print_vm(vm)
        return rc
    if a == "show":
        rc, r = _control(args, "vm-show", name=args.name)
        if rc == 0 and not args.json:
            _print_vm(r)
            print(f"  policy: {json.dumps(r['policy'])}")
            if r.get("clones"):
                print(f"  clones: {', '.join(r['clones'])}")
        return rc
    if a == "unregister":
        return _control(args, "vm-unregister", name=args.name)[0]
    rc, r = _control(args, "vm-untag", name=args.name, tags=args.tags)
    if rc == 0 and not args.json:
        print(f"{r['vm']}: tags now {','.join(r['tags']) or '-'}")
    return rc


@command
def cmd_policy(args: argparse.Namespace) -> int:
    a = args.policy_command
    if a == "set":
        settings = {}
        for item in args.settings:
            key, eq, value = item.partition("=")
            if not eq:
                print(f"offscan: expected KEY=VALUE, got {item!r}", file=sys.stderr)
                return EXIT_ERROR
            settings[key] = value
        rc, r = _control(args, "policy-set", vm=args.vm, settings=settings)
    elif a == "unset":
        rc, r = _control(args, "policy-unset", vm=args.vm, keys=args.keys)
    else:
        rc, r = _control(args, "vm-show", name=args.vm)
    if rc == 0 and not args.json:
        print(f"{args.vm}: {json.dumps(r['policy'])}")
    return rc


@command
def cmd_quarantine(args: argparse.Namespace) -> int:
    a = args.quarantine_command
    if a == "list":
        rc, r = _control(args, "quarantine-list")
        if rc == 0 and not args.json:
            for e in r["entries"]:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
                print(f"{e['id']}  {when}  {e['vm']}:{e['path']}  {','.join(e['signatures'])}  {e['digest'][:16]}")
        return rc
    if a == "restore":
        rc, r = _control(args, "quarantine-restore", id=args.id, overwrite=args.overwrite)
        if rc == 0 and not args.json:
            print(f"restored {r['qid']} to {r['restored']}")
        return rc
    return _control(args, "quarantine-delete", id=args.id)[0]


@command
def cmd_shim(args: argparse.Namespace) -> int:
    import asyncio

    from .shim import run_shim_cli

    _setup_logging(getattr(args, "verbose", False))
    return asyncio.run(run_shim_cli(args))


@command
def cmd_scan_image(args: argparse.Namespace) -> int:
    from .images import cmd_scan_image as run

    return run(args)


@command
def cmd_agent(args: argparse.Namespace) -> int:
    import asyncio

    from .agent import run_agent_cli

    return asyncio.run(run_agent_cli(args))


@command
def cmd_reload(args: argparse.Namespace) -> int:
    rc, r = _control(args, "reload")
    if rc == 0 and not args.json:
        print(f"pattern version {r['pattern_version']}" + (f" (update error: {r['error']})" if r.get("error") else ""))
    return rc


@command
def cmd_bench(args: argparse.Namespace) -> int:
    from .lab import cmd_bench as run

    return run(args)


@command
def cmd_patterns(args: argparse.Namespace) -> int:
    from .updates import cmd_patterns as run

    return run(args)


@command
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(clones=args.clones, files=args.files, keep=args.keep)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
