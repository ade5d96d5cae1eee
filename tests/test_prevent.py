"""On-access prevention (issue 11): real fanotify groups, a real appliance and shim, real opens
from other processes. Every VM root is a tmpfs mounted for the test or a temp directory; the
groups live in the shim child and are released when it stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import EICAR, ApplianceProc, Proc, run, wait_for
from prevent_support import (
    OPEN_TIMEOUT,
    blocked_in_open,
    open_in_child,
    prevented,
    prevention_of,
    require_fanotify,
    results,
    start_openers,
    tmpfs,
    wait_prevention,
    write_in_child,
)

from offscan.shim.fanotify import FAN_EVENT_ON_CHILD, FAN_OPEN_PERM, FanotifyGroup

pytestmark = pytest.mark.usefixtures("fanotify")

MARKER = b"OFFSCAN-PREVENT-TEST-MARKER-7f3a9c"  # a body signature of our own, anywhere in a file


@pytest.fixture
def fanotify() -> None:
    require_fanotify()


def marker_db(path: Path) -> Path:
    """A database with EICAR and :data:`MARKER` (offset any), for scripts and reloads."""
    path.write_text(
        f"Eicar-Test-Signature:0:0:{EICAR.hex()}\nOffscan.Test.Marker:0:*:{MARKER.hex()}\n"
    )
    return path


# -- the binding on its own ---------------------------------------------------------------------


def test_group_holds_an_open_until_answered(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    group = FanotifyGroup()
    answered: list[int] = []

    def answer() -> None:
        while len(answered) < 2:
            for ev in group.read(1.0):
                path = os.readlink(f"/proc/self/fd/{ev.fd}")
                group.respond(ev.fd, allow=path.endswith("/a"))
                os.close(ev.fd)
                answered.append(ev.pid)

    try:
        group.mark(str(tmp_path), FAN_OPEN_PERM | FAN_EVENT_ON_CHILD)
        reader = threading.Thread(target=answer)
        reader.start()
        assert open_in_child(tmp_path / "a", tmp_path / "b") == ["OK", "EPERM"]
        reader.join(OPEN_TIMEOUT)
        assert len(answered) == 2 and os.getpid() not in answered
    finally:
        group.close()
    assert open_in_child(tmp_path / "b") == ["OK"]  # closing the group removed its marks


# -- deny, allow, exec ---------------------------------------------------------------------------


def test_infected_open_fails_with_eperm_and_clean_opens_work(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "vm1") as root:
        with prevented(tmp_path, root) as (appliance, _shim):
            write_in_child(root / "eicar.com", EICAR)
            (root / "docs").mkdir()
            write_in_child(root / "docs" / "clean.txt", b"hello\n")
            assert open_in_child(root / "eicar.com") == ["EPERM"]
            cat = subprocess.run(["cat", str(root / "docs" / "clean.txt")], capture_output=True)
            assert cat.returncode == 0 and cat.stdout == b"hello\n"
            cat = subprocess.run(["cat", str(root / "eicar.com")], capture_output=True)
            assert cat.returncode != 0 and b"Operation not permitted" in cat.stderr
            p = wait_prevention(appliance.sock, "vm1", denied=lambda n: n >= 2)
            assert p["mode"] == "mount" and p["allowed"] >= 1 and p["held"] == 0
            out = run("status", "--appliance", appliance.sock)
            assert "prevention on (mount)" in out.stdout, out.stdout
            assert appliance.verdict_paths()[("vm1", "eicar.com")]["status"] == "infected"


def test_infected_on_open_is_denied_then_quarantined(tmp_path: Path) -> None:
    """The VM's actions run as for any detection; the appliance's own opens (the move into
    the vault) are not held."""
    policy = tmp_path / "policy.toml"
    policy.write_text('[default]\nactions = ["quarantine", "deny"]\n')
    with tmpfs(tmp_path / "vmq") as root:
        args = ("--policies", str(policy))
        with prevented(tmp_path, root, appliance_args=args) as (appliance, _shim):
            write_in_child(root / "eicar.com", EICAR)
            first = open_in_child(root / "eicar.com")
            wait_for(lambda: not (root / "eicar.com").exists(), 60, "moved into the vault")
            assert first in (["EPERM"], ["ENOENT"])  # denied, or already in the vault
            out = run("quarantine", "list", "--appliance", appliance.sock)
            assert out.returncode == 0 and "eicar.com" in out.stdout, out.stdout
            p = wait_prevention(appliance.sock, "vmq", held=0)
            assert p["timeouts"] == 0 and p["unreachable"] == 0


def test_directory_mode_holds_files_in_new_directories(tmp_path: Path) -> None:
    root = tmp_path / "vm2"
    (root / "old").mkdir(parents=True)
    with prevented(tmp_path, root) as (appliance, _shim):
        assert prevention_of(appliance.sock, "vm2")["mode"] == "directories"  # type: ignore[index]
        write_in_child(root / "old" / "e.com", EICAR)
        assert open_in_child(root / "old" / "e.com") == ["EPERM"]
        (root / "new" / "deeper").mkdir(parents=True)
        write_in_child(root / "new" / "deeper" / "e.com", EICAR)
        # A directory made after the start is marked when listed or by the next rescan.
        wait_for(lambda: open_in_child(root / "new" / "deeper" / "e.com") == ["EPERM"], 60)
        write_in_child(root / "new" / "deeper" / "ok.txt", b"fine")
        assert open_in_child(root / "new" / "deeper" / "ok.txt") == ["OK"]
    assert open_in_child(root / "old" / "e.com") == ["OK"]  # shim stopped: marks gone


def test_a_root_mounted_again_is_marked_again(tmp_path: Path) -> None:
    root = tmp_path / "vmm"
    with tmpfs(root):
        with prevented(tmp_path, root) as (appliance, _shim):
            subprocess.run(["umount", str(root)], check=True)
            with tmpfs(root):  # a new filesystem where the marked one was
                write_in_child(root / "eicar.com", EICAR)
                wait_for(lambda: open_in_child(root / "eicar.com") == ["EPERM"], 60)
                assert prevention_of(appliance.sock, "vmm")["mode"] == "mount"  # type: ignore[index]


def test_exec_of_an_infected_script_fails(tmp_path: Path) -> None:
    db = marker_db(tmp_path / "marker.ndb")
    with tmpfs(tmp_path / "vm3") as root:
        with prevented(tmp_path, root, appliance_args=("-d", str(db))):
            bad, good = root / "bad.sh", root / "good.sh"
            write_in_child(bad, b"#!/bin/sh\necho " + MARKER + b"\n")
            write_in_child(good, b"#!/bin/sh\necho fine\n")
            bad.chmod(0o755)
            good.chmod(0o755)
            with pytest.raises(PermissionError):
                subprocess.run([str(bad)], capture_output=True, timeout=OPEN_TIMEOUT)
            ok = subprocess.run([str(good)], capture_output=True, timeout=OPEN_TIMEOUT)
            assert ok.returncode == 0 and ok.stdout == b"fine\n"
            sh = subprocess.run(["sh", str(bad)], capture_output=True, timeout=OPEN_TIMEOUT)
            assert sh.returncode != 0 and not sh.stdout  # read by sh: denied too


# -- appliance trouble ---------------------------------------------------------------------------


def _policy(tmp_path: Path, vm: str, fail_mode: str, timeout: float) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(
        f'[vm.{vm}]\nfail_mode = "{fail_mode}"\nprevention = true\nprevention_timeout = {timeout}\n'
    )
    return path


@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_appliance_killed_while_opens_are_held(tmp_path: Path, fail_mode: str) -> None:
    """SIGSTOP the appliance, hold opens, then: some answered by the timeout, the rest when it
    is killed; every one per the fail mode; prevention resumes after a restart."""
    expect = "OK" if fail_mode == "open" else "EPERM"
    policy = _policy(tmp_path, "vm4", fail_mode, 2.0)
    with tmpfs(tmp_path / "vm4") as root:
        appliance = ApplianceProc(tmp_path, "--policies", str(policy))
        shim: Proc | None = None
        try:
            # No --prevent: the policy asks for it.
            shim = Proc(
                ["shim", "--appliance", str(appliance.sock), "--vm", f"vm4={root}"],
                tmp_path / "shim.log",
            )
            wait_prevention(appliance.sock, "vm4", enabled=True)
            appliance.p.send_signal(signal.SIGSTOP)
            files = []
            for i in range(6):  # written while the appliance sleeps: no verdict in the memo
                files.append(root / f"f{i}.txt")
                write_in_child(files[-1], f"content {i}\n".encode())
            waiting = start_openers(files[:3], jobs=3)
            assert results(waiting) == [expect] * 3  # answered by the timeout
            held = start_openers(files[3:], jobs=3)
            wait_for(lambda: blocked_in_open(held, 3), 60, "three opens held")
            appliance.p.send_signal(signal.SIGKILL)
            appliance.p.wait()
            assert results(held) == [expect] * 3  # answered at once or by the timeout
            assert open_in_child(files[0]) == [expect]  # appliance away: the fail mode
            appliance = ApplianceProc(tmp_path, "--policies", str(policy))
            p = wait_prevention(
                appliance.sock, "vm4", timeouts=lambda n: n >= 3, unreachable=lambda n: n >= 1
            )
            assert p["enabled"] and p["held"] == 0
            write_in_child(root / "eicar.com", EICAR)
            assert open_in_child(root / "eicar.com") == ["EPERM"]  # prevention resumed
            assert open_in_child(files[5]) == ["OK"]
        finally:
            if shim is not None:
                shim.stop()
            appliance.p.send_signal(signal.SIGCONT)
            appliance.stop()
    assert "no verdict" in (tmp_path / "shim.log").read_text()


def test_shim_killed_while_opens_are_held_leaves_nothing_hanging(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "vmk") as root:
        with prevented(tmp_path, root, "--prevent-timeout", "600") as (appliance, shim):
            write_in_child(root / "a.txt", b"some content")
            appliance.p.send_signal(signal.SIGSTOP)
            try:
                write_in_child(root / "b.txt", b"more content")  # no verdict can come now
                held = start_openers([root / "b.txt"])
                wait_for(lambda: blocked_in_open(held), 60, "the open is held")
                shim.kill9()  # the kernel answers what the dead group held: allow
                assert results(held) == ["OK"]
            finally:
                appliance.p.send_signal(signal.SIGCONT)


def test_prevention_per_vm_policy_and_the_shims_own_opens(tmp_path: Path) -> None:
    """Only the VM whose policy asks for prevention is held; the shim's own opens (fd
    content mode: it opens every file it sends) are exempt, so nothing waits on itself."""
    policy = tmp_path / "policy.toml"
    policy.write_text("[vm.held]\nprevention = true\n")
    with tmpfs(tmp_path / "held") as held, tmpfs(tmp_path / "free") as free:
        appliance = ApplianceProc(tmp_path, "--policies", str(policy))
        shim: Proc | None = None
        try:
            shim = Proc(
                ["shim", "--appliance", str(appliance.sock), "--content", "fd"]
                + ["--vm", f"held={held}", "--vm", f"free={free}"],
                tmp_path / "shim.log",
            )
            wait_prevention(appliance.sock, "held", enabled=True)
            for root in (held, free):
                for i in range(20):
                    write_in_child(root / f"f{i}.txt", b"file %d" % i)
                write_in_child(root / "eicar.com", EICAR)
            assert open_in_child(held / "eicar.com") == ["EPERM"]
            assert open_in_child(free / "eicar.com") == ["OK"]  # watched, not held
            wait_for(lambda: len(appliance.verdict_paths()) >= 42, 60, "every file verdicted")
            p = wait_prevention(appliance.sock, "held", exempt=lambda n: n >= 1, held=0)
            assert p["timeouts"] == 0 and p["unreachable"] == 0
            assert prevention_of(appliance.sock, "free") is None
            out = run("status", "--appliance", appliance.sock)
            assert "prevention off" in out.stdout and "prevention on (mount)" in out.stdout
        finally:
            if shim is not None:
                shim.stop()
            appliance.stop()


def test_memo_is_dropped_when_the_pattern_version_changes(tmp_path: Path) -> None:
    db = tmp_path / "live.ndb"
    db.write_text(f"Eicar-Test-Signature:0:0:{EICAR.hex()}\n")
    with tmpfs(tmp_path / "vm5") as root:
        with prevented(tmp_path, root, appliance_args=("-d", str(db))) as (appliance, _):
            write_in_child(root / "later.txt", b"harmless until " + MARKER)
            assert open_in_child(root / "later.txt", root / "later.txt") == ["OK", "OK"]
            wait_prevention(appliance.sock, "vm5", memo_hits=lambda n: n >= 1)
            marker_db(db)
            out = run("reload", "--appliance", appliance.sock)
            assert out.returncode == 0, out.stderr
            wait_for(lambda: open_in_child(root / "later.txt") == ["EPERM"], 60)


# -- load -----------------------------------------------------------------------------------------


def test_1000_concurrent_opens_from_8_processes_all_answered(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "vm6") as root:
        files = []
        for i in range(1000):
            files.append(root / f"d{i % 10}" / f"f{i}.bin")
            files[-1].parent.mkdir(exist_ok=True)
            files[-1].write_bytes(EICAR if i % 100 == 7 else os.urandom(64) + b"%d" % i)
        # Written before the shim starts: its memo is empty, every first open is a round trip.
        # A generous timeout: every open must get a real verdict, none the fail mode.
        with prevented(tmp_path, root, "--prevent-timeout", "120") as (appliance, _shim):
            procs = [start_openers(files[k::8], jobs=125) for k in range(8)]
            answers = [results(p) for p in procs]
            got = {str(f): a for k in range(8) for f, a in zip(files[k::8], answers[k])}
            assert len(got) == 1000
            denied = sorted(path for path, a in got.items() if a == "EPERM")
            assert denied == sorted(str(f) for i, f in enumerate(files) if i % 100 == 7)

            # the shim reports its counts periodically: wait for a report that has them all
            # (one taken right after the opens may still be an earlier report's)
            def counted() -> dict[str, Any] | None:
                p = prevention_of(appliance.sock, "vm6")
                done = p is not None and p["held"] == 0
                return p if done and p["allowed"] + p["denied"] >= 1000 else None

            p = wait_for(counted, 60, "prevention counts of vm6 covering the 1000 opens", 0.2)
            assert p["denied"] >= 10
            assert p["timeouts"] == 0 and p["unreachable"] == 0
            # The activation walk's scans are the appliance's own opens: never held.
            assert p["exempt"] >= 1


# -- no fanotify: watch mode ---------------------------------------------------------------------


def test_without_privileges_the_shim_watches_and_says_so(tmp_path: Path) -> None:
    if subprocess.run(["unshare", "-Ur", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -Ur (user namespaces) unavailable")
    root = tmp_path / "vm7"
    root.mkdir()
    appliance = ApplianceProc(tmp_path)
    log = tmp_path / "shim.log"
    try:
        with open(log, "wb") as f:
            # Root in a user namespace only: fanotify permission events are refused.
            shim = subprocess.Popen(
                ["unshare", "-Ur", sys.executable, "-m", "offscan", "shim", "--prevent"]
                + ["--appliance", str(appliance.sock), "--vm", f"vm7={root}"],
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        try:
            p = wait_prevention(appliance.sock, "vm7", mode="watch")
            assert not p["enabled"] and "not permitted" in p["reason"]
            write_in_child(root / "eicar.com", EICAR)
            assert open_in_child(root / "eicar.com") == ["OK"]  # not held...
            wait_for(lambda: ("vm7", "eicar.com") in appliance.verdict_paths(), 60)  # ...seen
            out = run("status", "--appliance", appliance.sock)
            assert "prevention unavailable" in out.stdout, out.stdout
        finally:
            shim.send_signal(signal.SIGTERM)
            shim.wait(30)
    finally:
        appliance.stop()
    text = log.read_text()
    assert text.count("prevention unavailable") == 1 and "watch mode only" in text
