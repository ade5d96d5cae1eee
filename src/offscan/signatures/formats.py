"""One line of ``.ndb`` (extended body signatures), ``.hdb`` and ``.hsb`` (hash signatures)."""

from __future__ import annotations

from . import fields
from .body import parse_body
from .model import FUNCTIONALITY_LEVEL, BodySignature, HashSignature, NotApplied, SignatureError

_HASH_LENGTHS = {32: "md5", 40: "sha1", 64: "sha256"}


def parse_hash_line(line: str, where: str, suffix: str) -> HashSignature | NotApplied:
    fields_ = line.split(":")
    if len(fields_) not in (3, 4):
        raise SignatureError(f"{where}: expected HASH:SIZE:NAME[:MINFL], got {len(fields_)} fields")
    hexdigest, size_s, name = fields_[0].strip(), fields_[1].strip(), fields_[2].strip()
    algo = _HASH_LENGTHS.get(len(hexdigest))
    try:
        digest = bytes.fromhex(hexdigest)
    except ValueError:
        digest = b""
    if algo is None or 2 * len(digest) != len(hexdigest):  # fromhex skips whitespace
        raise SignatureError(f"{where}: {hexdigest[:70]!r}: not an MD5, SHA1 or SHA256 hex digest")
    if suffix == ".hdb" and algo != "md5":
        raise SignatureError(f"{where}: .hdb holds MD5 digests; use .hsb for {algo.upper()}")
    if suffix == ".hsb" and algo == "md5":
        raise SignatureError(f"{where}: .hsb holds SHA1/SHA256 digests; use .hdb for MD5")
    if not name:
        raise SignatureError(f"{where}: empty signature name")
    size = None if size_s == "*" else fields.number(size_s, where, "size")
    if len(fields_) == 4:
        minfl = fields.flevel(fields_[3], where, "MinFL")
        if minfl is not None and minfl > FUNCTIONALITY_LEVEL:
            return NotApplied(name, where, f"needs functionality level {minfl}")
    return HashSignature(name, algo, digest, size, where)  # type: ignore[arg-type]


def parse_ndb_line(line: str, where: str) -> BodySignature | NotApplied:
    fields_ = line.split(":")
    if not 4 <= len(fields_) <= 6:
        raise SignatureError(
            f"{where}: expected Name:TargetType:Offset:HexSignature[:MinFL[:MaxFL]], "
            f"got {len(fields_)} fields"
        )
    name, target_s, offset_s, hexsig = fields_[0].strip(), fields_[1], fields_[2], fields_[3]
    if not name:
        raise SignatureError(f"{where}: empty signature name")
    target_s, offset_s, hexsig = target_s.strip(), offset_s.strip(), hexsig.strip()
    target = (
        0
        if target_s == "0"
        else fields.number(target_s, where, "target type", limit=fields.MAX_FLEVEL)
    )
    parts, gaps = parse_body(hexsig, where)
    if len(fields_) == 4 and target == 0:  # the common line: no functionality levels
        return BodySignature(
            name, 0, fields.offset(offset_s, where, strict=True), parts, gaps, where
        )
    minfl = fields.flevel(fields_[4], where, "MinFL") if len(fields_) > 4 else None
    maxfl = fields.flevel(fields_[5], where, "MaxFL") if len(fields_) > 5 else None
    if target != 0:
        fields.offset(offset_s, where, strict=False)
        return NotApplied(name, where, f"target type {target} not applied")
    offset = fields.offset(offset_s, where, strict=True)
    reason = flevel_reason(minfl, maxfl)
    if reason:
        return NotApplied(name, where, reason)
    return BodySignature(name, target, offset, parts, gaps, where)


def flevel_reason(minfl: int | None, maxfl: int | None) -> str | None:
    """Why a signature limited to functionality levels ``minfl..maxfl`` is not applied here."""
    if minfl is not None and minfl > FUNCTIONALITY_LEVEL:
        return f"needs functionality level {minfl}"
    if maxfl is not None and maxfl < FUNCTIONALITY_LEVEL:
        return f"only for functionality level <= {maxfl}"
    return None
