"""Pattern updates: signed full and delta bundles, an on-disk store, an HTTP server and a client.

A *bundle* is a zip file (``.osb``) holding ``manifest.json``, an optional detached Ed25519
signature ``manifest.sig`` over the manifest's exact bytes, and signature files. The manifest
names every other member with its SHA-256, so one signature check covers the whole bundle.
A *full* bundle holds the complete database of version N; a *delta* holds only the lines added
and removed since its parent version and the digests of the database it must produce.

:class:`PatternStore` keeps the active version on disk and switches versions atomically (a
``current`` symlink replaced with one rename), so a crash mid-update leaves the old or the new
version, never a mix. :class:`UpdateServer` serves a directory of bundles with a small
``latest`` index and ETags; :class:`UpdateClient` fetches only what a store lacks. The
appliance and every agent use the same store and client. See ``docs/updates.md``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import fcntl
import functools
import hashlib
import heapq
import http.client
import http.server
import io
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeGuard, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .signatures import DATABASE_SUFFIXES, PatternDB, SignatureError

__all__ = [
    "AppliedUpdate",
    "Bundle",
    "BundleEntry",
    "FileEntry",
    "Manifest",
    "PatternStore",
    "UpdateClient",
    "UpdateError",
    "UpdateServer",
    "add_patterns_arguments",
    "build_delta",
    "build_full",
    "canonical_lines",
    "cmd_patterns",
    "generate_key",
    "key_id",
    "load_private_key",
    "load_trust",
    "plan_updates",
    "read_bundle",
    "read_signature_dir",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "offscan-bundle"
FORMAT_VERSION = 1
INDEX_FORMAT = "offscan-updates"
INDEX_FORMAT_VERSION = 1
BUNDLE_SUFFIX = ".osb"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SIGNATURE_SCHEME = "offscan-ed25519"
ORIGIN_NAME = "origin.json"  # store only: where and when a version was fetched
INDEX_PATH = "latest"

MAX_BUNDLE_SIZE = 512 << 20  # bytes; ClamAV's whole main+daily+bytecode set is ~250 MiB
MAX_UNPACKED_SIZE = 1 << 30  # bytes, all members of one bundle together
MAX_MANIFEST_SIZE = 8 << 20  # bytes; a manifest line per file, a few hundred bytes each
MAX_INDEX_SIZE = 4 << 20  # bytes
MAX_MEMBERS = 4096
DEFAULT_TIMEOUT = 30.0  # seconds, per HTTP request
DEFAULT_KEEP_VERSIONS = 2  # the active version and the one before it
DEFAULT_PORT = 8474
SERVER_POLL_INTERVAL = 0.1  # seconds; how fast a background server notices close()

# Test hook: when set (seconds), PatternStore.apply prints each step to stderr and sleeps before
# doing it, so a test can SIGKILL the process between any two steps.
STEP_DELAY_ENV = "OFFSCAN_TEST_APPLY_STEP_DELAY"

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: same input, same bundle bytes
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_DELTA_DIRS = ("added", "removed")

Kind = Literal["full", "delta"]
TrustSpec = Union[str, "os.PathLike[str]", bytes, Ed25519PublicKey]


class UpdateError(Exception):
    """A bundle, store or update server that cannot be used; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Canonical signature files


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


def _join_lines(lines: Iterable[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("latin-1")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_db_name(name: str, where: str) -> None:
    if not _FILE_NAME.match(name) or os.path.splitext(name)[1].lower() not in DATABASE_SUFFIXES:
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
        _check_db_name(p.name, str(d))
        try:
            texts.append((p.name, p.read_bytes().decode("latin-1")))
        except OSError as exc:
            raise UpdateError(f"{p}: cannot read: {exc.strerror or exc}") from None
    PatternDB.from_text(texts)
    return {name: canonical_lines(text) for name, text in texts}


# ---------------------------------------------------------------------------------------------
# Keys


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
    _write_new(key_path, pem, 0o600)
    _write_new(pub_path, pub, 0o644)
    return key_path, pub_path, key_id(private.public_key())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # Written beside the target and renamed, so the private key is never readable by others,
    # not even for a moment, and a crash leaves no half-written key.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file written by :func:`generate_key` (or openssl)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UpdateError(f"{path}: cannot read key: {exc.strerror or exc}") from None
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
            raise UpdateError(f"{spec}: cannot read trusted key: {exc.strerror or exc}") from None
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
            raw = decode(text.decode("ascii"))  # type: ignore[operator]
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


# ---------------------------------------------------------------------------------------------
# Manifest and bundle


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file a manifest vouches for: digest, size in bytes and number of signature lines."""

    sha256: str
    size: int
    signatures: int

    @classmethod
    def of(cls, lines: Sequence[str]) -> FileEntry:
        data = _join_lines(lines)
        return cls(_sha256(data), len(data), len(lines))

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "signatures": self.signatures}


@dataclass(frozen=True)
class Manifest:
    """The signed description of a bundle.

    ``files`` are the bundle's members (database files for a full bundle, ``added/NAME`` and
    ``removed/NAME`` line lists for a delta); ``result`` is the database a client holds after
    applying it (the same as ``files`` for a full bundle).
    """

    kind: Kind
    version: int
    parent: int | None
    created: str
    files: dict[str, FileEntry]
    result: dict[str, FileEntry]
    format_version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        doc: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "kind": self.kind,
            "version": self.version,
            "parent": self.parent,
            "created": self.created,
            "files": {n: e.to_json() for n, e in sorted(self.files.items())},
        }
        if self.kind == "delta":
            doc["result"] = {n: e.to_json() for n, e in sorted(self.result.items())}
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @property
    def signature_count(self) -> int:
        return sum(e.signatures for e in self.result.values())

    def describe(self) -> str:
        what = f"full bundle version {self.version}"
        if self.kind == "delta":
            added = sum(e.signatures for n, e in self.files.items() if n.startswith("added/"))
            removed = sum(e.signatures for n, e in self.files.items() if n.startswith("removed/"))
            what = f"delta {self.parent}->{self.version} (+{added} -{removed} signatures)"
        return (
            f"{what}, {len(self.result)} file(s), {self.signature_count} signatures, "
            f"created {self.created}"
        )

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Validate a manifest strictly; anything unexpected is an :class:`UpdateError`."""
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise UpdateError(f"{MANIFEST_NAME}: not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise UpdateError(f"{MANIFEST_NAME}: not an offscan bundle manifest")
        fv = doc.get("format_version")
        if not _is_int(fv) or fv < 1:
            raise UpdateError(f"{MANIFEST_NAME}: bad format_version {fv!r}")
        if fv > FORMAT_VERSION:
            raise UpdateError(
                f"bundle format {fv} is newer than this offscan understands ({FORMAT_VERSION}); "
                "upgrade offscan"
            )
        kind = doc.get("kind")
        if kind not in ("full", "delta"):
            raise UpdateError(f"{MANIFEST_NAME}: kind must be 'full' or 'delta', not {kind!r}")
        version, parent = doc.get("version"), doc.get("parent")
        if not _is_int(version) or version < 1:
            raise UpdateError(
                f"{MANIFEST_NAME}: version must be a positive integer, not {version!r}"
            )
        if kind == "full" and parent is not None:
            raise UpdateError(f"{MANIFEST_NAME}: a full bundle has no parent")
        if kind == "delta" and (not _is_int(parent) or not 1 <= parent < version):
            raise UpdateError(
                f"{MANIFEST_NAME}: a delta needs an integer parent below its version, not {parent!r}"
            )
        created = doc.get("created")
        if not isinstance(created, str) or len(created) > 64:
            raise UpdateError(f"{MANIFEST_NAME}: bad creation time {created!r}")
        files = _parse_entries(doc.get("files"), "files")
        if kind == "full":
            if not files:
                raise UpdateError(f"{MANIFEST_NAME}: a full bundle holds at least one file")
            for name in files:
                _check_db_name(name, MANIFEST_NAME)
            result = files
        else:
            result = _parse_entries(doc.get("result"), "result")
            for name in result:
                _check_db_name(name, MANIFEST_NAME)
            for name in files:
                top, _, base = name.partition("/")
                if top not in _DELTA_DIRS:
                    raise UpdateError(
                        f"{MANIFEST_NAME}: delta member {name!r} is not added/ or removed/"
                    )
                _check_db_name(base, MANIFEST_NAME)
                if top == "added" and base not in result:
                    raise UpdateError(f"{MANIFEST_NAME}: {name} adds to a file missing from result")
            if not result:
                raise UpdateError(f"{MANIFEST_NAME}: a delta's result holds at least one file")
        return cls(kind, version, parent, created, files, result, fv)


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v < 1 << 53


def _parse_entries(obj: object, what: str) -> dict[str, FileEntry]:
    if not isinstance(obj, dict):
        raise UpdateError(f"{MANIFEST_NAME}: '{what}' must be an object")
    out = {}
    for name, e in obj.items():
        if not isinstance(e, dict):
            raise UpdateError(f"{MANIFEST_NAME}: {what}[{name!r}] must be an object")
        sha, size, count = e.get("sha256"), e.get("size"), e.get("signatures")
        if not isinstance(sha, str) or not _HEX64.match(sha):
            raise UpdateError(f"{MANIFEST_NAME}: {what}[{name!r}]: bad sha256")
        if not _is_int(size) or size < 0 or not _is_int(count) or count < 0:
            raise UpdateError(f"{MANIFEST_NAME}: {what}[{name!r}]: bad size or signature count")
        out[name] = FileEntry(sha, size, count)
    return out


def _utc_now_iso() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible builds
    t = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class Bundle:
    """A parsed bundle: manifest, optional signature and member files, all in memory.

    Parsing checks structure only; :meth:`verify` checks the signature against trusted keys
    and every member against the manifest's digests.
    """

    def __init__(
        self, manifest_bytes: bytes, members: Mapping[str, bytes], signature: bytes | None = None
    ):
        self.manifest_bytes = manifest_bytes
        self.manifest = Manifest.parse(manifest_bytes)
        self.members = dict(members)
        self.signature = signature
        extra = sorted(set(self.members) - set(self.manifest.files))
        missing = sorted(set(self.manifest.files) - set(self.members))
        if extra:
            raise UpdateError(f"bundle member {extra[0]!r} is not listed in the manifest")
        if missing:
            raise UpdateError(f"bundle lacks {missing[0]!r}, which its manifest lists")

    @property
    def kind(self) -> Kind:
        return self.manifest.kind

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def parent(self) -> int | None:
        return self.manifest.parent

    @property
    def signer(self) -> str | None:
        """The key id the signature claims (not yet verified), or None if unsigned."""
        if self.signature is None:
            return None
        try:
            return _parse_signature(self.signature)[0]
        except UpdateError:
            return None

    # -- container ------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The bundle as a zip file; the same content always gives the same bytes."""
        buf = io.BytesIO()
        entries = [(MANIFEST_NAME, self.manifest_bytes)]
        if self.signature is not None:
            entries.append((SIGNATURE_NAME, self.signature))
        entries += sorted(self.members.items())
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in entries:
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, data, compresslevel=9)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Bundle:
        """Parse a bundle; raises :class:`UpdateError` on anything malformed or oversized."""
        if len(data) > MAX_BUNDLE_SIZE:
            raise UpdateError(
                f"bundle of {len(data)} bytes exceeds the {MAX_BUNDLE_SIZE}-byte limit"
            )
        members: dict[str, bytes] = {}
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                infos = zf.infolist()
                if len(infos) > MAX_MEMBERS:
                    raise UpdateError(
                        f"bundle has {len(infos)} members; the limit is {MAX_MEMBERS}"
                    )
                total = 0
                for info in infos:
                    name = info.filename
                    if name in members:
                        raise UpdateError(f"bundle holds {name!r} twice")
                    if info.is_dir() or info.flag_bits & 0x1:
                        raise UpdateError(f"bundle member {name!r} is a directory or encrypted")
                    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                        raise UpdateError(f"bundle member {name!r}: unsupported compression")
                    total += info.file_size
                    if total > MAX_UNPACKED_SIZE:
                        raise UpdateError(f"bundle unpacks to more than {MAX_UNPACKED_SIZE} bytes")
                    # zipfile stops at the declared size and checks the CRC
                    members[name] = zf.read(info)
        except UpdateError:
            raise
        except Exception as exc:  # noqa: BLE001 - untrusted input: any parser failure means corrupt
            raise UpdateError(f"bundle is corrupt or not an offscan bundle: {exc}") from None
        manifest = members.pop(MANIFEST_NAME, None)
        if manifest is None:
            raise UpdateError(f"bundle is corrupt or not an offscan bundle: no {MANIFEST_NAME}")
        if len(manifest) > MAX_MANIFEST_SIZE:
            raise UpdateError(f"{MANIFEST_NAME} exceeds {MAX_MANIFEST_SIZE} bytes")
        signature = members.pop(SIGNATURE_NAME, None)
        return cls(manifest, members, signature)

    # -- signing and verification ---------------------------------------------------------

    def signed(self, private_key: Ed25519PrivateKey) -> Bundle:
        """A copy carrying a detached signature over the manifest bytes (replacing any)."""
        kid = key_id(private_key.public_key())
        sig = private_key.sign(self.manifest_bytes)
        line = f"{SIGNATURE_SCHEME} {kid} {base64.b64encode(sig).decode()}\n".encode()
        return Bundle(self.manifest_bytes, self.members, line)

    def verify(self, trust: Mapping[str, Ed25519PublicKey]) -> str:
        """Check the signature against ``trust`` (from :func:`load_trust`) and every member
        against the manifest; returns the signer's key id or raises :class:`UpdateError`."""
        if self.signature is None:
            raise UpdateError(
                f"bundle version {self.version} is not signed (no {SIGNATURE_NAME}); "
                "sign it with 'offscan patterns sign BUNDLE --key KEY'"
            )
        kid, sig = _parse_signature(self.signature)
        key = trust.get(kid)
        if key is None:
            raise UpdateError(
                f"bundle version {self.version} is signed by key {kid}, which is not trusted "
                f"(trusted: {', '.join(sorted(trust)) or 'none'})"
            )
        try:
            key.verify(sig, self.manifest_bytes)
        except InvalidSignature:
            raise UpdateError(
                f"bundle version {self.version}: signature does not verify with trusted key "
                f"{kid}: the manifest was modified after signing"
            ) from None
        self.check_digests()
        return kid

    def check_digests(self) -> None:
        """Every member matches the size and SHA-256 the manifest gives for it."""
        for name, entry in self.manifest.files.items():
            data = self.members[name]
            actual = _sha256(data)
            if len(data) != entry.size or actual != entry.sha256:
                raise UpdateError(
                    f"bundle version {self.version}: {name} does not match its manifest digest "
                    f"(expected sha256 {entry.sha256[:16]}..., got {actual[:16]}...): "
                    "content was modified after signing"
                )

    def check_canonical(self) -> None:
        """Members are in canonical form (sorted, unique, stripped lines), so that applying a
        delta to this version reproduces the publisher's bytes exactly."""
        for name, data in self.members.items():
            if _join_lines(canonical_lines(data)) != data:
                raise UpdateError(
                    f"bundle version {self.version}: {name} is not in canonical form "
                    "(sorted unique signature lines); rebuild it with 'offscan patterns build'"
                )

    def lines(self) -> dict[str, list[str]]:
        """Members as canonical line lists."""
        return {n: canonical_lines(d) for n, d in self.members.items()}


def _parse_signature(data: bytes) -> tuple[str, bytes]:
    try:
        scheme, kid, b64 = data.decode("ascii").split()
        sig = base64.b64decode(b64, validate=True)
    except (UnicodeDecodeError, ValueError, binascii.Error):
        raise UpdateError(f"{SIGNATURE_NAME}: malformed signature") from None
    if scheme != SIGNATURE_SCHEME or not _KEY_ID.match(kid) or len(sig) != 64:
        raise UpdateError(f"{SIGNATURE_NAME}: expected '{SIGNATURE_SCHEME} KEYID BASE64'")
    return kid, sig


def read_bundle(source: bytes | str | os.PathLike[str]) -> Bundle:
    """Parse a bundle from bytes or a file path (structure only; see :meth:`Bundle.verify`)."""
    return Bundle.from_bytes(_bundle_bytes(source))


def _bundle_bytes(source: bytes | bytearray | memoryview | str | os.PathLike[str]) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        with open(source, "rb") as f:
            data = f.read(MAX_BUNDLE_SIZE + 1)
    except OSError as exc:
        raise UpdateError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BUNDLE_SIZE:
        raise UpdateError(f"{source}: larger than the {MAX_BUNDLE_SIZE}-byte bundle limit")
    return data


def build_full(
    files: Mapping[str, Sequence[str]] | str | os.PathLike[str],
    version: int,
    *,
    created: str | None = None,
) -> Bundle:
    """A full bundle of ``version`` from a directory of signature files or canonical lines."""
    if not _is_int(version) or version < 1:
        raise UpdateError(f"version must be a positive integer, not {version!r}")
    lines = read_signature_dir(files) if isinstance(files, (str, os.PathLike)) else files
    members = {name: _join_lines(canonical_lines("\n".join(ls))) for name, ls in lines.items()}
    for name in members:
        _check_db_name(name, "build")
    entries = {n: FileEntry.of(canonical_lines(d)) for n, d in members.items()}
    manifest = Manifest("full", version, None, created or _utc_now_iso(), entries, entries)
    return Bundle(manifest.to_bytes(), members)


def build_delta(
    old: Mapping[str, Sequence[str]],
    new: Mapping[str, Sequence[str]],
    version: int,
    parent: int,
    *,
    created: str | None = None,
) -> Bundle:
    """A delta from ``parent`` (database ``old``) to ``version`` (database ``new``): per file,
    only the lines added and removed, plus the digests of ``new`` for the client to check."""
    if not (_is_int(version) and _is_int(parent) and 1 <= parent < version):
        raise UpdateError(f"a delta needs 1 <= parent < version (got {parent} -> {version})")
    if not new:
        raise UpdateError("the new database holds no files")
    old = {n: canonical_lines("\n".join(ls)) for n, ls in old.items()}
    new = {n: canonical_lines("\n".join(ls)) for n, ls in new.items()}
    for name in new:
        _check_db_name(name, "diff")
    members: dict[str, bytes] = {}
    for name in sorted(set(old) | set(new)):
        before, after = set(old.get(name, ())), set(new.get(name, ()))
        if after - before:
            members[f"added/{name}"] = _join_lines(sorted(after - before))
        if before - after:
            members[f"removed/{name}"] = _join_lines(sorted(before - after))
    files = {n: FileEntry.of(canonical_lines(d)) for n, d in members.items()}
    result = {n: FileEntry.of(ls) for n, ls in new.items()}
    manifest = Manifest("delta", version, parent, created or _utc_now_iso(), files, result)
    return Bundle(manifest.to_bytes(), members)


def _apply_delta(old: Mapping[str, Sequence[str]], bundle: Bundle) -> dict[str, list[str]]:
    m = bundle.manifest
    added: dict[str, set[str]] = {}
    removed: dict[str, set[str]] = {}
    for name, data in bundle.members.items():
        top, _, base = name.partition("/")
        (added if top == "added" else removed)[base] = set(canonical_lines(data))
    out = {}
    for name, entry in m.result.items():
        lines = sorted((set(old.get(name, ())) - removed.get(name, set())) | added.get(name, set()))
        actual = _sha256(_join_lines(lines))
        if actual != entry.sha256:
            raise UpdateError(
                f"delta {m.parent}->{m.version}: applying it does not give the published {name} "
                f"(expected sha256 {entry.sha256[:16]}..., got {actual[:16]}...); this store's "
                f"version {m.parent} differs from the publisher's: apply a full bundle"
            )
        out[name] = lines
    return out


def _diff(
    old: Mapping[str, Sequence[str]], new: Mapping[str, Sequence[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    added, removed = {}, {}
    for name in sorted(set(old) | set(new)):
        before, after = set(old.get(name, ())), set(new.get(name, ()))
        if after - before:
            added[name] = sorted(after - before)
        if before - after:
            removed[name] = sorted(before - after)
    return added, removed


# ---------------------------------------------------------------------------------------------
# Store


@dataclass(frozen=True)
class AppliedUpdate:
    """What one applied bundle changed: the appliance revalidates cached verdicts against
    ``added`` and rescans those that matched a signature in ``removed``.

    ``parent`` is the version the store ran before (None if it was empty), for full bundles too;
    ``added``/``removed`` are relative to it whatever the bundle kind.
    """

    version: int
    parent: int | None
    kind: Kind
    added: dict[str, list[str]] = field(default_factory=dict)
    removed: dict[str, list[str]] = field(default_factory=dict)
    bundle_size: int = 0  # bytes
    source: str | None = None
    signer: str = ""
    # The new database as test-loaded before the switch: the appliance can compile it directly
    # instead of parsing the same files again.
    database: PatternDB | None = field(default=None, repr=False, compare=False)

    @property
    def only_adds(self) -> bool:
        """True if no signature was removed: cached clean verdicts need only the added ones."""
        return not any(self.removed.values())

    def added_patterns(self) -> PatternDB:
        """The added signatures alone, as a small database to revalidate cached verdicts with."""
        return PatternDB.from_text((n, "\n".join(ls)) for n, ls in sorted(self.added.items()) if ls)

    def summary(self) -> str:
        plus = sum(map(len, self.added.values()))
        minus = sum(map(len, self.removed.values()))
        before = "(none)" if self.parent is None else self.parent
        return (
            f"version {before} -> {self.version} ({self.kind}, +{plus} -{minus} signatures, "
            f"{self.bundle_size} bytes)"
        )


class PatternStore:
    """The pattern version a scanner runs, kept on disk and switched atomically.

    Layout: ``versions/N/`` holds version N's signature files, its signed manifest and
    ``origin.json``; ``current`` is a symlink to ``versions/N``. A new version is written in
    ``tmp/``, fsynced, renamed into ``versions/`` and then made current by replacing the symlink
    with one ``rename(2)``: a process killed at any moment leaves ``current`` at the old or the
    new version, complete. ``trust`` are the publisher keys bundles must be signed with.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        trust: TrustSpec | Sequence[TrustSpec],
        *,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
    ) -> None:
        self.directory = Path(directory)
        self.trust = load_trust(trust)
        self.keep_versions = max(1, keep_versions)
        try:
            (self.directory / "versions").mkdir(parents=True, exist_ok=True)
            (self.directory / "tmp").mkdir(exist_ok=True)
        except OSError as exc:
            raise UpdateError(
                f"{self.directory}: cannot create store: {exc.strerror or exc}"
            ) from None
        with self._locked(blocking=False) as got:
            if got:
                self._recover()

    # -- reading --------------------------------------------------------------------------

    @property
    def current_version(self) -> int | None:
        """The active version, or None for an empty store."""
        try:
            target = os.readlink(self.directory / "current")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UpdateError(f"{self.directory}/current: {exc.strerror or exc}") from None
        head, _, tail = target.partition("/")
        if head != "versions" or not tail.isdigit():
            raise UpdateError(f"{self.directory}/current points to {target!r}, not versions/N")
        return int(tail)

    def _version_dir(self, version: int) -> Path:
        return self.directory / "versions" / str(version)

    def _snapshot(self) -> tuple[int, Manifest, dict[str, Any]] | None:
        # One read of the link, then only that version's immutable directory: consistent even
        # if another thread or process switches versions meanwhile.
        v = self.current_version
        if v is None:
            return None
        d = self._version_dir(v)
        manifest = Manifest.parse(self._read(d / MANIFEST_NAME))
        try:
            origin = json.loads(self._read(d / ORIGIN_NAME))
        except (UpdateError, ValueError):
            origin = {}
        return v, manifest, origin if isinstance(origin, dict) else {}

    def manifest(self) -> Manifest | None:
        """The current version's manifest (None for an empty store)."""
        snap = self._snapshot()
        return snap[1] if snap else None

    def database_paths(self) -> list[Path]:
        """The current version's signature files, to pass to ``load_database``.

        Empty for an empty store: the caller falls back to its configured database. The paths
        are inside ``versions/N``, which never changes once written.
        """
        snap = self._snapshot()
        if snap is None:
            return []
        v, m, _ = snap
        return [self._version_dir(v) / name for name in sorted(m.result)]

    def load(self) -> PatternDB:
        """Load the current version after re-checking its signature and file digests."""
        lines, paths = self._read_current(verify_signature=True)
        if not paths:
            raise UpdateError(f"{self.directory}: the store holds no pattern version yet")
        try:
            return PatternDB.from_text(
                (str(p), _join_lines(lines[p.name]).decode("latin-1")) for p in paths
            )
        except SignatureError as exc:
            raise UpdateError(f"{self.directory}: current version does not load: {exc}") from None

    def _origin(self) -> dict[str, Any]:
        snap = self._snapshot()
        return snap[2] if snap else {}

    @property
    def fetched_from(self) -> str | None:
        """Where the current version came from (URL or file), if known."""
        value = self._origin().get("fetched_from")
        return value if isinstance(value, str) else None

    @property
    def fetched_at(self) -> float | None:
        """When the current version was applied (Unix time)."""
        value = self._origin().get("fetched_at")
        return float(value) if isinstance(value, (int, float)) else None

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary for ``offscan status`` and ``offscan patterns status``."""
        snap = self._snapshot()
        v, m, origin = snap if snap else (None, None, {})
        return {
            "version": v,
            "kind": origin.get("kind"),
            "files": {n: e.signatures for n, e in sorted(m.result.items())} if m else {},
            "signatures": m.signature_count if m else 0,
            "created": m.created if m else None,
            "fetched_from": origin.get("fetched_from"),
            "fetched_at": origin.get("fetched_at"),
            "signer": origin.get("signer"),
        }

    def _read(self, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise UpdateError(f"{path}: cannot read: {exc.strerror or exc}") from None

    def _read_current(self, *, verify_signature: bool) -> tuple[dict[str, list[str]], list[Path]]:
        v = self.current_version
        if v is None:
            return {}, []
        d = self._version_dir(v)
        manifest_bytes = self._read(d / MANIFEST_NAME)
        if verify_signature:
            kid, raw = _parse_signature(self._read(d / SIGNATURE_NAME))
            key = self.trust.get(kid)
            if key is None:
                raise UpdateError(f"{d}: signed by key {kid}, which is not trusted")
            try:
                key.verify(raw, manifest_bytes)
            except InvalidSignature:
                raise UpdateError(
                    f"{d}: manifest signature does not verify; the store was modified"
                ) from None
        m = Manifest.parse(manifest_bytes)
        lines: dict[str, list[str]] = {}
        paths = []
        for name, entry in sorted(m.result.items()):
            data = self._read(d / name)
            if len(data) != entry.size or _sha256(data) != entry.sha256:
                raise UpdateError(
                    f"{d / name}: does not match the version's manifest; the store is damaged"
                )
            lines[name] = canonical_lines(data)
            paths.append(d / name)
        return lines, paths

    # -- applying -------------------------------------------------------------------------

    def apply(
        self,
        bundle: bytes | str | os.PathLike[str] | Bundle,
        *,
        source: str | None = None,
    ) -> AppliedUpdate:
        """Verify, test-load and activate a full or delta bundle.

        Rejects (with :class:`UpdateError`, leaving the store untouched) a bundle that is
        unsigned, signed by an untrusted key, tampered, not newer than the current version, a
        delta for another parent, or whose database does not parse.
        """
        if isinstance(bundle, Bundle):
            data = bundle.to_bytes()
            b = bundle
        else:
            data = _bundle_bytes(bundle)
            if source is None and not isinstance(bundle, (bytes, bytearray, memoryview)):
                source = str(Path(bundle).resolve())
            b = Bundle.from_bytes(data)
        signer = b.verify(self.trust)
        b.check_canonical()
        m = b.manifest
        with self._locked(blocking=True):
            current = self.current_version
            if current is not None and m.version <= current:
                raise UpdateError(
                    f"bundle version {m.version} is not newer than the current version {current}; "
                    "refusing to go back (replayed or stale bundle)"
                )
            if m.kind == "delta":
                if current is None:
                    raise UpdateError(
                        f"delta {m.parent}->{m.version} needs version {m.parent}, but this store "
                        "holds no version yet: apply a full bundle first"
                    )
                if m.parent != current:
                    raise UpdateError(
                        f"delta {m.parent}->{m.version} applies to version {m.parent} only; "
                        f"this store is at version {current}"
                    )
            try:
                old, _ = self._read_current(verify_signature=False)
            except UpdateError as exc:
                if m.kind == "delta":
                    raise
                # A full bundle repairs a damaged store; everything in it counts as added.
                log.warning("%s; replacing it with full bundle version %d", exc, m.version)
                old = {}
            result = _apply_delta(old, b) if m.kind == "delta" else b.lines()
            final = self._version_dir(m.version)
            try:
                # Named by their final paths: same files and content hash as load_database gives
                database = PatternDB.from_text(
                    (str(final / n), _join_lines(ls).decode("latin-1"))
                    for n, ls in sorted(result.items())
                )
            except SignatureError as exc:
                raise UpdateError(f"bundle version {m.version} does not load: {exc}") from None
            added, removed = _diff(old, result)
            origin = {
                "fetched_from": source,
                "fetched_at": time.time(),
                "kind": m.kind,
                "bundle_sha256": _sha256(data),
                "bundle_size": len(data),
                "signer": signer,
                "parent": current,
            }
            self._activate(m.version, result, b, origin)
        return AppliedUpdate(
            m.version, current, m.kind, added, removed, len(data), source, signer, database
        )

    def _activate(
        self, version: int, result: Mapping[str, Sequence[str]], b: Bundle, origin: dict[str, Any]
    ) -> None:
        _checkpoint("stage")
        staging = self.directory / "tmp" / f"{version}.{os.getpid()}.{threading.get_ident()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            outputs = [(n, _join_lines(ls)) for n, ls in sorted(result.items())]
            outputs += [
                (MANIFEST_NAME, b.manifest_bytes),
                (SIGNATURE_NAME, b.signature or b""),
                (ORIGIN_NAME, (json.dumps(origin, indent=1, sort_keys=True) + "\n").encode()),
            ]
            for name, data in outputs:
                _checkpoint(f"write {name}")
                _write_synced(staging / name, data)
            _fsync_dir(staging)
            _checkpoint("rename")
            final = self._version_dir(version)
            if final.exists():  # left by a crash between rename and switch; never current
                shutil.rmtree(final)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(final.parent)
        _checkpoint("link")
        link = self.directory / f".current.{os.getpid()}.{threading.get_ident()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        os.symlink(f"versions/{version}", link)
        _checkpoint("switch")
        os.replace(link, self.directory / "current")
        _fsync_dir(self.directory)
        _checkpoint("collect")
        self._collect()
        _checkpoint("done")

    def _collect(self) -> None:
        """Remove versions beyond the newest ``keep_versions`` up to the current one, and any
        newer (left by a crash before their switch)."""
        current = self.current_version
        versions = []
        for d in (self.directory / "versions").iterdir():
            if d.name.isdigit():
                versions.append(int(d.name))
        keep = sorted((v for v in versions if current is not None and v <= current), reverse=True)
        keep = keep[: self.keep_versions]
        for v in versions:
            if v not in keep:
                shutil.rmtree(self._version_dir(v), ignore_errors=True)

    def _recover(self) -> None:
        """Clear what a killed apply left behind: staging dirs, stray links, unswitched versions."""
        for entry in (self.directory / "tmp").iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
        for entry in self.directory.glob(".current.*"):
            with contextlib.suppress(OSError):
                entry.unlink()
        self._collect()

    @contextlib.contextmanager
    def _locked(self, *, blocking: bool) -> Iterator[bool]:
        # flock: released by the kernel when a killed process's descriptor goes away
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)


def _checkpoint(step: str) -> None:
    delay = os.environ.get(STEP_DELAY_ENV)
    if delay:
        print(f"offscan-apply-step {step}", file=sys.stderr, flush=True)
        time.sleep(float(delay))


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Update server


@dataclass(frozen=True, slots=True)
class BundleEntry:
    """One bundle the server offers, as listed in its ``latest`` index."""

    name: str
    kind: Kind
    version: int
    parent: int | None
    size: int  # bytes
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "version": self.version,
            "parent": self.parent,
            "size": self.size,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, obj: object) -> BundleEntry:
        if not isinstance(obj, dict):
            raise UpdateError("update index: bundle entry is not an object")
        name, kind, version, parent = (
            obj.get("name"),
            obj.get("kind"),
            obj.get("version"),
            obj.get("parent"),
        )
        size, sha = obj.get("size"), obj.get("sha256")
        if not isinstance(name, str) or not _FILE_NAME.match(name):
            raise UpdateError(f"update index: bad bundle name {name!r}")
        if kind not in ("full", "delta") or not _is_int(version) or not _is_int(size) or size < 0:
            raise UpdateError(f"update index: bad entry for {name}")
        if not (parent is None if kind == "full" else _is_int(parent)):
            raise UpdateError(f"update index: bad parent for {name}")
        if not isinstance(sha, str) or not _HEX64.match(sha):
            raise UpdateError(f"update index: bad sha256 for {name}")
        return cls(name, kind, version, parent, size, sha)


class _Catalog:
    """The bundles in a directory, re-read when a file's (size, mtime, inode) changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple[int, int, int], BundleEntry | None]] = {}
        self._index: tuple[bytes, str] = (b"", "")
        self._index_key: tuple[Any, ...] | None = None

    def refresh(self) -> tuple[bytes, str, dict[str, BundleEntry]]:
        with self._lock:
            seen: dict[str, BundleEntry] = {}
            keys = []
            try:
                names = sorted(os.listdir(self.directory))
            except OSError as exc:
                log.warning("%s: cannot list: %s", self.directory, exc)
                names = []
            for name in names:
                if not name.endswith(BUNDLE_SUFFIX) or not _FILE_NAME.match(name):
                    continue
                path = self.directory / name
                try:
                    st = path.stat()
                except OSError:
                    continue
                key = (st.st_size, st.st_mtime_ns, st.st_ino)
                cached = self._cache.get(name)
                if cached is None or cached[0] != key:
                    cached = (key, self._read_entry(path))
                    self._cache[name] = cached
                if cached[1] is not None:
                    seen[name] = cached[1]
                    keys.append((name, key))
            for gone in set(self._cache) - {n for n in names}:
                del self._cache[gone]
            if tuple(keys) != self._index_key:
                entries = sorted(
                    seen.values(),
                    key=lambda e: (e.version, e.kind != "full", e.parent or 0, e.name),
                )
                doc = {
                    "format": INDEX_FORMAT,
                    "format_version": INDEX_FORMAT_VERSION,
                    "latest": max((e.version for e in entries), default=None),
                    "bundles": [e.to_json() for e in entries],
                }
                body = (json.dumps(doc, separators=(",", ":"), sort_keys=True) + "\n").encode()
                self._index = (body, f'"{_sha256(body)[:32]}"')
                self._index_key = tuple(keys)
            return self._index[0], self._index[1], seen

    def _read_entry(self, path: Path) -> BundleEntry | None:
        try:
            data = _bundle_bytes(path)
            b = Bundle.from_bytes(data)
            b.check_digests()
        except UpdateError as exc:
            log.warning("%s: not served: %s", path, exc)
            return None
        if b.signature is None:
            log.warning("%s: unsigned; clients will reject it", path)
        m = b.manifest
        return BundleEntry(path.name, m.kind, m.version, m.parent, len(data), _sha256(data))


class _CountingWriter:
    def __init__(self, raw: Any, server: _HTTPServer) -> None:
        self._raw, self._server = raw, server

    def write(self, data: bytes) -> int:
        n = self._raw.write(data)
        self._server.count(sent=len(data))
        return n if n is not None else len(data)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)


class _CountingReader:
    """Counts bytes consumed from a buffered reader (for both the server and the client)."""

    def __init__(self, raw: Any, add: Any) -> None:
        self._raw, self._add = raw, add

    def _counted(self, data: bytes) -> bytes:
        self._add(len(data))
        return data

    def readline(self, *args: Any) -> bytes:
        return self._counted(self._raw.readline(*args))

    def read(self, *args: Any) -> bytes:
        return self._counted(self._raw.read(*args))

    def read1(self, *args: Any) -> bytes:
        return self._counted(self._raw.read1(*args))

    def readinto(self, b: Any) -> int:
        n = self._raw.readinto(b)
        self._add(n or 0)
        return n  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a fleet of agents polls at once; socketserver's default is 5

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            return  # a client that went away mid-reply is not a server error
        super().handle_error(request, client_address)

    def __init__(self, address: tuple[str, int], catalog: _Catalog) -> None:
        self.catalog = catalog
        self.stats = {"requests": 0, "not_modified": 0, "bytes_sent": 0, "bytes_received": 0}
        self._stats_lock = threading.Lock()
        super().__init__(address, _UpdateHandler)

    def count(
        self, *, sent: int = 0, received: int = 0, requests: int = 0, not_modified: int = 0
    ) -> None:
        with self._stats_lock:
            self.stats["bytes_sent"] += sent
            self.stats["bytes_received"] += received
            self.stats["requests"] += requests
            self.stats["not_modified"] += not_modified


class _UpdateHandler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "offscan-updates"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        self.wfile = _CountingWriter(self.wfile, self.server)  # type: ignore[assignment]
        self.rfile = _CountingReader(self.rfile, lambda n: self.server.count(received=n))  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        self.server.count(requests=1)
        path = urllib.parse.urlsplit(self.path).path.lstrip("/")
        index, etag, entries = self.server.catalog.refresh()
        if path in (INDEX_PATH, INDEX_PATH + ".json"):
            if self._not_modified(etag):
                return
            self._headers(200, len(index), etag, "application/json", cache="no-cache")
            if not head:
                self.wfile.write(index)
            return
        entry = entries.get(urllib.parse.unquote(path))
        if entry is None:
            body = b"not found\n"
            self._headers(404, len(body), None, "text/plain")
            if not head:
                self.wfile.write(body)
            return
        etag = f'"{entry.sha256}"'
        if self._not_modified(etag):
            return
        try:
            f = open(self.server.catalog.directory / entry.name, "rb")  # noqa: SIM115 - closed below
        except OSError:
            self._headers(404, 0, None, "text/plain")
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            self._headers(
                200, size, etag, "application/octet-stream", cache="max-age=31536000, immutable"
            )
            if not head:
                shutil.copyfileobj(f, self.wfile)  # type: ignore[misc]

    def _not_modified(self, etag: str) -> bool:
        header = self.headers.get("If-None-Match")
        if not header:
            return False
        tags = [t.strip().removeprefix("W/") for t in header.split(",")]
        if etag not in tags and "*" not in tags:
            return False
        self.server.count(not_modified=1)
        self.send_response(304)
        self.send_header("ETag", etag)
        self.end_headers()
        return True

    def _headers(
        self, code: int, length: int, etag: str | None, ctype: str, *, cache: str | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        if etag:
            self.send_header("ETag", etag)
        if cache:
            self.send_header("Cache-Control", cache)
        self.end_headers()


class UpdateServer:
    """A static HTTP server for a directory of ``.osb`` bundles plus a ``latest`` index.

    ``GET /latest`` returns JSON (``latest`` version and every bundle's kind, version, parent,
    size and sha256) with an ETag, so an idle poll with ``If-None-Match`` is a 304 of a few
    hundred bytes. ``GET /NAME`` returns a bundle. Publish by renaming a complete file into
    the directory; the index follows on the next request. Use as a context manager in tests.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
    ) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UpdateError(f"{self.directory}: not a directory")
        self._httpd = _HTTPServer((host, port), _Catalog(self.directory))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    @property
    def stats(self) -> dict[str, int]:
        """Requests served, 304s, and exact bytes sent and received (headers included)."""
        with self._httpd._stats_lock:
            return dict(self._httpd.stats)

    def index(self) -> dict[str, Any]:
        body, _, _ = self._httpd.catalog.refresh()
        return json.loads(body)  # type: ignore[no-any-return]

    def start(self) -> UpdateServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            args=(SERVER_POLL_INTERVAL,),
            name="offscan-update-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> UpdateServer:  # noqa: PYI034 - typing.Self needs 3.11
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Update client


class _Counter:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self._lock = threading.Lock()

    def add_sent(self, n: int) -> None:
        with self._lock:
            self.sent += n

    def add_received(self, n: int) -> None:
        with self._lock:
            self.received += n


class _CountingSocket:
    """Counts bytes on a socket as http.client uses it: ``sendall`` out, ``makefile`` in."""

    def __init__(self, sock: socket.socket, counter: _Counter) -> None:
        self._sock, self._counter = sock, counter

    def sendall(self, data: Any, *args: Any) -> None:
        self._counter.add_sent(len(memoryview(data).cast("B")))
        self._sock.sendall(data, *args)

    def makefile(self, *args: Any, **kwargs: Any) -> Any:
        return _CountingReader(self._sock.makefile(*args, **kwargs), self._counter.add_received)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _CountingConnection:
    """Mixin for http.client connections: wrap the socket so every byte is counted."""

    def __init__(self, *args: Any, counter: _Counter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._counter = counter

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock = _CountingSocket(self.sock, self._counter)  # type: ignore[attr-defined]


class _CountingHTTPConnection(_CountingConnection, http.client.HTTPConnection):
    pass


class _CountingHTTPSConnection(_CountingConnection, http.client.HTTPSConnection):
    pass


class _CountingHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self._counter = counter

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_CountingHTTPConnection, counter=self._counter), req)  # type: ignore[arg-type]


class _CountingHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self._counter = counter

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        conn = functools.partial(_CountingHTTPSConnection, counter=self._counter)
        return self.do_open(conn, req, context=self._context)  # type: ignore[arg-type, attr-defined]


def plan_updates(
    bundles: Iterable[BundleEntry], current: int | None, target: int, *, deltas: bool = True
) -> list[BundleEntry] | None:
    """The cheapest bundles (in bytes, then in steps) taking ``current`` to ``target``.

    Deltas apply only to their parent; a full bundle applies to anything older. So the plan is
    a delta chain, a full bundle, or a full bundle of an intermediate version followed by
    deltas, whichever is smallest. None if no sequence reaches ``target``.
    """
    fulls: list[BundleEntry] = []
    by_parent: dict[int | None, list[BundleEntry]] = {}
    for b in bundles:
        if b.version > target or (current is not None and b.version <= current):
            continue
        if b.kind == "full":
            fulls.append(b)
        elif deltas:
            by_parent.setdefault(b.parent, []).append(b)
    best: dict[int | None, tuple[int, int]] = {current: (0, 0)}
    came: dict[int, tuple[int | None, BundleEntry]] = {}
    heap: list[tuple[int, int, int, int | None]] = [(0, 0, -1, current)]
    while heap:
        size, steps, _, node = heapq.heappop(heap)
        if node == target:
            break
        if (size, steps) > best.get(node, (size, steps)):
            continue
        for b in by_parent.get(node, []) + [f for f in fulls if node is None or f.version > node]:
            cost = (size + b.size, steps + 1)
            if cost < best.get(b.version, (1 << 62, 0)):
                best[b.version] = cost
                came[b.version] = (node, b)
                heapq.heappush(heap, (cost[0], cost[1], b.version, b.version))
    if target not in came:
        return None
    plan: list[BundleEntry] = []
    step: int | None = target
    while step != current:
        assert step is not None
        step, b = came[step]
        plan.append(b)
    return plan[::-1]


class UpdateClient:
    """Keeps a :class:`PatternStore` at the server's latest version, fetching only what it lacks.

    Synchronous (urllib); the appliance runs it in a thread. ``bytes_transferred`` counts every
    byte on the wire in both directions, headers included; ``last_update_seconds`` times the last
    :meth:`update` that changed something.
    """

    def __init__(
        self, base_url: str, store: PatternStore, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.store = store
        self.timeout = timeout
        self._counter = _Counter()
        self._opener = urllib.request.build_opener(
            _CountingHTTPHandler(self._counter), _CountingHTTPSHandler(self._counter)
        )
        self._etag: str | None = None
        self._index: tuple[int | None, list[BundleEntry]] | None = None
        self.requests = 0
        self.not_modified = 0
        self.last_checked_at: float | None = None
        self.last_update_seconds: float | None = None
        self.last_applied: list[AppliedUpdate] = []

    @property
    def bytes_transferred(self) -> int:
        return self._counter.sent + self._counter.received

    @property
    def bytes_received(self) -> int:
        return self._counter.received

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "not_modified": self.not_modified,
            "bytes_transferred": self.bytes_transferred,
            "bytes_received": self.bytes_received,
            "last_checked_at": self.last_checked_at,
            "last_update_seconds": self.last_update_seconds,
        }

    def _get(self, url: str, headers: Mapping[str, str], limit: int) -> tuple[int, Any, bytes]:
        self.requests += 1
        req = urllib.request.Request(url, headers=dict(headers))
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                body = resp.read(limit + 1)
                if len(body) > limit:
                    raise UpdateError(f"{url}: response larger than {limit} bytes")
                return resp.status, resp.headers, body
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code == 304:
                    exc.read()
                    return 304, exc.headers, b""
                raise UpdateError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise UpdateError(f"{url}: cannot fetch: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise UpdateError(f"{url}: cannot fetch: {exc}") from None

    def fetch_index(self) -> tuple[int | None, list[BundleEntry]]:
        """The server's index, by a conditional GET (a 304 reuses the copy from last time)."""
        url = self.base_url + INDEX_PATH
        headers = {"If-None-Match": self._etag} if self._etag and self._index else {}
        status, resp_headers, body = self._get(url, headers, MAX_INDEX_SIZE)
        self.last_checked_at = time.time()
        if status == 304 and self._index is not None:
            self.not_modified += 1
            return self._index
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise UpdateError(f"{url}: index is not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
            raise UpdateError(f"{url}: not an offscan update index")
        latest = doc.get("latest")
        if latest is not None and not _is_int(latest):
            raise UpdateError(f"{url}: bad latest version {latest!r}")
        raw = doc.get("bundles")
        if not isinstance(raw, list):
            raise UpdateError(f"{url}: index lacks a bundle list")
        self._index = (latest, [BundleEntry.from_json(e) for e in raw])
        self._etag = resp_headers.get("ETag")
        return self._index

    def check(self) -> int | None:
        """The newer version the server offers, or None if the store is up to date."""
        latest, _ = self.fetch_index()
        current = self.store.current_version
        if latest is None or (current is not None and latest <= current):
            return None
        return latest

    def update(self) -> list[AppliedUpdate]:
        """Bring the store to the server's latest version; returns what was applied, in order.

        Takes the cheapest plan (delta chain or full bundle); if a delta does not apply (the
        local version differs from the publisher's, or the delta is bad), falls back to full
        bundles once. If it fails part way, :attr:`last_applied` still lists what was applied
        (the store moved; the caller should reload it).
        """
        t0 = time.monotonic()
        applied: list[AppliedUpdate] = []
        self.last_applied = applied
        target = self.check()
        if target is None:
            return applied
        _, bundles = self._index or (None, [])
        delta_error: UpdateError | None = None
        while True:
            current = self.store.current_version
            if current is not None and current >= target:
                break
            plan = plan_updates(bundles, current, target, deltas=delta_error is None)
            if plan is None:
                why = f" ({delta_error})" if delta_error else ""
                raise UpdateError(
                    f"{self.base_url}: version {target} is offered but there is no full bundle "
                    f"and no usable delta chain from version {current}{why}"
                )
            try:
                for entry in plan:
                    applied.append(self._apply(entry))
            except UpdateError as exc:
                if delta_error is not None or entry.kind != "delta":
                    raise
                log.warning("%s; falling back to full bundles", exc)
                delta_error = exc
        self.last_update_seconds = time.monotonic() - t0
        return applied

    def _apply(self, entry: BundleEntry) -> AppliedUpdate:
        url = self.base_url + urllib.parse.quote(entry.name)
        _, _, data = self._get(url, {}, min(entry.size, MAX_BUNDLE_SIZE))
        if len(data) != entry.size or _sha256(data) != entry.sha256:
            raise UpdateError(
                f"{url}: download does not match the index (size or sha256); corrupted in transit?"
            )
        return self.store.apply(data, source=url)


# ---------------------------------------------------------------------------------------------
# Command line: offscan patterns ...


def add_patterns_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``offscan patterns`` subcommands (the CLI registers the command itself)."""
    sub = parser.add_subparsers(dest="patterns_command", required=True, metavar="ACTION")

    p = sub.add_parser("build", help="build a full bundle from a directory of signature files")
    p.add_argument("directory", metavar="DIR")
    p.add_argument(
        "--version",
        type=int,
        required=True,
        metavar="N",
        help="pattern version (integer, increasing)",
    )
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE")
    p.add_argument("--key", metavar="KEY", help="sign with this private key")

    p = sub.add_parser(
        "diff", help="build a delta bundle from OLD to NEW (full bundles or directories)"
    )
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")
    p.add_argument("-o", "--output", required=True, metavar="DELTA")
    p.add_argument(
        "--version", type=int, metavar="N", help="NEW's version (required if NEW is a directory)"
    )
    p.add_argument(
        "--parent", type=int, metavar="N", help="OLD's version (required if OLD is a directory)"
    )
    p.add_argument("--key", metavar="KEY", help="sign with this private key")
    p.add_argument(
        "--trust", action="append", metavar="PUB", help="verify OLD/NEW bundles with this key"
    )

    p = sub.add_parser(
        "keygen", help="create an Ed25519 signing key pair PREFIX.key and PREFIX.pub"
    )
    p.add_argument("-o", "--output", required=True, metavar="PREFIX")
    p.add_argument("--force", action="store_true", help="replace existing files")

    p = sub.add_parser("sign", help="sign a bundle in place (or to -o)")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--key", required=True, metavar="KEY")
    p.add_argument("-o", "--output", metavar="OUT")

    p = sub.add_parser("verify", help="check a bundle's signature and digests")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--trust", action="append", required=True, metavar="PUB")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("apply", help="apply a bundle to a pattern store")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--store", required=True, metavar="DIR")
    p.add_argument("--trust", action="append", required=True, metavar="PUB")

    p = sub.add_parser("fetch", help="update a pattern store from an update server, once")
    p.add_argument("url", metavar="URL")
    p.add_argument("--store", required=True, metavar="DIR")
    p.add_argument("--trust", action="append", required=True, metavar="PUB")

    p = sub.add_parser("status", help="show a pattern store's version and origin")
    p.add_argument("--store", required=True, metavar="DIR")
    p.add_argument("--trust", action="append", required=True, metavar="PUB")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("serve", help="serve a directory of bundles over HTTP")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)


EXIT_OK, EXIT_REJECTED, EXIT_ERROR = 0, 1, 2


def cmd_patterns(args: argparse.Namespace) -> int:
    """Run ``offscan patterns ACTION``: 0 on success, 1 if a bundle is rejected, 2 on errors."""
    action = args.patterns_command
    try:
        return int(_ACTIONS[action](args))
    except (UpdateError, SignatureError) as exc:
        print(f"offscan patterns {action}: {exc}", file=sys.stderr)
        return EXIT_REJECTED if action in ("verify", "apply") else EXIT_ERROR
    except OSError as exc:
        print(f"offscan patterns {action}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _write_bundle(bundle: Bundle, output: str) -> int:
    data = bundle.to_bytes()
    out = Path(output)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)  # a server watching the directory never sees a partial bundle
    return len(data)


def _maybe_sign(bundle: Bundle, key: str | None) -> Bundle:
    return bundle.signed(load_private_key(key)) if key else bundle


def _do_build(args: argparse.Namespace) -> int:
    bundle = _maybe_sign(build_full(args.directory, args.version), args.key)
    size = _write_bundle(bundle, args.output)
    print(f"{args.output}: {bundle.manifest.describe()}, {size} bytes{_signed_note(bundle)}")
    return EXIT_OK


def _signed_note(bundle: Bundle) -> str:
    return f", signed by {bundle.signer}" if bundle.signature else ", unsigned"


def _side(
    path: str, version: int | None, what: str, trust: Mapping[str, Ed25519PublicKey] | None
) -> tuple[dict[str, list[str]], int]:
    if Path(path).is_dir():
        if version is None:
            raise UpdateError(f"{path} is a directory: give its version with --{what}")
        return read_signature_dir(path), version
    b = read_bundle(path)
    if trust:
        b.verify(trust)
    else:
        b.check_digests()
    if b.kind != "full":
        raise UpdateError(f"{path}: diff needs full bundles or directories, not a delta")
    if version is not None and version != b.version:
        raise UpdateError(f"{path} is version {b.version}, not {version}")
    return b.lines(), b.version


def _do_diff(args: argparse.Namespace) -> int:
    trust = load_trust(args.trust) if args.trust else None
    old, parent = _side(args.old, args.parent, "parent", trust)
    new, version = _side(args.new, args.version, "version", trust)
    bundle = _maybe_sign(build_delta(old, new, version, parent), args.key)
    size = _write_bundle(bundle, args.output)
    print(f"{args.output}: {bundle.manifest.describe()}, {size} bytes{_signed_note(bundle)}")
    return EXIT_OK


def _do_keygen(args: argparse.Namespace) -> int:
    key, pub, kid = generate_key(args.output, force=args.force)
    print(
        f"{key}: private key (keep it secret)\n{pub}: public key, id {kid} (give to clients as --trust)"
    )
    return EXIT_OK


def _do_sign(args: argparse.Namespace) -> int:
    bundle = read_bundle(args.bundle)
    bundle.check_digests()
    signed = bundle.signed(load_private_key(args.key))
    size = _write_bundle(signed, args.output or args.bundle)
    print(
        f"{args.output or args.bundle}: {bundle.manifest.describe()}, {size} bytes, signed by {signed.signer}"
    )
    return EXIT_OK


def _do_verify(args: argparse.Namespace) -> int:
    bundle = read_bundle(args.bundle)
    kid = bundle.verify(load_trust(args.trust))
    bundle.check_canonical()
    m = bundle.manifest
    if args.json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "kind": m.kind,
                    "version": m.version,
                    "parent": m.parent,
                    "created": m.created,
                    "signer": kid,
                    "files": {n: e.signatures for n, e in m.result.items()},
                }
            )
        )
    else:
        print(f"{args.bundle}: OK: {m.describe()}, signed by {kid}")
    return EXIT_OK


def _do_apply(args: argparse.Namespace) -> int:
    store = PatternStore(args.store, args.trust)
    applied = store.apply(args.bundle)
    print(f"{args.store}: {applied.summary()}")
    return EXIT_OK


def _do_fetch(args: argparse.Namespace) -> int:
    store = PatternStore(args.store, args.trust)
    client = UpdateClient(args.url, store)
    applied = client.update()
    for a in applied:
        print(f"{args.store}: {a.summary()}")
    if not applied:
        print(f"{args.store}: up to date at version {store.current_version}")
    print(f"{client.bytes_transferred} bytes transferred in {client.requests} request(s)")
    return EXIT_OK


def _do_status(args: argparse.Namespace) -> int:
    store = PatternStore(args.store, args.trust)
    st = store.status()
    if args.json:
        print(json.dumps(st))
    elif st["version"] is None:
        print(f"{args.store}: no pattern version yet")
    else:
        when = (
            datetime.fromtimestamp(st["fetched_at"], timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
            if st["fetched_at"]
            else "?"
        )
        print(f"version   {st['version']} ({st['signatures']} signatures, created {st['created']})")
        print(
            f"fetched   {when} from {st['fetched_from'] or '?'} ({st['kind']}, signed by {st['signer']})"
        )
    return EXIT_OK


def _do_serve(args: argparse.Namespace) -> int:
    server = UpdateServer(args.directory, host=args.host, port=args.port)
    index = server.index()
    print(
        f"serving {len(index['bundles'])} bundle(s) from {args.directory} at {server.url} "
        f"(latest version {index['latest']})",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return EXIT_OK


_ACTIONS = {
    "build": _do_build,
    "diff": _do_diff,
    "keygen": _do_keygen,
    "sign": _do_sign,
    "verify": _do_verify,
    "apply": _do_apply,
    "fetch": _do_fetch,
    "status": _do_status,
    "serve": _do_serve,
}
