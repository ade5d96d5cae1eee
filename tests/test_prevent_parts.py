"""The parts of on-access prevention that need no fanotify: the shim's identity memo, the
policy keys, the ``report`` frame and how the appliance takes it, the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import run

from offscan import protocol as P
from offscan.appliance.registry import _prevention_stats
from offscan.policy import PolicyError, validate
from offscan.shim.fanotify import FanotifyGroup
from offscan.shim.prevent import IdentityMemo


def ident(n: int) -> tuple[int, int, int, int, int]:
    return (1, n, 10, 100, 100)


def test_memo_answers_what_it_was_told_for_the_current_version() -> None:
    memo = IdentityMemo(4)
    memo.observe_version("v1")
    memo.put(ident(1), True, "v1")
    memo.put(ident(2), False, "v1")
    assert memo.get(ident(1)) is True and memo.get(ident(2)) is False
    assert memo.get(ident(3)) is None
    assert memo.get((1, 1, 11, 100, 100)) is None  # another size: another identity


def test_memo_is_bounded_least_recently_used_first() -> None:
    memo = IdentityMemo(3)
    memo.observe_version("v")
    for n in range(3):
        memo.put(ident(n), True, "v")
    assert memo.get(ident(0)) is True  # now the most recent
    memo.put(ident(3), True, "v")
    assert len(memo) == 3
    assert memo.get(ident(1)) is None and memo.get(ident(0)) is True


def test_a_new_pattern_version_empties_the_memo_and_old_verdicts_are_not_stored() -> None:
    memo = IdentityMemo()
    assert memo.observe_version("v1") is True
    memo.put(ident(1), True, "v1")
    assert memo.observe_version("v1") is False and memo.get(ident(1)) is True
    assert memo.observe_version(None) is False  # no news
    assert memo.observe_version("v2") is True
    assert memo.get(ident(1)) is None and memo.invalidations == 1
    memo.put(ident(1), True, "v1")  # a late verdict of the old patterns
    assert memo.get(ident(1)) is None
    memo.put(ident(1), False, "v2")
    assert memo.get(ident(1)) is False


def test_policy_keys_for_prevention() -> None:
    assert validate({"prevention": True, "prevention_timeout": 2}) == {
        "prevention": True,
        "prevention_timeout": 2.0,
    }
    assert validate({"prevention": "yes"}) == {"prevention": True}  # policy set vm k=v
    assert validate({"prevention": "off"}) == {"prevention": False}
    for bad in ({"prevention": "maybe"}, {"prevention": 1}):
        with pytest.raises(PolicyError, match="prevention: expected true or false"):
            validate(bad)
    for bad_timeout in (0, -1, 601, "soon"):
        with pytest.raises(PolicyError, match="prevention_timeout"):
            validate({"prevention_timeout": bad_timeout})


def _stats(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "enabled": True,
        "mode": "mount",
        "reason": None,
        "held": 0,
        "allowed": 5,
        "denied": 1,
        "timeouts": 0,
        "unreachable": 0,
        "memo_hits": 3,
        "exempt": 2,
    }
    return {**base, **over}


def test_report_frame_is_validated() -> None:
    P.validate({"t": "report", "id": 1, "vms": {"vm": _stats()}})
    with pytest.raises(P.ProtocolError, match="missing required field 'vms'"):
        P.validate({"t": "report", "id": 1})
    with pytest.raises(P.ProtocolError, match="report.vms"):
        P.validate({"t": "report", "id": 1, "vms": ["vm"]})


@pytest.mark.parametrize(
    "bad",
    [
        "not a map",
        _stats(allowed=-1),
        _stats(denied=True),  # a bool is not a count
        _stats(mode="sometimes"),
        _stats(enabled="yes"),
        _stats(reason=7),
        {k: v for k, v in _stats().items() if k != "held"},
    ],
)
def test_the_appliance_keeps_only_well_formed_reports(bad: Any) -> None:
    assert _prevention_stats(bad) is None


def test_the_appliance_keeps_known_keys_only() -> None:
    kept = _prevention_stats({**_stats(), "extra": "x" * 10_000, "reason": "r" * 1000})
    assert kept is not None and "extra" not in kept and len(kept["reason"] or "") == 300


def test_bad_prevent_timeout_is_a_one_line_error() -> None:
    out = run(
        "shim", "--appliance", "/nonexistent.sock", "--vm", "a=/tmp", "--prevent-timeout", "0"
    )
    assert out.returncode == 2 and "--prevent-timeout" in out.stderr
    assert "Traceback" not in out.stderr


def test_group_close_is_idempotent_and_wake_ends_a_read() -> None:
    try:
        group = FanotifyGroup()
    except OSError as exc:
        pytest.skip(f"fanotify unavailable: {exc}")
    try:
        group.wake()
        assert group.read(30.0) == []  # woken, not timed out: returns at once
    finally:
        group.close()
    group.close()
    assert group.closed


def test_a_real_appliance_takes_reports_for_its_vms_only(tmp_path: Path) -> None:
    import asyncio

    from helpers import ApplianceProc

    from offscan.protocol import ApplianceClient
    from offscan.protocol import messages as M

    root = tmp_path / "vm"
    root.mkdir()
    appliance = ApplianceProc(tmp_path)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        owner = ApplianceClient(str(appliance.sock), shim_id="owner")
        other = ApplianceClient(str(appliance.sock), shim_id="other")
        await owner.connect()
        await other.connect()
        try:
            await owner.register("vm", str(root))
            reply = await owner.request(
                {"t": "report", "vms": {"vm": _stats(), "ghost": _stats(), "bad": 3}}
            )
            # Another shim cannot overwrite the owner's numbers.
            await other.request({"t": "report", "vms": {"vm": _stats(allowed=999)}})
            status = await owner.status()
            return reply, status, dict(status["vms"][0])
        finally:
            await owner.close()
            await other.close()

    try:
        reply, status, vm = asyncio.run(scenario())
    finally:
        appliance.stop()
    assert reply["vms"] == 1 and reply["pattern_version"] == status["pattern_version"]
    p = vm["prevention"]
    assert set(p) == set(M.PreventionStats.__required_keys__)
    assert p == _stats()  # the owner's report, not the other shim's
