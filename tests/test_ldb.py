"""Logical signatures (.ldb): parsing, refusals, and matching through both matcher cores.

The semantics asserted here were checked against clamscan 1.4.6 (``--allmatch``) on binary
files; tests/test_parity_clamav.py compares generated .ldb databases with clamscan itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import make_db

from offscan import Matcher, PatternDB
from offscan.signatures import SignatureError
from offscan.signatures.ldb import Both, Count, Either, Sub
from offscan.signatures.logic import LogicalIndex

A = bytes.fromhex("91a3f708c4")
B = bytes.fromhex("22334455e6")
C = bytes.fromhex("c0ffee0b1e")
E = "Engine:81-255,Target:0"


def ldb(*lines: str) -> PatternDB:
    return make_db("\n".join(lines), name="t.ldb")


def scan(impl: str, lines: list[str], data: bytes) -> tuple[str, ...]:
    m = Matcher(ldb(*lines), impl=impl, window_size=64)
    return m.scan_bytes(b"\0\0\0\0" + data + b"\0\0\0\0").matches


def fill(*chunks: bytes) -> bytes:
    return b"\x80\x81".join(chunks)


# -- parsing ---------------------------------------------------------------------------------


def test_expression_tree_and_subsig_bodies() -> None:
    db = ldb(f"S;Target:0;(0&1)|2>1,2;{A.hex()};{B.hex()};{C.hex()}")
    (lg,) = db.logical
    assert lg.expression == Either((Both((Sub(0), Sub(1))), Count(Sub(2), ">", 1, 2)))
    assert lg.subsigs == 3 and lg.source == "t.ldb:1"
    assert [sub for _, sub, _ in lg.bodies] == [0, 1, 2]
    assert [db.body[i].all_hits for i, _, _ in lg.bodies] == [False, False, True]
    assert db.plain_body == 0 and db.signature_count == 1
    assert "0 body, 1 logical and 0 hash signatures" in db.summary()


def test_mixed_operators_group_to_the_right_like_clamav() -> None:
    (lg,) = ldb(f"S;Target:0;0&1|2;{A.hex()};{B.hex()};{C.hex()}").logical
    assert lg.expression == Both((Sub(0), Either((Sub(1), Sub(2)))))


def test_other_targets_and_unsupported_features_are_not_applied() -> None:
    db = ldb(
        f"PE;Target:1;0;{A.hex()}",
        f"Zip;Engine:51-255,Target:0,Container:CL_TYPE_ZIP;0;{A.hex()}",
        f"New;Engine:300-400,Target:0;0;{A.hex()}",
        f"Pcre;{E};0&1;{A.hex()};0/ab+c/",
        f"Macro;{E};0&1;{A.hex()};${{6-7}}12$",
        f"Odd;Engine:51-255,Target:0,Foo:1-2;0;{A.hex()}",
        f"Wf;{E};0;4:{A.hex()}::wf",
        f"Ok;Engine:51-255,Target:0,Container:CL_TYPE_ANY;0;{A.hex()}",
    )
    assert [lg.name for lg in db.logical] == ["Ok"]
    reasons = {n.name: n.reason for n in db.not_applied}
    assert reasons == {
        "PE": "target type 1 not applied",
        "Zip": "container CL_TYPE_ZIP not unpacked",
        "New": "needs functionality level 300",
        "Pcre": "PCRE subsignatures not supported",
        "Macro": "macro subsignatures not supported",
        "Odd": "unknown attribute Foo",
        "Wf": "fullword wide (::wf) with an offset not supported",
    }


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("S;Target:0;0", "expected Name;TargetDescriptionBlock"),
        (f";Target:0;0;{A.hex()}", "empty signature name"),
        (f"S;Engine:51-255;0;{A.hex()}", "no Target"),
        (f"S;Target:0,Engine:51-255;0;{A.hex()}", "Engine must be the first attribute"),
        (f"S;Target:0,FileSize:1-9;0;{A.hex()}", "needs Engine:51"),
        (f"S;Engine:51-255,Target:0,FileSize:9;0;{A.hex()}", "expected a range min-max"),
        (f"S;Engine:51-255,Target:0,FileSize:9-1;0;{A.hex()}", "min > max"),
        (f"S;Engine:51-255,Target:0,EntryPoint:0-9;0;{A.hex()}", "needs an executable target"),
        (f"S;Target:0;0&1;{A.hex()}", "1 subsignatures but the expression refers to"),
        (f"S;Target:0;0;{A.hex()};{B.hex()}", "2 subsignatures but"),
        (f"S;Target:0;(0&1;{A.hex()};{B.hex()}", "unbalanced '('"),
        (f"S;Target:0;0&;{A.hex()}", "ends where a subsignature was expected"),
        (f"S;Target:0;0>;{A.hex()}", "expected a number after >"),
        (f"S;Target:0;0 1;{A.hex()};{B.hex()}", "unexpected '1'"),
        (f"S;Target:0;;{A.hex()}", "empty"),
        (f"S;Target:0;0#;{A.hex()}", "unexpected '#'"),
        (f"S;Target:0;64;{A.hex()}", "exceeds 63"),
        (f"S;Target:0;0;{A.hex()}::x", "unknown modifier"),
        (f"S;Target:0;0;{A.hex()}:x:i", "expected [Offset:]HexSignature"),
        (f"S;Target:0;0;EP+0:{A.hex()}", "offset 'EP+0'"),
        ("S;Target:0;0;aa??bb", "too weak"),
        ("S;Target:0;0;aabb!(cc|dd)eeff::i", "negated alternative cannot take ::i"),
        ("S;Target:0;0;aabb!(cc|dd)eeff::a", "negated alternative cannot take ::a"),
        ("S;Target:0;0;6161*6262*6363*6464::i", "expands into 256 variants"),
        ("S;Target:0;" + "(" * 70 + "0" + ")" * 70 + f";{A.hex()}", "nested deeper than"),
        (f"S;Target:0;0=9{'9' * 30};{A.hex()}", "exceeds"),
    ],
)
def test_bad_lines_name_file_line_and_reason(line: str, reason: str) -> None:
    with pytest.raises(SignatureError, match=r"^t\.ldb:2: .*" + re.escape(reason)):
        ldb(f"Good;Target:0;0;{A.hex()}", line)


def test_empty_modifiers_and_modifiers_without_engine_are_accepted_like_clamav() -> None:
    db = ldb(f"S;Target:0;0&1;{A.hex()}::;{b'hello'.hex()}::i")
    assert len(db.logical) == 1 and len(db.body) == 1 + 4  # ::i: 2x2 case variants of "he"


def test_too_many_subsignatures() -> None:
    subs = ";".join(f"{i:04x}{A.hex()}" for i in range(65))
    expr = "|".join(str(i) for i in range(65))
    with pytest.raises(SignatureError, match="at most 64"):
        ldb(f"S;Target:0;{expr};{subs}")


# -- matching --------------------------------------------------------------------------------


def test_and_or_parentheses(impl: str) -> None:
    sigs = [f"AndOr;Target:0;(0&1)|2;{A.hex()};{B.hex()};{C.hex()}"]
    assert scan(impl, sigs, fill(A, B)) == ("AndOr",)
    assert scan(impl, sigs, fill(C)) == ("AndOr",)
    assert scan(impl, sigs, fill(A)) == ()
    assert scan(impl, sigs, fill(B, A)) == ("AndOr",)  # order does not matter


@pytest.mark.parametrize("copies", range(5))
def test_counts_of_one_subsignature(impl: str, copies: int) -> None:
    sigs = [f"Eq{x};Target:0;0={x};{A.hex()}" for x in range(4)]
    sigs += [f"Gt{x};Target:0;0>{x};{A.hex()}" for x in range(4)]
    sigs += [f"Lt{x};Target:0;0<{x};{A.hex()}" for x in range(1, 4)]
    data = fill(B, *([A] * copies))
    want = {f"Eq{x}" for x in range(4) if copies == x}
    want |= {f"Gt{x}" for x in range(4) if copies > x}
    want |= {f"Lt{x}" for x in range(1, 4) if copies < x}
    assert set(scan(impl, sigs, data)) == want


def test_overlapping_matches_count_separately(impl: str) -> None:
    sigs = [f"Two;Target:0;0=2;{(b'ABAB').hex()}"]
    assert scan(impl, sigs, b"\x80ABABAB\x80") == ("Two",)


def test_block_counts_and_distinct_subsignatures(impl: str) -> None:
    abc = f"{A.hex()};{B.hex()};{C.hex()}"
    sigs = [
        f"Gt2d2;Target:0;(0|1|2)>2,2;{abc}",
        f"Eq3d3;Target:0;(0|1|2)=3,3;{abc}",
        f"Lt3d2;Target:0;(0|1|2)<3,2;{abc}",
        f"AndEq2;Target:0;(0&1)=2;{A.hex()};{B.hex()}",
    ]
    assert set(scan(impl, sigs, fill(A, A, B))) == {"Gt2d2"}
    assert set(scan(impl, sigs, fill(A, B, C))) == {"Gt2d2", "Eq3d3", "AndEq2"}
    assert set(scan(impl, sigs, fill(A, B))) == {"Lt3d2", "AndEq2"}
    assert set(scan(impl, sigs, fill(A, A, A))) == set()


def test_multi_part_subsignature_counts_match_ends(impl: str) -> None:
    sigs = [f"G2;Target:0;0=2;{A.hex()}*{B.hex()}", f"G1;Target:0;0=1;{A.hex()}*{B.hex()}"]
    assert scan(impl, sigs, fill(A, A, B)) == ("G1",)  # one end of B: one match
    assert scan(impl, sigs, fill(A, B, B)) == ("G2",)  # as clamscan counts


def test_negation_and_presence(impl: str) -> None:
    sigs = [f"NotB;Target:0;0&1=0;{A.hex()};{B.hex()}"]
    assert scan(impl, sigs, fill(A)) == ("NotB",)
    assert scan(impl, sigs, fill(A, B)) == ()


def test_subsignature_offsets(impl: str) -> None:
    sigs = [f"At;Target:0;0&1;4:{A.hex()};EOF-{len(B) + 6},2:{B.hex()}"]
    assert scan(impl, sigs, A + b"\x80" * 30 + B + b"\x81\x82") == ("At",)
    assert scan(impl, sigs, b"\x80" + A + b"\x80" * 30 + B + b"\x81\x82") == ()


def test_file_size_attribute(impl: str) -> None:
    sigs = [f"Sized;Engine:51-255,Target:0,FileSize:10-20;0;{A.hex()}"]
    assert scan(impl, sigs, A + b"\x80") == ("Sized",)  # 4 + 6 + 4 bytes
    assert scan(impl, sigs, A + b"\x80" * 20) == ()


def test_nocase_wide_ascii(impl: str) -> None:
    h = b"hello".hex()
    sigs = [f"I;{E};0;{h}::i", f"W;{E};0;{h}::w", f"WA2;{E};0=2;{h}::wa", f"Plain;{E};0;{h}::a"]
    assert set(scan(impl, sigs, b"\x80HeLLo\x80")) == {"I"}
    assert set(scan(impl, sigs, b"\x80h\0e\0l\0l\0o\0\x80")) == {"W"}
    assert set(scan(impl, sigs, b"\x80h\0e\0l\0l\0o\0\x80hello\x80")) == {"W", "WA2", "I", "Plain"}


def test_nocase_alternatives_and_wide_wildcards(impl: str) -> None:
    sigs = [
        f"Alt;{E};0;{b'hello'.hex()}(2d|2b)(77|57)6f726c64::i",
        f"Wild;{E};0;6865??6c6f::w",
    ]
    assert scan(impl, sigs, b"\x80HELLO-WoRLD\x80") == ("Alt",)
    assert scan(impl, sigs, b"\x80HELLO=WoRLD\x80") == ()
    assert scan(impl, sigs, b"\x80h\0e\0X\0l\0o\0\x80") == ("Wild",)
    assert scan(impl, sigs, b"\x80h\0e\0Xl\0o\0\x80") == ()  # ?? is widened too


def test_fullword(impl: str) -> None:
    sigs = [f"F;{E};0;{b'hello'.hex()}::f", f"F2;{E};0=2;{b'hello'.hex()}::f"]
    assert scan(impl, sigs, b" hello.") == ("F",)
    assert scan(impl, sigs, b"_hello_") == ("F",)  # '_' is not alphanumeric
    assert scan(impl, sigs, b"xhello ") == ()
    assert scan(impl, sigs, b" hello9") == ()
    assert scan(impl, sigs, b" hello hello hellox") == ("F", "F2")
    m = Matcher(ldb(*sigs), impl=impl)
    assert m.scan_bytes(b"hello").matches == ("F",)  # file start and end delimit too
    assert m.scan_bytes(b"hello hello").matches == ("F", "F2")
    assert m.scan_bytes(b"hellox").matches == ()


def test_subsignatures_are_not_reported_by_name(impl: str) -> None:
    db = PatternDB.from_text(
        [("t.ndb", f"Body:0:*:{A.hex()}"), ("t.ldb", f"Logic;Target:0;0&1;{A.hex()};{B.hex()}")]
    )
    assert db.plain_body == 1 and len(db.body) == 3
    m = Matcher(db, impl=impl)
    assert m.scan_bytes(fill(A, B)).matches == ("Body", "Logic")
    assert m.scan_bytes(fill(A)).matches == ("Body",)
    assert m.scan_bytes(fill(B)).matches == ()
    assert m.scan_bytes(fill(A, B), allmatch=False).matches == ("Body",)


def test_window_edges_do_not_double_count(impl: str) -> None:
    sigs = [f"Three;Target:0;0=3;{A.hex()}"]
    data = b"".join(b"\x80" * 59 + A for _ in range(3))
    for window in (16, 64, 1 << 20):
        m = Matcher(ldb(*sigs), impl=impl, window_size=window)
        assert m.scan_bytes(data).matches == ("Three",), window


# How counts and distinct subsignatures combine in nested expressions, as measured with
# clamscan 1.4.6 --allmatch (expression, matches of each subsignature, reported?).
CLAMSCAN_CASES = [
    ("((0<1)&1)>0,2", (0, 1), True),
    ("((0=0)&1)>0,2", (0, 1), True),
    ("((0<1)&1)>1", (0, 1), False),
    ("((0<1)&1)=1", (0, 1), True),
    ("((0&1)|2)=2,2", (0, 3, 2), False),
    ("((0&1)|2)=2", (0, 3, 2), True),
    ("((0&1)|2)=2,1", (0, 3, 2), True),
    ("(0|1)=3,2", (1, 2), True),
    ("((0>0)|1)=2,2", (1, 1), True),
    ("((0>1)|1)=3", (2, 1), True),
    ("((0>1)|1)=2", (2, 1), False),
    ("((0>1)&1)=3,2", (2, 1), True),
    ("((0=2)|1)>0,2", (2, 1), True),
    ("((0&1)|2)>0,2", (1, 1, 0), True),
    ("((0&1)&2)=3,3", (1, 1, 1), True),
    ("((0|1)|2)=1,1", (0, 0, 1), True),
    ("((0=0)|1)=1,2", (0, 1), True),
    ("((0<2)|1)=2,2", (1, 1), True),
    ("((0<2)|1)=1,2", (1, 1), False),
    ("(((0|1)>0)|2)=3,3", (1, 1, 1), False),
    ("(((0|1)>0)|2)=3,2", (1, 1, 1), False),
    ("(((0|1)>0)|2)=3", (1, 1, 1), True),
    ("((0=5)|1)=3", (2, 1), False),
    ("((0=5)|1)=1", (2, 1), True),
    ("((0&1)|2)=3", (2, 0, 1), False),
    ("((0&1)|2)=1", (2, 0, 1), True),
    ("((0|1)=2)&2", (1, 1, 1), True),
    ("(((0|1)=2)&2)=3", (1, 1, 1), True),
    ("(((0&1)=2)&2)=2", (1, 1, 1), False),
    ("(((0&1)=2)&2)=3", (1, 1, 1), True),
]
SUBS = [A, B, C]


@pytest.mark.parametrize(("expr", "counts", "found"), CLAMSCAN_CASES)
def test_nested_counts_as_clamscan(
    impl: str, expr: str, counts: tuple[int, ...], found: bool
) -> None:
    subs = ";".join(SUBS[k].hex() for k in range(len(counts)))
    data = fill(*(SUBS[k] for k, n in enumerate(counts) for _ in range(n)))
    assert scan(impl, [f"S;Target:0;{expr};{subs}"], data) == (("S",) if found else ())


@pytest.mark.parametrize(("expr", "n"), [("(0)=1", 1), ("((0|1)>0)=2", 2), ("((0>1))=1", 1)])
def test_count_on_a_group_of_one_term_is_refused_like_clamav(expr: str, n: int) -> None:
    subs = ";".join(SUBS[k].hex() for k in range(n))
    with pytest.raises(SignatureError, match="a count modifier on a group of one term"):
        ldb(f"S;Target:0;{expr};{subs}")


def test_counts_stay_bounded_on_a_file_full_of_matches(impl: str) -> None:
    sigs = [f"Gt2;Target:0;0>2;{b'ABAB'.hex()}", f"Eq3;Target:0;0=3;{b'ABAB'.hex()}"]
    sigs.append(f"Lt5;Target:0;(0<5)&1;{b'ABAB'.hex()};{A.hex()}")
    data = b"AB" * 200_000 + A  # ~200,000 overlapping matches
    assert scan(impl, sigs, data) == ("Gt2",)
    db = ldb(*sigs)
    index = LogicalIndex(db)
    hits: dict[int, set[int]] = {}
    body = db.logical[0].bodies[0][0]
    for end in range(10_000):
        index.record(hits, body, end, 10_000)
    assert len(hits[body]) == db.logical[0].count_cap() == 3


def test_wide_fullword_as_clamscan(impl: str) -> None:
    w = b"h\0e\0l\0l\0o\0"
    sigs = [f"WF;{E};0;{b'hello'.hex()}::wf", f"WF2;{E};0=2;{b'hello'.hex()}::wf"]
    m = Matcher(ldb(*sigs), impl=impl, window_size=16)
    found = {
        b"\x80.\0" + w + b".\0\x80": ("WF",),
        b"\x80a\0" + w + b".\0\x80": (),  # a wide letter before
        b"\x80aa" + w + b".\0\x80": ("WF",),  # "aa" is no wide letter
        b"\x80.\0" + w + b"a\0\x80": (),
        b"\x80.\0" + w + b"aa\x80": ("WF",),
        b"a" + w + b".\0\x80": ("WF",),  # one byte before: the start counts as a boundary
        b"\x80.\0" + w + b"a": (),  # one alphanumeric byte after: not a boundary
        b"\x80.\0" + w + b".": ("WF",),
        w: ("WF",),
        b"\x80.\0" + w + b".\0" + w + b"-\0\x80": ("WF", "WF2"),  # one delimiter, two words
        b"\x80.\0" + w + b".\0" + w + b"a\0" + w + b"-\0\x80": ("WF",),  # clamscan: 1 match
    }
    for data, want in found.items():
        assert m.scan_bytes(data).matches == want, data


@pytest.mark.parametrize("impl", ["py", "auto"])
def test_ign2_drops_a_logical_signature_and_keeps_the_others(tmp_path: Path, impl: str) -> None:
    from offscan.signatures import load_database

    d = tmp_path / "db"
    d.mkdir()
    (d / "t.ldb").write_text(
        f"Gone;{E};0&1;{A.hex()};{B.hex()}\nKept;{E};0&1;{B.hex()};{C.hex()}\n"
    )
    (d / "t.ndb").write_text(f"Plain:0:*:{C.hex()}\n")
    (d / "x.ign2").write_text("Gone\n")
    db = load_database(d)
    assert [lg.name for lg in db.logical] == ["Kept"]
    assert db.plain_body == 1 and db.signature_count == 2
    for lg in db.logical:  # the kept signature's body indices point at its own bodies
        assert all(0 <= i < len(db.body) for i, _, _ in lg.bodies)
    m = Matcher(db, impl=impl, window_size=64)
    assert m.scan_bytes(fill(A, B)).matches == ()
    assert sorted(m.scan_bytes(fill(B, C), allmatch=True).matches) == ["Kept", "Plain"]
    (d / "x.ign2").write_text("Kept\nPlain\n")
    m = Matcher(load_database(d), impl=impl, window_size=64)
    assert m.scan_bytes(fill(A, B)).matches == ("Gone",)
    assert m.scan_bytes(fill(B, C), allmatch=True).matches == ()
