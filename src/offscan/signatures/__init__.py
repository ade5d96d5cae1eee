"""ClamAV-format signature databases, parsed into one immutable :class:`PatternDB`.

Supported formats (ClamAV's "Creating signatures" document):

- ``.hdb``  ``MD5:Size:Name[:MinFL]``
- ``.hsb``  ``SHA1|SHA256:Size:Name[:MinFL]`` (Size may be ``*``)
- ``.ndb``  ``Name:TargetType:Offset:HexSignature[:MinFL[:MaxFL]]``

Body syntax: hex bytes, ``??``, nibble wildcards ``a?``/``?a``, gaps ``*``, ``{n}``, ``{-n}``,
``{n-}``, ``{n-m}`` (and ClamAV's short form ``[n-m]``), alternatives ``(aa|bb)`` of equal-length
strings and negated alternatives ``!(aa|bb)``. Offsets ``*``, ``n``, ``n,m`` and ``EOF-n[,m]``.

A signature is split at its gaps into *parts*; each part has a fixed length and must hold a run
of at least two static bytes, the anchor the engine searches for. Weaker parts are rejected.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # containers and allowlists (issue 12) import this module
    from .allowlist import Allowlist
    from .containers import ContainerInfo

__all__ = [
    "Alt",
    "BodySignature",
    "Gap",
    "HashSignature",
    "NotApplied",
    "Offset",
    "Part",
    "PatternDB",
    "SignatureError",
    "DATABASE_SUFFIXES",
    "FUNCTIONALITY_LEVEL",
    "default_database_path",
    "load_database",
    "parse_body",
]

# ClamAV "functionality level" we claim for MinFL/MaxFL fields (ClamAV 1.4 is 200-ish; a
# signature asking for a newer engine is loaded but reported as not applied, like ClamAV does).
FUNCTIONALITY_LEVEL = 200
DATABASE_SUFFIXES = (".ndb", ".hdb", ".hsb")
MIN_STATIC_RUN = 2  # bytes; a part without such a run cannot be anchored efficiently
MAX_PART_LENGTH = 65536  # bytes; bounds the window overlap the engine must keep

_HASH_LENGTHS = {32: "md5", 40: "sha1", 64: "sha256"}
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class SignatureError(ValueError):
    """A database line that cannot be loaded; the message names file, line and reason."""


@dataclass(frozen=True, slots=True)
class Alt:
    """Alternatives at ``offset`` within a part: one of ``options`` (or none of them, if negated)."""

    offset: int
    options: tuple[bytes, ...]
    negated: bool = False

    @property
    def length(self) -> int:
        return len(self.options[0])


@dataclass(frozen=True, slots=True)
class Part:
    """A fixed-length piece of a body signature between gaps.

    ``values``/``masks`` describe every byte (mask 0xff static, 0xf0/0x0f nibble, 0 wildcard or
    covered by an alternative); ``alts`` are checked in addition.
    """

    values: bytes
    masks: bytes
    alts: tuple[Alt, ...] = ()

    @property
    def length(self) -> int:
        return len(self.values)

    def static_runs(self) -> list[tuple[int, int]]:
        """(start, length) of each maximal run of fully static bytes."""
        runs, start = [], None
        for i, m in enumerate(self.masks):
            if m == 0xFF:
                if start is None:
                    start = i
            elif start is not None:
                runs.append((start, i - start))
                start = None
        if start is not None:
            runs.append((start, len(self.masks) - start))
        return runs


@dataclass(frozen=True, slots=True)
class Gap:
    """Bytes allowed between two parts; ``max is None`` means unbounded."""

    min: int
    max: int | None


@dataclass(frozen=True, slots=True)
class Offset:
    """Where a signature may start: anywhere, at ``n`` (+``span``), or at ``EOF-n`` (+``span``)."""

    kind: Literal["any", "abs", "eof"] = "any"
    n: int = 0
    span: int = 0

    def start_range(self, size: int) -> tuple[int, int] | None:
        """Inclusive range of allowed start positions in a file of ``size`` bytes."""
        if self.kind == "any":
            return (0, size)
        lo = self.n if self.kind == "abs" else size - self.n
        if lo < 0:
            return None
        return (lo, lo + self.span)


@dataclass(frozen=True, slots=True)
class BodySignature:
    name: str
    target: int
    offset: Offset
    parts: tuple[Part, ...]
    gaps: tuple[Gap, ...]
    source: str  # "file:line"


@dataclass(frozen=True, slots=True)
class HashSignature:
    name: str
    algorithm: Literal["md5", "sha1", "sha256"]
    digest: bytes
    size: int | None  # None: any size
    source: str


@dataclass(frozen=True, slots=True)
class NotApplied:
    """A valid signature this engine loads but does not match, with the reason."""

    name: str
    source: str
    reason: str


@dataclass(frozen=True)
class PatternDB:
    """An immutable, fully validated signature database."""

    body: tuple[BodySignature, ...]
    hashes: tuple[HashSignature, ...]
    not_applied: tuple[NotApplied, ...] = ()
    files: tuple[str, ...] = ()
    version: str = ""
    _by_name: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    allowlist: Allowlist | None = None  # .fp/.sfp/.ign2 (signatures/allowlist.py)
    containers: tuple[ContainerInfo, ...] = ()  # .cvd/.cld/.cud loaded (signatures/containers.py)

    @property
    def signature_count(self) -> int:
        return len(self.body) + len(self.hashes) + len(self.not_applied)

    def summary(self) -> str:
        text = (
            f"{len(self.body)} body and {len(self.hashes)} hash signatures from "
            f"{len(self.files)} file(s), version {self.version}"
        )
        if self.not_applied:
            reasons: dict[str, int] = {}
            for n in self.not_applied:
                reasons[n.reason] = reasons.get(n.reason, 0) + 1
            text += "; not applied: " + ", ".join(f"{c} ({r})" for r, c in sorted(reasons.items()))
        return text

    @classmethod
    def from_text(cls, files: Iterable[tuple[str, str]]) -> PatternDB:
        """Build from ``(filename, content)`` pairs; the suffix of each name picks the format."""
        body: list[BodySignature] = []
        hashes: list[HashSignature] = []
        skipped: list[NotApplied] = []
        names: list[str] = []
        h = hashlib.sha256()
        for fname, text in files:
            suffix = os.path.splitext(fname)[1].lower()
            if suffix not in DATABASE_SUFFIXES:
                raise SignatureError(
                    f"{fname}: unsupported database type {suffix or '(none)'}; "
                    f"expected one of {', '.join(DATABASE_SUFFIXES)}"
                )
            names.append(fname)
            h.update(os.path.basename(fname).encode() + b"\0" + text.encode() + b"\0")
            for lineno, raw in enumerate(text.splitlines(), 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                where = f"{os.path.basename(fname)}:{lineno}"
                sig: BodySignature | HashSignature | NotApplied
                if suffix == ".ndb":
                    sig = _parse_ndb_line(line, where)
                else:
                    sig = _parse_hash_line(line, where, suffix)
                if isinstance(sig, NotApplied):
                    skipped.append(sig)
                elif isinstance(sig, BodySignature):
                    body.append(sig)
                else:
                    hashes.append(sig)
        return cls(
            body=tuple(body),
            hashes=tuple(hashes),
            not_applied=tuple(skipped),
            files=tuple(names),
            version="sha256:" + h.hexdigest()[:16],
        )


def default_database_path() -> Path:
    """The shipped ``patterns/`` directory (installed as package data ``offscan.patterns``)."""
    patterns = importlib.import_module("offscan.patterns")
    return Path(str(patterns.__file__)).resolve().parent


def load_database(*paths: str | os.PathLike[str]) -> PatternDB:
    """Load every database file named, or found (non-recursively) in the directories named.

    With no paths, loads the shipped default database. Raises :class:`SignatureError` on the
    first bad line; nothing is half-loaded.
    """
    if not paths:
        paths = (default_database_path(),)
    from .containers import DatabaseSet  # also containers (.cvd/.cld/.cud) and allowlists

    dbset = DatabaseSet()
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(c for c in p.iterdir() if dbset.loadable(c) and c.is_file())
            if not found:
                raise SignatureError(f"{p}: no signature files ({', '.join(DATABASE_SUFFIXES)})")
            for c in found:
                dbset.add(c)
        else:
            dbset.add(p)
    return dbset.build()


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return data.decode("latin-1")


def _parse_hash_line(line: str, where: str, suffix: str) -> HashSignature | NotApplied:
    fields = line.split(":")
    if len(fields) not in (3, 4):
        raise SignatureError(f"{where}: expected HASH:SIZE:NAME[:MINFL], got {len(fields)} fields")
    hexdigest, size_s, name = fields[0].strip(), fields[1].strip(), fields[2].strip()
    algo = _HASH_LENGTHS.get(len(hexdigest))
    if algo is None or not _HEX.match(hexdigest):
        raise SignatureError(f"{where}: {hexdigest[:70]!r}: not an MD5, SHA1 or SHA256 hex digest")
    if suffix == ".hdb" and algo != "md5":
        raise SignatureError(f"{where}: .hdb holds MD5 digests; use .hsb for {algo.upper()}")
    if suffix == ".hsb" and algo == "md5":
        raise SignatureError(f"{where}: .hsb holds SHA1/SHA256 digests; use .hdb for MD5")
    if not name:
        raise SignatureError(f"{where}: empty signature name")
    if size_s == "*":
        size = None
    elif size_s.isascii() and size_s.isdigit():
        size = int(size_s)
    else:
        raise SignatureError(f"{where}: size {size_s!r} is not a number or '*'")
    if len(fields) == 4:
        minfl = _parse_flevel(fields[3], where, "MinFL")
        if minfl is not None and minfl > FUNCTIONALITY_LEVEL:
            return NotApplied(name, where, f"needs functionality level {minfl}")
    return HashSignature(name, algo, bytes.fromhex(hexdigest), size, where)  # type: ignore[arg-type]


def _parse_flevel(text: str, where: str, what: str) -> int | None:
    text = text.strip()
    if text == "":
        return None
    if not (text.isascii() and text.isdigit()):
        raise SignatureError(f"{where}: {what} {text!r} is not a number")
    return int(text)


def _parse_ndb_line(line: str, where: str) -> BodySignature | NotApplied:
    fields = line.split(":")
    if not 4 <= len(fields) <= 6:
        raise SignatureError(
            f"{where}: expected Name:TargetType:Offset:HexSignature[:MinFL[:MaxFL]], "
            f"got {len(fields)} fields"
        )
    name, target_s, offset_s, hexsig = (f.strip() for f in fields[:4])
    if not name:
        raise SignatureError(f"{where}: empty signature name")
    if not (target_s.isascii() and target_s.isdigit()):
        raise SignatureError(f"{where}: target type {target_s!r} is not a number")
    target = int(target_s)
    parts, gaps = parse_body(hexsig, where)
    minfl = _parse_flevel(fields[4], where, "MinFL") if len(fields) > 4 else None
    maxfl = _parse_flevel(fields[5], where, "MaxFL") if len(fields) > 5 else None
    if target != 0:
        _parse_offset(offset_s, where, strict=False)
        return NotApplied(name, where, f"target type {target} not applied")
    offset = _parse_offset(offset_s, where, strict=True)
    if minfl is not None and minfl > FUNCTIONALITY_LEVEL:
        return NotApplied(name, where, f"needs functionality level {minfl}")
    if maxfl is not None and maxfl < FUNCTIONALITY_LEVEL:
        return NotApplied(name, where, f"only for functionality level <= {maxfl}")
    return BodySignature(name, target, offset, parts, gaps, where)


_OFFSET_ABS = re.compile(r"^(\d+)(?:,(\d+))?$")
_OFFSET_EOF = re.compile(r"^EOF-(\d+)(?:,(\d+))?$")
_OFFSET_OTHER = re.compile(r"^(EP[+-]\d+|S[EL]?\d*[+-]?\d*|VI|SE\d+)(?:,\d+)?$")


def _parse_offset(text: str, where: str, *, strict: bool) -> Offset:
    if text == "*":
        return Offset()
    m = _OFFSET_ABS.match(text)
    if m:
        return Offset("abs", int(m.group(1)), int(m.group(2) or 0))
    m = _OFFSET_EOF.match(text)
    if m:
        return Offset("eof", int(m.group(1)), int(m.group(2) or 0))
    if not strict and _OFFSET_OTHER.match(text):
        return Offset()  # executable-relative offsets only exist for typed targets
    raise SignatureError(
        f"{where}: offset {text!r}: expected '*', 'n', 'n,m' or 'EOF-n' for target type 0"
    )


_GAP_BRACE = re.compile(r"^(\d*)(-?)(\d*)$")


def parse_body(hexsig: str, where: str = "<signature>") -> tuple[tuple[Part, ...], tuple[Gap, ...]]:
    """Parse a ClamAV hex body signature into fixed-length parts and the gaps between them."""
    if not hexsig:
        raise SignatureError(f"{where}: empty hex signature")
    parts: list[Part] = []
    gaps: list[Gap] = []
    values = bytearray()
    masks = bytearray()
    alts: list[Alt] = []
    i, n = 0, len(hexsig)

    def close_part(token: str) -> None:
        if not values:
            raise SignatureError(
                f"{where}: {token}: a gap must sit between two byte sequences "
                "(not at the start, the end, or next to another gap)"
            )
        part = Part(bytes(values), bytes(masks), tuple(alts))
        if part.length > MAX_PART_LENGTH:
            raise SignatureError(
                f"{where}: part of {part.length} bytes exceeds {MAX_PART_LENGTH}; split it with a gap"
            )
        parts.append(part)
        values.clear()
        masks.clear()
        alts.clear()

    while i < n:
        c = hexsig[i]
        if c == "*":
            close_part("*")
            gaps.append(Gap(0, None))
            i += 1
        elif c in "{[":
            close = "}" if c == "{" else "]"
            j = hexsig.find(close, i)
            if j < 0:
                raise SignatureError(f"{where}: {hexsig[i : i + 12]}: unterminated '{c}'")
            token = hexsig[i : j + 1]
            gap = _parse_gap(token, where, bracket=c == "[")
            close_part(token)
            gaps.append(gap)
            i = j + 1
        elif c == "(" or (c == "!" and hexsig.startswith("!(", i)):
            negated = c == "!"
            start = i + (2 if negated else 1)
            j = hexsig.find(")", start)
            if j < 0:
                raise SignatureError(f"{where}: {hexsig[i : i + 12]}: unterminated '('")
            token = hexsig[i : j + 1]
            options = _parse_alternatives(hexsig[start:j], token, where)
            alts.append(Alt(len(values), options, negated))
            values.extend(b"\0" * len(options[0]))
            masks.extend(b"\0" * len(options[0]))
            i = j + 1
        else:
            pair = hexsig[i : i + 2]
            if len(pair) < 2:
                raise SignatureError(f"{where}: {pair!r}: odd number of hex digits")
            v, m = _parse_byte(pair, where)
            values.append(v)
            masks.append(m)
            i += 2
    close_part("end")
    for k, part in enumerate(parts):
        if max((ln for _, ln in part.static_runs()), default=0) < MIN_STATIC_RUN:
            raise SignatureError(
                f"{where}: part {k + 1} ({_describe(part)}) has fewer than {MIN_STATIC_RUN} "
                "consecutive static bytes; too weak to match efficiently"
            )
    return tuple(parts), tuple(gaps)


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


def _parse_byte(pair: str, where: str) -> tuple[int, int]:
    hi, lo = pair[0], pair[1]
    if not all(c == "?" or c in _HEX_DIGITS for c in pair):
        # int(..., 16) alone would accept " a", "+a" and "-1"
        raise SignatureError(f"{where}: {pair!r}: not a hex byte")
    if hi == "?" and lo == "?":
        return 0, 0
    try:
        if hi == "?":
            return int(lo, 16), 0x0F
        if lo == "?":
            return int(hi, 16) << 4, 0xF0
        return int(pair, 16), 0xFF
    except ValueError:
        raise SignatureError(f"{where}: {pair!r}: not a hex byte") from None


def _parse_gap(token: str, where: str, *, bracket: bool) -> Gap:
    m = _GAP_BRACE.match(token[1:-1])
    if not m or (not m.group(1) and not m.group(3)):
        raise SignatureError(f"{where}: {token}: expected {{n}}, {{-n}}, {{n-}} or {{n-m}}")
    lo_s, dash, hi_s = m.groups()
    lo = int(lo_s) if lo_s else 0
    if not dash:
        hi: int | None = lo
    elif hi_s:
        hi = int(hi_s)
    else:
        hi = None
    if bracket and (hi is None or not dash):
        raise SignatureError(f"{where}: {token}: expected [n-m]")
    if hi is not None and lo > hi:
        raise SignatureError(f"{where}: {token}: min > max")
    return Gap(lo, hi)


def _parse_alternatives(body: str, token: str, where: str) -> tuple[bytes, ...]:
    if body in ("B", "L"):
        raise SignatureError(f"{where}: {token}: word/line boundary anchors are not supported")
    opts = body.split("|")
    out = []
    for o in opts:
        if not o or len(o) % 2 or not _HEX.match(o):
            raise SignatureError(
                f"{where}: {token}: alternatives must be non-empty static hex strings"
            )
        out.append(bytes.fromhex(o))
    if len({len(o) for o in out}) != 1:
        raise SignatureError(f"{where}: {token}: alternatives must all have the same length")
    return tuple(out)
