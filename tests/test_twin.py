"""Property tests: the native core equals the Python twin, windowed scans equal whole-buffer
scans, and both equal an independent regex oracle, on random signatures using all the syntax."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from offscan import Matcher, PatternDB, ScanResult, _index, _match

# Without the native core (a build that fell back) these fail, as test_c_extension_loaded does,
# unless OFFSCAN_NO_EXTENSIONS asked for pure Python.
needs_native = pytest.mark.skipif(
    _match.NativeCore is None and bool(os.environ.get("OFFSCAN_NO_EXTENSIONS")),
    reason="OFFSCAN_NO_EXTENSIONS: no native core to compare",
)
IMPLS = ("c", "py") if not os.environ.get("OFFSCAN_NO_EXTENSIONS") else ("py",)

# OFFSCAN_TWIN_EXAMPLES=5000 hunts longer; the default keeps the suite under a minute.
SETTINGS = settings(
    max_examples=int(os.environ.get("OFFSCAN_TWIN_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
WHOLE = 1 << 20  # window size holding every generated buffer whole
# Few distinct bytes so random buffers hold partial and full matches; several are regex
# metacharacters ('.', '\\', '(', '*', '|', '\n') to keep the oracle's escaping honest.
ALPHABET = bytes(
    [0x00, 0x0A, 0x2E, 0x5C, 0x28, 0x2A, 0x41, 0x42, 0x61, 0x7C, 0x80, 0x90, 0xAA, 0xAB, 0xFE, 0xFF]
)

# -- a signature model independent of offscan.signatures ----------------------------------


@dataclass(frozen=True)
class Byte:
    value: int


@dataclass(frozen=True)
class AnyByte:
    pass


@dataclass(frozen=True)
class Nibble:
    value: int  # 0..15
    high: bool  # True: 'a?' (high nibble fixed); False: '?a'


@dataclass(frozen=True)
class Alternatives:
    options: tuple[bytes, ...]
    negated: bool


Element = Byte | AnyByte | Nibble | Alternatives


@dataclass(frozen=True)
class GapSpec:
    text: str
    lo: int
    hi: int | None


@dataclass(frozen=True)
class OffsetSpec:
    kind: str  # "any", "abs", "eof"
    n: int = 0
    span: int | None = None

    @property
    def text(self) -> str:
        if self.kind == "any":
            return "*"
        base = str(self.n) if self.kind == "abs" else f"EOF-{self.n}"
        return base if self.span is None else f"{base},{self.span}"

    def starts(self, size: int) -> range:
        if self.kind == "any":
            return range(size + 1)
        lo = self.n if self.kind == "abs" else size - self.n
        if lo < 0:
            return range(0)
        return range(lo, lo + (self.span or 0) + 1)


@dataclass(frozen=True)
class Sig:
    name: str
    offset: OffsetSpec
    parts: tuple[tuple[Element, ...], ...]
    gaps: tuple[GapSpec, ...]

    def ndb(self) -> str:
        body = _part_hex(self.parts[0])
        for gap, part in zip(self.gaps, self.parts[1:]):
            body += gap.text + _part_hex(part)
        return f"{self.name}:0:{self.offset.text}:{body}"

    def regex(self) -> re.Pattern[bytes]:
        rx = _part_rx(self.parts[0])
        for gap, part in zip(self.gaps, self.parts[1:]):
            rx += b".{%d,%s}" % (gap.lo, b"" if gap.hi is None else b"%d" % gap.hi)
            rx += _part_rx(part)
        return re.compile(rx, re.DOTALL)


def _part_hex(part: tuple[Element, ...]) -> str:
    out = []
    for e in part:
        if isinstance(e, Byte):
            out.append(f"{e.value:02x}")
        elif isinstance(e, AnyByte):
            out.append("??")
        elif isinstance(e, Nibble):
            out.append(f"{e.value:x}?" if e.high else f"?{e.value:x}")
        else:
            out.append(("!(" if e.negated else "(") + "|".join(o.hex() for o in e.options) + ")")
    return "".join(out)


def _esc(data: bytes) -> bytes:
    return b"".join(b"\\x%02x" % b for b in data)


def _part_rx(part: tuple[Element, ...]) -> bytes:
    out = b""
    for e in part:
        if isinstance(e, Byte):
            out += _esc(bytes([e.value]))
        elif isinstance(e, AnyByte):
            out += b"."
        elif isinstance(e, Nibble):
            members = (
                [e.value << 4 | k for k in range(16)]
                if e.high
                else [k << 4 | e.value for k in range(16)]
            )
            out += b"[" + _esc(bytes(members)) + b"]"
        else:
            alts = b"(?:" + b"|".join(_esc(o) for o in e.options) + b")"
            if e.negated:
                out += b"(?!" + alts + b")" + b".{%d}" % len(e.options[0])
            else:
                out += alts
    return out


# -- strategies -----------------------------------------------------------------------------

alpha_byte = st.sampled_from(list(ALPHABET))


@st.composite
def elements(draw: st.DrawFn) -> Element:
    kind = draw(st.sampled_from(["byte", "byte", "any", "nibble", "alt", "negalt"]))
    if kind == "byte":
        return Byte(draw(alpha_byte))
    if kind == "any":
        return AnyByte()
    if kind == "nibble":
        b = draw(alpha_byte)
        high = draw(st.booleans())
        return Nibble(b >> 4 if high else b & 15, high)
    length = draw(st.integers(1, 2))
    options = draw(
        st.lists(
            st.lists(alpha_byte, min_size=length, max_size=length).map(bytes),
            min_size=1,
            max_size=3,
        )
    )
    return Alternatives(tuple(dict.fromkeys(options)), kind == "negalt")


@st.composite
def parts(draw: st.DrawFn) -> tuple[Element, ...]:
    # short anchors are found by exact lookup, long ones (8+) by sampling in the native core
    anchor = draw(
        st.one_of(
            st.lists(alpha_byte, min_size=2, max_size=4),
            st.lists(alpha_byte, min_size=5, max_size=14),
        )
    )
    before = draw(st.lists(elements(), max_size=3))
    after = draw(st.lists(elements(), max_size=3))
    return tuple(before) + tuple(Byte(b) for b in anchor) + tuple(after)


@st.composite
def gaps(draw: st.DrawFn) -> GapSpec:
    kind = draw(st.sampled_from(["*", "{n}", "{-n}", "{n-}", "{n-m}", "[n-m]"]))
    n = draw(st.integers(0, 20))
    if kind == "*":
        return GapSpec("*", 0, None)
    if kind == "{n}":
        return GapSpec(f"{{{n}}}", n, n)
    if kind == "{-n}":
        return GapSpec(f"{{-{n}}}", 0, n)
    if kind == "{n-}":
        return GapSpec(f"{{{n}-}}", n, None)
    m = n + draw(st.integers(0, 20))
    return GapSpec(f"{{{n}-{m}}}" if kind == "{n-m}" else f"[{n}-{m}]", n, m)


offsets = st.one_of(
    st.just(OffsetSpec("any")),
    st.just(OffsetSpec("any")),
    st.builds(
        OffsetSpec, st.just("abs"), st.integers(0, 60), st.one_of(st.none(), st.integers(0, 20))
    ),
    st.builds(
        OffsetSpec, st.just("eof"), st.integers(0, 150), st.one_of(st.none(), st.integers(0, 20))
    ),
)


@st.composite
def signatures(draw: st.DrawFn, name: str) -> Sig:
    n_parts = draw(st.integers(1, 4))
    return Sig(
        name,
        draw(offsets),
        tuple(draw(parts()) for _ in range(n_parts)),
        tuple(draw(gaps()) for _ in range(n_parts - 1)),
    )


@st.composite
def databases(draw: st.DrawFn) -> list[Sig]:
    count = draw(st.integers(1, 4))
    return [draw(signatures(f"S{i}")) for i in range(count)]


@st.composite
def instance(draw: st.DrawFn, sig: Sig, near_miss: bool = False) -> bytes:
    """Bytes matching ``sig`` (offset aside); with ``near_miss``, probably not quite: one gap
    one byte too short or too long, or the signature cut short."""
    out = bytearray()
    n_parts = len(sig.parts)
    bad_gap = -1
    if near_miss:
        if n_parts > 1 and draw(st.booleans()):
            bad_gap = draw(st.integers(0, n_parts - 2))
        else:
            n_parts = draw(st.integers(1, n_parts))
    for k, part in enumerate(sig.parts[:n_parts]):
        if k:
            gap = sig.gaps[k - 1]
            hi = gap.lo + 30 if gap.hi is None else gap.hi
            size = draw(st.integers(gap.lo, hi))
            if k - 1 == bad_gap:
                size = draw(st.sampled_from([max(0, gap.lo - 1), hi + 1]))
            out += bytes(draw(st.lists(alpha_byte, min_size=size, max_size=size)))
        for e in part:
            if isinstance(e, Byte):
                out.append(e.value)
            elif isinstance(e, AnyByte):
                out.append(draw(st.integers(0, 255)))
            elif isinstance(e, Nibble):
                free = draw(st.integers(0, 15))
                out.append(e.value << 4 | free if e.high else free << 4 | e.value)
            elif not e.negated:
                out += draw(st.sampled_from(e.options))
            else:
                size = len(e.options[0])
                cands = [bytes([a]) * size for a in ALPHABET[:4]] + [bytes([0x33]) * size]
                out += draw(st.sampled_from([c for c in cands if c not in e.options]))
    return bytes(out)


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[Sig], bytes]:
    """A database and a buffer with instances and near misses planted (inserted or written
    over each other), the last one where its offset says."""
    sigs = draw(databases())
    buf = bytearray(draw(st.lists(alpha_byte, max_size=200)))
    for _ in range(draw(st.integers(0, 5))):
        sig = draw(st.sampled_from(sigs))
        inst = draw(instance(sig, near_miss=draw(st.booleans())))
        at = draw(st.integers(0, len(buf)))
        if draw(st.booleans()):
            buf[at:at] = inst
        else:
            buf[at : at + len(inst)] = inst
    if draw(st.integers(0, 3)):
        sig = draw(st.sampled_from(sigs))
        inst = draw(instance(sig))
        off = sig.offset
        shift = draw(st.integers(0, off.span or 0))
        if off.kind == "abs":
            at = off.n + shift
            if at > len(buf):
                buf += bytes(
                    draw(st.lists(alpha_byte, min_size=at - len(buf), max_size=at - len(buf)))
                )
            buf[at:at] = inst
        elif off.kind == "eof" and off.n - shift >= len(inst):
            tail = off.n - shift - len(inst)
            buf += inst + bytes(draw(st.lists(alpha_byte, min_size=tail, max_size=tail)))
        else:
            buf += inst
    return sigs, bytes(buf)


def to_db(sigs: list[Sig]) -> PatternDB:
    return PatternDB.from_text([("r.ndb", "\n".join(s.ndb() for s in sigs))])


# -- the oracle -----------------------------------------------------------------------------


def first_end(sig: Sig, buf: bytes) -> int | None:
    """Smallest end offset of any match of ``sig`` in ``buf``, by regex and binary search."""
    rx = sig.regex()
    starts = sig.offset.starts(len(buf))

    def within(end: int) -> bool:  # some match lies inside buf[:end]
        if sig.offset.kind == "any":
            return rx.search(buf, 0, end) is not None
        return any(rx.match(buf, s, end) for s in starts if s <= end)

    if not within(len(buf)):
        return None
    lo, hi = 0, len(buf)
    while lo < hi:
        mid = (lo + hi) // 2
        if within(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def oracle(sigs: list[Sig], buf: bytes) -> tuple[str, ...]:
    """Matching signature names, ordered as the engine orders them (by end, then position)."""
    ends = [(first_end(s, buf), i) for i, s in enumerate(sigs)]
    return tuple(sigs[i].name for e, i in sorted((e, i) for e, i in ends if e is not None))


# -- tests ----------------------------------------------------------------------------------


def test_generated_syntax_covers_everything() -> None:
    """The strategies above really produce every syntax element (guards against drift)."""
    seen: set[str] = set()

    @settings(max_examples=100, deadline=None, database=None, derandomize=True)
    @given(databases())
    def collect(sigs: list[Sig]) -> None:
        for s in sigs:
            text = s.ndb().split(":", 3)[3]
            for token, pattern in [
                ("??", r"\?\?"),
                ("a?", r"[0-9a-f]\?(?!\?)"),
                ("?a", r"(?<!\?)\?[0-9a-f]"),
                ("*", r"\*"),
                ("{n}", r"\{\d+\}"),
                ("{-n}", r"\{-\d+\}"),
                ("{n-}", r"\{\d+-\}"),
                ("{n-m}", r"\{\d+-\d+\}"),
                ("[n-m]", r"\[\d+-\d+\]"),
                ("(a|b)", r"(?<!!)\([0-9a-f]{2}(\|[0-9a-f]{2})+\)"),
                ("(aabb|ccdd)", r"\([0-9a-f]{4}(\|[0-9a-f]{4})+\)"),
                ("!(..)", r"!\("),
            ]:
                if re.search(pattern, text):
                    seen.add(token)
            seen.add("offset:" + s.offset.kind + ("" if s.offset.span is None else ",m"))

    collect()
    assert seen >= {
        "??",
        "a?",
        "?a",
        "*",
        "{n}",
        "{-n}",
        "{n-}",
        "{n-m}",
        "[n-m]",
        "(a|b)",
        "(aabb|ccdd)",
        "!(..)",
        "offset:any",
        "offset:abs",
        "offset:abs,m",
        "offset:eof",
        "offset:eof,m",
    }


def test_generated_signatures_are_valid() -> None:
    @settings(max_examples=100, deadline=None, database=None)
    @given(databases())
    def check(sigs: list[Sig]) -> None:
        db = to_db(sigs)
        assert [s.name for s in db.body] == [s.name for s in sigs]
        for got, sig in zip(db.body, sigs):
            assert [(g.min, g.max) for g in got.gaps] == [(g.lo, g.hi) for g in sig.gaps]
            assert [expected_part(p) for p in sig.parts] == [
                (p.values, p.masks, [(a.offset, a.options, a.negated) for a in p.alts])
                for p in got.parts
            ]

    check()


def expected_part(
    part: tuple[Element, ...],
) -> tuple[bytes, bytes, list[tuple[int, tuple[bytes, ...], bool]]]:
    """(values, masks, alternatives) the parser should produce for a modelled part."""
    values, masks, alts = bytearray(), bytearray(), []
    for e in part:
        if isinstance(e, Byte):
            values.append(e.value)
            masks.append(0xFF)
        elif isinstance(e, AnyByte):
            values.append(0)
            masks.append(0)
        elif isinstance(e, Nibble):
            values.append(e.value << 4 if e.high else e.value)
            masks.append(0xF0 if e.high else 0x0F)
        else:
            alts.append((len(values), e.options, e.negated))
            values += bytes(len(e.options[0]))
            masks += bytes(len(e.options[0]))
    return bytes(values), bytes(masks), alts


def _hits(core: object, buf: bytes, min_end: int, done: np.ndarray) -> list[tuple[int, int]]:
    parts, starts = core.find(buf, min_end, done)  # type: ignore[attr-defined]
    assert parts.dtype == np.int32 and starts.dtype == np.int64
    return sorted(zip(parts.tolist(), starts.tolist()))


@needs_native
@SETTINGS
@given(cases(), st.sampled_from([1, 2, 3, 5, 7, 16, 64]), st.data())
def test_native_equals_twin(
    case: tuple[list[Sig], bytes], window: int, data: st.DataObject
) -> None:
    sigs, buf = case
    db = to_db(sigs)
    c = Matcher(db, impl="c")
    py = Matcher(db, impl="py")
    # raw hits of the cores, including the window overlap cut and the 'done' skips
    n = c.tables.n_parts
    min_end = data.draw(st.integers(0, len(buf)), label="min_end")
    done_in = np.array(
        data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n), label="done"), dtype=np.uint8
    )
    done_c, done_py = done_in.copy(), done_in.copy()
    assert _hits(c.core, buf, min_end, done_c) == _hits(py.core, buf, min_end, done_py)
    assert done_c.tolist() == done_py.tolist()
    # whole-buffer and windowed verdicts, all matches and first match
    cw = Matcher(db, impl="c", window_size=window)
    pyw = Matcher(db, impl="py", window_size=window)
    want = c.scan_bytes(buf, allmatch=True)
    assert py.scan_bytes(buf, allmatch=True) == want
    assert cw.scan_bytes(buf, allmatch=True) == want
    assert pyw.scan_bytes(buf, allmatch=True) == want
    # the first match stops the scan early, so bytes_scanned depends on the window size
    first = c.scan_bytes(buf, allmatch=False)
    assert py.scan_bytes(buf, allmatch=False) == first
    assert (first.status, first.matches) == (want.status, want.matches[:1])
    for m in (cw, pyw):
        r = m.scan_bytes(buf, allmatch=False)
        assert (r.status, r.matches) == (first.status, first.matches)
    assert cw.scan_bytes(buf, allmatch=False) == pyw.scan_bytes(buf, allmatch=False)
    # through a file descriptor, windowed the way files are
    fd = os.memfd_create("offscan-twin")
    try:
        os.write(fd, buf)
        whole = c.scan_bytes(buf)
        for m in (cw, pyw):
            assert m.scan_fd(fd, allmatch=True) == whole
            first = m.scan_fd(fd)
            assert first.matches == whole.matches[:1] and first.status == whole.status
    finally:
        os.close(fd)


def _simd_paths() -> tuple[str, ...]:
    if _match.NativeCore is None:
        return ()
    from offscan import _match_c

    return _match_c.SIMD_AVAILABLE


@needs_native
@SETTINGS
@given(cases(), st.data())
def test_every_simd_path_equals_the_twin(
    case: tuple[list[Sig], bytes], data: st.DataObject
) -> None:
    """Every filter loop this CPU has (scalar, AVX2, AVX-512) finds the twin's hits. The
    case is embedded at a random place in up to 3 KiB of alphabet bytes, so the SIMD loops
    (which need 64-128 bytes ahead) run over it, at every alignment of their steps."""
    sigs, buf = case
    pad = data.draw(st.binary(min_size=0, max_size=3000), label="pad")
    cut = data.draw(st.integers(0, len(pad)), label="cut")
    filler = bytes(ALPHABET[b % len(ALPHABET)] for b in pad)
    big = filler[:cut] + buf + filler[cut:]
    db = to_db(sigs)
    py = Matcher(db, impl="py")
    n = py.tables.n_parts
    want = _hits(py.core, big, 0, np.zeros(n, dtype=np.uint8))
    assert _match.NativeCore is not None
    for path in _simd_paths():
        core = _match.NativeCore(py.tables, simd=path)  # type: ignore[call-arg]
        assert core.simd == path
        assert _hits(core, big, 0, np.zeros(n, dtype=np.uint8)) == want, path


@needs_native
@pytest.mark.parametrize("count", [40, 3000])
def test_every_simd_path_on_a_large_buffer(count: int) -> None:
    """Hundreds of literal and wildcard signatures of 4-64 bytes planted at every alignment
    in 1 MiB: every filter loop finds exactly the twin's hits (long grams, every stride)."""
    rng = np.random.default_rng(count)
    lines, planted = [], []
    for i in range(count):
        body = rng.bytes(int(rng.integers(4, 65)))
        text = body.hex()
        if i % 7 == 0 and len(body) >= 10:
            text = body[:5].hex() + "??" + body[6:].hex()
        elif i % 11 == 0 and len(body) >= 12:
            text = body[:6].hex() + "{0-4}" + body[6:].hex()
        lines.append(f"S{i}:0:*:{text}")
        planted.append(body)
    buf = bytearray(rng.bytes(1 << 20))
    for k, body in enumerate(planted[::3]):
        at = (k * 977 + k % 8) % (len(buf) - 64)
        buf[at : at + len(body)] = body
    db = PatternDB.from_text([("big.ndb", "\n".join(lines))])
    py = Matcher(db, impl="py")
    n = py.tables.n_parts
    want = _hits(py.core, bytes(buf), 0, np.zeros(n, dtype=np.uint8))
    assert len(want) >= len(planted[::3]) // 2
    assert _match.NativeCore is not None
    for path in _simd_paths():
        core = _match.NativeCore(py.tables, simd=path)  # type: ignore[call-arg]
        assert _hits(core, bytes(buf), 0, np.zeros(n, dtype=np.uint8)) == want, path


@needs_native
@pytest.mark.parametrize("q", [2, 3, 4, 6, 8])
def test_every_simd_path_at_every_stride_of_a_forced_plan(
    q: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each filter loop has its own way of cutting the grams out of the buffer per stride and
    gram length (AVX2: four of them); the planner picks only some (q, S) for a given set, so
    here the plan is forced to one pass of every (q, S), S = 1..8, over plain parts of 20-40
    bytes planted at every alignment, and every path must find the twin's hits."""
    rng = np.random.default_rng(q)
    bodies = [rng.bytes(int(rng.integers(20, 41))) for _ in range(120)]
    text = "\n".join(f"F{i}:0:*:{b.hex()}" for i, b in enumerate(bodies))
    db = PatternDB.from_text([("forced.ndb", text)])
    buf = bytearray(rng.bytes(1 << 16))
    for k, body in enumerate(bodies[::2]):
        at = k * 521 + k % 16
        buf[at : at + len(body)] = body
    for stride in range(1, 9):
        monkeypatch.setattr(_index._Index, "_plan", lambda self, strides, s=stride: [(q, s)])
        py = Matcher(db, impl="py")
        assert [(ps.q, ps.stride) for ps in py.tables.passes] == [(q, stride)]
        n = py.tables.n_parts
        want = _hits(py.core, bytes(buf), 0, np.zeros(n, dtype=np.uint8))
        assert len(want) >= len(bodies[::2])
        for path in _simd_paths():
            core = _match.NativeCore(py.tables, simd=path)  # type: ignore[call-arg]
            got = _hits(core, bytes(buf), 0, np.zeros(n, dtype=np.uint8))
            assert got == want, (path, q, stride)


@needs_native
def test_simd_path_is_the_widest_or_the_one_asked_for() -> None:
    from offscan import _match_c

    assert _match_c.SIMD_AVAILABLE[0] == "none"
    asked = os.environ.get("OFFSCAN_SIMD")
    assert _match_c.SIMD == (asked or _match_c.SIMD_AVAILABLE[-1])
    with pytest.raises(ValueError, match="this CPU has"):
        _match.NativeCore(Matcher(to_db([]), impl="py").tables, simd="neon")  # type: ignore[call-arg]


@SETTINGS
@given(cases(), st.sampled_from([3, 16, WHOLE]))
def test_matcher_equals_regex_oracle(case: tuple[list[Sig], bytes], window: int) -> None:
    sigs, buf = case
    db = to_db(sigs)
    want = oracle(sigs, buf)
    event(f"{len(want)} of {len(sigs)} signatures match")
    for s in sigs:
        if s.name in want:
            event(f"match: offset {s.offset.kind}, {len(s.parts)} part(s)")
    for impl in IMPLS:
        m = Matcher(db, impl=impl, window_size=window)
        r = m.scan_bytes(buf, allmatch=True)
        assert r == ScanResult(
            None, "infected" if want else "clean", want, size=len(buf), bytes_scanned=len(buf)
        ), sigs
        assert m.scan_bytes(buf, allmatch=False).matches == want[:1]


@pytest.mark.parametrize(
    ("sig_text", "buf", "infected"),
    [
        # a later instance of the first part must be kept when an earlier one is too far
        ("S:0:*:aabb{2-3}ccdd", bytes.fromhex("aabb" + "11" * 10 + "aabb0000ccdd"), True),
        ("S:0:*:4141*4242{0-1}4141", b"AABBAAAB" + b"BAA", True),
        ("S:0:*:4141*4242{0}4141", b"AABB_AABB_AA", False),
        ("S:0:EOF-4:4142{-3}4344", b"xxABCD", True),
        ("S:0:EOF-5:4142{-3}4344", b"xxABCD", False),
        ("S:0:1,2:4142*4344", b"xyzwABCD", False),
        ("S:0:1,2:4142*4344", b"xyABCD", True),
    ],
)
def test_pinned_examples(sig_text: str, buf: bytes, infected: bool) -> None:
    db = PatternDB.from_text([("e.ndb", sig_text)])
    for window in (1, 3, WHOLE):
        for impl in IMPLS:
            r = Matcher(db, impl=impl, window_size=window).scan_bytes(buf)
            assert r.infected is infected, (impl, window)


@needs_native
def test_many_signatures_native_equals_twin() -> None:
    """Thousands of atoms fill the native hash buckets and Bloom bitmap; hits must not change."""
    rng = np.random.default_rng(2024)
    sigs, instances = [], []
    for i in range(3000):
        static = rng.integers(0, 256, int(rng.integers(2, 21)), dtype=np.uint8).tobytes()
        body = static.hex()
        inst = static
        if i % 3 == 0:
            body += "??" + static[:2].hex()
            inst += b"\x99" + static[:2]
        if i % 5 == 0:
            body += "{-3}" + static[::-1].hex()
            inst += b"\x01\x02" + static[::-1]
        sigs.append(f"M{i}:0:*:{body}")
        instances.append(inst)
    db = PatternDB.from_text([("many.ndb", "\n".join(sigs))])
    buf = bytearray(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    for k in range(0, 3000, 7):
        at = int(rng.integers(0, len(buf) - 80))
        buf[at : at + len(instances[k])] = instances[k]
    buf = bytes(buf)
    c, py = Matcher(db, impl="c"), Matcher(db, impl="py")
    n = c.tables.n_parts
    hits_c = _hits(c.core, buf, 0, np.zeros(n, dtype=np.uint8))
    assert hits_c == _hits(py.core, buf, 0, np.zeros(n, dtype=np.uint8))
    assert len(hits_c) > 400
    whole = c.scan_bytes(buf)
    assert len(whole.matches) > 400
    assert py.scan_bytes(buf) == whole
    assert Matcher(db, impl="c", window_size=4096).scan_bytes(buf) == whole
