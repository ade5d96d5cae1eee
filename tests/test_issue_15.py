"""Issue 15: a client that keeps all its credits in use with single ``scan`` frames of new
content was refused ("more than 256 outstanding scans") and lost its connection: a scan task
that had sent its reply still counted as outstanding while its send's own task (``wait_for``)
finished, and the client, which had read the reply, had already used the credit again."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from helpers import ApplianceProc, run_async

from offscan.protocol import ApplianceClient


def test_single_scans_at_full_credit_are_never_refused(tmp_path: Path, loop: str) -> None:
    root = tmp_path / "vm"
    root.mkdir()
    body = os.urandom(4088)
    a = ApplianceProc(tmp_path, "--loop", loop)
    try:

        async def main() -> tuple[int, list[str], int]:
            c = ApplianceClient(str(a.sock), shim_id="full")
            await c.connect()
            try:
                await c.register("vm", str(root))
                credits = c.credits
                names = [f"f{i}" for i in range(3 * credits)]
                for i, name in enumerate(names):  # new content: each scan takes the pipeline
                    (root / name).write_bytes(body + i.to_bytes(8, "little"))
                got = await asyncio.gather(*(c.scan_path("vm", n) for n in names))
                return credits, [v["status"] for v in got], c.credits
            finally:
                await c.close()

        credits, statuses, left = run_async(main)
    finally:
        a.stop()
    assert statuses == ["clean"] * 3 * credits
    assert left == credits  # every scan returned its credit
    assert "backpressure" not in a.output()
