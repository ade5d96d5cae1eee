"""Several appliances per shim (offscan.shim.connection): ``offscan shim --appliance A
--appliance B`` uses A, fails over to B when A dies mid-stream, replays what A did not answer,
and fails back to A when it returns; no file goes without a verdict."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

from helpers import EICAR, ApplianceProc, Proc, run_async, wait_for

from offscan.protocol import ApplianceClient, admin_socket_for
from offscan.shim import Shim, VMSpec


def shim_over(work: Path, socks: list[Path], root: Path, *extra: str) -> Proc:
    args = ["shim"]
    for s in socks:
        args += ["--appliance", str(s)]
    return Proc(
        [*args, "--vm", f"{root.name}={root}", "--quiet", "0.05", *extra], work / "shim.log"
    )


def judged(apps: list[ApplianceProc], vm: str) -> dict[str, str]:
    """path -> status over every appliance's event log (the latest wins)."""
    out: dict[str, str] = {}
    for a in apps:
        for (v, path), e in a.verdict_paths().items():
            if v == vm:
                out[path] = e["status"]
    return out


def write_files(root: Path, start: int, n: int) -> list[str]:
    names = []
    for i in range(start, start + n):
        name = f"f{i:04d}.txt"
        body = EICAR if i % 50 == 7 else f"file {i}\n".encode() * 50
        (root / name).write_bytes(body)
        names.append(name)
    return names


def stats_of(shim: Proc) -> dict[str, str]:
    line = [ln for ln in shim.output().splitlines() if ln.startswith("offscan shim: ")][-1]
    return dict(kv.split("=", 1) for kv in line[len("offscan shim: ") :].split())


def test_shim_fails_over_a_to_b_and_back_losing_nothing(tmp_path: Path) -> None:
    wa, wb = tmp_path / "a", tmp_path / "b"
    wa.mkdir()
    wb.mkdir()
    root = tmp_path / "vm1"
    root.mkdir()
    a = ApplianceProc(wa, name="a")
    b = ApplianceProc(wb, name="b")
    shim = shim_over(tmp_path, [a.sock, b.sock], root)
    apps = [a, b]
    try:
        first = write_files(root, 0, 40)
        wait_for(lambda: len(judged([a], "vm1")) >= 10, 60, "A judges the first files")
        a.kill9()  # mid-stream: some of the first batch are not answered yet
        second = write_files(root, 40, 40)
        wait_for(lambda: set(first + second) <= set(judged(apps, "vm1")), 60, "B judges the rest")
        assert judged([b], "vm1"), "B never got a request"
        assert "now using appliance" in shim.output()
        # A returns: the shim fails back to it, and new files go to A again
        a = ApplianceProc(wa, name="a")
        apps = [a, b]
        wait_for(lambda: shim.output().count("now using appliance") >= 2, 60, "fail back")
        before_b = set(judged([b], "vm1"))
        third = write_files(root, 80, 20)
        wait_for(lambda: set(third) <= set(judged([a], "vm1")), 60, "A judges after failback")
        assert not (set(third) & (set(judged([b], "vm1")) - before_b))
        every = first + second + third
        got = judged(apps, "vm1")
        assert set(every) <= set(got)
        infected = {n for n in every if (root / n).read_bytes() == EICAR}
        assert {n for n in every if got[n] == "infected"} == infected
    finally:
        shim.stop()
        for x in apps:
            x.stop()
    st = stats_of(shim)
    assert st["dropped"] == "0" and st["backlog"] == "0"
    assert int(st["failovers"]) >= 1 and int(st["failbacks"]) >= 1
    assert int(st["verdicts"]) >= len(every)


def test_a_silent_appliance_is_failed_over(tmp_path: Path) -> None:
    """A stops answering without closing its socket (SIGSTOP): heartbeats notice and the shim
    moves to B; the files still get verdicts."""
    wa, wb = tmp_path / "a", tmp_path / "b"
    wa.mkdir()
    wb.mkdir()
    root = tmp_path / "vm1"
    root.mkdir()
    a = ApplianceProc(wa, name="a")
    b = ApplianceProc(wb, name="b")
    shim = shim_over(tmp_path, [a.sock, b.sock], root)
    try:
        names = write_files(root, 0, 5)
        wait_for(lambda: set(names) <= set(judged([a], "vm1")), 60, "A judges")
        a.p.send_signal(signal.SIGSTOP)
        try:
            more = write_files(root, 5, 10)
            wait_for(lambda: set(more) <= set(judged([b], "vm1")), 60, "B judges while A hangs")
        finally:
            a.p.send_signal(signal.SIGCONT)
    finally:
        shim.stop()
        a.stop()
        b.stop()
    assert re.search(r"now using appliance .*b?\.sock|now using appliance", shim.output())


def test_shim_in_process_reports_the_appliance_in_use(tmp_path: Path) -> None:
    """``Shim.stats()`` names the appliance in use; a dead first choice is skipped at once."""
    wb = tmp_path / "b"
    wb.mkdir()
    root = tmp_path / "vm"
    root.mkdir()
    (root / "x.txt").write_text("hello\n")
    missing = tmp_path / "nobody.sock"
    with_b = ApplianceProc(wb, name="b")
    try:

        async def main() -> dict[str, object]:
            shim = Shim([str(missing), str(with_b.sock)], [VMSpec("vm", str(root))])
            task = asyncio.create_task(shim.run())
            try:
                for _ in range(600):
                    if shim.connected and shim.stats()["verdicts"] >= 1:
                        break
                    await asyncio.sleep(0.05)
                return shim.stats()
            finally:
                shim.stop()
                await task

        st = run_async(main, timeout=60)
        assert st["appliance"] == str(with_b.sock)
        assert st["verdicts"] == 1

        async def peek() -> int:
            # the operator's view (a shim on the main socket sees only its own VMs)
            async with ApplianceClient(admin_socket_for(str(with_b.sock)), shim_id="probe") as c:
                return len((await c.status())["vms"])

        assert run_async(peek) == 1
    finally:
        with_b.stop()
