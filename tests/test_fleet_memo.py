"""The identity memo persists across appliance restarts (offscan.cache.memo_log): an appliance
restarted, gracefully or by ``kill -9``, serves known files from the memo and the verdict
cache without reading them again; a changed file is read again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import EICAR, ApplianceProc, run_async

from offscan.cache import Identity
from offscan.cache.memo_log import MEMO_LOG_NAME, PersistentIdentityMemo
from offscan.protocol import ApplianceClient

SIZE = 2 << 20  # bytes per file


async def scan(sock: Path, root: Path, names: list[str]) -> list[str]:
    async with ApplianceClient(str(sock), shim_id="memo-shim") as c:
        await c.register("vm", str(root))
        return [(await c.scan_path("vm", n))["status"] for n in names]


async def counters(sock: Path) -> dict[str, int]:
    async with ApplianceClient(str(sock), shim_id="probe") as c:
        st = await c.status()
    return {k: st[k] for k in ("bytes_read", "served_identity", "contents_matched")}  # type: ignore[literal-required]


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_restart_reads_nothing_again(tmp_path: Path, how: str) -> None:
    root = tmp_path / "vm"
    root.mkdir()
    names = []
    for i in range(4):
        (root / f"big{i}").write_bytes(os.urandom(SIZE))
        names.append(f"big{i}")
    (root / "eicar.com").write_bytes(EICAR)
    names.append("eicar.com")
    a = ApplianceProc(tmp_path)
    try:
        first = run_async(scan(a.sock, root, names))
        assert first == ["clean"] * 4 + ["infected"]
        assert run_async(counters(a.sock))["bytes_read"] >= 4 * SIZE
    finally:
        if how == "kill9":
            a.kill9()
        else:
            a.stop()
    a = ApplianceProc(tmp_path)
    try:
        (root / "big0").write_bytes(os.urandom(SIZE))  # changed while the appliance was away
        again = run_async(scan(a.sock, root, names))
        assert again == first
        c = run_async(counters(a.sock))
        assert c["served_identity"] == 4  # everything but the changed file
        assert c["contents_matched"] == 1
        assert c["bytes_read"] == SIZE  # the changed file, read once: hashed and matched
    finally:
        a.stop()


def test_memo_log_replays_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    d = b"\x11" * 32
    memo = PersistentIdentityMemo(tmp_path)
    idents = [Identity("local", 1, i, 10, 5, 6) for i in range(100)]
    for ident in idents:
        memo.put(ident, d)
    memo.discard(idents[0])
    memo.close()
    with open(tmp_path / MEMO_LOG_NAME, "ab") as f:
        f.write(b"\x40\x00\x00\x00torn")  # a record cut short by a crash
    again = PersistentIdentityMemo(tmp_path)
    try:
        assert len(again) == 99
        assert again.get(idents[0]) is None and again.get(idents[1]) == d
    finally:
        again.close()
    assert (tmp_path / MEMO_LOG_NAME).stat().st_mode & 0o777 == 0o600


def test_memo_put_many_is_one_write_and_replays(tmp_path: Path) -> None:
    """A group's identities (bulk.py) reach the log in one write, and replay as single puts."""
    d = b"\x22" * 32
    memo = PersistentIdentityMemo(tmp_path)
    idents = [Identity("local", 1, i, 10, 5, 6) for i in range(64)]
    before = (tmp_path / MEMO_LOG_NAME).stat().st_size
    memo.put_many([(i, d) for i in idents])
    memo.put_many([])  # nothing to write
    after = (tmp_path / MEMO_LOG_NAME).stat().st_size
    memo.close()
    assert after > before
    again = PersistentIdentityMemo(tmp_path)
    try:
        assert len(again) == 64 and all(again.get(i) == d for i in idents)
    finally:
        again.close()
