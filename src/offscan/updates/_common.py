"""What every part of :mod:`offscan.updates` shares: the error type and the small validators.

:class:`UpdateError` is the one exception a bundle, store, server or client raises for anything
unusable; the helpers here check names, digests and integers the same way in manifests, store
directories and update indexes. Pure functions; this module touches no file and no socket.
"""

from __future__ import annotations

import hashlib
import re
from typing import TypeGuard

FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # a bundle or database file name
HEX64 = re.compile(r"^[0-9a-f]{64}$")  # a SHA-256 in hex


class UpdateError(Exception):
    """A bundle, store or update server that cannot be used; the message says why and what to do."""


class InputMissing(UpdateError):
    """A file or store that is not there or cannot be read: a usage error (exit 2), not a
    rejected bundle (exit 1)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_int(v: object) -> TypeGuard[int]:
    """A JSON integer that is not a bool and survives a round trip through a JS double."""
    return isinstance(v, int) and not isinstance(v, bool) and v < 1 << 53
