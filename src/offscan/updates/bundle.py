"""Bundles: the signed manifest, the zip container, and building full and delta bundles.

A *bundle* is a zip file (``.osb``) holding ``manifest.json``, an optional detached Ed25519
signature ``manifest.sig`` over the manifest's exact bytes, and signature files. The manifest
names every other member with its SHA-256, so one signature check covers the whole bundle.
A *full* bundle holds the complete database of version N; a *delta* holds only the lines added
and removed since its parent version and the digests of the database it must produce. Bundles
live in memory here; this module reads a bundle file at most and writes none.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._common import HEX64, InputMissing, UpdateError, is_int, sha256_hex
from .canonical import canonical_lines, check_db_name, join_lines, read_signature_dir
from .keys import KEY_ID, key_id

FORMAT_NAME = "offscan-bundle"
FORMAT_VERSION = 1
BUNDLE_SUFFIX = ".osb"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SIGNATURE_SCHEME = "offscan-ed25519"

MAX_BUNDLE_SIZE = 512 << 20  # bytes; ClamAV's whole main+daily+bytecode set is ~250 MiB
MAX_UNPACKED_SIZE = 1 << 30  # bytes, all members of one bundle together
MAX_MANIFEST_SIZE = 8 << 20  # bytes; a manifest line per file, a few hundred bytes each
MAX_MEMBERS = 4096
MAX_SIGNATURE_SIZE = 1 << 10  # bytes; "offscan-ed25519 KEYID BASE64" is ~110

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps: same input, same bundle bytes
_DELTA_DIRS = ("added", "removed")

Kind = Literal["full", "delta"]


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file a manifest vouches for: digest, size in bytes and number of signature lines."""

    sha256: str
    size: int
    signatures: int

    @classmethod
    def of(cls, lines: Sequence[str]) -> FileEntry:
        data = join_lines(lines)
        return cls(sha256_hex(data), len(data), len(lines))

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
        if not is_int(fv) or fv < 1:
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
        if not is_int(version) or version < 1:
            raise UpdateError(
                f"{MANIFEST_NAME}: version must be a positive integer, not {version!r}"
            )
        if kind == "full" and parent is not None:
            raise UpdateError(f"{MANIFEST_NAME}: a full bundle has no parent")
        if kind == "delta" and (not is_int(parent) or not 1 <= parent < version):
            raise UpdateError(
                f"{MANIFEST_NAME}: a delta needs an integer parent below its version, "
                f"not {parent!r}"
            )
        created = doc.get("created")
        if not isinstance(created, str) or len(created) > 64:
            raise UpdateError(f"{MANIFEST_NAME}: bad creation time {created!r}")
        files = _parse_entries(doc.get("files"), "files")
        if kind == "full":
            if not files:
                raise UpdateError(f"{MANIFEST_NAME}: a full bundle holds at least one file")
            for name in files:
                check_db_name(name, MANIFEST_NAME)
            result = files
        else:
            result = _parse_entries(doc.get("result"), "result")
            for name in result:
                check_db_name(name, MANIFEST_NAME)
            for name in files:
                top, _, base = name.partition("/")
                if top not in _DELTA_DIRS:
                    raise UpdateError(
                        f"{MANIFEST_NAME}: delta member {name!r} is not added/ or removed/"
                    )
                check_db_name(base, MANIFEST_NAME)
                if top == "added" and base not in result:
                    raise UpdateError(f"{MANIFEST_NAME}: {name} adds to a file missing from result")
            if not result:
                raise UpdateError(f"{MANIFEST_NAME}: a delta's result holds at least one file")
        return cls(kind, version, parent, created, files, result, fv)


def _parse_entries(obj: object, what: str) -> dict[str, FileEntry]:
    if not isinstance(obj, dict):
        raise UpdateError(f"{MANIFEST_NAME}: '{what}' must be an object")
    out = {}
    for name, e in obj.items():
        if not isinstance(e, dict):
            raise UpdateError(f"{MANIFEST_NAME}: {what}[{name!r}] must be an object")
        sha, size, count = e.get("sha256"), e.get("size"), e.get("signatures")
        if not isinstance(sha, str) or not HEX64.match(sha):
            raise UpdateError(f"{MANIFEST_NAME}: {what}[{name!r}]: bad sha256")
        if not is_int(size) or size < 0 or not is_int(count) or count < 0:
            raise UpdateError(f"{MANIFEST_NAME}: {what}[{name!r}]: bad size or signature count")
        out[name] = FileEntry(sha, size, count)
    return out


def _utc_now_iso() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible builds
    t = datetime.fromtimestamp(int(epoch), UTC) if epoch else datetime.now(UTC)
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
            return parse_signature(self.signature)[0]
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
    def from_bytes(
        cls, data: bytes, *, trust: Mapping[str, Ed25519PublicKey] | None = None
    ) -> Bundle:
        """Parse a bundle; raises :class:`UpdateError` on anything malformed or oversized.

        Nothing is inflated before it is vouched for: the manifest (at most
        :data:`MAX_MANIFEST_SIZE`) and signature are read first and, with ``trust``, the
        signature is verified before any other member is read. Every member must then be
        listed in the manifest with the size its zip entry declares, and is inflated at most
        to that size, so a bundle can never unpack to more than its manifest says."""
        if len(data) > MAX_BUNDLE_SIZE:
            raise UpdateError(
                f"bundle of {len(data)} bytes exceeds the {MAX_BUNDLE_SIZE}-byte limit"
            )
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                infos = _check_entries(zf.infolist())
                manifest = _read_member(zf, infos.pop(MANIFEST_NAME, None), MAX_MANIFEST_SIZE)
                if manifest is None:
                    raise UpdateError(
                        f"bundle is corrupt or not an offscan bundle: no {MANIFEST_NAME}"
                    )
                signature = _read_member(zf, infos.pop(SIGNATURE_NAME, None), MAX_SIGNATURE_SIZE)
                parsed = Manifest.parse(manifest)
                if trust is not None:  # vouched for before a single member is inflated
                    _verify_manifest(parsed, manifest, signature, trust)
                members = _read_members(zf, infos, parsed)
        except UpdateError:
            raise
        except Exception as exc:  # untrusted input: any parser failure means corrupt
            raise UpdateError(f"bundle is corrupt or not an offscan bundle: {exc}") from None
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
        kid = _verify_manifest(self.manifest, self.manifest_bytes, self.signature, trust)
        self.check_digests()
        return kid

    def check_digests(self) -> None:
        """Every member matches the size and SHA-256 the manifest gives for it."""
        for name, entry in self.manifest.files.items():
            data = self.members[name]
            actual = sha256_hex(data)
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
            if join_lines(canonical_lines(data)) != data:
                raise UpdateError(
                    f"bundle version {self.version}: {name} is not in canonical form "
                    "(sorted unique signature lines); rebuild it with 'offscan patterns build'"
                )

    def lines(self) -> dict[str, list[str]]:
        """Members as canonical line lists."""
        return {n: canonical_lines(d) for n, d in self.members.items()}


def _check_entries(infos: list[zipfile.ZipInfo]) -> dict[str, zipfile.ZipInfo]:
    """The zip's entries by name, from its directory alone (nothing inflated yet)."""
    if len(infos) > MAX_MEMBERS:
        raise UpdateError(f"bundle has {len(infos)} members; the limit is {MAX_MEMBERS}")
    out: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if name in out:
            raise UpdateError(f"bundle holds {name!r} twice")
        if info.is_dir() or info.flag_bits & 0x1:
            raise UpdateError(f"bundle member {name!r} is a directory or encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise UpdateError(f"bundle member {name!r}: unsupported compression")
        out[name] = info
    return out


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo | None, limit: int) -> bytes | None:
    """One member, inflated to at most ``limit`` bytes (more is an error, found before
    inflating: the entry's declared size, or while inflating: its actual size)."""
    if info is None:
        return None
    if info.file_size > limit:
        raise UpdateError(f"bundle member {info.filename!r} exceeds {limit} bytes")
    with zf.open(info) as f:  # zipfile stops at the declared size and checks the CRC
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UpdateError(f"bundle member {info.filename!r} exceeds {limit} bytes")
    return data


def _read_members(
    zf: zipfile.ZipFile, infos: dict[str, zipfile.ZipInfo], manifest: Manifest
) -> dict[str, bytes]:
    """The members the manifest lists, each bounded by the size the manifest gives it."""
    extra = sorted(set(infos) - set(manifest.files))
    if extra:
        raise UpdateError(f"bundle member {extra[0]!r} is not listed in the manifest")
    total = sum(e.size for e in manifest.files.values())
    if total > MAX_UNPACKED_SIZE:
        raise UpdateError(f"bundle unpacks to more than {MAX_UNPACKED_SIZE} bytes")
    members: dict[str, bytes] = {}
    for name, info in infos.items():
        want = manifest.files[name].size
        if info.file_size != want:
            raise UpdateError(
                f"bundle member {name!r} is {info.file_size} bytes; its manifest says {want}"
            )
        data = _read_member(zf, info, want)
        assert data is not None
        members[name] = data
    return members


def _verify_manifest(
    manifest: Manifest,
    manifest_bytes: bytes,
    signature: bytes | None,
    trust: Mapping[str, Ed25519PublicKey],
) -> str:
    """The key id that signed ``manifest_bytes``, checked against ``trust``; UpdateError
    for an unsigned bundle, an untrusted key or a signature that does not verify."""
    version = manifest.version
    if signature is None:
        raise UpdateError(
            f"bundle version {version} is not signed (no {SIGNATURE_NAME}); "
            "sign it with 'offscan patterns sign BUNDLE --key KEY'"
        )
    kid, sig = parse_signature(signature)
    key = trust.get(kid)
    if key is None:
        raise UpdateError(
            f"bundle version {version} is signed by key {kid}, which is not trusted "
            f"(trusted: {', '.join(sorted(trust)) or 'none'})"
        )
    try:
        key.verify(sig, manifest_bytes)
    except InvalidSignature:
        raise UpdateError(
            f"bundle version {version}: signature does not verify with trusted key "
            f"{kid}: the manifest was modified after signing"
        ) from None
    return kid


def parse_signature(data: bytes) -> tuple[str, bytes]:
    try:
        scheme, kid, b64 = data.decode("ascii").split()
        sig = base64.b64decode(b64, validate=True)
    except (UnicodeDecodeError, ValueError, binascii.Error):
        raise UpdateError(f"{SIGNATURE_NAME}: malformed signature") from None
    if scheme != SIGNATURE_SCHEME or not KEY_ID.match(kid) or len(sig) != 64:
        raise UpdateError(f"{SIGNATURE_NAME}: expected '{SIGNATURE_SCHEME} KEYID BASE64'")
    return kid, sig


def read_bundle(
    source: bytes | str | os.PathLike[str],
    *,
    trust: Mapping[str, Ed25519PublicKey] | None = None,
) -> Bundle:
    """Parse a bundle from bytes or a file path: structure only, or with ``trust`` its
    signature first (see :meth:`Bundle.from_bytes`; :meth:`Bundle.verify` checks digests)."""
    return Bundle.from_bytes(bundle_bytes(source), trust=trust)


def bundle_bytes(source: bytes | bytearray | memoryview | str | os.PathLike[str]) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        with open(source, "rb") as f:
            data = f.read(MAX_BUNDLE_SIZE + 1)
    except OSError as exc:
        raise InputMissing(f"{source}: cannot read: {exc.strerror or exc}") from None
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
    if not is_int(version) or version < 1:
        raise UpdateError(f"version must be a positive integer, not {version!r}")
    lines = read_signature_dir(files) if isinstance(files, (str, os.PathLike)) else files
    members = {name: join_lines(canonical_lines("\n".join(ls))) for name, ls in lines.items()}
    for name in members:
        check_db_name(name, "build")
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
    if not (is_int(version) and is_int(parent) and 1 <= parent < version):
        raise UpdateError(f"a delta needs 1 <= parent < version (got {parent} -> {version})")
    if not new:
        raise UpdateError("the new database holds no files")
    old = {n: canonical_lines("\n".join(ls)) for n, ls in old.items()}
    new = {n: canonical_lines("\n".join(ls)) for n, ls in new.items()}
    for name in new:
        check_db_name(name, "diff")
    members: dict[str, bytes] = {}
    for name in sorted(set(old) | set(new)):
        before, after = set(old.get(name, ())), set(new.get(name, ()))
        if after - before:
            members[f"added/{name}"] = join_lines(sorted(after - before))
        if before - after:
            members[f"removed/{name}"] = join_lines(sorted(before - after))
    files = {n: FileEntry.of(canonical_lines(d)) for n, d in members.items()}
    result = {n: FileEntry.of(ls) for n, ls in new.items()}
    manifest = Manifest("delta", version, parent, created or _utc_now_iso(), files, result)
    return Bundle(manifest.to_bytes(), members)


def apply_delta(old: Mapping[str, Sequence[str]], bundle: Bundle) -> dict[str, list[str]]:
    m = bundle.manifest
    added: dict[str, set[str]] = {}
    removed: dict[str, set[str]] = {}
    for name, data in bundle.members.items():
        top, _, base = name.partition("/")
        (added if top == "added" else removed)[base] = set(canonical_lines(data))
    out = {}
    for name, entry in m.result.items():
        lines = sorted((set(old.get(name, ())) - removed.get(name, set())) | added.get(name, set()))
        actual = sha256_hex(join_lines(lines))
        if actual != entry.sha256:
            raise UpdateError(
                f"delta {m.parent}->{m.version}: applying it does not give the published {name} "
                f"(expected sha256 {entry.sha256[:16]}..., got {actual[:16]}...); this store's "
                f"version {m.parent} differs from the publisher's: apply a full bundle"
            )
        out[name] = lines
    return out


def diff_lines(
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
