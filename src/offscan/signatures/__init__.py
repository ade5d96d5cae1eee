"""ClamAV-format signature databases, parsed into one immutable :class:`PatternDB`.

Supported formats (ClamAV's "Creating signatures" document):

- ``.hdb``  ``MD5:Size:Name[:MinFL]``
- ``.hsb``  ``SHA1|SHA256:Size:Name[:MinFL]`` (Size may be ``*``)
- ``.ndb``  ``Name:TargetType:Offset:HexSignature[:MinFL[:MaxFL]]``
- ``.ldb``  ``Name;TargetDescriptionBlock;LogicalExpression;Subsig0;...`` (see ``ldb``)

Body syntax: hex bytes, ``??``, nibble wildcards ``a?``/``?a``, gaps ``*``, ``{n}``, ``{-n}``,
``{n-}``, ``{n-m}`` (and ClamAV's short form ``[n-m]``), alternatives ``(aa|bb)`` of equal-length
strings and negated alternatives ``!(aa|bb)``. Offsets ``*``, ``n``, ``n,m`` and ``EOF-n[,m]``.

A signature is split at its gaps into *parts*; each part has a fixed length and must hold a run
of at least two static bytes, the anchor the engine searches for. Weaker parts are rejected.

Modules: ``model`` (the parsed forms), ``fields`` (bounded numbers, offsets, lines), ``body``
(hex syntax), ``formats`` (.ndb/.hdb/.hsb lines), ``ldb`` (logical signatures), ``database``
(``PatternDB``); this module loads files and directories.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from .body import parse_body
from .database import DATABASE_SUFFIXES, PatternDB
from .fields import MAX_LINE_LENGTH
from .ldb import LogicalSignature
from .model import (
    FUNCTIONALITY_LEVEL,
    MAX_PART_LENGTH,
    MIN_STATIC_RUN,
    Alt,
    BodySignature,
    Gap,
    HashSignature,
    NotApplied,
    Offset,
    Part,
    SignatureError,
)

__all__ = [
    "Alt",
    "BodySignature",
    "Gap",
    "HashSignature",
    "LogicalSignature",
    "NotApplied",
    "Offset",
    "Part",
    "PatternDB",
    "SignatureError",
    "DATABASE_SUFFIXES",
    "FUNCTIONALITY_LEVEL",
    "MAX_LINE_LENGTH",
    "MAX_PART_LENGTH",
    "MIN_STATIC_RUN",
    "default_database_path",
    "load_database",
    "parse_body",
]

READ_CHUNK = 1 << 20  # bytes read at a time, so an overlong line is refused early


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
    from .containers import CONTAINER_SUFFIXES, DatabaseSet  # .cvd/.cld/.cud and allowlists

    def text(path: Path) -> str | None:  # containers are binary; DatabaseSet reads them
        return None if path.suffix.lower() in CONTAINER_SUFFIXES else _read_text(path)

    dbset = DatabaseSet()
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(c for c in p.iterdir() if dbset.loadable(c) and c.is_file())
            if not found:
                raise SignatureError(f"{p}: no signature files ({', '.join(DATABASE_SUFFIXES)})")
            for c in found:
                dbset.add(c, text(c))
        else:
            dbset.add(p, text(p))
    return dbset.build()


def _read_text(path: Path) -> str:
    """The file as latin-1 text, read in chunks: a line longer than MAX_LINE_LENGTH is refused
    as soon as it is seen, before the rest of a (maybe huge) file is read."""
    chunks: list[bytes] = []
    lineno, line_len = 1, 0  # the line being read and its length so far
    try:
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                chunks.append(chunk)
                pieces = chunk.split(b"\n")
                for k, piece in enumerate(pieces):
                    length = len(piece) + (line_len if k == 0 else 0)
                    if length > MAX_LINE_LENGTH:
                        raise SignatureError(
                            f"{path.name}:{lineno + k}: line longer than {MAX_LINE_LENGTH} "
                            "characters"
                        )
                lineno += len(pieces) - 1
                line_len = length
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return b"".join(chunks).decode("latin-1")
