"""``offscan demo``: one appliance protects a master image and 50 clones, end to end.

Builds a small master image, starts a real appliance process and a shim, clones the master,
writes a burst of new files (one of them the EICAR test file) and reports what offloading
bought: contents matched once, everything else served from the shared verdict cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .protocol import ApplianceClient, admin_socket_for
from .shim import Shim, VMSpec

if TYPE_CHECKING:
    from .protocol.messages import ApplianceStatus, LocalVerdict

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
_WORDS = (
    "kernel driver config service update policy session desktop profile cache registry user "
    "network packet report invoice budget meeting archive backup system library module"
).split()


def build_master(root: Path, files: int, seed: int = 7) -> int:
    """A deterministic master image: text, configs and binaries in a few directories."""
    rng = random.Random(seed)
    dirs = ["etc", "usr/lib", "usr/bin", "home/user/docs", "var/log", "opt/app"]
    total = 0
    for i in range(files):
        d = root / dirs[i % len(dirs)]
        d.mkdir(parents=True, exist_ok=True)
        kind = i % 3
        if kind == 0:
            body = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 2000))).encode()
            name = f"doc{i:04d}.txt"
        elif kind == 1:
            body = rng.randbytes(rng.randint(1_000, 200_000))
            name = f"lib{i:04d}.so"
        else:
            body = f"[section{i}]\nkey={rng.random()}\n".encode() * rng.randint(1, 50)
            name = f"conf{i:04d}.ini"
        (d / name).write_bytes(body)
        total += len(body)
    return total


def _start_appliance(
    sock: Path, state: Path, ready: Path, log: Path, policy: Path
) -> subprocess.Popen[bytes]:
    logf = open(log, "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offscan",
            "serve",
            "--socket",
            str(sock),
            "--state",
            str(state),
            "--ready-file",
            str(ready),
            "--policies",
            str(policy),
            "--vm-area",  # the demo's VMs live in its work directory
            str(ready.parent.resolve()),
        ],
        stdout=logf,
        stderr=subprocess.STDOUT,
    )
    logf.close()
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"appliance did not start; see its log:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


async def _demo(work: Path, clones: int, files: int, console: Console) -> dict[str, Any]:
    """The demo's phases in order (master, clones, burst), timed, and what they cost. Long: one
    script the reader follows top to bottom, progress bar and cleanup around it."""
    timings: dict[str, float] = {}
    master = work / "vms" / "master"
    t = time.monotonic()
    master_bytes = build_master(master, files)
    timings["build master"] = time.monotonic() - t
    console.print(f"master image: {files} files, {master_bytes / 1e6:.1f} MB in {master}")

    sock, state = work / "appliance.sock", work / "state"
    t = time.monotonic()
    policy = work / "policy.toml"
    policy.write_text('[default]\nactions = ["quarantine", "deny"]\n')
    proc = _start_appliance(sock, state, work / "ready.json", work / "appliance.log", policy)
    timings["start appliance"] = time.monotonic() - t
    detections: list[tuple[str, str, list[str], str | None]] = []
    verdicts = 0

    def on_verdict(vm: str, path: str, verdict: LocalVerdict) -> None:
        nonlocal verdicts
        verdicts += 1
        if not verdicts & 63:  # the bar redraws ten times a second; 15,000 updates cost more
            progress.update(task, completed=verdicts)
        if verdict["status"] == "infected":  # an appliance's Verdict (the shim's are errors)
            detections.append((vm, path, verdict.get("matches", []), verdict.get("quarantine_id")))

    burst_per_clone = 4
    expected = files * (clones + 1) + clones * burst_per_clone + 1
    shim = Shim(
        str(sock), [VMSpec("master", str(master))], shim_id="demo-shim", on_verdict=on_verdict
    )
    runner: asyncio.Task[None] | None = None
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            task = progress.add_task("verdicts", total=expected)
            runner = asyncio.create_task(shim.run())
            t = time.monotonic()
            progress.update(task, description="activation scan of the master")
            if not await shim.wait_idle(120):
                raise RuntimeError("master activation scan did not finish")
            timings["protect master"] = time.monotonic() - t

            master_status = await _status(sock)
            progress.update(
                task, description=f"cloning {clones} VMs on the appliance", completed=verdicts
            )
            t = time.monotonic()
            op = ApplianceClient(admin_socket_for(str(sock)), shim_id="demo-operator")
            await op.connect()
            made = await op.control(
                "vm-clone",
                timeout=600,
                base="master",
                count=clones,
                into=str(work / "vms"),
                prefix="vm-",
            )
            await op.close()
            timings[f"clone {clones} VMs"] = time.monotonic() - t
            progress.update(task, description=f"protecting {clones} clones", completed=verdicts)
            t = time.monotonic()
            for c in made["clones"]:
                await shim.add_vm(VMSpec(c["name"], c["root"], clone_of="master"))
            if not await shim.wait_idle(300):
                raise RuntimeError("clone activation did not finish")
            timings[f"protect {clones} clones"] = time.monotonic() - t
            clones_status = await _status(sock)

            progress.update(
                task, description="burst of new files in the clones", completed=verdicts
            )
            t = time.monotonic()
            rng = random.Random(11)
            shared_update = rng.randbytes(150_000)
            for i in range(1, clones + 1):
                home = work / "vms" / f"vm-{i}" / "home" / "user"
                (home / "Downloads").mkdir(parents=True, exist_ok=True)
                (home / "Downloads" / "patch.bin").write_bytes(shared_update)
                (home / "docs" / "notes.txt").write_text("same notes on every desktop\n" * 40)
                (home / "docs" / f"report-{i}.txt").write_text(f"report of desktop {i}\n" * 100)
                (home / "Downloads" / f"tmp-{i}.dat").write_bytes(rng.randbytes(20_000))
                if i == min(17, clones):
                    (home / "Downloads" / "eicar.com").write_bytes(EICAR)
            if not await shim.wait_idle(120):
                raise RuntimeError("burst did not finish")
            timings["burst"] = time.monotonic() - t
            progress.update(task, description="done", completed=verdicts)

        status = await _status(sock)
        tags = {}
        op = ApplianceClient(admin_socket_for(str(sock)), shim_id="demo-operator")
        await op.connect()
        for vm, _, _, _ in detections:
            tags[vm] = (await op.control("vm-show", name=vm))["tags"]
        await op.close()
    finally:
        shim.stop()
        if runner is not None:
            try:
                await asyncio.wait_for(runner, 10)  # cancels it on timeout
            except Exception as exc:  # the demo's result matters more than a shim shutdown hiccup
                console.print(f"shim stopped with: {exc!r}")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {
        "status": status,
        "timings": timings,
        "detections": detections,
        "tags": tags,
        "verdicts": verdicts,
        "shim": shim.stats(),
        "clone_bytes_read": clones_status["bytes_read"] - master_status["bytes_read"],
        "clone_matched": clones_status["contents_matched"] - master_status["contents_matched"],
        "clone_inherited": clones_status["served_clone"] - master_status["served_clone"],
    }


async def _status(sock: Path) -> ApplianceStatus:
    client = ApplianceClient(admin_socket_for(str(sock)), shim_id="demo-status")
    await client.connect()
    try:
        return await client.status()
    finally:
        await client.close()


def run_demo(*, clones: int = 50, files: int = 300, keep: str | None = None) -> int:
    console = Console()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("watchdog").setLevel(logging.ERROR)  # observer shutdown chatter
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="offscan-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        out = asyncio.run(_demo(work, clones, files, console))
    except (RuntimeError, OSError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 2
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    st: ApplianceStatus = out["status"]  # _demo's, from _status
    matched, served = st["contents_matched"], st["served_from_cache"]
    table = Table(title="offscan demo: one appliance, master + clones", show_header=False)
    table.add_row("VMs protected", str(len(st["vms"])))
    table.add_row("files seen (verdicts)", str(st["verdicts"]))
    table.add_row("contents matched", str(matched))
    table.add_row(
        "served from cache",
        f"{served} ({st['served_clone']} by clone inheritance, "
        f"{st['served_identity']} by identity, {st['served_digest']} by digest)",
    )
    table.add_row(
        "clone dedup",
        f"{out['clone_inherited']} clone files protected unread: "
        f"{out['clone_bytes_read']} bytes read, {out['clone_matched']} contents matched for the clones",
    )
    table.add_row(
        "dedup ratio",
        f"{st['verdicts'] / max(1, matched):.1f} verdicts per matched content "
        f"(hit ratio {st['hit_ratio']:.1%})",
    )
    table.add_row(
        "bytes read / matched",
        f"{st['bytes_read'] / 1e6:.1f} MB / {st['bytes_matched'] / 1e6:.1f} MB",
    )
    for vm, path, names, qid in out["detections"]:
        table.add_row("[red]detection[/red]", f"VM {vm}: {path}: {', '.join(names)} (deny)")
        table.add_row("quarantine id", str(qid))
        table.add_row(f"tags of {vm}", ", ".join(out["tags"].get(vm, [])))
    for name, secs in out["timings"].items():
        table.add_row(f"time: {name}", f"{secs:.2f} s")
    console.print(table)
    if not out["detections"]:
        console.print("[red]expected the EICAR file to be detected[/red]")
        return 1
    if keep:
        console.print(f"kept {work}; summary in {work / 'summary.json'}")
        (work / "summary.json").write_text(json.dumps(out, indent=1, default=str))
    return 0
