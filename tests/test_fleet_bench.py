"""``offscan bench fleet``, small and real: three appliance processes and a real redis-server
protect clone VMs of one master isolated, with the shared tier, and through a failover."""

from __future__ import annotations

import json
from pathlib import Path

from fleet_support import needs_redis
from helpers import run

pytestmark = needs_redis


def test_fleet_bench_small_real_run(tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["bench", "fleet", "--hosts", "3", "--vms", "2", "--files", "15", "--sigs", "200"]
    done = run(*args, "-o", out, "--work", tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("report.md", "results.json", "fleet.png"):
        assert (out / name).exists(), name
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    assert set(runs) == {"isolated", "shared", "failover"}
    for r in runs.values():
        assert r["complete"] and r["verdicts_lost"] == 0, r["mode"]
    iso = runs["isolated"]["counters"]["total"]
    shared = runs["shared"]["counters"]["total"]
    contents = shared["contents_matched"]
    assert iso["contents_matched"] > contents  # each host matched the master on its own
    assert iso["round_trips"] == 0 and shared["round_trips"] > 0
    assert shared["hits"] + shared["served_by_peer"] > 0
    assert runs["failover"]["failovers"] >= 1
    assert runs["failover"]["time_to_resume_s"] is not None
    report = (out / "report.md").read_text()
    assert "verdicts lost | 0" in report
