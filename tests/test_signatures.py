"""Parsing ClamAV-format databases into a PatternDB: syntax, offsets, hash formats, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import pytest
from conftest import EICAR, make_db

from offscan import PatternDB, SignatureError, load_database
from offscan.signatures import (
    FUNCTIONALITY_LEVEL,
    MAX_PART_LENGTH,
    Alt,
    Gap,
    Offset,
    Part,
    default_database_path,
    parse_body,
)

# -- body syntax ---------------------------------------------------------------------------


def body(hexsig: str) -> tuple[tuple[Part, ...], tuple[Gap, ...]]:
    return parse_body(hexsig, "t.ndb:1")


def test_static_bytes_one_part() -> None:
    parts, gaps = body("DEADbeef")
    assert gaps == ()
    assert parts == (Part(b"\xde\xad\xbe\xef", b"\xff\xff\xff\xff"),)
    assert parts[0].static_runs() == [(0, 4)]


def test_full_wildcard() -> None:
    (part,), _ = body("aabb??cc")
    assert part.values == b"\xaa\xbb\x00\xcc"
    assert part.masks == b"\xff\xff\x00\xff"
    assert part.static_runs() == [(0, 2), (3, 1)]


def test_high_nibble_wildcard() -> None:
    (part,), _ = body("aabba?")
    assert part.values[2] == 0xA0 and part.masks[2] == 0xF0


def test_low_nibble_wildcard() -> None:
    (part,), _ = body("aabb?a")
    assert part.values[2] == 0x0A and part.masks[2] == 0x0F


@pytest.mark.parametrize(
    ("gap_text", "gap"),
    [
        ("*", Gap(0, None)),
        ("{5}", Gap(5, 5)),
        ("{0}", Gap(0, 0)),
        ("{-5}", Gap(0, 5)),
        ("{5-}", Gap(5, None)),
        ("{2-5}", Gap(2, 5)),
        ("{3-3}", Gap(3, 3)),
        ("[2-5]", Gap(2, 5)),
        ("[0-1]", Gap(0, 1)),
    ],
)
def test_gaps_split_parts(gap_text: str, gap: Gap) -> None:
    parts, gaps = body(f"aabb{gap_text}ccdd")
    assert gaps == (gap,)
    assert [p.values for p in parts] == [b"\xaa\xbb", b"\xcc\xdd"]


def test_several_gaps() -> None:
    parts, gaps = body("aabb*ccdd{1-2}eeff{3}0011")
    assert len(parts) == 4
    assert gaps == (Gap(0, None), Gap(1, 2), Gap(3, 3))


def test_single_byte_alternatives() -> None:
    (part,), _ = body("aabb(cc|dd|ee)")
    assert part.alts == (Alt(2, (b"\xcc", b"\xdd", b"\xee"), False),)
    assert part.length == 3
    assert part.masks[2] == 0  # covered by the alternative, not by value/mask


def test_string_alternatives() -> None:
    (part,), _ = body("(aabb|ccdd)eeff")
    assert part.alts == (Alt(0, (b"\xaa\xbb", b"\xcc\xdd"), False),)
    assert part.alts[0].length == 2
    assert part.length == 4
    assert part.static_runs() == [(2, 2)]


def test_negated_alternatives() -> None:
    (part,), _ = body("aabb!(cc|dd)ee")
    assert part.alts == (Alt(2, (b"\xcc", b"\xdd"), True),)
    assert part.length == 4


def test_everything_together() -> None:
    parts, gaps = body("aabb??a??a(01|02)!(0304|0506)*ccdd{-4}eeff[1-2]1122{4-}3344")
    assert len(parts) == 5
    assert gaps == (Gap(0, None), Gap(0, 4), Gap(1, 2), Gap(4, None))
    first = parts[0]
    assert first.length == 2 + 1 + 1 + 1 + 1 + 2
    assert first.alts == (
        Alt(5, (b"\x01", b"\x02"), False),
        Alt(6, (b"\x03\x04", b"\x05\x06"), True),
    )


def test_uppercase_and_lowercase_hex_agree() -> None:
    assert body("AABBCC") == body("aabbcc")


# -- offsets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "offset"),
    [
        ("*", Offset("any")),
        ("0", Offset("abs", 0, 0)),
        ("17", Offset("abs", 17, 0)),
        ("17,5", Offset("abs", 17, 5)),
        ("EOF-10", Offset("eof", 10, 0)),
        ("EOF-10,4", Offset("eof", 10, 4)),
    ],
)
def test_offsets(text: str, offset: Offset) -> None:
    db = make_db(f"Sig:0:{text}:aabbcc")
    assert db.body[0].offset == offset


def test_offset_start_ranges() -> None:
    assert Offset("any").start_range(100) == (0, 100)
    assert Offset("abs", 10, 5).start_range(100) == (10, 15)
    assert Offset("eof", 10).start_range(100) == (90, 90)
    assert Offset("eof", 10, 3).start_range(100) == (90, 93)
    assert Offset("eof", 200).start_range(100) is None


@pytest.mark.parametrize("text", ["EP+0", "EOF+3", "-1", "1,", ",1", "x", "EOF-", "S1+4"])
def test_bad_offsets_for_target_0(text: str) -> None:
    with pytest.raises(SignatureError, match=re.escape(f"t.ndb:1: offset {text!r}")):
        make_db(f"Sig:0:{text}:aabbcc")


# -- target types and functionality levels ----------------------------------------------


def test_other_target_types_loaded_and_counted_not_applied() -> None:
    db = make_db(
        "PE.Sig:1:EP+0:aabbcc\nELF.Sig:6:*:ddeeff\nAny.Sig:0:*:112233\nHTML.Sig:3:0:445566"
    )
    assert [s.name for s in db.body] == ["Any.Sig"]
    assert [n.name for n in db.not_applied] == ["PE.Sig", "ELF.Sig", "HTML.Sig"]
    assert [n.source for n in db.not_applied] == ["t.ndb:1", "t.ndb:2", "t.ndb:4"]
    assert db.signature_count == 4
    summary = db.summary()
    assert "1 body and 0 hash signatures" in summary
    assert "not applied" in summary
    assert "1 (target type 1 not applied)" in summary
    assert "1 (target type 6 not applied)" in summary


def test_other_target_types_still_validate_the_body() -> None:
    with pytest.raises(SignatureError, match=r"t\.ndb:1: .*too weak"):
        make_db("PE.Sig:1:*:aa??bb")


def test_functionality_levels() -> None:
    db = make_db(
        f"New:0:*:aabbcc:{FUNCTIONALITY_LEVEL + 1}\n"
        f"Old:0:*:aabbcc::{FUNCTIONALITY_LEVEL - 1}\n"
        f"Ok:0:*:aabbcc:1:{FUNCTIONALITY_LEVEL + 5}\n"
    )
    assert [s.name for s in db.body] == ["Ok"]
    assert {n.name for n in db.not_applied} == {"New", "Old"}


def test_comments_and_blank_lines_are_skipped() -> None:
    db = make_db("# a comment\n\n   \nSig:0:*:aabbcc\n")
    assert [s.source for s in db.body] == ["t.ndb:4"]


# -- hash databases ------------------------------------------------------------------------


def test_hdb_md5() -> None:
    md5 = hashlib.md5(EICAR).hexdigest()
    db = make_db(f"{md5}:68:Eicar.MD5", name="t.hdb")
    (h,) = db.hashes
    assert (h.name, h.algorithm, h.digest, h.size, h.source) == (
        "Eicar.MD5",
        "md5",
        bytes.fromhex(md5),
        68,
        "t.hdb:1",
    )


def test_hsb_sha1_sha256_and_any_size() -> None:
    sha1 = hashlib.sha1(EICAR).hexdigest()
    sha256 = hashlib.sha256(EICAR).hexdigest()
    db = make_db(f"{sha1}:68:E.SHA1\n{sha256.upper()}:*:E.SHA256:73", name="t.hsb")
    assert [(h.algorithm, h.size) for h in db.hashes] == [("sha1", 68), ("sha256", None)]
    assert db.hashes[1].digest == bytes.fromhex(sha256)


@pytest.mark.parametrize(
    ("suffix", "line", "reason"),
    [
        (".hdb", "abc:68:X", "not an MD5, SHA1 or SHA256 hex digest"),
        (".hdb", "zz" * 16 + ":68:X", "not an MD5, SHA1 or SHA256 hex digest"),
        (".hdb", "aa" * 20 + ":68:X", ".hdb holds MD5 digests"),
        (".hsb", "aa" * 16 + ":68:X", ".hsb holds SHA1/SHA256 digests"),
        (".hdb", "aa" * 16 + ":6x:X", "size '6x' is not a number"),
        (".hdb", "aa" * 16 + ":\u00b2:X", "is not a number"),  # '²'.isdigit() is True
        (".hdb", "aa" * 16 + ":68:", "empty signature name"),
        (".hdb", "aa" * 16 + ":68", "expected HASH:SIZE:NAME"),
        (".hdb", "aa" * 16 + ":68:X:1:2", "expected HASH:SIZE:NAME"),
        (".hdb", "aa" * 16 + ":68:X:abc", "MinFL 'abc' is not a number"),
    ],
)
def test_bad_hash_lines(suffix: str, line: str, reason: str) -> None:
    expected = re.escape(f"t{suffix}:1: ") + ".*" + re.escape(reason)
    with pytest.raises(SignatureError, match=expected):
        make_db(line, name=f"t{suffix}")


def test_hash_minfl_not_applied() -> None:
    db = make_db("aa" * 16 + f":68:X:{FUNCTIONALITY_LEVEL + 1}", name="t.hdb")
    assert db.hashes == () and [n.name for n in db.not_applied] == ["X"]


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hexsig", "reason"),
    [
        ("aabb{5-2}ccdd", "{5-2}: min > max"),
        ("aabb[5-2]ccdd", "[5-2]: min > max"),
        ("aabb{}ccdd", "{}: expected"),
        ("aabb{-}ccdd", "{-}: expected"),
        ("aabb{x}ccdd", "{x}: expected"),
        ("aabb{5ccdd", "unterminated '{'"),
        ("aabb[5]ccdd", "[5]: expected [n-m]"),
        ("aabb[5-]ccdd", "[5-]: expected [n-m]"),
        ("aabb(cc|dd", "unterminated '('"),
        ("aabb(cc|ddee)", "alternatives must all have the same length"),
        ("aabb(ccdd|ee)", "alternatives must all have the same length"),
        ("aabb(cc|)", "alternatives must be non-empty static hex strings"),
        ("aabb(c?|dd)", "alternatives must be non-empty static hex strings"),
        ("aabb(ccd|dde)", "alternatives must be non-empty static hex strings"),
        ("aabb(B)", "word/line boundary anchors are not supported"),
        ("aabbc", "odd number of hex digits"),
        ("aabbzz", "'zz': not a hex byte"),
        ("aa bbcc", "not a hex byte"),
        ("+abbcc", "not a hex byte"),
        ("-1aabb", "not a hex byte"),
        ("aabb!cc", "not a hex byte"),
    ],
)
def test_syntax_errors_name_file_line_and_reason(hexsig: str, reason: str) -> None:
    with pytest.raises(SignatureError) as info:
        make_db(f"Good:0:*:aabbcc\nBad:0:*:{hexsig}\n", name="x.ndb")
    assert str(info.value).startswith("x.ndb:2: ")
    assert reason in str(info.value)


def test_min_greater_than_max_message_exactly() -> None:
    with pytest.raises(SignatureError) as info:
        make_db("A:0:*:aabbcc\nB:0:*:aabb{5-2}ccdd", name="x.ndb")
    assert str(info.value) == "x.ndb:2: {5-2}: min > max"


@pytest.mark.parametrize(
    "hexsig",
    [
        "*aabb",
        "aabb*",
        "{5}aabb",
        "aabb{5}",
        "aabb**ccdd",
        "aabb{1}{2}ccdd",
        "aabb*{2}ccdd",
        "[1-2]aabb",
        "aabb[1-2]",
    ],
)
def test_gaps_at_start_end_or_adjacent_rejected(hexsig: str) -> None:
    with pytest.raises(SignatureError, match=r"^t\.ndb:1: .*a gap must sit between two byte"):
        make_db(f"S:0:*:{hexsig}")


@pytest.mark.parametrize(
    "hexsig",
    [
        "aa",
        "aa??bb",
        "a?bb",
        "aab?",
        "(aa|bb)cc",
        "aa(bb|cc)",
        "aabb*cc",
        "aa*bbcc",
        "aa!(bb|cc)dd",
        "????",
        "aa{2}bb",
    ],
)
def test_weak_signatures_rejected(hexsig: str) -> None:
    with pytest.raises(SignatureError, match=r"^t\.ndb:1: part \d .*too weak to match efficiently"):
        make_db(f"S:0:*:{hexsig}")


@pytest.mark.parametrize("hexsig", ["aabb", "aabb*ccdd", "a?aabb?b", "(aa|bb)ccdd(ee|ff)"])
def test_minimal_strong_signatures_accepted(hexsig: str) -> None:
    assert len(make_db(f"S:0:*:{hexsig}").body) == 1


def test_part_too_long_rejected() -> None:
    with pytest.raises(SignatureError, match=f"exceeds {MAX_PART_LENGTH}"):
        make_db("S:0:*:" + "ab" * (MAX_PART_LENGTH + 1))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("S:0:*", "expected Name:TargetType:Offset:HexSignature"),
        ("S:0:*:aabb:1:2:3", "got 7 fields"),
        (":0:*:aabb", "empty signature name"),
        ("S:x:*:aabb", "target type 'x' is not a number"),
        ("S:\u00b2:*:aabb", "is not a number"),
        ("S:0:*:", "empty hex signature"),
        ("S:0:*:aabb:x", "MinFL 'x' is not a number"),
    ],
)
def test_bad_ndb_lines(line: str, reason: str) -> None:
    with pytest.raises(SignatureError, match=r"^t\.ndb:1: .*" + re.escape(reason)):
        make_db(line)


def test_errors_are_value_errors_with_only_signature_error_type() -> None:
    # callers catch SignatureError; nothing else may escape the parser for bad text
    for text in ("S:0:*:-1aabb", "S:0:*:aa\u00b2\u00b3", "\u00ff" * 40 + ":1:x"):
        for name in ("t.ndb", "t.hdb", "t.hsb"):
            try:
                make_db(text, name=name)
            except SignatureError:
                pass


def test_unsupported_file_type() -> None:
    with pytest.raises(SignatureError, match=r"x\.yar: unsupported database type \.yar"):
        PatternDB.from_text([("x.yar", "")])


def test_one_bad_line_loads_nothing(tmp_path: Path) -> None:
    good = tmp_path / "a.ndb"
    good.write_text("A:0:*:aabbcc\n")
    bad = tmp_path / "b.ndb"
    bad.write_text("B:0:*:ddeeff\nC:0:*:dd{9-1}ee\n")
    with pytest.raises(SignatureError, match=r"^b\.ndb:2: \{9-1\}: min > max$"):
        load_database(tmp_path)
    with pytest.raises(SignatureError, match=r"^b\.ndb:2: "):
        load_database(good, bad)
    assert [s.name for s in load_database(good).body] == ["A"]


def test_patterndb_is_immutable() -> None:
    db = make_db("A:0:*:aabbcc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        db.body = ()  # type: ignore[misc]
    assert isinstance(db.body, tuple) and isinstance(db.body[0].parts, tuple)


def test_version_depends_on_content() -> None:
    a = make_db("A:0:*:aabbcc")
    assert a.version == make_db("A:0:*:aabbcc").version
    assert a.version != make_db("A:0:*:aabbcd").version
    assert a.version.startswith("sha256:")


# -- loading files and directories ---------------------------------------------------------


def test_directory_loading(tmp_path: Path) -> None:
    (tmp_path / "one.ndb").write_text("One:0:*:aabbcc\n")
    (tmp_path / "two.hdb").write_text(hashlib.md5(b"x").hexdigest() + ":1:Two\n")
    (tmp_path / "three.hsb").write_text(hashlib.sha256(b"x").hexdigest() + ":*:Three\n")
    (tmp_path / "notes.txt").write_text("not a database: garbage\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.ndb").write_text("Deep:0:*:aabbcc\n")  # not recursive
    db = load_database(tmp_path)
    assert [s.name for s in db.body] == ["One"]
    assert sorted(h.name for h in db.hashes) == ["Three", "Two"]
    assert len(db.files) == 3
    assert "1 body and 2 hash signatures from 3 file(s)" in db.summary()


def test_file_and_directory_mixed(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.ndb").write_text("A:0:*:aabbcc\n")
    (tmp_path / "b.ndb").write_text("B:0:*:ddeeff\n")
    db = load_database(tmp_path / "d", tmp_path / "b.ndb")
    assert [s.name for s in db.body] == ["A", "B"]


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="no signature files"):
        load_database(tmp_path)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match="missing.ndb: cannot read"):
        load_database(tmp_path / "missing.ndb")


def test_error_names_the_file_it_came_from(tmp_path: Path) -> None:
    (tmp_path / "a.ndb").write_text("A:0:*:aabbcc\n")
    (tmp_path / "z.hdb").write_text("\n# c\nnope\n")
    with pytest.raises(SignatureError, match=r"^z\.hdb:3: "):
        load_database(tmp_path)


def test_default_database_has_eicar() -> None:
    db = load_database()
    assert default_database_path().is_dir()
    names = [s.name for s in db.body] + [h.name for h in db.hashes]
    assert "Eicar-Test-Signature" in names
    (eicar,) = [s for s in db.body if s.name == "Eicar-Test-Signature"]
    assert eicar.offset == Offset("abs", 0, 0)
    assert b"".join(p.values for p in eicar.parts) == EICAR
    (md5,) = [h for h in db.hashes if h.name == "Eicar-Test-Signature"]
    assert md5.digest == hashlib.md5(EICAR).digest() and md5.size == len(EICAR)
    assert db.not_applied == ()


# -- hostile databases (issue 14 items 7 and 9, NEL) ---------------------------------------

HUGE = "9" * 4400  # int() refuses strings of more than 4,300 digits with a plain ValueError


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("t.ndb", f"S:{HUGE}:*:aabbcc"),
        ("t.ndb", f"S:0:{HUGE}:aabbcc"),
        ("t.ndb", f"S:0:1,{HUGE}:aabbcc"),
        ("t.ndb", f"S:0:EOF-{HUGE}:aabbcc"),
        ("t.ndb", f"S:0:*:aabb{{{HUGE}}}ccdd"),
        ("t.ndb", f"S:0:*:aabb{{1-{HUGE}}}ccdd"),
        ("t.ndb", f"S:0:*:aabb[{HUGE}-1]ccdd"),
        ("t.ndb", f"S:0:*:aabbcc:{HUGE}"),
        ("t.ndb", f"S:0:*:aabbcc:1:{HUGE}"),
        ("t.ndb", f"S:1:{HUGE}:aabbcc"),
        ("t.hdb", "aa" * 16 + f":{HUGE}:X"),
        ("t.hdb", "aa" * 16 + f":1:X:{HUGE}"),
        ("t.hsb", "aa" * 32 + f":{HUGE}:X"),
        ("t.ldb", f"S;Target:{HUGE};0;aabbcc"),
        ("t.ldb", f"S;Engine:{HUGE}-1,Target:0;0;aabbcc"),
        ("t.ldb", f"S;Engine:51-255,Target:0,FileSize:1-{HUGE};0;aabbcc"),
        ("t.ldb", f"S;Target:0;{HUGE};aabbcc"),
        ("t.ldb", f"S;Target:0;0>{HUGE};aabbcc"),
        ("t.ldb", f"S;Target:0;0>1,{HUGE};aabbcc"),
        ("t.ldb", f"S;Target:0;0;{HUGE}:aabbcc"),
        ("t.ldb", f"S;Target:0;0;aabb{{{HUGE}}}ccdd"),
    ],
)
def test_huge_numbers_are_signature_errors_with_file_and_line(name: str, line: str) -> None:
    with pytest.raises(SignatureError) as info:  # a bare ValueError would escape this
        make_db("# first\n" + line, name=name)
    assert str(info.value).startswith(f"{name}:2: ")
    assert len(str(info.value)) < 300  # the number is not echoed back in full


def test_numbers_at_the_limit_still_load() -> None:
    big = str((1 << 63) - 1)
    db = make_db(f"S:0:{big},{big}:aabb{{{big}}}ccdd")
    assert db.body[0].offset == Offset("abs", (1 << 63) - 1, (1 << 63) - 1)
    with pytest.raises(SignatureError, match="exceeds"):
        make_db(f"S:0:{1 << 63}:aabbcc")


def test_overlong_line_fails_fast_with_little_memory(tmp_path: Path) -> None:
    import tracemalloc

    path = tmp_path / "huge.ndb"
    with open(path, "wb") as f:  # "S:0:*:" then 100 MB of one line (sparse: no disk used)
        f.write(b"Ok:0:*:aabbcc\nS:0:*:")
        f.truncate(100 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(SignatureError, match=r"^huge\.ndb:2: line longer than"):
            load_database(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak >> 20} MiB while refusing a 100 MB line"


def test_overlong_line_in_text_is_refused() -> None:
    from offscan.signatures import MAX_LINE_LENGTH

    with pytest.raises(SignatureError, match=r"^t\.ndb:3: line of \d+ characters exceeds"):
        make_db("A:0:*:aabbcc\n\nB:0:*:" + "ab" * MAX_LINE_LENGTH)


@pytest.mark.parametrize("sep", ["\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\u2028"])
def test_line_separators_other_than_newline_do_not_shift_line_numbers(sep: str) -> None:
    db = make_db(f"# a{sep}b comment\nGood:0:*:aabbcc\r\nAlso:0:*:ddeeff\n")
    assert [s.source for s in db.body] == ["t.ndb:2", "t.ndb:3"]
    with pytest.raises(SignatureError, match=r"^t\.ndb:3: "):
        make_db(f"A{sep}x:0:*:aabbcc\nB:0:*:ddeeff\nC:0:*:zz\n")


def test_nel_inside_a_signature_name_is_kept() -> None:
    (sig,) = make_db("N\x85L:0:*:aabbcc\n").body
    assert sig.name == "N\x85L" and sig.source == "t.ndb:1"
