"""ClamAV allowlists: files known clean by hash (``.fp``, ``.sfp``) and signatures to ignore
(``.ign2``, and the legacy ``.ign``).

- ``.fp``   ``MD5:Size:Name`` (the ``.hdb`` layout): a file with this MD5 and size is clean
  whatever matches it.
- ``.sfp``  ``SHA1|SHA256:Size:Name`` (the ``.hsb`` layout; Size may be ``*``).
- ``.ign2`` ``SignatureName[:MD5]``: the signature is dropped when the database loads (the
  optional MD5, of the signature's database line in ClamAV, is not checked).
- ``.ign``  ``DB:LINE:SignatureName`` (legacy): the name is taken, the rest is not checked.

:func:`apply` returns the database without the ignored signatures and with an
:class:`Allowlist` attached; the engine asks :meth:`Allowlist.algorithms_for` which digests a
file of a given size needs and drops every match with :meth:`Allowlist.filter`. Pure: parses
text it is given, reads no file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from . import PatternDB
    from .ldb import LogicalSignature
    from .model import BodySignature

__all__ = ["ALLOWLIST_SUFFIXES", "Allowlist", "apply", "parse"]

ALLOWLIST_SUFFIXES = (".fp", ".sfp", ".ign2", ".ign")
HashAlgorithm = Literal["md5", "sha1", "sha256"]
_LENGTHS: dict[int, HashAlgorithm] = {32: "md5", 40: "sha1", 64: "sha256"}


def _error(message: str) -> Exception:
    from . import SignatureError

    return SignatureError(message)


@dataclass(frozen=True)
class Allowlist:
    """Hash allowlist entries ``(algorithm, digest) -> sizes`` (None in sizes: any size) and
    the ignored signature names."""

    hashes: Mapping[tuple[HashAlgorithm, bytes], frozenset[int | None]] = field(
        default_factory=dict
    )
    ignored: frozenset[str] = frozenset()
    _by_size: Mapping[int | None, frozenset[HashAlgorithm]] = field(
        default_factory=dict, repr=False
    )

    def __post_init__(self) -> None:
        by_size: dict[int | None, set[HashAlgorithm]] = {}
        for (algo, _), sizes in self.hashes.items():
            for s in sizes:
                by_size.setdefault(s, set()).add(algo)
        object.__setattr__(self, "_by_size", {s: frozenset(a) for s, a in by_size.items()})

    def algorithms_for(self, size: int) -> frozenset[HashAlgorithm]:
        """The digests a file of ``size`` bytes needs before a match may be reported."""
        exact = self._by_size.get(size, frozenset())
        anysize = self._by_size.get(None, frozenset())
        return exact | anysize if anysize else exact

    def allows(self, digests: Mapping[HashAlgorithm, bytes], size: int) -> bool:
        """Whether a file with these digests and size is allowlisted (clean whatever matched)."""
        for algo, digest in digests.items():
            sizes = self.hashes.get((algo, digest))
            if sizes is not None and (size in sizes or None in sizes):
                return True
        return False

    def filter(
        self, names: Iterable[str], digests: Mapping[HashAlgorithm, bytes], size: int
    ) -> tuple[str, ...]:
        """``names`` less what the allowlist clears: all of them for an allowlisted file,
        else the ignored names (already dropped at load, kept here for merged databases)."""
        if self.allows(digests, size):
            return ()
        return tuple(n for n in names if n not in self.ignored)


def _hash_line(line: str, where: str, suffix: str) -> tuple[HashAlgorithm, bytes, int | None]:
    fields = line.split(":")
    if len(fields) < 3:
        raise _error(f"{where}: expected HASH:SIZE:NAME, got {len(fields)} field(s)")
    hexdigest, size_s = fields[0].strip(), fields[1].strip()
    algo = _LENGTHS.get(len(hexdigest))
    try:
        digest = bytes.fromhex(hexdigest)
    except ValueError:
        algo = None
    if algo is None:
        raise _error(f"{where}: {hexdigest[:70]!r}: not an MD5, SHA1 or SHA256 hex digest")
    if (suffix == ".fp") != (algo == "md5"):
        want = "MD5" if suffix == ".fp" else "SHA1/SHA256"
        raise _error(f"{where}: {suffix} holds {want} digests, not {algo.upper()}")
    if size_s == "*":
        return algo, digest, None
    if not (size_s.isascii() and size_s.isdigit()) or len(size_s) > 20:
        raise _error(f"{where}: size {size_s[:30]!r} is not a number or '*'")
    return algo, digest, int(size_s)


def parse(files: Iterable[tuple[str, str]]) -> Allowlist:
    """An :class:`Allowlist` from ``(filename, text)`` pairs; the suffix picks the format.
    Raises SignatureError naming file and line for a malformed entry."""
    hashes: dict[tuple[HashAlgorithm, bytes], set[int | None]] = {}
    ignored: set[str] = set()
    for fname, text in files:
        suffix = os.path.splitext(fname)[1].lower()
        for lineno, raw in enumerate(text.split("\n"), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{os.path.basename(fname)}:{lineno}"
            if suffix in (".fp", ".sfp"):
                algo, digest, size = _hash_line(line, where, suffix)
                hashes.setdefault((algo, digest), set()).add(size)
            elif suffix == ".ign2":
                ignored.add(line.split(":")[0].strip())
            elif suffix == ".ign":
                ignored.add(line.split(":")[-1].strip())
            else:
                raise _error(f"{fname}: not an allowlist ({', '.join(ALLOWLIST_SUFFIXES)})")
    return Allowlist({k: frozenset(v) for k, v in hashes.items()}, frozenset(ignored))


def apply(db: PatternDB, files: list[tuple[str, str]]) -> PatternDB:
    """``db`` with the allowlist files applied: ignored signatures dropped, the hash allowlist
    attached, and the version changed (a verdict cached before must not be served after)."""
    if not files:
        return db
    allow = parse(files)
    h = hashlib.sha256(db.version.encode())
    for fname, text in files:
        h.update(b"\0" + os.path.basename(fname).encode() + b"\0" + text.encode("latin-1"))
    body, logical = _drop_ignored(db, allow.ignored)
    return dataclasses.replace(
        db,
        body=body,
        logical=logical,
        hashes=tuple(s for s in db.hashes if s.name not in allow.ignored),
        files=(*db.files, *(f for f, _ in files)),
        version="sha256:" + h.hexdigest()[:16],
        allowlist=allow,
    )


def _drop_ignored(
    db: PatternDB, ignored: frozenset[str]
) -> tuple[tuple[BodySignature, ...], tuple[LogicalSignature, ...]]:
    """The body and logical signatures of ``db`` less the ignored names. A logical signature
    is ignored by its own name; its body signatures go with it, and the body indices of the
    logical signatures kept are renumbered."""
    owned = {i for lg in db.logical for i, _, _ in lg.bodies}
    kept_logical = [lg for lg in db.logical if lg.name not in ignored]
    keep = {i for i, s in enumerate(db.body) if i not in owned and s.name not in ignored}
    keep.update(i for lg in kept_logical for i, _, _ in lg.bodies)
    order = sorted(keep)
    new_index = {old: new for new, old in enumerate(order)}
    logical = tuple(
        dataclasses.replace(lg, bodies=tuple((new_index[i], sub, eof) for i, sub, eof in lg.bodies))
        for lg in kept_logical
    )
    return tuple(db.body[i] for i in order), logical
