"""ClamAV logical signatures (``.ldb``): ``Name;TargetDescriptionBlock;Expression;Subsig0;...``.

A logical signature is compiled into ordinary body signatures (one per subsignature, or a few
*variants* of one: wide and ascii forms, case variants of a 2-byte anchor for ``::i``) that the
engine matches like any other; they are not reported by name. After a scan the expression is
evaluated from which subsignatures matched and, where a count modifier needs it, how often
(distinct end offsets, as ClamAV counts). What is supported and what is refused is listed in
``docs/signatures.md``; semantics were checked against clamscan 1.4.6.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from itertools import product
from typing import Literal

from . import fields
from .body import parse_body
from .formats import flevel_reason
from .model import Alt, BodySignature, NotApplied, Offset, Part, SignatureError

MAX_SUBSIGS = 64  # ClamAV's limit
MAX_DEPTH = 64  # parentheses; bounds the recursive parser and evaluator
MAX_VARIANTS = 64  # body signatures one subsignature may expand into (``::i``, ``::wa``)
ENGINE_NEW_ATTRIBUTES = 51  # ClamAV 0.96: attributes past Target need Engine:51- first

Op = Literal["=", ">", "<"]


@dataclass(frozen=True, slots=True)
class Sub:
    """Subsignature ``index``: its number of matches."""

    index: int


@dataclass(frozen=True, slots=True)
class Both:
    """``A&B&...``: every operand matches; generates the sum of their matches."""

    operands: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Either:
    """``A|B|...``: generates the sum of the operands' matches."""

    operands: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Count:
    """``A=X``, ``A>X``, ``A<X``, optionally ``,Y``: at least Y distinct subsignatures."""

    operand: Expr
    op: Op
    x: int
    y: int | None = None


Expr = Sub | Both | Either | Count


@dataclass(frozen=True, slots=True)
class LogicalSignature:
    """A parsed logical signature. ``bodies`` maps each body signature the engine matches for
    it (an index into ``PatternDB.body``) to the subsignature it stands for, and says whether
    only a match ending at the end of the file counts (a fullword match at EOF)."""

    name: str
    source: str
    expression: Expr
    subsigs: int
    file_size: tuple[int, int] | None
    bodies: tuple[tuple[int, int, bool], ...]

    def count_cap(self) -> int:
        """Matches per subsignature worth counting: one more than the largest number a count
        modifier compares with (capping every count there changes no comparison)."""
        return _max_count(self.expression) + 1

    def evaluate(self, counts: list[int], size: int, *, sized: bool = True) -> bool:
        """Whether the signature matches a file of ``size`` bytes (any size if not ``sized``)
        whose subsignature ``i`` matched ``counts[i]`` times (1 stands for "at least once"
        where no count is needed)."""
        fs = self.file_size
        if sized and fs is not None and not fs[0] <= size <= fs[1]:
            return False
        return _eval(self.expression, counts)[0]


@dataclass(frozen=True, slots=True)
class ParsedLogical:
    """One ``.ldb`` line before its body signatures get their places in a PatternDB."""

    name: str
    source: str
    expression: Expr
    file_size: tuple[int, int] | None
    bodies: tuple[tuple[int, BodySignature, bool], ...]  # (subsig, body, must end at EOF)
    subsigs: int


def parse_ldb_line(line: str, where: str) -> ParsedLogical | NotApplied:
    """Parse one logical signature; valid features offscan cannot apply give NotApplied."""
    fields_ = line.split(";")
    if len(fields_) < 4:
        raise SignatureError(
            f"{where}: expected Name;TargetDescriptionBlock;LogicalExpression;Subsig0[;...], "
            f"got {len(fields_)} fields"
        )
    name, tdb, expr_text = fields_[0].strip(), fields_[1].strip(), fields_[2].strip()
    subsig_texts = [s.strip() for s in fields_[3:]]
    if not name:
        raise SignatureError(f"{where}: empty signature name")
    if len(subsig_texts) > MAX_SUBSIGS:
        raise SignatureError(f"{where}: {len(subsig_texts)} subsignatures; at most {MAX_SUBSIGS}")
    target, file_size, skip = _parse_tdb(tdb, where)
    expression, used = _Parser(expr_text, where).parse()
    if max(used) + 1 != len(subsig_texts):
        raise SignatureError(
            f"{where}: {len(subsig_texts)} subsignatures but the expression refers to "
            f"subsignatures 0..{max(used)}"
        )
    counted = _counted(expression, inside=False)
    bodies: list[tuple[int, BodySignature, bool]] = []
    for i, text in enumerate(subsig_texts):
        sub_where = f"{where}: subsignature {i}"
        result = _parse_subsig(text, sub_where, name, target, all_hits=i in counted)
        if isinstance(result, str):
            skip = skip or result
        else:
            bodies.extend((i, b, at_eof) for b, at_eof in result)
    if target != 0:
        return NotApplied(name, where, f"target type {target} not applied")
    if skip:
        return NotApplied(name, where, skip)
    return ParsedLogical(name, where, expression, file_size, tuple(bodies), len(subsig_texts))


# -- target description block --------------------------------------------------------------

_RANGE = re.compile(r"([0-9]+)-([0-9]+)\Z")
_UNSUPPORTED_FOR_TARGET_0 = ("EntryPoint", "NumberOfSections", "IconGroup1", "IconGroup2")


def _range(text: str, where: str, what: str) -> tuple[int, int]:
    m = _RANGE.match(text)
    if not m:
        raise SignatureError(f"{where}: {what} {text[:40]!r}: expected a range min-max")
    lo = fields.number(m.group(1), where, what)
    hi = fields.number(m.group(2), where, what)
    if lo > hi:
        raise SignatureError(f"{where}: {what} {text[:40]!r}: min > max")
    return lo, hi


def _parse_tdb(tdb: str, where: str) -> tuple[int, tuple[int, int] | None, str | None]:
    """(target type, file size range, reason not to apply) from ``Arg:Val,...``."""
    target: int | None = None
    file_size: tuple[int, int] | None = None
    skip: str | None = None
    engine_first = False
    for k, item in enumerate(tdb.split(",")):
        key, sep, value = item.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise SignatureError(f"{where}: target description {item[:40]!r}: expected Arg:Val")
        if key == "Engine":
            if k != 0:
                raise SignatureError(f"{where}: Engine must be the first attribute")
            lo, hi = _range(value, where, "Engine")
            engine_first = lo >= ENGINE_NEW_ATTRIBUTES
            skip = skip or flevel_reason(lo, hi)
            continue
        if key == "Target":
            target = fields.number(value, where, "target type", limit=fields.MAX_FLEVEL)
            continue
        if not engine_first:
            raise SignatureError(
                f"{where}: attribute {key[:40]} needs Engine:{ENGINE_NEW_ATTRIBUTES}-... as the "
                "first attribute (ClamAV refuses it otherwise)"
            )
        if key == "FileSize":
            file_size = _range(value, where, "FileSize")
        elif key == "Container":
            if value != "CL_TYPE_ANY":  # CL_TYPE_ANY: top-level files only, which is all we scan
                skip = skip or f"container {value[:40]} not unpacked"
        elif key == "Intermediates":
            skip = skip or "Intermediates (container layers) not unpacked"
        elif key in _UNSUPPORTED_FOR_TARGET_0:
            pass  # checked below, once the target is known
        else:
            skip = skip or f"unknown attribute {key[:40]}"
    if target is None:
        raise SignatureError(f"{where}: no Target in the target description block {tdb[:40]!r}")
    if target == 0:
        for item in tdb.split(","):
            key = item.partition(":")[0].strip()
            if key in _UNSUPPORTED_FOR_TARGET_0:
                raise SignatureError(f"{where}: {key} needs an executable target, not Target:0")
    return target, file_size, skip


# -- logical expression --------------------------------------------------------------------

_EXPR_TOKEN = re.compile(r"\s*(?:([0-9]+)|(.))")


class _Parser:
    """Recursive descent over ``expr := term [(&||) expr]``, ``term := atom [(=|>|<)X[,Y]]``,
    ``atom := N | (expr)``. Mixed ``&``/``|`` without parentheses group to the right, as in
    ClamAV 1.4 (``0&1|2`` is ``0&(1|2)``)."""

    def __init__(self, text: str, where: str) -> None:
        self.where = f"{where}: expression {text[:60]!r}"
        self.tokens: list[tuple[str, str]] = []
        for m in _EXPR_TOKEN.finditer(text):
            if m.group(1) is not None:
                self.tokens.append(("n", m.group(1)))
            elif m.group(2) is not None:
                self.tokens.append(("op", m.group(2)))
        self.pos = 0
        self.used: set[int] = set()

    def parse(self) -> tuple[Expr, set[int]]:
        if not self.tokens:
            raise SignatureError(f"{self.where}: empty")
        expr = self._expr(0)
        if self.pos != len(self.tokens):
            raise SignatureError(f"{self.where}: unexpected {self.tokens[self.pos][1]!r}")
        return expr, self.used

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _number(self, what: str) -> int:
        tok = self._peek()
        if tok is None or tok[0] != "n":
            raise SignatureError(f"{self.where}: expected a number after {what}")
        self.pos += 1
        return fields.number(tok[1], self.where, what)

    def _expr(self, depth: int) -> Expr:
        if depth > MAX_DEPTH:
            raise SignatureError(f"{self.where}: nested deeper than {MAX_DEPTH}")
        terms, ops = [self._term(depth)], []
        while (tok := self._peek()) is not None and tok[1] in ("&", "|"):
            self.pos += 1
            ops.append(tok[1])
            terms.append(self._term(depth))
        expr = terms[-1]  # fold from the right, without recursion: long chains are fine
        for op, term in zip(reversed(ops), reversed(terms[:-1])):
            node = Both if op == "&" else Either
            rest = expr.operands if isinstance(expr, node) else (expr,)
            expr = node((term, *rest))
        return expr

    def _term(self, depth: int) -> Expr:
        tok = self._peek()
        if tok is None:
            raise SignatureError(f"{self.where}: ends where a subsignature was expected")
        self.pos += 1
        atom: Expr
        if tok[0] == "n":
            index = fields.number(tok[1], self.where, "subsignature", limit=MAX_SUBSIGS - 1)
            self.used.add(index)
            atom = Sub(index)
        elif tok[1] == "(":
            atom = self._expr(depth + 1)
            close = self._peek()
            if close is None or close[1] != ")":
                raise SignatureError(f"{self.where}: unbalanced '('")
            self.pos += 1
            nxt = self._peek()
            if nxt is not None and nxt[1] in "=><" and isinstance(atom, Sub | Count):
                raise SignatureError(
                    f"{self.where}: a count modifier on a group of one term; write 0=X, not "
                    "(0)=X or ((0>1))=X (ClamAV refuses it too)"
                )
        else:
            raise SignatureError(f"{self.where}: unexpected {tok[1]!r}")
        tok = self._peek()
        if tok is not None and tok[1] in "=><":
            self.pos += 1
            op: Op = tok[1]  # type: ignore[assignment]
            x = self._number(op)
            y = None
            nxt = self._peek()
            if nxt is not None and nxt[1] == ",":
                self.pos += 1
                y = self._number(",")
            atom = Count(atom, op, x, y)
        return atom


def _counted(expr: Expr, *, inside: bool) -> set[int]:
    """Subsignatures whose number of matches matters (those under a count modifier)."""
    if isinstance(expr, Sub):
        return {expr.index} if inside else set()
    if isinstance(expr, Count):
        return _counted(expr.operand, inside=True)
    out: set[int] = set()
    for child in expr.operands:
        out |= _counted(child, inside=inside)
    return out


def _max_count(expr: Expr) -> int:
    if isinstance(expr, Sub):
        return 0
    if isinstance(expr, Count):
        return max(expr.x, _max_count(expr.operand))
    return max(_max_count(child) for child in expr.operands)


def _eval(expr: Expr, counts: list[int]) -> tuple[bool, int, int]:
    """(holds, matches, bitmask of distinct subsignatures) of an expression, as clamscan 1.4
    computes them (measured, the documentation leaves it open): ``&`` and ``|`` add the
    matches and join the subsignatures of their operands that hold; a count modifier yields
    its operand's matches, and its subsignature when the operand is a single one (even if
    that matched 0 times, as in ``0=0``) but none for a group."""
    if isinstance(expr, Sub):
        c = counts[expr.index]
        return (c > 0, c, 1 << expr.index if c else 0)
    if isinstance(expr, Both | Either):
        held, total, ids = False, 0, 0
        for child in expr.operands:
            ok, c, d = _eval(child, counts)
            if ok:
                held, total, ids = True, total + c, ids | d
            elif isinstance(expr, Both):
                return (False, 0, 0)
        return (held, total, ids) if held else (False, 0, 0)
    _, c, d = _eval(expr.operand, counts)
    ok = c == expr.x if expr.op == "=" else c > expr.x if expr.op == ">" else c < expr.x
    if not ok or (expr.y is not None and d.bit_count() < expr.y):
        return (False, 0, 0)
    return (True, c, 1 << expr.operand.index if isinstance(expr.operand, Sub) else 0)


# -- subsignatures -------------------------------------------------------------------------

_MODIFIERS = frozenset("iwaf")


def _parse_subsig(
    text: str, where: str, name: str, target: int, *, all_hits: bool
) -> list[tuple[BodySignature, bool]] | str:
    """Body signatures for one subsignature (each with its "must end at EOF" flag), or the
    reason it cannot be applied."""
    if text.startswith("$"):
        return "macro subsignatures not supported"
    if "/" in text:
        return "PCRE subsignatures not supported"
    if text.startswith("fuzzy_img#"):
        return "fuzzy image hash subsignatures not supported"
    if "(" in text and text.count("#") >= 2:
        return "byte compare subsignatures not supported"
    tokens = text.split(":")
    mods = ""
    if len(tokens) in (3, 4):
        if tokens[-2] != "":  # "hex::" (no modifiers) is accepted, as by ClamAV
            raise SignatureError(f"{where}: expected [Offset:]HexSignature[::Modifiers]")
        mods = tokens[-1]
        tokens = tokens[:-2]
    if len(tokens) == 2:
        offset_text, hexsig = tokens
    elif len(tokens) == 1:
        offset_text, hexsig = "*", tokens[0]
    else:
        raise SignatureError(f"{where}: expected [Offset:]HexSignature[::Modifiers]")
    if set(mods) - _MODIFIERS:
        raise SignatureError(f"{where}: unknown modifier in {mods[:20]!r}; expected i, w, a, f")
    offset = fields.offset(offset_text.strip(), where, strict=target == 0)
    if "f" in mods and "w" in mods and offset.kind != "any":
        return "fullword wide (::wf) with an offset not supported"
    if "f" in mods and offset.kind == "eof":
        return "fullword (::f) with an EOF-relative offset not supported"
    hexsig = hexsig.strip()
    forms = []
    if "w" in mods:
        forms.append(_widen(hexsig, where))
    if "w" not in mods or "a" in mods:
        forms.append(hexsig)
    out: list[tuple[BodySignature, bool]] = []
    for k, form in enumerate(forms):
        wide = "w" in mods and k == 0
        parts, gaps = parse_body(form, where)
        if mods and any(a.negated for p in parts for a in p.alts):
            raise SignatureError(
                f"{where}: a negated alternative cannot take ::{mods} (ClamAV refuses it too)"
            )
        variants = _nocase(parts, where) if "i" in mods else [parts]
        for v in variants:
            body = BodySignature(name, target, offset, v, gaps, where, all_hits=all_hits)
            out.extend(_fullword(body, wide=wide) if "f" in mods else [(body, False)])
    if len(out) > MAX_VARIANTS:
        raise SignatureError(
            f"{where}: expands into {len(out)} body signatures (at most {MAX_VARIANTS})"
        )
    return out


def _widen(hexsig: str, where: str) -> str:
    """ClamAV's wide form: every hex byte (``??`` and nibbles too) is followed by ``00``;
    gaps are not widened and ``[n-m]`` becomes ``{n-m}``."""
    out: list[str] = []
    i, n = 0, len(hexsig)
    while i < n:
        c = hexsig[i]
        if c in "*|)!(":
            out.append(c)
            i += 1
        elif c in "{[":
            close = "}" if c == "{" else "]"
            j = hexsig.find(close, i)
            if j < 0:
                raise SignatureError(f"{where}: {hexsig[i : i + 12]}: unterminated '{c}'")
            out.append("{" + hexsig[i + 1 : j] + "}")
            i = j + 1
        else:
            out.append(hexsig[i : i + 2] + "00")
            i += 2
    return "".join(out)


_LETTERS = frozenset(range(0x41, 0x5B)) | frozenset(range(0x61, 0x7B))


def _nocase(parts: tuple[Part, ...], where: str) -> list[tuple[Part, ...]]:
    """Case-insensitive forms of ``parts``: each part keeps one 2-byte anchor of static bytes
    (its letters spelled out in every case, one variant each) and every other letter becomes
    a two-way alternative, so the engine still finds every part by a static anchor."""
    per_part = [_nocase_part(p, where) for p in parts]
    total = 1
    for forms in per_part:
        total *= len(forms)
    if total > MAX_VARIANTS:
        raise SignatureError(f"{where}: ::i expands into {total} variants (at most {MAX_VARIANTS})")
    return [tuple(combo) for combo in product(*per_part)]


def _nocase_part(part: Part, where: str) -> list[Part]:
    values, masks = part.values, part.masks
    static = [m == 0xFF for m in masks]
    letter = [static[i] and values[i] in _LETTERS for i in range(len(values))]
    windows = [
        (letter[i] + letter[i + 1], i)
        for i in range(len(values) - 1)
        if static[i] and static[i + 1]
    ]
    _, anchor = min(windows)  # parse_body guarantees a 2-byte static run
    alts = [_nocase_alt(a, where) for a in part.alts]
    base_values, base_masks = bytearray(values), bytearray(masks)
    for i in range(len(values)):
        if letter[i] and i not in (anchor, anchor + 1):
            alts.append(Alt(i, (bytes([values[i] & 0xDF]), bytes([values[i] | 0x20]))))
            base_values[i] = base_masks[i] = 0
    alts.sort(key=lambda a: a.offset)
    choices = [
        (values[i] & 0xDF, values[i] | 0x20) if letter[i] else (values[i],)
        for i in (anchor, anchor + 1)
    ]
    out = []
    for a, b in product(*choices):
        v = bytearray(base_values)
        v[anchor], v[anchor + 1] = a, b
        out.append(Part(bytes(v), bytes(base_masks), tuple(alts)))
    return out


def _nocase_alt(alt: Alt, where: str) -> Alt:
    options: list[bytes] = []
    for o in alt.options:
        cases = [(c & 0xDF, c | 0x20) if c in _LETTERS else (c,) for c in o]
        for combo in product(*cases):
            options.append(bytes(combo))
            if len(options) > 256:
                raise SignatureError(f"{where}: ::i alternative has too many case variants")
    return Alt(alt.offset, tuple(dict.fromkeys(options)), alt.negated)


_ALNUM = tuple(
    bytes([c]) for c in b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


# One byte next to a fullword match: (values byte, mask byte, alternative options, negated)
_Byte = tuple[int, int, tuple[bytes, ...], bool]
_ANY: _Byte = (0, 0, (), False)
_NOT_ALNUM: _Byte = (0, 0, _ALNUM, True)
_IS_ALNUM: _Byte = (0, 0, _ALNUM, False)
_NOT_NUL: _Byte = (0, 0, (b"\0",), True)


def _extend(part: Part, before: list[_Byte], after: list[_Byte]) -> Part:
    """``part`` with constrained bytes added before and after it."""
    n = len(before)
    alts = [Alt(k, o, neg) for k, (_, _, o, neg) in enumerate(before) if o]
    alts += [Alt(a.offset + n, a.options, a.negated) for a in part.alts]
    alts += [Alt(n + part.length + k, o, neg) for k, (_, _, o, neg) in enumerate(after) if o]
    values = bytes(v for v, _, _, _ in before) + part.values + bytes(v for v, _, _, _ in after)
    masks = bytes(m for _, m, _, _ in before) + part.masks + bytes(m for _, m, _, _ in after)
    return Part(values, masks, tuple(alts))


def _fullword(body: BodySignature, *, wide: bool) -> list[tuple[BodySignature, bool]]:
    """A fullword (``::f``) subsignature as several body signatures, one per way its match
    can be delimited, as ClamAV's ``(W)`` marker does (measured with clamscan 1.4.6):

    - ASCII: the byte before and the byte after are not letters or digits, or the match
      touches the start / end of the file;
    - wide: the 2-byte character before and after is not a letter or digit followed by NUL,
      or the match starts at offset 0 or 1, or ends at EOF (or one non-alphanumeric byte
      before it).

    A match at the end of the file cannot be told by its start, so those variants count every
    match and keep only one ending at EOF (the flag returned with each body)."""
    off = body.offset
    starts: list[tuple[Offset, list[_Byte]]]  # where the variant starts, bytes before
    if wide:  # offsets other than "*" are refused by the caller
        starts = [(off, [_NOT_ALNUM, _ANY]), (off, [_IS_ALNUM, _NOT_NUL])]
        starts += [(Offset("abs", 0), [_ANY]), (Offset("abs", 0), [])]
        ends: list[tuple[list[_Byte], bool]] = [
            ([_NOT_ALNUM, _ANY], False),
            ([_IS_ALNUM, _NOT_NUL], False),
            ([_NOT_ALNUM], True),
            ([], True),
        ]
    else:
        ends = [([_NOT_ALNUM], False), ([], True)]
        if off.kind == "any":
            starts = [(off, [_NOT_ALNUM]), (Offset("abs", 0), [])]
        elif off.n >= 1:
            starts = [(Offset("abs", off.n - 1, off.span), [_NOT_ALNUM])]
        else:
            starts = [(Offset("abs", 0), [])]
            if off.span:
                starts.append((Offset("abs", 0, off.span - 1), [_NOT_ALNUM]))
    out = []
    for offset, before in starts:
        for after, at_eof in ends:
            parts = list(body.parts)
            if len(parts) == 1:
                parts[0] = _extend(parts[0], before, after)
            else:
                parts[0] = _extend(parts[0], before, [])
                parts[-1] = _extend(parts[-1], [], after)
            all_hits = body.all_hits or at_eof
            variant = replace(body, offset=offset, parts=tuple(parts), all_hits=all_hits)
            out.append((variant, at_eof))
    return out
