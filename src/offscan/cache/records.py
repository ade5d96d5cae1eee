"""Cached verdicts and their on-disk framing in the verdict log.

A :class:`CachedVerdict` is what the verdict cache serves; :func:`encode_record` and
:func:`decode_payload` turn one into a CRC-framed msgpack record of ``verdicts.log`` and back.
Pure data: this module does no I/O.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Literal

import msgpack

from .digests import MIN_DIGEST_SIZE

LOG_MAGIC = b"OFSVLOG1"  # file header: format name and version
RECORD_HEADER = struct.Struct("<II")  # payload length (bytes), zlib.crc32 of the payload
MAX_RECORD_BYTES = 1 << 20  # a longer length field means corruption, not a real record

Status = Literal["clean", "infected"]
_CACHEABLE = ("clean", "infected")


@dataclass(frozen=True, slots=True)
class CachedVerdict:
    """A verdict the cache may serve: content ``digest``/``size`` under ``pattern_version``.

    Only "clean" and "infected" are cacheable; an "error" (timeout, unreadable file, ...) must
    be retried, so constructing one raises ValueError.
    """

    status: Status
    matches: tuple[str, ...]
    pattern_version: str
    digest: bytes
    size: int
    scanned_at: float  # unix time

    def __post_init__(self) -> None:
        if self.status not in _CACHEABLE:
            raise ValueError(f"only clean and infected verdicts are cached, not {self.status!r}")
        if not isinstance(self.digest, bytes) or len(self.digest) < MIN_DIGEST_SIZE:
            raise ValueError(
                f"digest must be a cryptographic digest (bytes, >= {MIN_DIGEST_SIZE} long), "
                f"not {self.digest!r:.80}"
            )
        if not isinstance(self.matches, tuple):
            object.__setattr__(self, "matches", tuple(self.matches))

    @property
    def infected(self) -> bool:
        return self.status == "infected"


def encode_record(v: CachedVerdict) -> bytes:
    payload = msgpack.packb(
        [v.digest, v.size, v.pattern_version, v.status, list(v.matches), v.scanned_at],
        use_bin_type=True,
    )
    return RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes) -> CachedVerdict:
    fields = msgpack.unpackb(payload, raw=False)
    if not isinstance(fields, list) or len(fields) != 6:
        raise ValueError("record is not a 6-field array")
    digest, size, version, status, matches, scanned_at = fields
    if not (
        isinstance(size, int)
        and isinstance(version, str)
        and isinstance(matches, list)
        and all(isinstance(m, str) for m in matches)
        and isinstance(scanned_at, (int, float))
    ):
        raise ValueError("record field has the wrong type")
    return CachedVerdict(status, tuple(matches), version, digest, size, float(scanned_at))
