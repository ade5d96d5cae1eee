"""The immutable :class:`PatternDB`, built from the text of database files."""

from __future__ import annotations

import functools
import gc
import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .fields import lines
from .formats import parse_hash_line, parse_ndb_line
from .ldb import LogicalSignature, ParsedLogical, parse_ldb_line
from .model import BodySignature, HashSignature, NotApplied, SignatureError

if TYPE_CHECKING:  # containers and allowlists (issue 12) import this module
    from .allowlist import Allowlist
    from .containers import ContainerInfo

DATABASE_SUFFIXES = (".ndb", ".hdb", ".hsb", ".ldb")


@dataclass(frozen=True)
class PatternDB:
    """An immutable, fully validated signature database.

    ``body`` holds the body signatures the engine matches: those of ``.ndb`` files, then the
    ones logical signatures compiled into (which are never reported by name; ``logical`` maps
    them back).
    """

    body: tuple[BodySignature, ...]
    hashes: tuple[HashSignature, ...]
    not_applied: tuple[NotApplied, ...] = ()
    files: tuple[str, ...] = ()
    version: str = ""
    logical: tuple[LogicalSignature, ...] = ()
    allowlist: Allowlist | None = None  # .fp/.sfp/.ign2 (signatures/allowlist.py)
    containers: tuple[ContainerInfo, ...] = ()  # .cvd/.cld/.cud loaded (signatures/containers.py)
    _by_name: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def plain_body(self) -> int:
        """Body signatures reported by their own name (not a logical signature's parts)."""
        return len(self.body) - sum(len(lg.bodies) for lg in self.logical)

    @property
    def signature_count(self) -> int:
        return self.plain_body + len(self.logical) + len(self.hashes) + len(self.not_applied)

    def summary(self) -> str:
        logical = f", {len(self.logical)} logical" if self.logical else ""
        text = (
            f"{self.plain_body} body{logical} and {len(self.hashes)} hash signatures from "
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
        """Build from ``(filename, content)`` pairs; the suffix of each name picks the format.

        The cyclic garbage collector is paused meanwhile: parsing makes millions of small
        acyclic objects, and with a database already loaded (an appliance reloading) the
        collections it triggers doubled the parse time (100k .ndb lines: 1.35 -> 0.6 s CPU).
        """
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return cls._parse(files)
        finally:
            if was_enabled:
                gc.enable()

    @classmethod
    def _parse(cls, files: Iterable[tuple[str, str]]) -> PatternDB:
        body: list[BodySignature] = []
        hashes: list[HashSignature] = []
        skipped: list[NotApplied] = []
        parsed_logical: list[ParsedLogical] = []
        names: list[str] = []
        h = hashlib.sha256()
        out: dict[type, list] = {
            NotApplied: skipped,
            BodySignature: body,
            ParsedLogical: parsed_logical,
            HashSignature: hashes,
        }
        for fname, text in files:
            suffix = os.path.splitext(fname)[1].lower()
            if suffix not in DATABASE_SUFFIXES:
                raise SignatureError(
                    f"{fname}: unsupported database type {suffix or '(none)'}; "
                    f"expected one of {', '.join(DATABASE_SUFFIXES)}"
                )
            names.append(fname)
            base = os.path.basename(fname)
            h.update(base.encode() + b"\0" + text.encode() + b"\0")
            # one parser per file and one list per result type, so a line costs one call and
            # one dict lookup besides its own parse
            parse: Callable[[str, str], object]
            if suffix == ".ndb":
                parse = parse_ndb_line
            elif suffix == ".ldb":
                parse = parse_ldb_line
            else:
                parse = functools.partial(parse_hash_line, suffix=suffix)
            for lineno, line in lines(text, base):
                sig = parse(line, f"{base}:{lineno}")
                out[type(sig)].append(sig)
        logical = []
        for p in parsed_logical:  # their body signatures go after every plain one
            first = len(body)
            body.extend(b for _, b, _ in p.bodies)
            refs = tuple((first + k, sub, eof) for k, (sub, _, eof) in enumerate(p.bodies))
            logical.append(
                LogicalSignature(p.name, p.source, p.expression, p.subsigs, p.file_size, refs)
            )
        return cls(
            body=tuple(body),
            hashes=tuple(hashes),
            not_applied=tuple(skipped),
            files=tuple(names),
            version="sha256:" + h.hexdigest()[:16],
            logical=tuple(logical),
        )
