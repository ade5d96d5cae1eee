"""Logical signatures (.ldb) and tiny files for the parity generator (``sigsgen.generate``).

Each logical signature gets 1-4 subsignatures: random-byte ones in the full ``.ndb`` body
syntax (some with offsets) and ASCII-word ones with the modifiers ``::i``, ``::w``, ``::wa``,
``::a``, ``::f``, ``::fi``, ``::wi``. Its expression is a random tree of ``&``, ``|`` and count
modifiers (``=X``, ``>X``, ``<X``, ``,Y``) that is false when nothing matches (ClamAV 1.4
reports such signatures on every file it takes for text, whatever it holds). Instances are
planted as *copies* of subsignatures, a chosen number per file; decoy copies (wrong case, an
ASCII copy of a wide-only word, a word glued to a letter) must not count. What must match is
decided here by an evaluator written from ClamAV's documentation, independent of offscan's.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field, replace

from sigsgen import (
    BodySig,
    CorpusFile,
    HashSig,
    Plant,
    Tok,
    _make_gap,
    _make_part,
    _Planter,
    _Unique,
)

ENGINE = "Engine:81-255"  # modifiers and attributes past Target need a new-enough Engine


@dataclass(frozen=True)
class Leaf:
    index: int


@dataclass(frozen=True)
class Op:
    op: str  # "&" or "|"
    kids: tuple[Expr, ...]


@dataclass(frozen=True)
class Cnt:
    kid: Expr
    op: str  # "=", ">" or "<"
    x: int
    y: int | None


Expr = Leaf | Op | Cnt


def value(e: Expr, counts: list[int]) -> bool:
    """Whether an expression holds. ClamAV's documentation does not say how counts and
    distinct subsignatures combine in nested expressions; this follows what clamscan 1.4.6
    does (measured case by case): each node yields (holds, matches, distinct subsignatures)."""
    return _node(e, counts)[0]


def _node(e: Expr, counts: list[int]) -> tuple[bool, int, frozenset[int]]:
    no: tuple[bool, int, frozenset[int]] = (False, 0, frozenset())
    if isinstance(e, Leaf):
        c = counts[e.index]
        return (True, c, frozenset([e.index])) if c else no
    if isinstance(e, Op):
        results = [_node(k, counts) for k in e.kids]
        held = [r for r in results if r[0]]
        if not held or (e.op == "&" and len(held) < len(results)):
            return no
        return (True, sum(r[1] for r in held), frozenset().union(*(r[2] for r in held)))
    _, c, ids = _node(e.kid, counts)
    holds = {"=": c == e.x, ">": c > e.x, "<": c < e.x}[e.op]
    if not holds or (e.y is not None and len(ids) < e.y):
        return no
    return (True, c, frozenset([e.kid.index]) if isinstance(e.kid, Leaf) else frozenset())


def leaves(e: Expr) -> list[int]:
    if isinstance(e, Leaf):
        return [e.index]
    if isinstance(e, Op):
        return [i for k in e.kids for i in leaves(k)]
    return leaves(e.kid)


def counted(e: Expr, inside: bool = False) -> set[int]:
    if isinstance(e, Leaf):
        return {e.index} if inside else set()
    if isinstance(e, Op):
        return set().union(*(counted(k, inside) for k in e.kids))
    return counted(e.kid, True)


def render(e: Expr, top: bool = True) -> str:
    if isinstance(e, Leaf):
        return str(e.index)
    if isinstance(e, Cnt):
        text = render(e.kid, top=False) + f"{e.op}{e.x}" + (f",{e.y}" if e.y is not None else "")
        return text if top else f"({text})"
    text = e.op.join(render(k, top=False) for k in e.kids)
    return text if top else f"({text})"


def _tree(rng: random.Random, idx: list[int]) -> Expr:
    if len(idx) == 1:
        node: Expr = Leaf(idx[0])
    else:
        cut = rng.randint(1, len(idx) - 1)
        node = Op(rng.choice("&|"), (_tree(rng, idx[:cut]), _tree(rng, idx[cut:])))
    if rng.random() < 0.35:
        op = rng.choice("=><")
        x = rng.randint(1, 3) if op != ">" else rng.randint(0, 2)
        n = len(leaves(node))
        y = rng.randint(1, n) if n > 1 and rng.random() < 0.5 else None
        node = Cnt(node, op, x, y)
    return node


# -- subsignatures -------------------------------------------------------------------------


@dataclass
class SubSig:
    text: str  # as written in the .ldb line
    forms: list[BodySig]  # what a counting copy looks like (one picked per copy)
    decoys: list[BodySig]  # copies that must not count
    nocase: bool = False  # copies get their letters' case flipped at random


def _word(rng: random.Random, n: int) -> bytes:
    return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def _form(name: str, toks: list[Tok], offset: str = "*") -> BodySig:
    kind = "any" if offset == "*" else "abs"
    n = int(offset.split(",")[0]) if kind == "abs" else 0
    span = int(offset.split(",")[1]) if "," in offset else 0
    return BodySig(name, offset, kind, n, span, (tuple(toks),), ())  # type: ignore[arg-type]


def _widen(toks: list[Tok]) -> list[Tok]:
    out: list[Tok] = []
    for t in toks:
        if t.kind == "static":
            out.append(Tok("static", b"".join(bytes([c, 0]) for c in t.value)))
        else:
            out += [t, Tok("static", b"\0")]  # ClamAV widens ?? too
    return out


WORD_MODIFIERS = ("", "::i", "::w", "::wa", "::a", "::f", "::fi", "::wi", "::wf", "::wfi", "::wfa")


def _word_subsig(rng: random.Random, name: str, mods: str) -> SubSig:
    toks = [Tok("static", _word(rng, rng.randint(6, 9)))]
    if rng.random() < 0.4:
        toks += [Tok("any"), Tok("static", _word(rng, rng.randint(3, 5)))]
    hexsig = "".join(t.hex() for t in toks)
    wide, ascii_ = "w" in mods, "w" not in mods or "a" in mods
    forms, decoys = [], []
    delim = [Tok("static", bytes([rng.choice(b" .,;-_\0\x80\xff")])) for _ in range(2)]
    glued = Tok("static", rng.choice([b"x", b"Q", b"7"]))
    if ascii_:
        forms.append(_form(name, [delim[0], *toks, delim[1]] if "f" in mods else toks))
    if wide and "f" in mods:  # wide characters around it: not a letter or digit and NUL
        wdelim = [Tok("static", d.value + b"\0") for d in delim]
        forms.append(_form(name, [wdelim[0], *_widen(toks), wdelim[1]]))
        wglued = Tok("static", glued.value + b"\0")
        decoys.append(_form(name, [wglued, *_widen(toks), wdelim[1]]))
        decoys.append(_form(name, [wdelim[0], *_widen(toks), wglued]))
    elif wide:
        forms.append(_form(name, _widen(toks)))
    if "f" in mods and ascii_:
        decoys.append(_form(name, [glued, *toks, delim[1]]))
        decoys.append(_form(name, [delim[0], *toks, glued]))
    if not wide:
        decoys.append(_form(name, _widen(toks)))
    elif not ascii_:
        decoys.append(_form(name, toks))
    sub = SubSig(hexsig + mods, forms, decoys, nocase="i" in mods)
    if not sub.nocase:  # a copy in the other case must not count
        upper = [Tok("static", t.value.upper()) if t.kind == "static" else t for t in toks]
        sub.decoys.append(_form(name, [delim[0], *upper, delim[1]] if "f" in mods else upper))
    return sub


def _binary_subsig(
    rng: random.Random, uniq: _Unique, name: str, *, count: bool, where: str
) -> SubSig:
    """Random bytes in .ndb syntax; ``where`` ("*", "abs" or "eof") for a presence-only one."""
    nparts = 1 if count else rng.choice((1, 1, 2))
    parts = tuple(_make_part(rng, uniq, []) for _ in range(nparts))
    gaps = tuple(_make_gap(rng, rng.choice(("{n}", "{-n}", "{n-m}", "*"))) for _ in parts[1:])
    offset, kind, n, span = "*", "any", 0, 0
    if not count and where != "*":
        n, span = rng.randint(0, 3000), rng.choice((0, rng.randint(1, 300)))
        kind = where
        if kind == "eof":
            n += sum(len(t.hex()) // 2 for p in parts for t in p) + span + 4000
        offset = ("EOF-" if kind == "eof" else "") + str(n) + (f",{span}" if span else "")
    sig = BodySig(name, offset, kind, n, span, parts, gaps)  # type: ignore[arg-type]
    text = sig.hexsig() if offset == "*" else f"{offset}:{sig.hexsig()}"
    # with a modifier ClamAV refuses negated alternatives and treats every alternative as a
    # multi-byte one when it builds its prefilter (sigsgen._clamav_filter_ok), so only
    # subsignatures without alternatives get one
    alts = any(t.kind in ("alt", "notalt") for p in parts for t in p)
    mods = "" if alts else rng.choice(["", "", "::a"])
    return SubSig(text + mods, [sig], [])


# -- logical signatures --------------------------------------------------------------------


@dataclass
class LdbSig:
    name: str
    expr: Expr
    subs: list[SubSig]
    file_size: tuple[int, int] | None = None
    target: int = 0

    def line(self) -> str:
        tdb = f"{ENGINE},Target:{self.target}"
        if self.file_size:
            tdb += f",FileSize:{self.file_size[0]}-{self.file_size[1]}"
        return ";".join([self.name, tdb, render(self.expr), *(s.text for s in self.subs)])

    def matches(self, counts: list[int], size: int) -> bool:
        if self.target != 0:
            return False
        if self.file_size and not self.file_size[0] <= size <= self.file_size[1]:
            return False
        return value(self.expr, counts)


def make_ldb_sigs(rng: random.Random, seed: int, count: int) -> list[LdbSig]:
    uniq = _Unique(rng)
    out = []
    words = binaries = 0
    for i in range(count):
        name = f"Parity.Ldb-{seed}-{i:02d}"
        n = rng.randint(1, 4)
        while True:
            expr = _tree(rng, list(range(n)))
            if not value(expr, [0] * n):  # never true when nothing matches
                break
        many = counted(expr)
        subs = []
        for k in range(n):
            if rng.random() < 0.5:  # every modifier in turn
                mods = WORD_MODIFIERS[words % len(WORD_MODIFIERS)]
                words += 1
                subs.append(_word_subsig(rng, f"{name}/{k}", mods))
            else:
                where = "*" if k in many else ("*", "abs", "*", "eof")[binaries % 4]
                binaries += k not in many
                subs.append(_binary_subsig(rng, uniq, f"{name}/{k}", count=k in many, where=where))
        size = None
        if i % 5 == 2:  # some files are bigger than 500,000 bytes, some smaller
            size = rng.choice([(0, 500_000), (500_001, 10**9)])
        out.append(LdbSig(name, expr, subs, size, target=1 if i == count - 1 else 0))
    return out


@dataclass
class LdbPlan:
    """Copies planted per (file, logical signature): counts per subsignature."""

    counts: dict[tuple[str, str], list[int]] = field(default_factory=dict)


def _vectors(rng: random.Random, sig: LdbSig, want: bool) -> list[int] | None:
    many = counted(sig.expr)
    for _ in range(200):
        vec = [rng.randint(0, 3) if k in many else rng.randint(0, 1) for k in range(len(sig.subs))]
        if any(vec) and value(sig.expr, vec) == want:
            return vec
    return None


def _flip(c: int, rng: random.Random) -> int:
    """Maybe the other case of an ASCII letter."""
    letter = 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A
    return c ^ 0x20 if letter and rng.random() < 0.5 else c


def _copy(planter: _Planter, f: CorpusFile, form: BodySig, why: str, nocase: bool) -> bool:
    if not planter.plant(f, form, "pos"):
        return False
    pl = f.plants[-1]
    chunks = pl.chunks
    if nocase:
        rng = planter.rng
        chunks = [(p, bytes(_flip(c, rng) for c in b)) for p, b in chunks]
    f.plants[-1] = replace(pl, positive=False, why=why, chunks=chunks)
    return True


def plant_ldb(
    rng: random.Random, planter: _Planter, files: list[CorpusFile], sigs: list[LdbSig]
) -> LdbPlan:
    """Plant positive and negative count vectors of every logical signature, plus decoys."""
    plan = LdbPlan()
    roomy = [f for f in files if f.size > 4096]
    for sig in sigs:
        order = roomy[:]
        rng.shuffle(order)
        wants = [True] * rng.randint(1, 2) + [False] * rng.randint(1, 2)
        for want, f in zip(wants, order):
            vec = _vectors(rng, sig, want)
            if vec is None:
                continue
            got = [0] * len(sig.subs)
            for k, sub in enumerate(sig.subs):
                for _ in range(vec[k]):
                    form = rng.choice(sub.forms)
                    if _copy(planter, f, form, f"{sig.name} sub {k} copy", sub.nocase):
                        got[k] += 1
                if sub.decoys and rng.random() < 0.6:
                    _copy(planter, f, rng.choice(sub.decoys), f"{sig.name} sub {k} decoy", False)
            plan.counts[(f.name, sig.name)] = got
    return plan


def ldb_expected(
    files: list[CorpusFile], sigs: list[LdbSig], plan: LdbPlan
) -> set[tuple[str, str]]:
    out = set()
    for f in files:
        for sig in sigs:
            counts = plan.counts.get((f.name, sig.name), [0] * len(sig.subs))
            if sig.matches(counts, f.size):
                out.add((f.name, sig.name))
    return out


# -- tiny files and their hashes -----------------------------------------------------------

TINY_MAX = 16  # bytes
CLAMAV_MIN_SIZE = 6  # ClamAV does not scan files of 5 bytes or fewer


def tiny_files() -> list[CorpusFile]:
    return [CorpusFile(f"t{n:02d}.bin", n) for n in range(TINY_MAX + 1)]


def tiny_hash_sigs(seed: int, files: list[CorpusFile]) -> list[HashSig]:
    """A hash signature for every tiny file (size 0 only as ``*``: ClamAV refuses size 0)."""
    out = []
    for i, f in enumerate(files):
        algo = ("md5", "sha1", "sha256")[i % 3] if f.size else "sha256"
        digest = hashlib.new(algo, f.data).hexdigest()
        any_size = f.size == 0 or (i % 5 == 4 and algo != "md5")
        size_text = "*" if any_size else str(f.size)
        name = f"Parity.Tiny-{seed}-{f.size:02d}-{algo}"
        line = f"{digest}:{size_text}:{name}" + (":73" if any_size else "")
        suffix = ".hdb" if algo == "md5" else ".hsb"
        out.append(HashSig(name, suffix, line, algo, digest, None if any_size else f.size))  # type: ignore[arg-type]
    return out


def plant_tiny(
    rng: random.Random, seed: int, tiny: list[CorpusFile], plan: LdbPlan
) -> tuple[list[BodySig], list[LdbSig]]:
    """A 6-byte body signature in each tiny file of 10 bytes or more (after its NUL prefix),
    at ``*``, an absolute offset or ``EOF-n``, and one logical signature in the largest."""
    body, ldb = [], []
    for f in tiny:
        if f.size < 10:
            continue
        data = rng.randbytes(6)
        offset, kind, n = rng.choice(
            [("*", "any", 0), ("4", "abs", 4), (f"EOF-{f.size - 4}", "eof", f.size - 4)]
        )
        part = (Tok("static", data),)
        if f.size == TINY_MAX:  # the logical one
            name = f"Parity.TinyLdb-{seed}"
            sub = _form(f"{name}/0", list(part))
            ldb.append(LdbSig(name, Cnt(Leaf(0), "=", 1, None), [SubSig(data.hex(), [sub], [])]))
            plan.counts[(f.name, name)] = [1]
            f.plants.append(Plant(sub, 4, (), False, "tiny ldb", [(4, data)]))
            continue
        sig = BodySig(f"Parity.TinyBody-{seed}-{f.size:02d}", offset, kind, n, 0, (part,), ())  # type: ignore[arg-type]
        f.plants.append(Plant(sig, 4, (), True, "tiny file", [(4, data)]))
        body.append(sig)
    return body, ldb


def big_hash_sigs(seed: int, files: list[CorpusFile]) -> list[HashSig]:
    """Hash signatures of the three largest files (over 1 MiB: several scan windows)."""
    out = []
    for algo, f in zip(("md5", "sha1", "sha256"), sorted(files, key=lambda f: -f.size)[:3]):
        digest = hashlib.new(algo, f.data).hexdigest()
        any_size = algo == "sha1"
        name = f"Parity.Big-{seed}-{algo}"
        line = f"{digest}:{'*' if any_size else f.size}:{name}" + (":73" if any_size else "")
        suffix = ".hdb" if algo == "md5" else ".hsb"
        out.append(HashSig(name, suffix, line, algo, digest, None if any_size else f.size))  # type: ignore[arg-type]
    return out
