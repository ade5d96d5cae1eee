"""The parsed forms of signatures: frozen dataclasses shared by every database format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# ClamAV "functionality level" we claim for MinFL/MaxFL fields (ClamAV 1.4 is 200-ish; a
# signature asking for a newer engine is loaded but reported as not applied, like ClamAV does).
FUNCTIONALITY_LEVEL = 200
MIN_STATIC_RUN = 2  # bytes; a part without such a run cannot be anchored efficiently
MAX_PART_LENGTH = 65536  # bytes; bounds the window overlap the engine must keep


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
    """A body signature; ``all_hits`` asks the engine for every match, not only the first
    (a logical signature's subsignature whose matches are counted)."""

    name: str
    target: int
    offset: Offset
    parts: tuple[Part, ...]
    gaps: tuple[Gap, ...]
    source: str  # "file:line"
    all_hits: bool = False


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
