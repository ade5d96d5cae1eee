"""Seeded generator of a ClamAV-format database and a corpus with planted signature instances.

Used by ``test_parity_clamav.py``: the same database and files go to ``clamscan`` and to
``offscan scan``, and the generator knows which (file, signature) pairs must be found.

Every body signature gets its own random static bytes and every part holds at least
``MIN_PART_STATIC`` static bytes (one run of two or more), so a part cannot match by accident
in random data: the only hits are the planted ones. Each signature is planted at most once per
file (positive or negative, sometimes with a decoy copy of a part or two that cannot chain),
which keeps clear of ClamAV's habit of remembering only the last few (``AC_DEFAULT_TRACKLEN``
= 8) candidate positions of each part of a multi-part signature.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

KIB = 1 << 10
MIB = 1 << 20
# Window sizes offscan is run with, plus ClamAV's own 128 KiB scan buffer: instances are
# planted across multiples of each.
WINDOWS = (64 * KIB, 128 * KIB, MIB)
MIN_PART_STATIC = 6  # bytes; 2**-48 chance of a random hit per position
BIG_GAP = 1_300_000  # bytes; an unbounded gap this long skips a whole 1 MiB window

TokKind = Literal["static", "any", "hi", "lo", "alt", "notalt"]
OffsetKind = Literal["any", "abs", "eof"]


@dataclass(frozen=True)
class Tok:
    """One element of a signature part: static bytes, a (nibble) wildcard or alternatives."""

    kind: TokKind
    value: bytes = b""
    options: tuple[bytes, ...] = ()

    @property
    def length(self) -> int:
        if self.kind == "static":
            return len(self.value)
        if self.kind in ("alt", "notalt"):
            return len(self.options[0])
        return 1

    def hex(self) -> str:
        if self.kind == "static":
            return self.value.hex()
        if self.kind == "any":
            return "??"
        if self.kind == "hi":
            return f"{self.value[0] >> 4:x}?"
        if self.kind == "lo":
            return f"?{self.value[0] & 15:x}"
        inner = "|".join(o.hex() for o in self.options)
        return f"!({inner})" if self.kind == "notalt" else f"({inner})"

    def fill(self, rng: random.Random, *, bad: bool = False) -> bytes:
        """Bytes matching this token (or, with ``bad``, bytes that do not)."""
        if self.kind == "static":
            return self.value
        if self.kind == "any":
            return bytes([rng.randrange(256)])
        if self.kind in ("hi", "lo"):
            keep = 0xF0 if self.kind == "hi" else 0x0F
            want = self.value[0] & keep
            while True:
                b = rng.randrange(256)
                if ((b & keep) == want) != bad:
                    return bytes([b])
        inside = (self.kind == "alt") != bad
        if inside:
            return rng.choice(self.options)
        while True:
            other = rng.randbytes(self.length)
            if other not in self.options:
                return other

    @property
    def can_fail(self) -> bool:
        return self.kind != "static" and self.kind != "any"


@dataclass(frozen=True)
class GapSpec:
    """A gap between parts: ``lo``..``hi`` bytes (``hi`` None: unbounded), as written."""

    lo: int
    hi: int | None
    text: str


Part = tuple[Tok, ...]


def part_length(part: Part) -> int:
    return sum(t.length for t in part)


@dataclass(frozen=True)
class BodySig:
    name: str
    offset: str
    kind: OffsetKind
    n: int
    span: int
    parts: tuple[Part, ...]
    gaps: tuple[GapSpec, ...]
    upper: bool = False  # write the hex digits in upper case (both engines accept either)

    def hexsig(self) -> str:
        out = []
        for k, part in enumerate(self.parts):
            if k:
                out.append(self.gaps[k - 1].text)
            out.extend(t.hex() for t in part)
        text = "".join(out)
        return text.upper() if self.upper else text

    def line(self) -> str:
        return f"{self.name}:0:{self.offset}:{self.hexsig()}"

    def min_length(self) -> int:
        return sum(map(part_length, self.parts)) + sum(g.lo for g in self.gaps)


@dataclass(frozen=True)
class HashSig:
    name: str
    suffix: Literal[".hdb", ".hsb"]
    line: str
    algorithm: str
    digest: str
    size: int | None


@dataclass
class Plant:
    """One instance of a body signature written into a corpus file."""

    sig: BodySig
    start: int
    gap_lens: tuple[int, ...]
    positive: bool
    why: str
    chunks: list[tuple[int, bytes]] = field(default_factory=list)  # (position, part bytes)

    def describe(self) -> str:
        sign = "+" if self.positive else "-"
        return f"{sign}{self.sig.name}@{self.start} gaps={list(self.gap_lens)} ({self.why})"


@dataclass
class CorpusFile:
    name: str
    size: int
    plants: list[Plant] = field(default_factory=list)
    data: bytes = b""
    reserved: int = 4  # leading NUL bytes: ClamAV then takes the file for binary, not text

    def occupied(self) -> list[tuple[int, int]]:
        return [(p, p + len(b)) for pl in self.plants for p, b in pl.chunks]


@dataclass
class Generated:
    """A database directory and a corpus directory, with the matches they must produce."""

    seed: int
    body: list[BodySig]
    hashes: list[HashSig]
    files: list[CorpusFile]
    expected: set[tuple[str, str]]  # (file name, signature name), as offscan must report
    ldb: list[Any] = field(default_factory=list)  # sigsgen_ldb.LdbSig
    clamav: set[tuple[str, str]] = field(default_factory=set)  # without files ClamAV skips

    def explain(self, fname: str, sig: str) -> str:
        for f in self.files:
            if f.name == fname:
                plants = [p.describe() for p in f.plants if p.sig.name.split("/")[0] == sig]
                line = next((s.line() for s in self.body if s.name == sig), None)
                if line is None:
                    line = next((s.line() for s in self.ldb if s.name == sig), None)
                if line is None:
                    line = next((h.line for h in self.hashes if h.name == sig), "?")
                return f"{fname} (size {f.size}) {sig}: {line}; plants: {plants or 'none'}"
        return f"{fname} {sig}"


# -- signatures ----------------------------------------------------------------------------

_FEATURES = ("any", "hi", "lo", "alt1", "altn", "notalt1", "notaltn")
_GAP_KINDS = ("*", "{n}", "{n}big", "{-n}", "{n-}", "{n-m}", "{n-m}big", "{-n}big")
_OFFSET_KINDS = ("*", "n", "n,m", "EOF-n", "EOF-n,m")


class _Unique:
    """Random byte strings never handed out twice (so no two signatures share static bytes)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seen: set[bytes] = set()

    def bytes(self, n: int) -> bytes:
        while True:
            b = self.rng.randbytes(n)
            if b not in self.seen:
                self.seen.add(b)
                return b


def _fancy(rng: random.Random, feature: str) -> Tok:
    if feature == "any":
        return Tok("any")
    if feature in ("hi", "lo"):
        return Tok(feature, rng.randbytes(1))  # type: ignore[arg-type]
    width = 1 if feature.endswith("1") else rng.randint(2, 3)
    count = rng.randint(2, 4)
    options: list[bytes] = []
    while len(options) < count:
        o = rng.randbytes(width)
        if o not in options:
            options.append(o)
    return Tok("notalt" if feature.startswith("not") else "alt", options=tuple(options))


def _is_multibyte_alt(t: Tok) -> bool:
    return t.kind in ("alt", "notalt") and t.length > 1


def _clamav_filter_ok(part: Part) -> bool:
    """Whether ClamAV 1.4's shift-or prefilter (filtering.c) handles this part correctly.

    The filter reads a part's byte positions from its start (after any leading multi-byte
    alternatives) up to the first multi-byte alternative: the *region*. Two undocumented
    quirks, avoided here because offscan follows the documented semantics:

    - a region of one position, or of just ``????``, makes the whole database fail to load
      ("Don't know how to create filter", "very bad score");
    - a negated single-byte alternative followed by another position inside the filter's
      chosen window makes the filter reject the real match (its loop over the bytes a negated
      alternative allows stops after the first one), so ClamAV never verifies the match unless
      some other signature's filter hit earlier in the same buffer. ClamAV picks that window
      away from negated alternatives whenever the region holds two adjacent static bytes, so
      a region with a negated alternative that is not its last position must hold such a pair.
    """
    toks = list(part)
    while toks and _is_multibyte_alt(toks[0]):
        toks.pop(0)
    region = toks
    for k, t in enumerate(toks):
        if _is_multibyte_alt(t):
            region = toks[:k]
            if k == 1 or (k == 2 and toks[0].kind == toks[1].kind == "any"):
                return False
            break
    if any(t.kind == "notalt" for t in region[:-1]):
        pairs = (
            t.value[j : j + 2]
            for t in region
            if t.kind == "static"
            for j in range(len(t.value) - 1)
        )
        return any(p not in (b"\0\0", b"\xff\xff") for p in pairs)
    return True


def _make_part(rng: random.Random, uniq: _Unique, forced: list[str]) -> Part:
    while True:
        part = _try_part(rng, uniq, forced)
        if _clamav_filter_ok(part):
            return part


def _try_part(rng: random.Random, uniq: _Unique, forced: list[str]) -> Part:
    """A part: an anchor run of 2..5 static bytes, more static runs of 1..4 bytes until there are
    MIN_PART_STATIC static bytes, and wildcards/alternatives between and around them."""
    runs = [rng.randint(2, 5)]
    while sum(runs) < MIN_PART_STATIC or rng.random() < 0.3:
        runs.append(rng.randint(1, 4))
    rng.shuffle(runs)
    fancy = list(forced)
    for _ in range(rng.randint(0, 3)):
        fancy.append(rng.choice(_FEATURES))
    rng.shuffle(fancy)
    # slots: before the first run, between runs (at least one token, so runs stay apart), after
    slots: list[list[str]] = [[] for _ in range(len(runs) + 1)]
    for i in range(1, len(runs)):
        slots[i].append(fancy.pop() if fancy else "any")
    for f in fancy:
        slots[rng.randrange(len(slots))].append(f)
    toks: list[Tok] = []
    for i, slot in enumerate(slots):
        toks.extend(_fancy(rng, f) for f in slot)
        if i < len(runs):
            run = uniq.bytes(runs[i]) if runs[i] > 1 else rng.randbytes(1)
            toks.append(Tok("static", run))
    return tuple(toks)


def _make_gap(rng: random.Random, kind: str) -> GapSpec:
    if kind == "*":
        return GapSpec(0, None, "*")
    if kind == "{n}":
        n = rng.randint(1, 127)  # ClamAV turns these into n ?? inside one pattern
        return GapSpec(n, n, f"{{{n}}}")
    if kind == "{n}big":
        n = rng.randint(128, 70_000)
        return GapSpec(n, n, f"{{{n}}}")
    if kind == "{-n}":
        n = rng.randint(1, 300)
        return GapSpec(0, n, f"{{-{n}}}")
    if kind == "{-n}big":
        n = rng.randint(60_000, 140_000)
        return GapSpec(0, n, f"{{-{n}}}")
    if kind == "{n-}":
        n = rng.randint(1, 2000)
        return GapSpec(n, None, f"{{{n}-}}")
    if kind == "{n-m}":
        n = rng.randint(0, 200)
        m = n + rng.randint(1, 300)
        return GapSpec(n, m, f"{{{n}-{m}}}")
    if kind == "{n-m}big":
        n = rng.randint(1, 70_000)
        m = n + rng.randint(1, 70_000)
        return GapSpec(n, m, f"{{{n}-{m}}}")
    raise AssertionError(kind)


def _make_offset(rng: random.Random, kind: str, min_len: int) -> tuple[str, OffsetKind, int, int]:
    """(text, kind, n, span) for an offset; absolute ones sit near window edges or near 0."""
    if kind == "*":
        return "*", "any", 0, 0
    if kind in ("n", "n,m"):
        where = rng.random()
        if where < 0.3:
            n = rng.randint(0, 300)
        else:
            edge = rng.choice(WINDOWS) * rng.randint(1, 2 if where < 0.7 else 1)
            n = edge + rng.randint(-60, 120)  # straddles edge or edge + overlap, or just after
        span = rng.randint(1, 400) if kind == "n,m" else 0
        return (f"{n},{span}" if span else str(n)), "abs", n, span
    # EOF-n: the instance must fit between size-n(+span) and the end of the file
    span = rng.randint(1, 300) if kind == "EOF-n,m" else 0
    if rng.random() < 0.3:  # starts far from the end, in an earlier window
        n = min_len + span + rng.randint(1, 1_200_000)
    else:
        n = min_len + span + rng.randint(1, 3000)
    return (f"EOF-{n},{span}" if span else f"EOF-{n}"), "eof", n, span


def make_body_sigs(rng: random.Random, seed: int, count: int) -> list[BodySig]:
    """``count`` body signatures; every feature, gap kind and offset kind occurs several times."""
    uniq = _Unique(rng)
    sigs = []
    for i in range(count):
        nparts = rng.choice((1, 1, 2, 2, 3, 4))
        # the first gap cycles through every kind, later ones are random
        gap_kinds = [_GAP_KINDS[i % len(_GAP_KINDS)]] + [rng.choice(_GAP_KINDS) for _ in range(2)]
        gap_kinds = gap_kinds[: nparts - 1]
        forced = [_FEATURES[i % len(_FEATURES)]]
        parts = tuple(_make_part(rng, uniq, forced if k == 0 else []) for k in range(nparts))
        gaps = tuple(_make_gap(rng, g) for g in gap_kinds)
        body_min = sum(map(part_length, parts)) + sum(g.lo for g in gaps)
        text, kind, n, span = _make_offset(rng, _OFFSET_KINDS[i % len(_OFFSET_KINDS)], body_min)
        name = f"Parity.Body-{seed}-{i:03d}"
        sigs.append(BodySig(name, text, kind, n, span, parts, gaps, upper=i % 4 == 3))
    return sigs


# -- planting ------------------------------------------------------------------------------


def _layout(sig: BodySig, gap_lens: tuple[int, ...]) -> list[tuple[int, int]]:
    """(relative start, length) of each part of an instance."""
    out, pos = [], 0
    for k, part in enumerate(sig.parts):
        ln = part_length(part)
        out.append((pos, ln))
        pos += ln + (gap_lens[k] if k < len(gap_lens) else 0)
    return out


def _pick_gaps(rng: random.Random, sig: BodySig, limit: int) -> tuple[int, ...] | None:
    """Valid gap lengths (boundaries often) with a total instance length <= ``limit``."""
    room = limit - sig.min_length()
    if room < 0:
        return None
    out = []
    for g in sig.gaps:
        hi = g.hi if g.hi is not None else g.lo + rng.choice((0, 50, 5000, BIG_GAP))
        hi = min(hi, g.lo + room)
        r = rng.random()
        n = g.lo if r < 0.3 else hi if r < 0.6 else rng.randint(g.lo, hi)
        room -= n - g.lo
        out.append(n)
    return tuple(out)


def _render(
    rng: random.Random,
    sig: BodySig,
    start: int,
    gap_lens: tuple[int, ...],
    bad: tuple[int, int] | None = None,
) -> list[tuple[int, bytes]]:
    chunks = []
    for k, (rel, _ln) in enumerate(_layout(sig, gap_lens)):
        b = b"".join(t.fill(rng, bad=bad == (k, j)) for j, t in enumerate(sig.parts[k]))
        chunks.append((start + rel, b))
    return chunks


def _edges(size: int, overlap: int) -> list[int]:
    """Window edges inside a file: multiples of each window size, and the same shifted by the
    overlap offscan carries between windows (where its new data actually starts)."""
    out = set()
    for w in WINDOWS:
        for k in range(1, size // w + 1):
            for e in (k * w, k * w + overlap):
                if 0 < e < size:
                    out.add(e)
    return sorted(out)


class _Planter:
    def __init__(self, rng: random.Random, overlap: int) -> None:
        self.rng = rng
        self.overlap = overlap

    @staticmethod
    def _fits(f: CorpusFile, chunks: list[tuple[int, bytes]]) -> bool:
        taken = f.occupied()
        for p, b in chunks:
            if p < f.reserved or p + len(b) > f.size:
                return False
            for s, e in taken:
                if p < e + 1 and s < p + len(b) + 1:
                    return False
        return True

    def _starts(
        self, f: CorpusFile, sig: BodySig, gap_lens: tuple[int, ...]
    ) -> list[tuple[int, str]]:
        """Candidate instance starts for a signature with offset ``*``: straddling edges first."""
        rng = self.rng
        lay = _layout(sig, gap_lens)
        total = lay[-1][0] + lay[-1][1]
        out = []
        edges = _edges(f.size, self.overlap)
        rng.shuffle(edges)
        for e in edges[:20]:
            k = rng.randrange(len(lay))
            rel, ln = lay[k]
            if rng.random() < 0.5 and k + 1 < len(lay) and lay[k + 1][0] > rel + ln:
                # the gap after part k spans the edge
                s = e - rng.randint(rel + ln, lay[k + 1][0])
                out.append((s, f"gap {k} spans edge {e}"))
            elif ln > 1:
                s = e - rel - rng.randint(1, ln - 1)
                out.append((s, f"part {k} straddles edge {e}"))
        for _ in range(20):
            if f.size > total:
                out.append((rng.randrange(0, f.size - total + 1), "random place"))
        out.append((0, "at start"))
        out.append((f.size - total, "at end"))
        return out

    def plant(self, f: CorpusFile, sig: BodySig, mode: str) -> bool:
        """Plant ``sig`` in ``f``; ``mode`` is "pos" or the name of a negative variant."""
        rng = self.rng
        limit = f.size
        if sig.kind == "eof":  # the instance must end inside the file from every start tried
            limit = min(limit, sig.n - sig.span - 1)
        gap_lens = _pick_gaps(rng, sig, limit)
        if gap_lens is None:
            return False
        bad = None
        why = mode
        if mode == "token":
            slots = [
                (k, j) for k, part in enumerate(sig.parts) for j, t in enumerate(part) if t.can_fail
            ]
            if not slots:
                return False
            bad = rng.choice(slots)
            why = f"token {sig.parts[bad[0]][bad[1]].hex()} violated"
        elif mode in ("gap_long", "gap_short"):
            cands = []
            for k, g in enumerate(sig.gaps):
                if mode == "gap_long" and g.hi is not None:
                    cands.append((k, g.hi + 1))
                elif mode == "gap_short" and g.lo > 0:
                    cands.append((k, g.lo - 1))
            if not cands:
                return False
            k, n = rng.choice(cands)
            gap_lens = gap_lens[:k] + (n,) + gap_lens[k + 1 :]
            why = f"gap {k} ({sig.gaps[k].text}) = {n}"
        elif mode == "swap" and len(sig.parts) < 2:
            return False
        lay = _layout(sig, gap_lens)
        total = lay[-1][0] + lay[-1][1]
        if sig.kind == "any":
            if mode == "offset":
                return False
            starts = self._starts(f, sig, gap_lens)
        else:
            lo = sig.n if sig.kind == "abs" else f.size - sig.n
            if lo < 0:  # EOF-n before the start of the file: never matches (ClamAV, offscan)
                if mode != "offset" or lo + sig.span < 0:
                    return False
                picks = [
                    (rng.randint(0, lo + sig.span), "EOF-n before file start, n,m reaching in")
                ]
            elif mode == "offset":
                picks = [
                    (lo - 1, "start = lowest allowed - 1"),
                    (lo + sig.span + 1, "start = highest allowed + 1"),
                ]
            else:
                picks = [
                    (lo, "lowest allowed start"),
                    (lo + sig.span, "highest allowed start"),
                    (lo + rng.randint(0, sig.span), "allowed start"),
                ]
            rng.shuffle(picks)
            starts = picks
        for s, where in starts:
            if s < 0 or s + total > f.size:
                continue
            chunks = _render(rng, sig, s, gap_lens, bad)
            if mode == "swap":
                # first and last part exchange places: right bytes, wrong order
                first, last = chunks[0][1], chunks[-1][1]
                chunks[0] = (chunks[0][0], last)
                chunks[-1] = (chunks[-1][0] + len(last) - len(first), first)
                why = "first and last part swapped"
            decoys = self._decoys(sig, chunks, gap_lens) if mode in ("pos", "gap_long") else []
            if self._fits(f, chunks + decoys) and _disjoint(chunks + decoys):
                note = f"; decoys at {[p for p, _ in decoys]}" if decoys else ""
                f.plants.append(
                    Plant(sig, s, gap_lens, mode == "pos", f"{why}; {where}{note}", chunks + decoys)
                )
                return True
        return False

    def _decoys(
        self, sig: BodySig, chunks: list[tuple[int, bytes]], gap_lens: tuple[int, ...]
    ) -> list[tuple[int, bytes]]:
        """Extra copies of a non-final part that cannot chain to the next part: a bounded gap's
        worth too far before it, or closer to it than the gap's minimum. Sometimes none."""
        rng = self.rng
        out: list[tuple[int, bytes]] = []
        if len(chunks) < 2 or rng.random() < 0.5:
            return out
        for k, g in enumerate(sig.gaps):
            ln = len(chunks[k][1])
            nxt = chunks[k + 1][0]
            if g.hi is not None and rng.random() < 0.5:
                end = nxt - g.hi - 1 - rng.choice((0, 0, rng.randint(1, 300)))
                out.append((end - ln, _render(rng, sig, 0, gap_lens)[k][1]))
            if g.lo > 0 and gap_lens[k] >= ln + g.lo and rng.random() < 0.5:
                end = nxt - rng.randint(0, g.lo - 1)
                out.append((end - ln, _render(rng, sig, 0, gap_lens)[k][1]))
        return out


def _disjoint(chunks: list[tuple[int, bytes]]) -> bool:
    spans = sorted((p, p + len(b)) for p, b in chunks)
    return all(a[1] < b[0] for a, b in itertools.pairwise(spans))


def _negative_modes(sig: BodySig) -> list[str]:
    modes = []
    if any(t.can_fail for part in sig.parts for t in part):
        modes.append("token")
    if any(g.hi is not None for g in sig.gaps):
        modes.append("gap_long")
    if any(g.lo > 0 for g in sig.gaps):
        modes.append("gap_short")
    if sig.kind != "any":
        modes.append("offset")
    if len(sig.parts) > 1 and sig.kind == "any":
        modes.append("swap")
    return modes


# -- hashes --------------------------------------------------------------------------------


def _hash_sigs(rng: random.Random, seed: int, files: list[CorpusFile]) -> list[HashSig]:
    """MD5 (.hdb), SHA1 and SHA256 (.hsb) signatures for some files, one SHA256 with size ``*``,
    and decoys (right digest, wrong size; digests of content that is not in the corpus)."""
    small = [f for f in files if f.size < 64 * KIB]
    medium = [f for f in files if 64 * KIB <= f.size < MIB]
    targets = [
        ("md5", small[0], "size"),
        ("sha1", small[1], "size"),
        ("sha256", small[2], "size"),
        ("sha256", small[3], "*"),
        ("md5", medium[0], "size"),
        ("sha1", medium[1], "*"),
        ("md5", small[0], "wrong size"),
        ("sha256", small[1], "wrong size"),
        ("md5", None, "size"),
        ("sha1", None, "*"),
        ("sha256", None, "size"),
    ]
    out = []
    for i, (algo, f, how) in enumerate(targets):
        data = f.data if f is not None else rng.randbytes(rng.randint(100, 5000))
        digest = hashlib.new(algo, data).hexdigest()
        text = digest.upper() if i % 3 == 1 else digest
        size: int | None = len(data)
        size_text = str(size)
        if how == "wrong size":
            size = len(data) + 1
            size_text = str(size)
        if how == "*":
            size, size_text = None, "*"
        name = f"Parity.Hash-{seed}-{algo}-{i:02d}"
        suffix = ".hdb" if algo == "md5" else ".hsb"
        line = f"{text}:{size_text}:{name}" + (":73" if size is None else "")
        out.append(HashSig(name, suffix, line, algo, digest, size))  # type: ignore[arg-type]
    return out


# -- everything ----------------------------------------------------------------------------

_SIZES = (  # corpus file sizes: small ones for hashes, 64 KiB-scale ones, up to ~3 MiB
    [lambda r: r.randint(300, 6000)] * 4
    + [lambda r: r.randint(100 * KIB, 420 * KIB)] * 5
    + [
        lambda r: r.randint(int(1.1 * MIB), int(1.6 * MIB)),
        lambda r: r.randint(2 * MIB, 3 * MIB),
        lambda r: 3 * MIB - r.randint(0, 4096),
    ]
)


def generate(
    seed: int, dbdir: Path, corpus: Path, *, n_body: int = 60, n_ldb: int = 24
) -> Generated:
    """Write ``parity.ndb/.hdb/.hsb/.ldb`` into ``dbdir`` and the corpus files into ``corpus``."""
    import sigsgen_ldb  # late: it imports this module

    rng = random.Random(seed)
    body = make_body_sigs(rng, seed, n_body)
    overlap = max(part_length(p) for s in body for p in s.parts) - 1
    files = [CorpusFile(f"f{i:02d}.bin", size(rng)) for i, size in enumerate(_SIZES)]
    tiny = sigsgen_ldb.tiny_files()
    planter = _Planter(rng, overlap)
    _plant_body(rng, planter, files, body)
    ldb = sigsgen_ldb.make_ldb_sigs(rng, seed, n_ldb)
    plan = sigsgen_ldb.plant_ldb(rng, planter, files, ldb)
    tiny_body, tiny_ldb = sigsgen_ldb.plant_tiny(rng, seed, tiny, plan)
    body += tiny_body
    ldb += tiny_ldb
    files += tiny
    dbdir.mkdir(parents=True, exist_ok=True)
    corpus.mkdir(parents=True, exist_ok=True)
    for f in files:
        data = bytearray(rng.randbytes(f.size))
        data[: f.reserved] = bytes(min(f.reserved, f.size))
        for pl in f.plants:
            for p, b in pl.chunks:
                data[p : p + len(b)] = b
        f.data = bytes(data)
        (corpus / f.name).write_bytes(f.data)
    hashes = _hash_sigs(rng, seed, files) + sigsgen_ldb.tiny_hash_sigs(seed, tiny)
    hashes += sigsgen_ldb.big_hash_sigs(seed, files)
    (dbdir / "parity.ndb").write_text("".join(s.line() + "\n" for s in body))
    (dbdir / "parity.ldb").write_text("".join(s.line() + "\n" for s in ldb))
    for suffix in (".hdb", ".hsb"):
        (dbdir / f"parity{suffix}").write_text(
            "".join(h.line + "\n" for h in hashes if h.suffix == suffix)
        )
    expected = {(f.name, pl.sig.name) for f in files for pl in f.plants if pl.positive}
    for h in hashes:
        for f in files:
            if (h.size is None or h.size == f.size) and hashlib.new(
                h.algorithm, f.data
            ).hexdigest() == h.digest:
                expected.add((f.name, h.name))
    expected |= sigsgen_ldb.ldb_expected(files, ldb, plan)
    sizes = {f.name: f.size for f in files}
    clamav = {(n, s) for n, s in expected if sizes[n] >= sigsgen_ldb.CLAMAV_MIN_SIZE}
    return Generated(seed, body, hashes, files, expected, ldb, clamav)


def _plant_body(
    rng: random.Random, planter: _Planter, files: list[CorpusFile], body: list[BodySig]
) -> None:
    """One or two positive instances of every body signature and up to two negative ones."""
    for i, sig in enumerate(body):
        order = files[:]
        rng.shuffle(order)
        used: set[str] = set()
        positives, wanted = 0, rng.randint(1, 2)
        for _attempt in range(20):
            for f in order:  # one or two positive instances, each in its own file
                if planter.plant(f, sig, "pos"):
                    used.add(f.name)
                    positives += 1
                    if positives == wanted:
                        break
            if positives:
                break
            if sig.kind == "any":
                continue  # another try picks other gap lengths and places
            # every allowed start collides with other plants: move the offset a little
            n = sig.n + rng.randint(50, 300)
            text = (f"{n}" if sig.kind == "abs" else f"EOF-{n}") + (
                f",{sig.span}" if sig.span else ""
            )
            sig = body[i] = replace(sig, n=n, offset=text)
        assert positives, f"could not plant {sig.line()}"
        modes = _negative_modes(sig)
        rng.shuffle(modes)
        for mode in modes[:2]:  # up to two negative instances, in files without a positive one
            for f in order:
                if f.name not in used and planter.plant(f, sig, mode):
                    used.add(f.name)
                    break
