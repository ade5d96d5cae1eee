"""The perf regression gate works on the user's own machine: one baseline per machine kind.

Runs the real Makefile targets on one small benchmark, against a baseline directory in
tmp_path. No timing is asserted: the gate is set so loose that only a broken gate fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ONE_BENCH = "bench/test_bench_cache.py -k digest_bytes_1mib"


def make(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, env=env, timeout=600
    )


def machine_id() -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench-machine-id")],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_machine_id_names_cpu_simd_and_python() -> None:
    mid = machine_id()
    assert mid.startswith(os.uname().machine + "-")
    assert any(f"-{simd}-" in mid for simd in ("avx512", "avx2", "scalar"))
    assert mid.endswith(f"py{sys.version_info.major}{sys.version_info.minor}")


def test_compare_without_a_baseline_says_what_to_do(tmp_path: Path) -> None:
    r = make("bench-compare", f"BASELINES={tmp_path}", f"BENCH={ONE_BENCH}")
    assert r.returncode != 0
    assert f"no baseline for this machine ({machine_id()})" in r.stderr
    assert "make bench-baseline" in r.stderr
    assert "INTERNALERROR" not in r.stdout + r.stderr


@pytest.mark.slow
def test_baseline_then_compare_on_this_machine(tmp_path: Path) -> None:
    r = make("bench-baseline", f"BASELINES={tmp_path}", f"BENCH={ONE_BENCH}")
    assert r.returncode == 0, r.stdout + r.stderr
    saved = list((tmp_path / machine_id()).rglob("*baseline.json"))
    assert len(saved) == 1
    # A gate no real run can cross: this checks the gate runs and compares, not the timing.
    r = make("bench-compare", f"BASELINES={tmp_path}", f"BENCH={ONE_BENCH}", "GATE=min:100000%")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "INTERNALERROR" not in r.stdout + r.stderr
    assert "digest_bytes_1mib" in r.stdout
