"""Bounded fuzzing of every signature parser (.ndb .hdb .hsb .ldb): any text gives a PatternDB
that a Matcher can be built from, or a SignatureError naming file and line; never any other
exception (issue 14). ``OFFSCAN_FUZZ_EXAMPLES`` raises the example count (``make fuzz``)."""

from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from offscan import Matcher, PatternDB
from offscan.signatures import SignatureError

EXAMPLES = int(os.environ.get("OFFSCAN_FUZZ_EXAMPLES", "300"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

HUGE = "9" * 4400  # more digits than int() converts (sys.int_info.str_digits_check_threshold)
_hex_byte = st.sampled_from(["aa", "4F", "00", "ff", "9c", "??", "a?", "?b", "e7", "31"])
_token = st.one_of(
    _hex_byte,
    _hex_byte,
    _hex_byte,
    st.sampled_from(
        ["*", "{5}", "{-3}", "{2-}", "{1-4}", "[1-2]", "(aa|bb)", "!(cc|dd)", "(B)", "{", "(", "!"]
    ),
    st.builds(lambda n: "{" + n + "}", st.sampled_from(["0", "7", HUGE, "9-1", "-", ""])),
    st.text(alphabet="0123456789abcdef?*{}[]()!|-x \x85", max_size=3),
)
_run = st.lists(st.sampled_from(["aa", "4f", "9c", "e7", "31", "0b"]), min_size=2, max_size=5)
_inner = st.sampled_from(["", "??", "a?", "(aa|bb)", "!(cc|dd)", "?c"])
_piece = st.builds(lambda r, i, r2: "".join(r) + i + "".join(r2), _run, _inner, _run)
_gap = st.sampled_from(["*", "{5}", "{-3}", "{2-}", "{1-4}", "[1-2]"])
_valid_hexsig = st.builds(
    lambda first, rest: first + "".join(g + p for g, p in rest),
    _piece,
    st.lists(st.tuples(_gap, _piece), max_size=3),
)
_hexsig = st.one_of(
    _valid_hexsig, _valid_hexsig, st.lists(_token, min_size=0, max_size=14).map("".join)
)
_number = st.one_of(
    st.integers(0, 300).map(str),
    st.integers(0, 300).map(str),
    st.sampled_from(["", "x", "-1", "\u00b2", HUGE, "1" * 19, "1" * 20]),
)
_offset = st.one_of(
    st.sampled_from(["*", "0", "EP+0", "EOF-", "S1+4", "VI"]),
    st.builds(lambda a, b: f"{a},{b}", _number, _number),
    st.builds(lambda a: f"EOF-{a}", _number),
    _number,
)
_name = st.sampled_from(["Sig", "Sig", "Sig", "", "X.Y-1", "N\x85L", "a b"])


def _ndb_line() -> st.SearchStrategy[str]:
    target = st.one_of(st.just("0"), st.just("0"), _number)
    fields = st.tuples(_name, target, _offset, _hexsig, st.lists(_number, max_size=3))
    return fields.map(lambda f: ":".join([f[0], f[1], f[2], f[3], *f[4]]))


def _hash_line() -> st.SearchStrategy[str]:
    digest = st.sampled_from(["a" * 32, "B" * 40, "c" * 64, "z" * 32, "a" * 31, "aa " * 10 + "aa"])
    size = st.one_of(_number, st.just("*"))
    fields = st.tuples(digest, size, _name, st.lists(_number, max_size=2))
    return fields.map(lambda f: ":".join([f[0], f[1], f[2], *f[3]]))


_expr_piece = st.sampled_from(
    ["0", "1", "2", "&", "|", "(", ")", "=", ">", "<", ",", "0&1", "(0|1)>1,2", "2=0", HUGE]
)
_GOOD_EXPR = ["0", "0&1", "0|1", "(0|1)>1,2", "0&1=0", "0>2", "(0&1)=2", "1|0<3", "0&1|2"]
_tdb = st.lists(
    st.sampled_from(
        [
            "Target:0",
            "Target:0",
            "Target:0",
            "Target:1",
            "Engine:81-255",
            "Engine:300-400",
            f"Engine:{HUGE}-1",
            "FileSize:10-9000",
            f"FileSize:0-{HUGE}",
            "Container:CL_TYPE_ANY",
            "Container:CL_TYPE_ZIP",
            "EntryPoint:0-9",
            "Foo:1",
            "Target",
            "",
        ]
    ),
    max_size=4,
).map(",".join)
_modifiers = st.sampled_from(
    ["", "", "", "::i", "::w", "::wa", "::f", "::fi", "::a", "::q", "::", ":x:i"]
)
_good_modifiers = st.sampled_from(["", "::i", "::w", "::wa", "::f", "::fi", "::a"])
_subsig = st.one_of(
    st.builds(lambda h, m: h + m, _valid_hexsig, _good_modifiers),
    st.builds(lambda h, m: h + m, _valid_hexsig, _good_modifiers),
    st.builds(lambda h, m: h + m, _hexsig, _modifiers),
    st.builds(lambda o, h, m: f"{o}:{h}{m}", _offset, _hexsig, _modifiers),
    st.sampled_from(["${6-7}12$", "0/abc/", "0(>>5#hb2#=42)", "fuzzy_img#0123456789abcdef"]),
)


def _ldb_line() -> st.SearchStrategy[str]:
    def line(name: str, tdb: str, expr: str, subsigs: list[str]) -> str:
        return ";".join([name, tdb, expr, *subsigs])

    fuzz_expr = st.lists(_expr_piece, max_size=8).map("".join)
    fuzzed = st.builds(line, _name, _tdb, fuzz_expr, st.lists(_subsig, min_size=1, max_size=3))

    def consistent_line(name: str, tdb: str, expr: str, subsigs: list[str]) -> str:
        return line(name, tdb, expr, subsigs[: max(map(int, re.findall("[0-9]", expr))) + 1])

    consistent = st.builds(
        consistent_line,
        _name,
        st.one_of(st.just("Target:0"), _tdb),
        st.sampled_from(_GOOD_EXPR),
        st.lists(_subsig, min_size=3, max_size=3),
    )
    return st.one_of(consistent, consistent, fuzzed)


def _text(line: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    junk = st.one_of(st.text(max_size=60), st.sampled_from(["", "# comment \x85\x0c", "  "]))
    lines = st.lists(st.one_of(line, line, line, line, line, junk), min_size=1, max_size=3)
    return lines.map("\n".join)


def _check(name: str, text: str) -> None:
    try:
        db = PatternDB.from_text([(name, text)])
    except SignatureError as exc:
        assert re.match(rf"{re.escape(name)}:\d+: ", str(exc)), str(exc)
        event("SignatureError")
        return
    event(f"loaded {db.plain_body} body, {len(db.logical)} logical, {len(db.hashes)} hash")
    Matcher(db, impl="py").scan_bytes(b"\0aa\x4f\x9c" * 8)


@SETTINGS
@given(_text(_ndb_line()))
def test_fuzz_ndb(text: str) -> None:
    _check("f.ndb", text)


@SETTINGS
@given(_text(_hash_line()), st.sampled_from(["f.hdb", "f.hsb"]))
def test_fuzz_hash_databases(text: str, name: str) -> None:
    _check(name, text)


@SETTINGS
@given(_text(_ldb_line()))
def test_fuzz_ldb(text: str) -> None:
    _check("f.ldb", text)


@SETTINGS
@given(st.text(max_size=300), st.sampled_from(["f.ndb", "f.hdb", "f.hsb", "f.ldb"]))
def test_fuzz_any_text(text: str, name: str) -> None:
    _check(name, text)
