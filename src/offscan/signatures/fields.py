"""Bounded field parsers shared by every format: numbers, offsets, functionality levels, lines.

Every number in a database goes through :func:`number`, so no field can make ``int()`` raise
(Python refuses to convert strings of more than 4,300 digits) or build a huge integer: a bad
number is a :class:`SignatureError` naming file, line, field and limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from .model import Offset, SignatureError

MAX_NUMBER = (1 << 63) - 1  # sizes, offsets and gaps: what a file offset can hold
MAX_DIGITS = len(str(MAX_NUMBER))
MAX_FLEVEL = 1 << 16  # functionality levels are small (ClamAV 1.5 is 230)
MAX_LINE_LENGTH = 1 << 20  # characters; ClamAV's own line buffer (CLI_DEFAULT_LSIG_BUFSIZE
# and friends) is far smaller, and a longer line is a corrupt or hostile file

_DIGITS = re.compile(r"[0-9]+\Z")
_OFFSET = re.compile(r"(EOF-)?([0-9]+)(?:,([0-9]+))?\Z")
_OFFSET_OTHER = re.compile(r"(EP[+-]\d+|S[EL]?\d*[+-]?\d*|VI|SE\d+)(?:,\d+)?\Z")
_ANY = Offset()
# Parsed offsets by (text, strict): a database repeats a few offsets (``*``, ``0``, ``EOF-n``)
# on most lines, and an Offset is immutable, so lines share one. Bounded: distinct offsets of
# a hostile file cannot grow it without limit.
_OFFSET_CACHE: dict[tuple[str, bool], Offset] = {}
_OFFSET_CACHE_MAX = 4096


def number(text: str, where: str, what: str, *, limit: int = MAX_NUMBER) -> int:
    """A decimal number of at most ``limit``; anything else is a SignatureError."""
    if not _DIGITS.match(text):
        raise SignatureError(f"{where}: {what} {text[:40]!r} is not a number")
    if len(text) > MAX_DIGITS or int(text) > limit:
        raise SignatureError(f"{where}: {what} {text[:40]!r} exceeds {limit}")
    return int(text)


def flevel(text: str, where: str, what: str) -> int | None:
    """A MinFL/MaxFL field: empty means unset."""
    text = text.strip()
    if text == "":
        return None
    return number(text, where, what, limit=MAX_FLEVEL)


def offset(text: str, where: str, *, strict: bool) -> Offset:
    """``*``, ``n``, ``n,m``, ``EOF-n`` or ``EOF-n,m``. With ``strict`` False (typed targets),
    executable-relative offsets are accepted and ignored, since such signatures are not applied."""
    if text == "*":
        return _ANY
    cached = _OFFSET_CACHE.get((text, strict))
    if cached is not None:
        return cached
    parsed = _parse_offset(text, where, strict=strict)
    if len(_OFFSET_CACHE) < _OFFSET_CACHE_MAX:
        _OFFSET_CACHE[text, strict] = parsed
    return parsed


def _parse_offset(text: str, where: str, *, strict: bool) -> Offset:
    m = _OFFSET.match(text)
    if m:
        n = number(m.group(2), where, "offset")
        span = number(m.group(3), where, "offset shift") if m.group(3) else 0
        return Offset("eof" if m.group(1) else "abs", n, span)
    if not strict and _OFFSET_OTHER.match(text):
        return Offset()
    raise SignatureError(
        f"{where}: offset {text[:40]!r}: expected '*', 'n', 'n,m' or 'EOF-n' for target type 0"
    )


def lines(text: str, name: str) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of every line that is not blank or a comment.

    Lines end at ``\\n`` only, as in ClamAV: ``str.splitlines`` would also split at NEL
    (``\\x85``), form feeds and other separators and shift every later line number.
    """
    long_lines = len(text) > MAX_LINE_LENGTH  # else no line can be too long
    for lineno, raw in enumerate(text.split("\n"), 1):
        if long_lines and len(raw) > MAX_LINE_LENGTH:
            raise SignatureError(
                f"{name}:{lineno}: line of {len(raw)} characters exceeds {MAX_LINE_LENGTH}"
            )
        line = raw.strip(" \t\r")
        if line and not line.startswith("#"):
            yield lineno, line
