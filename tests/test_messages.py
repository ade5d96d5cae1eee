"""The wire contracts agree: the TypedDicts in offscan.protocol.messages, the validation tables
(offscan.protocol.SCHEMAS) and the message tables in docs/protocol.md name the same fields,
the same required ones and the same enumeration values; and what a real appliance sends only
carries documented keys."""

from __future__ import annotations

import asyncio
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
from helpers import EICAR, ApplianceProc

from offscan import protocol as P
from offscan.protocol import messages as M

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
ENVELOPE = M.ENVELOPE_FIELDS
# Shapes inside replies, documented in tables of their own (Counters is spread into status).
NESTED: tuple[Any, ...] = (
    M.VMInfo,
    M.Detection,
    M.Counters,
    M.PatternsSource,
    M.PatternSwap,
    M.PreventionStats,
    M.SharedCacheStatus,
    M.BatchScan,
    M.BatchVerdict,
)
HEADING = re.compile(r"^#+\s+(?:`([^`]+)`|(.+?))\s*$")
SPREAD = re.compile(r"^`\*\*(\w+)`$")
CODE = re.compile(r"`([^`]+)`")


# -- docs/protocol.md, read as data ---------------------------------------------------------


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def doc_tables() -> dict[str, list[dict[str, str]]]:
    """Every table in the doc, by the heading above it (a backticked name, or the title)."""
    tables: dict[str, list[dict[str, str]]] = {}
    name: str | None = None
    header: list[str] | None = None
    for line in DOC.read_text().splitlines():
        heading = HEADING.match(line)
        if heading:
            name, header = heading.group(1) or heading.group(2), None
            continue
        if not line.startswith("|") or name is None:
            header = None if not line.strip() else header
            continue
        cells = _cells(line)
        if header is None:
            header = cells
            assert name not in tables, f"two tables under the heading {name!r}"
            tables[name] = []
        elif not all(set(c) <= set("-: ") for c in cells):
            assert len(cells) == len(header), f"{name}: ragged row {line!r}"
            tables[name].append(dict(zip(header, cells)))
    return tables


TABLES = doc_tables()


def _field(row: dict[str, str]) -> str:
    match = CODE.fullmatch(row["field"])
    assert match, f"field cell {row['field']!r} is not one `name`"
    return match.group(1)


def doc_fields(name: str) -> dict[str, dict[str, str]]:
    """A message's (or shape's) documented fields, ``**Shape`` rows spread into theirs."""
    assert name in TABLES, f"docs/protocol.md has no table under a heading `{name}`"
    out: dict[str, dict[str, str]] = {}
    for row in TABLES[name]:
        spread = SPREAD.match(row["field"])
        if spread:  # the spread row says when its fields are there ("reply" for counters)
            for f, inner in doc_fields(spread.group(1)).items():
                out[f] = {**inner, "required": row["required"]}
        else:
            out[_field(row)] = row
    return out


def doc_required(name: str) -> set[str]:
    return {f for f, row in doc_fields(name).items() if row["required"] == "yes"}


def doc_column(title: str, column: str) -> set[str]:
    assert title in TABLES, f"docs/protocol.md has no table under the heading {title!r}"
    return {CODE.fullmatch(row[column]).group(1) for row in TABLES[title]}  # type: ignore[union-attr]


# -- the types, read as data ----------------------------------------------------------------


def keys(td: Any) -> set[str]:
    return set(td.__required_keys__ | td.__optional_keys__)


def literal_values(tp: Any) -> Iterator[Any]:
    """Every value of every Literal inside ``tp`` (through unions, lists, nesting)."""
    if get_origin(tp) is Literal:
        yield from get_args(tp)
        return
    for arg in get_args(tp):
        yield from literal_values(arg)


def typed_dicts_in(tp: Any) -> Iterator[Any]:
    if typing.is_typeddict(tp):
        yield tp
    for arg in get_args(tp):
        yield from typed_dicts_in(arg)


# -- types ⇄ schemas ⇄ docs ------------------------------------------------------------------


def test_every_message_type_has_types_a_schema_and_a_table() -> None:
    assert set(get_args(M.MessageType)) == set(M.MESSAGES) == set(P.SCHEMAS) == P.MESSAGE_TYPES
    for t, variants in M.MESSAGES.items():
        for td in variants:
            assert typing.get_type_hints(td)["t"] == Literal[t], td
        assert t in TABLES, f"no table for message {t!r} in docs/protocol.md"


@pytest.mark.parametrize("t", sorted(M.MESSAGES))
def test_fields_agree(t: str) -> None:
    variants = M.MESSAGES[t]  # type: ignore[index]
    typed = set().union(*(keys(td) for td in variants)) - ENVELOPE
    schema = set(P.SCHEMAS[t].fields)
    documented = set(doc_fields(t)) - ENVELOPE
    assert typed == schema, f"{t}: TypedDict vs schema: {typed ^ schema}"
    assert documented == schema, f"{t}: docs vs schema: {documented ^ schema}"


@pytest.mark.parametrize("t", sorted(M.MESSAGES))
def test_required_fields_agree(t: str) -> None:
    variants = M.MESSAGES[t]  # type: ignore[index]
    # A field is required of the message when every variant requires it (scan's size is
    # required in stream mode only, the status reply's keys only in the reply).
    typed = set.intersection(*(set(td.__required_keys__) for td in variants)) - ENVELOPE
    assert typed == set(P.SCHEMAS[t].required)
    assert doc_required(t) == typed


@pytest.mark.parametrize("td", NESTED, ids=lambda td: td.__name__)
def test_nested_shapes_agree_with_their_tables(td: Any) -> None:
    assert set(doc_fields(td.__name__)) == keys(td)
    assert doc_required(td.__name__) == set(td.__required_keys__)


def test_every_nested_shape_is_documented() -> None:
    reachable = {
        inner
        for variants in M.MESSAGES.values()
        for td in variants
        for hint in typing.get_type_hints(td).values()
        for inner in typed_dicts_in(hint)
    }
    assert reachable <= set(NESTED), reachable - set(NESTED)


def _documented_rows() -> Iterator[tuple[str, tuple[Any, ...], str, dict[str, str]]]:
    for t, variants in M.MESSAGES.items():
        for f, row in doc_fields(t).items():
            yield t, variants, f, row
    for td in NESTED:
        for f, row in doc_fields(td.__name__).items():
            yield td.__name__, (td,), f, row


def test_enumerated_values_are_listed_in_the_type_column() -> None:
    checked = 0
    for name, variants, f, row in _documented_rows():
        if f in ENVELOPE:
            continue
        values = {v for td in variants for v in literal_values(typing.get_type_hints(td).get(f))}
        listed = set(CODE.findall(row["type"]))
        assert {str(v) for v in values} <= listed, f"{name}.{f}: {values - listed} not listed"
        checked += bool(values)
    assert checked >= 6  # mode, prio, status, action, source, detection action


def test_error_codes_are_documented() -> None:
    codes = set(get_args(M.ErrorCode))
    assert P.ERROR_CODES == codes
    assert "refused" in codes  # the appliance's answer to a declined operator command
    assert doc_column("Error codes", "code") == codes


def test_verdict_sources_are_documented() -> None:
    sources = set(get_args(M.VerdictSource))
    assert sources == set(M.VERDICT_SOURCES) | set(M.SHIM_VERDICT_SOURCES)
    assert doc_column("Verdict sources", "source") == sources


def test_control_operations_are_documented() -> None:
    assert doc_column("Control operations", "op") == set(get_args(M.ControlOp))


def test_enumeration_tuples_follow_their_literals() -> None:
    assert M.SCAN_MODES == get_args(M.ScanMode) == ("path", "fd", "stream")
    assert M.PRIORITIES == ("access", "demand")
    assert M.VERDICT_STATUSES == ("clean", "infected", "error")
    assert M.VERDICT_ACTIONS == ("allow", "deny")


def _verdict(**extra: Any) -> dict[str, Any]:
    return {
        "t": "verdict",
        "id": 1,
        "vm": "v",
        "path": "a",
        "status": "clean",
        "action": "allow",
        **extra,
    }


def test_validation_follows_the_verdict_type() -> None:
    for source in M.VERDICT_SOURCES:
        P.validate(_verdict(source=source))
    with pytest.raises(P.ProtocolError):  # the shim's own, never on the wire
        P.validate(_verdict(source="shim"))
    P.validate(_verdict(quarantine_id="q1", action_errors=["quarantine: no vault"]))
    with pytest.raises(P.ProtocolError):
        P.validate(_verdict(action_errors="quarantine failed"))
    # The status reply's fields are documented, not checked (it is for people).
    P.validate({"t": "status", "id": 1, "uptime": "a while", "vms": None})


# -- what a real appliance sends --------------------------------------------------------------


def _assert_documented(msg: dict[str, Any]) -> None:
    t = msg["t"]
    if t == "ok":  # plus whatever the request reports: checked against its shape instead
        assert "id" in msg
        return
    extra = set(msg) - ENVELOPE - set(doc_fields(t))
    assert not extra, f"{t} carries undocumented keys {extra}"


def _assert_shape(value: dict[str, Any], td: Any, where: str) -> None:
    extra = set(value) - keys(td)
    missing = set(td.__required_keys__) - set(value)
    assert not extra and not missing, f"{where}: extra {extra}, missing {missing}"


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[ApplianceProc]:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[default]\nactions = ["quarantine", "deny"]\n[vm.vm]\nexclude_ext = ["iso"]\n'
    )
    a = ApplianceProc(tmp_path, "--policies", str(policy))
    yield a
    a.stop()


def test_real_appliance_messages_carry_documented_keys(
    appliance: ApplianceProc, tmp_path: Path
) -> None:
    root = tmp_path / "vm"
    root.mkdir()
    (root / "ok.txt").write_text("fine")
    (root / "disk.iso").write_bytes(b"not scanned")
    (root / "eicar.com").write_bytes(EICAR)

    async def run() -> dict[str, Any]:
        c = P.ApplianceClient(str(appliance.sock), shim_id="contracts")
        seen: dict[str, Any] = {"welcome": await c.connect()}
        admin = P.ApplianceClient(P.admin_socket_for(str(appliance.sock)), shim_id="operator")
        await admin.connect()
        try:
            seen["ok"] = await c.register("vm", str(root))
            seen["clean"] = await c.scan_path("vm", "ok.txt")
            seen["cached"] = await c.scan_path("vm", "ok.txt")
            seen["excluded"] = await c.scan_path("vm", "disk.iso")
            with (root / "ok.txt").open("rb") as f:
                seen["streamed"] = await c.scan_stream("vm", "ok.txt", f)
            seen["infected"] = await c.scan_path("vm", "eicar.com")
            for what, op, args in (
                ("unknown-vm", None, {}),
                ("refused", "quarantine-delete", {"id": "no-such-entry"}),
                ("unsupported", "no-such-op", {}),
            ):
                with pytest.raises(P.RequestError) as ei:
                    if op is None:
                        await c.scan_path("ghost", "x")
                    else:
                        await admin.control(op, **args)
                assert ei.value.code == what and ei.value.reply is not None
                seen[what] = ei.value.reply
            seen["vm-show"] = await admin.control("vm-show", name="vm")
            seen["status"] = await admin.status()
            await c.ping()
            return seen
        finally:
            await c.close()
            await admin.close()

    seen = asyncio.run(run())
    for msg in seen.values():
        _assert_documented(msg)
        P.validate(msg)
    assert seen["clean"]["source"] == "scan" and seen["cached"]["source"] == "identity"
    assert seen["excluded"]["source"] == "excluded"
    infected = seen["infected"]
    assert infected["status"] == "infected" and infected["quarantine_id"]
    for name in ("clean", "cached", "excluded", "streamed", "infected"):
        assert seen[name]["source"] in M.VERDICT_SOURCES
        # the appliance sends every verdict field but the two added by actions
        assert keys(M.Verdict) - set(seen[name]) <= {"quarantine_id", "action_errors"}
    for code in ("unknown-vm", "refused", "unsupported"):
        assert seen[code]["code"] in P.ERROR_CODES
    show = {k: v for k, v in seen["vm-show"].items() if k not in ("t", "id")}
    _assert_shape(show, M.VMInfo, "vm-show")

    st = seen["status"]
    _assert_shape(st, M.ApplianceStatus, "status")
    for vm in st["vms"]:
        _assert_shape(vm, M.VMInfo, "status.vms[]")
    assert st["recent_detections"], "the EICAR detection"
    for det in st["recent_detections"]:
        _assert_shape(det, M.Detection, "status.recent_detections[]")
    assert set(st["patterns_source"]) <= keys(M.PatternsSource)
    assert st["last_swap"] is None
