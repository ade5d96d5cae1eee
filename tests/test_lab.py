"""The lab (``offscan bench``): small real runs of both benches, plus its measuring parts."""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from pathlib import Path

import pytest

from offscan import PatternDB
from offscan.cli import main
from offscan.engine import Matcher
from offscan.lab import (
    EICAR,
    TOOL_MARKER,
    V2_SIGNATURE,
    ContentMaker,
    EventTail,
    InotifyBudget,
    LabError,
    VerdictTracker,
    build_signatures,
    consolidation,
    fit_line,
    measure,
    plan_image,
    read_proc,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    """A complete PNG: signature, an IHDR of non-zero size, chunks with good CRCs, IEND."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind!r}"
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND", kinds
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


# ------------------------------------------------------------------ parts


def test_image_plan_is_deterministic_mixed_and_shared_as_asked():
    a, b = plan_image(200, shared=0.8, seed=3), plan_image(200, shared=0.8, seed=3)
    assert a == b
    assert len({f.relpath for f in a}) == 200
    assert {f.kind for f in a} >= {"config", "text", "binary", "log"}
    assert sum(f.shared for f in a) == 160
    assert min(f.size for f in a) < 8 << 10 < 256 << 10 < max(f.size for f in a)
    assert plan_image(200, seed=4) != a
    with pytest.raises(LabError):
        plan_image(10, shared=1.5)


def test_content_is_deterministic_and_per_key():
    maker = ContentMaker(1)
    assert maker.make("text", 5000, "k") == maker.make("text", 5000, "k")
    assert maker.make("text", 5000, "k") != maker.make("text", 5000, "other")
    binary = maker.make("binary", 40_000, "b")
    assert binary.startswith(b"\x7fELF") and len(binary) == 40_000


def test_signatures_load_detect_eicar_and_v2_detects_the_shared_tool():
    v1 = build_signatures(300, seed=2)
    v2 = build_signatures(300, seed=2, version=2)
    assert v1 == build_signatures(300, seed=2)
    db1 = PatternDB.from_text((n, "\n".join(ls)) for n, ls in v1.items())
    db2 = PatternDB.from_text((n, "\n".join(ls)) for n, ls in v2.items())
    assert db1.signature_count == 301 and db2.signature_count > db1.signature_count
    tool = b"\x7fELF" + os.urandom(5000) + TOOL_MARKER + os.urandom(100)
    m1, m2 = Matcher(db1), Matcher(db2)
    assert m1.scan_bytes(EICAR).infected
    assert not m1.scan_bytes(tool).infected
    assert m2.scan_bytes(tool).matches == (V2_SIGNATURE,)
    assert not m1.scan_bytes(ContentMaker(2).make("binary", 300_000, "x")).infected


def test_read_proc_measures_this_process():
    st = read_proc(os.getpid(), pss=True)
    assert st is not None
    assert st.cpu > 0 and st.cpu == pytest.approx(st.cpu_user + st.cpu_sys)
    assert st.hwm >= st.rss > 0 and st.pss > 0 and st.rchar > 0
    assert read_proc(2**22 + 1) is None  # no such pid


def test_event_tail_reads_only_complete_new_lines(tmp_path):
    log = tmp_path / "events.jsonl"
    tail = EventTail(log)
    assert tail.read() == []
    log.write_text('{"a": 1}\n{"b"')
    assert tail.read() == [{"a": 1}]
    with open(log, "a") as f:
        f.write(": 2}\n")
    assert tail.read() == [{"b": 2}]


def test_verdict_tracker_first_and_complete():
    tr = VerdictTracker({"vm1": ["a", "b"], "vm2": ["a"]})

    def v(vm, path, t, status="clean", source="scan"):
        return {
            "event": "verdict",
            "vm": vm,
            "path": path,
            "time": t,
            "status": status,
            "source": source,
        }

    tr.feed(
        [v("vm1", "a", 10.0), {"event": "refused", "vm": "vm1"}, v("vm2", "a", 11.0, "infected")]
    )
    assert not tr.complete and tr.first == {"vm1": 10.0, "vm2": 11.0} and tr.done == {"vm2": 11.0}
    tr.feed([v("vm1", "b", 12.0), v("vm1", "b", 13.0)])
    assert tr.complete and tr.done["vm1"] == 12.0 and tr.verdicts == 4
    assert tr.infected == {("vm2", "a"): []}
    tr.expect("vm3", ["x"])
    assert not tr.complete and tr.total == 4


def test_verdict_tracker_counts_verdicts_logged_before_the_vm_was_expected():
    """A clone's inherited verdicts are logged while the appliance registers it: the lab can
    read them before the vm-clone reply tells it to expect that clone."""
    tr = VerdictTracker({})
    ev = [
        {"event": "verdict", "vm": "c1", "path": p, "time": t, "status": "clean", "source": "clone"}
        for p, t in (("a", 5.0), ("b", 6.0), ("a", 7.0))
    ]
    tr.feed(ev)
    assert tr.complete and tr.verdicts == 3 and tr.first == {}
    tr.expect("c1", ["a", "b", "c"])
    assert not tr.complete and tr.missing == 1 and tr.total == 3
    assert tr.first == {"c1": 5.0} and "c1" not in tr.done
    tr.feed(
        [
            {
                "event": "verdict",
                "vm": "c1",
                "path": "c",
                "time": 9.0,
                "status": "clean",
                "source": "scan",
            }
        ]
    )
    assert tr.complete and tr.done == {"c1": 9.0} and tr.seen[("c1", "a")] == 5.0
    tr.feed(ev[:1])
    tr.expect("c2", ["a"])  # nothing logged for c2 yet
    assert not tr.complete
    tr.expect("c3", [])
    tr.feed(
        [
            {
                "event": "verdict",
                "vm": "c4",
                "path": "z",
                "time": 3.0,
                "status": "clean",
                "source": "clone",
            }
        ]
    )
    tr.expect("c4", ["z"])
    assert tr.done["c4"] == 3.0 and tr.missing == 1


def test_fit_and_consolidation_arithmetic():
    fit = fit_line([1, 10, 100], [5.0, 14.0, 104.0])
    assert fit["a"] == pytest.approx(4.0) and fit["b"] == pytest.approx(1.0)
    assert fit_line([10], [20.0]) == {"a": 0.0, "b": 2.0, "method": "one point: proportional"}
    fits = {
        "agentless": {"cpu_s": {"a": 10.0, "b": 0.1}, "mem": {"a": 100.0, "b": 1.0}},
        "agent": {"cpu_s": {"a": 0.0, "b": 1.0}, "mem": {"a": 0.0, "b": 50.0}},
    }
    cons = consolidation(fits, {"cpu_s": 60.0, "mem_bytes": 2000.0}, max_n=100)
    assert cons["agentless"]["n_cpu"] == 500 and cons["agentless"]["n_mem"] == 1900
    assert cons["agentless"]["n_fit"] == 500 and cons["agentless"]["limited_by"] == "cpu"
    assert cons["agentless"]["extrapolated"]
    assert cons["agent"] == {
        "n_cpu": 60,
        "n_mem": 40,
        "n_fit": 40,
        "limited_by": "memory",
        "extrapolated": False,
    }
    assert cons["ratio"] == pytest.approx(12.5)
    s = summarize([1.0, 2.0, 3.0])
    assert s["p50"] == 2.0 and s["max"] == 3.0 and summarize([])["p99"] is None


def test_inotify_budget_refuses_with_an_actionable_message(monkeypatch):
    # the instances in use are the host's (other tests' shims, other programs): read once and
    # held, so the budget arithmetic is checked against a fixed count
    used = measure.inotify_in_use()
    monkeypatch.setattr(measure, "inotify_in_use", lambda: used)
    limit = used + 1 + measure.INOTIFY_MARGIN
    monkeypatch.setattr(InotifyBudget, "limit", staticmethod(lambda: limit))
    with pytest.raises(LabError, match=f"max_user_instances is {limit} and {used} are in use"):
        InotifyBudget().ensure(2, allow_raise=False)
    InotifyBudget().ensure(1, allow_raise=False)


# ------------------------------------------------------------------ real runs


def _runs(results):
    return {(r["setup"], r["n"]): r for r in results["runs"]}


def test_agent_vs_agentless_boot_storm_small_real_run(tmp_path):
    out = tmp_path / "report"
    rc = main(
        [
            "bench",
            "agent-vs-agentless",
            "--vms",
            "3",
            "--points",
            "1,3",
            "--files",
            "20",
            "--sigs",
            "300",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    for name in (
        "report.md",
        "results.json",
        "cost_per_vm.png",
        "consolidation.png",
        "time_to_protect.png",
    ):
        assert (out / name).exists(), name
    for png in out.glob("*.png"):
        assert_png(png)
    results = json.loads((out / "results.json").read_text())
    runs = _runs(results)
    assert set(runs) == {("agentless", 1), ("agent", 1), ("agentless", 3), ("agent", 3)}
    for (setup, n), run in runs.items():
        boot = run["boot"]
        assert boot["complete"] and boot["missing"] == 0, (setup, n)
        expected = n * 20 + 1  # 20 files per VM, EICAR in the first VM
        assert boot["expected"] == expected
        c = boot["counters"]
        assert c["verdicts"] >= expected and c["errors"] == 0
        assert c["detections"] == 1 and boot["detections"] == [
            "vm-000:home/user/Downloads/eicar.com"
        ]
        assert boot["processes"] == (2 if setup == "agentless" else n)
        assert (
            boot["cpu_s"] > 0 and boot["hwm_sum"] > 0 and boot["pss_sum"] > 0 and boot["rchar"] > 0
        )
        assert all(p["cpu_s"] > 0 and p["hwm"] > 0 for p in boot["per_process"].values())
        for ref in ("from_launch", "from_registration"):
            t = boot[ref]
            assert t["first_verdict_s"]["n"] == n and t["all_files_s"]["n"] == n
            assert 0 <= t["first_verdict_s"]["p50"] <= t["all_files_s"]["p99"]
        assert (
            c["contents_matched"] + c["served_from_cache"] + c["joined_in_flight"] == c["verdicts"]
        )
    for n in (1, 3):
        al, ag = runs[("agentless", n)]["boot"]["counters"], runs[("agent", n)]["boot"]["counters"]
        assert al["contents_matched"] <= ag["contents_matched"]
        assert ag["contents_matched"] == n * 20 + 1 and ag["served_from_cache"] == 0
        assert ag["pattern_versions"] == al["pattern_versions"]
    # 16 of 20 files are identical on every VM: agentless matches them once
    assert runs[("agentless", 3)]["boot"]["counters"]["contents_matched"] == 16 + 3 * 4 + 1
    cons = results["analysis"]["consolidation"]
    assert cons["agent"]["n_fit"] is not None and cons["agent"]["limited_by"] in ("cpu", "memory")
    # with N <= 3 the agentless cost is nearly all fixed: its fit may be flat (no VM count
    # exhausts the budget), else it must fit more VMs than agents
    assert cons["ratio"] is None or cons["ratio"] > 1
    assert fit_line([1, 3], [1.27, 1.01])["b"] == 0.0
    report = (out / "report.md").read_text()
    assert "## Summary" in report and "![consolidation.png](consolidation.png)" in report
    assert not Path(results["meta"]["work"]).exists()  # the VMs and scanner state are gone


@pytest.mark.parametrize("workload", ["steady", "update", "clone-storm"])
def test_other_workloads_small_real_runs(tmp_path, workload):
    out = tmp_path / workload
    extra = {"steady": ["--duration", "2", "--rate", "2"], "update": [], "clone-storm": []}[
        workload
    ]
    rc = main(
        [
            "bench",
            "agent-vs-agentless",
            "--points",
            "2",
            "--files",
            "10",
            "--sigs",
            "200",
            "--workload",
            workload,
            "-o",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    runs = _runs(results)
    for png in out.glob("*.png"):
        assert_png(png)
    al, ag = runs[("agentless", 2)], runs[("agent", 2)]
    if workload == "steady":
        for r in (al, ag):
            s = r["steady"]
            assert s["complete"] and s["writes"] > 0
            assert s["write_to_verdict_s"]["n"] == s["writes"]
        assert al["steady"]["writes"] == ag["steady"]["writes"]  # same schedule
    elif workload == "update":
        assert (out / "update.png").exists()
        for r, points in ((al, 1), (ag, 2)):
            u = r["update"]
            assert u["complete"] and u["scanning_points"] == points
            assert u["counters"]["pattern_versions"] == ["2"]
            assert u["update_bytes"] > 0 and u["all_points_on_v2_s"] > 0
            assert u["all_vms_reported_s"] is not None  # the newly detected file, on every VM
        assert ag["update"]["update_bytes"] == pytest.approx(
            2 * al["update"]["update_bytes"], rel=0.1
        )
        assert (
            al["update"]["counters"]["contents_matched"] == 0
        )  # revalidated by the delta, not rescanned
    else:
        for r in (al, ag):
            cs = r["clone_storm"]
            assert cs["complete"] and cs["time_to_protect"]["first_verdict_s"]["n"] == 2
            assert cs["time_to_protect"]["vms_without_verdict"] == 0
        assert al["clone_storm"]["verdict_sources"] == {"clone": 20}  # inherited, never read
        assert al["clone_storm"]["counters"]["contents_matched"] == 0
        assert ag["clone_storm"]["counters"]["contents_matched"] == 20


def test_clone_storm_small_real_run(tmp_path):
    out = tmp_path / "storm"
    rc = main(
        ["bench", "clone-storm", "--clones", "10", "--files", "20", "--sigs", "200", "-o", str(out)]
    )
    assert rc == 0
    for name in ("report.md", "results.json", "time_to_protect.png", "limits.png"):
        assert (out / name).exists(), name
    for png in out.glob("*.png"):
        assert_png(png)
    s = json.loads((out / "results.json").read_text())["storm"]
    assert s["complete"] and s["clones"] == 10 and len(s["per_clone"]) == 10
    t = s["time_to_protect"]
    assert (
        t["first_verdict_s"]["n"] == 10
        and t["all_files_s"]["n"] == 10
        and t["vms_without_verdict"] == 0
    )
    assert 0 < t["first_verdict_s"]["p50"] <= t["first_verdict_s"]["max"] <= t["all_files_s"]["max"]
    assert all(c["registered"] <= c["handed_to_shim"] <= c["activated"] for c in s["per_clone"])
    assert s["verdict_sources"] == {"clone": 200}  # served from the master's verdicts, unread
    assert s["counters"]["contents_matched"] == 0 and s["counters"]["bytes_read"] == 0
    assert s["cloning"]["files"] == 200 and s["cloning"]["inherited"] == 200
    assert not math.isnan(s["throughput"]["verdicts_per_s"])
    report = (out / "report.md").read_text()
    assert "What limits it" in report and "Goal p99 < 1 s" in report
