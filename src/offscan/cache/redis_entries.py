"""Entries of the fleet's shared verdict tier: Redis key names, and values a fleet key signs.

A value is ``HMAC-SHA256(fleet key, redis key + payload) || payload``, the payload a msgpack
array ``[format, status, names, judging version, scanned_at, judged_by]``. The MAC covers the
key too, so an entry cannot be moved to another digest, size or pattern version: whoever can
write to Redis but does not hold the fleet key cannot make an appliance serve "clean" for
malware (:func:`decode_entry` returns None and the tier counts it as forged). Pure: no I/O
except :func:`load_fleet_key`, which reads the key file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

import msgpack

from .records import CachedVerdict

ENTRY_FORMAT = 1
MAC_SIZE = hashlib.sha256().digest_size  # 32 bytes
MAX_ENTRY_BYTES = 16 * 1024  # a bigger value (hundreds of names) is kept in L1 only
MIN_KEY_BYTES = 16  # a fleet key shorter than this is refused
DEFAULT_NAMESPACE = "offscan"


class FleetKeyError(ValueError):
    """The ``--cache-key`` file is missing, unreadable or too short."""


def load_fleet_key(path: str | os.PathLike[str]) -> bytes:
    """The fleet key in ``path`` (its bytes, surrounding whitespace stripped)."""
    try:
        with open(path, "rb") as f:
            key = f.read(1 << 16).strip()
    except OSError as exc:
        raise FleetKeyError(f"cannot read the fleet cache key {os.fspath(path)}: {exc}") from None
    if len(key) < MIN_KEY_BYTES:
        raise FleetKeyError(
            f"fleet cache key {os.fspath(path)} is {len(key)} bytes; it needs at least "
            f"{MIN_KEY_BYTES} (e.g. head -c 32 /dev/urandom | base64 > KEYFILE)"
        )
    return key


@dataclass(frozen=True, slots=True)
class EntryKey:
    """Where one verdict lives in Redis. The ``{digest:size}`` hash tag keeps an entry and its
    lock on one cluster slot; the pattern version ends the name, so versions never mix."""

    digest: bytes
    size: int
    version: str
    namespace: str = DEFAULT_NAMESPACE

    @property
    def name(self) -> bytes:
        return f"{self.namespace}:{{{self.digest.hex()}:{self.size}}}:{self.version}".encode()

    @property
    def lock(self) -> bytes:
        return self.name + b":lock"


def encode_entry(key: EntryKey, verdict: CachedVerdict, fleet_key: bytes, judged_by: str) -> bytes:
    """The signed value for ``verdict`` under ``key`` (whose digest, size, version it has)."""
    payload = msgpack.packb(
        [
            ENTRY_FORMAT,
            verdict.status,
            list(verdict.matches),
            verdict.pattern_version,
            verdict.scanned_at,
            judged_by,
        ],
        use_bin_type=True,
    )
    return _mac(fleet_key, key, payload) + payload


def decode_entry(key: EntryKey, value: bytes, fleet_key: bytes) -> CachedVerdict | None:
    """The verdict in ``value`` if the fleet key signed it for ``key``; None if it did not
    (forged, moved or corrupt)."""
    if not isinstance(value, bytes) or len(value) <= MAC_SIZE or len(value) > MAX_ENTRY_BYTES:
        return None
    mac, payload = value[:MAC_SIZE], value[MAC_SIZE:]
    if not hmac.compare_digest(mac, _mac(fleet_key, key, payload)):
        return None
    try:
        fields = msgpack.unpackb(payload, raw=False)
        fmt, status, names, version, scanned_at, _by = fields
        if fmt != ENTRY_FORMAT or version != key.version:
            return None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            return None
        return CachedVerdict(status, tuple(names), version, key.digest, key.size, float(scanned_at))
    except (ValueError, TypeError, msgpack.UnpackException):
        return None


def judged_by(value: bytes) -> str | None:
    """Which appliance wrote an entry (unverified: for reports and tests only)."""
    try:
        fields = msgpack.unpackb(value[MAC_SIZE:], raw=False)
        return str(fields[5])
    except (ValueError, TypeError, IndexError, msgpack.UnpackException):
        return None


def _mac(fleet_key: bytes, key: EntryKey, payload: bytes) -> bytes:
    return hmac.new(fleet_key, key.name + b"\0" + payload, hashlib.sha256).digest()
