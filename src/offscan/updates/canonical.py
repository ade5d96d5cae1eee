"""Canonical signature files: the one form in which bundles carry and stores keep databases.

A database file in canonical form is its signature lines stripped, sorted and unique, comments
and blank lines dropped, each ending in a newline (latin-1). Canonical order is what lets a
delta reproduce its target byte for byte. This module reads a directory of signature files
(``offscan patterns build``) and writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..signatures import DATABASE_SUFFIXES, PatternDB
from ._common import FILE_NAME, InputMissing, UpdateError


def canonical_lines(text: str | bytes) -> list[str]:
    """The signatures of one database file in canonical form: stripped, sorted, unique.

    Comments and blank lines are dropped. Lines are split and stripped exactly as
    :meth:`PatternDB.from_text` does (latin-1 text), so the canonical file loads to the same
    signatures; canonical order is what makes a delta reproduce its target byte for byte.
    """
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    out = set()
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            out.add(line)
    return sorted(out)


def join_lines(lines: Iterable[str]) -> bytes:
    """Lines as the bytes of a signature file (each ends in a newline; latin-1)."""
    return "".join(line + "\n" for line in lines).encode("latin-1")


def check_db_name(name: str, where: str) -> None:
    """Raise :class:`UpdateError` unless ``name`` is a plain signature file name."""
    if not FILE_NAME.match(name) or os.path.splitext(name)[1].lower() not in DATABASE_SUFFIXES:
        raise UpdateError(
            f"{where}: {name!r} is not a signature file name (letters, digits, '._-', "
            f"ending in {', '.join(DATABASE_SUFFIXES)})"
        )


def read_signature_dir(directory: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Canonical lines of every signature file in ``directory`` (non-recursive).

    The files are parsed first, so a bad line fails here with :class:`SignatureError` naming
    the source file and line, not later on every client.
    """
    d = Path(directory)
    try:
        paths = sorted(
            p for p in d.iterdir() if p.suffix.lower() in DATABASE_SUFFIXES and p.is_file()
        )
    except OSError as exc:
        raise UpdateError(f"{d}: cannot list: {exc.strerror or exc}") from None
    if not paths:
        raise UpdateError(f"{d}: no signature files ({', '.join(DATABASE_SUFFIXES)})")
    texts: list[tuple[str, str]] = []
    for p in paths:
        check_db_name(p.name, str(d))
        try:
            texts.append((p.name, p.read_bytes().decode("latin-1")))
        except OSError as exc:
            raise InputMissing(f"{p}: cannot read: {exc.strerror or exc}") from None
    PatternDB.from_text(texts)
    return {name: canonical_lines(text) for name, text in texts}
