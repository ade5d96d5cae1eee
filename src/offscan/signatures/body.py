"""ClamAV's hex body syntax, parsed into fixed-length parts and the gaps between them.

One compiled regular expression tokenizes a signature; a run of static hex bytes is one token
converted by ``bytes.fromhex``, so parsing costs a few regex steps per signature rather than
several Python calls per byte (100k signatures: ~5 s before, well under 1 s now).
"""

from __future__ import annotations

import re
from typing import NoReturn

from .fields import number
from .model import MAX_PART_LENGTH, MIN_STATIC_RUN, Alt, Gap, Part, SignatureError

_TOKEN = re.compile(
    r"(?P<hex>(?:[0-9a-fA-F]{2})+)"
    r"|(?P<any>(?:\?\?)+)"
    r"|(?P<hi>[0-9a-fA-F]\?)"
    r"|(?P<lo>\?[0-9a-fA-F])"
    r"|(?P<star>\*)"
    r"|(?P<gap>\{[^}]*\}|\[[^\]]*\])"
    r"|(?P<alt>!?\([^)]*\))"
)
_GAP_BRACE = re.compile(r"([0-9]*)(-?)([0-9]*)\Z")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+\Z")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class _PartBuilder:
    """Bytes of the part being parsed, and the longest run of static bytes seen in it."""

    __slots__ = ("values", "masks", "alts", "run", "best")

    def __init__(self) -> None:
        self.values = bytearray()
        self.masks = bytearray()
        self.alts: list[Alt] = []
        self.run = 0
        self.best = 0

    def static(self, data: bytes) -> None:
        self.values += data
        self.masks += b"\xff" * len(data)
        self.run += len(data)
        if self.run > self.best:
            self.best = self.run

    def other(self, values: bytes, masks: bytes) -> None:
        self.values += values
        self.masks += masks
        self.run = 0


def parse_body(hexsig: str, where: str = "<signature>") -> tuple[tuple[Part, ...], tuple[Gap, ...]]:
    """Parse a ClamAV hex body signature into fixed-length parts and the gaps between them."""
    if not hexsig:
        raise SignatureError(f"{where}: empty hex signature")
    try:  # the common case, one static part, at C speed
        data = bytes.fromhex(hexsig)
    except ValueError:
        pass
    else:  # fromhex skips whitespace, which the length check catches
        if 2 * len(data) == len(hexsig) and MIN_STATIC_RUN <= len(data) <= MAX_PART_LENGTH:
            return (Part(data, b"\xff" * len(data)),), ()
    parts: list[Part] = []
    gaps: list[Gap] = []
    weakest: list[tuple[int, int]] = []  # (best static run, part index)
    cur = _PartBuilder()
    pos, n = 0, len(hexsig)

    def close_part(token: str) -> None:
        nonlocal cur
        if not cur.values:
            raise SignatureError(
                f"{where}: {token}: a gap must sit between two byte sequences "
                "(not at the start, the end, or next to another gap)"
            )
        if len(cur.values) > MAX_PART_LENGTH:
            raise SignatureError(
                f"{where}: part of {len(cur.values)} bytes exceeds {MAX_PART_LENGTH}; "
                "split it with a gap"
            )
        weakest.append((cur.best, len(parts)))
        parts.append(Part(bytes(cur.values), bytes(cur.masks), tuple(cur.alts)))
        cur = _PartBuilder()

    while pos < n:
        m = _TOKEN.match(hexsig, pos)
        if m is None:
            _syntax_error(hexsig, pos, where)
        kind, text = m.lastgroup, m.group()
        pos = m.end()
        if kind == "hex":
            cur.static(bytes.fromhex(text))
        elif kind == "any":
            cur.other(bytes(len(text) // 2), bytes(len(text) // 2))
        elif kind == "hi":
            cur.other(bytes([int(text[0], 16) << 4]), b"\xf0")
        elif kind == "lo":
            cur.other(bytes([int(text[1], 16)]), b"\x0f")
        elif kind == "star":
            close_part("*")
            gaps.append(Gap(0, None))
        elif kind == "gap":
            gap = _parse_gap(text, where, bracket=text[0] == "[")
            close_part(text)
            gaps.append(gap)
        else:
            negated = text[0] == "!"
            options = _parse_alternatives(text[2 if negated else 1 : -1], text, where)
            cur.alts.append(Alt(len(cur.values), options, negated))
            width = len(options[0])
            cur.other(bytes(width), bytes(width))
    close_part("end")
    for best, k in weakest:
        if best >= MIN_STATIC_RUN:
            continue
        raise SignatureError(
            f"{where}: part {k + 1} ({_describe(parts[k])}) has fewer than {MIN_STATIC_RUN} "
            "consecutive static bytes; too weak to match efficiently"
        )
    return tuple(parts), tuple(gaps)


def _syntax_error(hexsig: str, pos: int, where: str) -> NoReturn:
    c = hexsig[pos]
    if c in "{[(":
        raise SignatureError(f"{where}: {hexsig[pos : pos + 12]}: unterminated '{c}'")
    if hexsig.startswith("!(", pos):
        raise SignatureError(f"{where}: {hexsig[pos : pos + 12]}: unterminated '('")
    pair = hexsig[pos : pos + 2]
    if len(pair) < 2:
        raise SignatureError(f"{where}: {pair!r}: odd number of hex digits")
    raise SignatureError(f"{where}: {pair!r}: not a hex byte")


def _describe(part: Part) -> str:
    out = []
    for v, m in zip(part.values, part.masks):
        if m == 0xFF:
            out.append(f"{v:02x}")
        elif m == 0xF0:
            out.append(f"{v >> 4:x}?")
        elif m == 0x0F:
            out.append(f"?{v & 15:x}")
        else:
            out.append("??")
    s = "".join(out)
    return s if len(s) <= 40 else s[:37] + "..."


def _parse_gap(token: str, where: str, *, bracket: bool) -> Gap:
    m = _GAP_BRACE.match(token[1:-1])
    if not m or (not m.group(1) and not m.group(3)):
        raise SignatureError(f"{where}: {token[:40]}: expected {{n}}, {{-n}}, {{n-}} or {{n-m}}")
    lo_s, dash, hi_s = m.groups()
    lo = number(lo_s, where, f"gap {token[:40]}") if lo_s else 0
    hi: int | None
    if not dash:
        hi = lo
    elif hi_s:
        hi = number(hi_s, where, f"gap {token[:40]}")
    else:
        hi = None
    if bracket and (hi is None or not dash):
        raise SignatureError(f"{where}: {token[:40]}: expected [n-m]")
    if hi is not None and lo > hi:
        raise SignatureError(f"{where}: {token}: min > max")
    return Gap(lo, hi)


def _parse_alternatives(body: str, token: str, where: str) -> tuple[bytes, ...]:
    if body in ("B", "L", "W"):
        raise SignatureError(f"{where}: {token}: word/line boundary anchors are not supported")
    out = []
    for o in body.split("|"):
        if not _HEX.match(o):
            raise SignatureError(
                f"{where}: {token[:40]}: alternatives must be non-empty static hex strings"
            )
        out.append(bytes.fromhex(o))
    if len({len(o) for o in out}) != 1:
        raise SignatureError(f"{where}: {token[:40]}: alternatives must all have the same length")
    return tuple(out)
