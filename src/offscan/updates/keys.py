"""Ed25519 keys for signing bundles: generate a pair, load a private key, load trusted keys.

A publisher signs with a private key (``offscan patterns keygen`` writes it, mode 0600); stores
trust one or more public keys, named by :func:`key_id`. This module writes only the two key
files of :func:`generate_key`, atomically and durably; everything else only reads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .._fsutil import atomic_write
from ._common import InputMissing, UpdateError

KEY_ID = re.compile(r"^[0-9a-f]{16}$")
PRIVATE_KEY_MODE = 0o600  # from creation: the private key is never readable by others
PUBLIC_KEY_MODE = 0o644

TrustSpec = Union[str, "os.PathLike[str]", bytes, Ed25519PublicKey]


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 8 bytes of SHA-256 of its raw form."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(prefix: str | os.PathLike[str], *, force: bool = False) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair: ``PREFIX.key`` (PKCS#8 PEM, mode 0600) and ``PREFIX.pub``.

    Returns both paths and the key id. Existing files are kept unless ``force``.
    """
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for path in (key_path, pub_path):
        if path.exists() and not force:
            raise UpdateError(f"{path} exists; use --force to replace it")
    try:
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UpdateError(f"{key_path.parent}: cannot create: {exc.strerror or exc}") from None
    # Durable (fsync): a lost signing key cannot be recreated, and a crash must not leave a
    # half-written one. The mode is set at creation, so the key is never readable by others.
    atomic_write(key_path, pem, fsync=True, mode=PRIVATE_KEY_MODE)
    atomic_write(pub_path, pub, fsync=True, mode=PUBLIC_KEY_MODE)
    return key_path, pub_path, key_id(private.public_key())


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file written by :func:`generate_key` (or openssl)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputMissing(f"{path}: cannot read key: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UpdateError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UpdateError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def _load_public_key(spec: TrustSpec) -> Ed25519PublicKey:
    if isinstance(spec, Ed25519PublicKey):
        return spec
    where = "trusted key"
    if isinstance(spec, bytes):
        data = spec
    else:
        where = str(spec)
        try:
            data = Path(spec).read_bytes()
        except OSError as exc:
            raise InputMissing(f"{spec}: cannot read trusted key: {exc.strerror or exc}") from None
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise UpdateError(f"{where}: not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise UpdateError(f"{where}: not an Ed25519 public key ({type(key).__name__})")
        return key
    raw = data if len(data) == 32 else _decode_text_key(data.strip())
    if raw is None:
        raise UpdateError(
            f"{where}: expected a PEM Ed25519 public key, 32 raw bytes, or their hex/base64"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def _decode_text_key(text: bytes) -> bytes | None:
    for decode in (bytes.fromhex, base64.b64decode):
        try:
            raw = decode(text.decode("ascii"))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            continue
        if len(raw) == 32:
            return raw
    return None


def load_trust(trust: TrustSpec | Sequence[TrustSpec]) -> dict[str, Ed25519PublicKey]:
    """Trusted public keys by key id, from a path, PEM or raw bytes, a key, or a list of those.

    Several keys let a publisher rotate: trust old and new until every client runs a bundle
    signed with the new one.
    """
    specs: Sequence[TrustSpec]
    if isinstance(trust, (str, bytes, os.PathLike, Ed25519PublicKey)):
        specs = [trust]
    else:
        specs = list(trust)
    if not specs:
        raise UpdateError("no trusted key given")
    keys = [_load_public_key(s) for s in specs]
    return {key_id(k): k for k in keys}
