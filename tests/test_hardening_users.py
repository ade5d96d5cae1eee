"""Issue 14, found as a new user: a quarantine restore into a watched VM sticks, ``policy set
VM fail_mode=closed`` reaches a connected shim, and clones made by ``offscan vm clone`` are
watched by the running shim at once, their numbering continuing. Real appliance processes,
a real shim (in process), the real CLI.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from helpers import EICAR, ApplianceProc, async_wait_for, run

from offscan.shim import Shim, VMSpec

POLICY = '[default]\nactions = ["quarantine", "deny"]\n'


def _cli(a: ApplianceProc, *args: str) -> dict[str, Any]:
    r = run(*args, "--appliance", a.sock, "--json")
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_a_restored_file_stays_in_its_watched_vm(tmp_path: Path) -> None:
    root = tmp_path / "vm"
    root.mkdir()
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    a = ApplianceProc(tmp_path, "--policies", str(policy))
    verdicts: list[tuple[str, dict[str, Any]]] = []

    async def scenario() -> None:
        shim = Shim(
            str(a.sock),
            [VMSpec("vm", str(root))],
            shim_id="host",
            on_verdict=lambda vm, p, v: verdicts.append((p, v)),
        )
        task = asyncio.create_task(shim.run())
        try:
            assert await shim.wait_idle(60)
            (root / "eicar.com").write_bytes(EICAR)
            await async_wait_for(lambda: not (root / "eicar.com").exists(), 30)
            entries = (await asyncio.to_thread(_cli, a, "quarantine", "list"))["entries"]
            assert [e["path"] for e in entries] == ["eicar.com"]
            await asyncio.to_thread(_cli, a, "quarantine", "restore", entries[0]["id"])
            assert (root / "eicar.com").read_bytes() == EICAR
            await async_wait_for(
                lambda: any(p == "eicar.com" and v.get("action") == "allow" for p, v in verdicts),
                30,
            )
            assert await shim.wait_idle(60)
        finally:
            shim.stop()
            await task

    try:
        asyncio.run(scenario())
        assert (root / "eicar.com").read_bytes() == EICAR, "quarantined again after restore"
        assert _cli(a, "quarantine", "list")["entries"] == []
    finally:
        a.stop()


def test_policy_set_fail_closed_reaches_the_connected_shim(tmp_path: Path) -> None:
    root = tmp_path / "vm"
    root.mkdir()
    (root / "a.txt").write_text("hello")
    a = ApplianceProc(tmp_path)

    async def scenario() -> list[str]:
        shim = Shim(str(a.sock), [VMSpec("vm", str(root))], shim_id="host")
        task = asyncio.create_task(shim.run())
        try:
            assert await shim.wait_idle(60)
            assert shim.stats_isolated() == []
            await asyncio.to_thread(_cli, a, "policy", "set", "vm", "fail_mode=closed")
            a.kill9()  # the appliance goes away: the VM must now be isolated
            await async_wait_for(lambda: shim.stats_isolated() == ["vm"], 30)
            return shim.stats_isolated()
        finally:
            shim.stop()
            await task

    try:
        assert asyncio.run(scenario()) == ["vm"]
    finally:
        a.stop()


def test_clones_are_watched_at_once_and_numbering_continues(tmp_path: Path) -> None:
    master = tmp_path / "vms" / "master"
    master.mkdir(parents=True)
    (master / "a.txt").write_text("hello")
    a = ApplianceProc(tmp_path)
    got: dict[tuple[str, str], str] = {}

    async def scenario() -> list[str]:
        shim = Shim(
            str(a.sock),
            [VMSpec("master", str(master))],
            shim_id="host",
            on_verdict=lambda vm, p, v: got.__setitem__((vm, p), v["status"]),
        )
        task = asyncio.create_task(shim.run())
        try:
            assert await shim.wait_idle(60)
            into = str(tmp_path / "vms")
            names = []
            for _ in range(2):  # two rounds: the second continues the numbering
                args = ("vm", "clone", "master", "--count", "2", "--into", into)
                made = await asyncio.to_thread(_cli, a, *args)
                names += [c["name"] for c in made["clones"]]
            # protected without any restart: watched, and a new file gets its verdict
            await async_wait_for(lambda: shim.stats()["watched"] == 1 + len(names), 30)
            assert await shim.wait_idle(60)
            for n in names:
                (tmp_path / "vms" / n / "eicar.com").write_bytes(EICAR)
            await async_wait_for(lambda: all((n, "eicar.com") in got for n in names), 60)
            return names
        finally:
            shim.stop()
            await task

    try:
        names = asyncio.run(scenario())
        assert names == [f"master-clone00{i}" for i in range(1, 5)]
        assert all(got[(n, "eicar.com")] == "infected" for n in names)
    finally:
        a.stop()
