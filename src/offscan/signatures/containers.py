"""ClamAV database containers (``.cvd``, ``.cld``, ``.cud``) and the set of files one load reads.

A container is a 512-byte header, then a tar archive (gzip-compressed in ``.cvd``/``.cud``):

``ClamAV-VDB:BUILD TIME:VERSION:SIGNATURES:FLEVEL:MD5:DSIG:BUILDER:STIME`` padded with spaces.

- ``.cvd`` (official, signed): the MD5 of everything after the header must equal ``MD5``, and
  ``DSIG`` must be that MD5 signed with ClamAV's published RSA key: DSIG's characters are
  base-64 digits (``a-zA-Z0-9+/``, least significant first); ``DSIG^e mod n`` must end with the
  16 MD5 bytes (libclamav's dsig.c, ``cli_versig``).
- ``.cud`` (unsigned, ``sigtool --unsigned``): the MD5 is checked, DSIG is ``X``.
- ``.cld`` (freshclam's local copy after applying signed incremental updates): neither is
  checked by ClamAV, whose header is carried over from the CVD; here, as there, integrity comes
  from the ``.info`` member, which lists ``NAME:SIZE:SHA256`` for every file: each is checked.

Members in the formats offscan parses are loaded; allowlists are applied; the others (``.ldb``
until it is supported, ``.mdb``, ``.cdb``, bytecode, ...) are reported as not applied, per
file. When one directory holds ``daily.cvd`` and ``daily.cld`` the newer version wins.
Decompression is bounded (member and total sizes). Reads the files it is given; writes nothing.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from . import allowlist

if TYPE_CHECKING:
    from . import NotApplied, PatternDB

__all__ = [
    "CLAMAV_INFO_KEY",
    "CLAMAV_KEY",
    "CLAMAV_KEYS",
    "ContainerKeys",
    "CONTAINER_SUFFIXES",
    "ContainerInfo",
    "DatabaseSet",
    "open_container",
    "parse_header",
    "verify_dsig",
    "verify_pss",
]

CONTAINER_SUFFIXES = (".cvd", ".cld", ".cud")
HEADER_SIZE = 512  # bytes
MAX_CONTAINER = 2 << 30  # bytes on disk (ClamAV's main.cvd is ~170 MB)
MAX_UNPACKED = 4 << 30  # bytes of tar content (a decompression bomb stops here)
MAX_MEMBER = 1 << 30  # bytes in one member

# ClamAV's published key for .cvd signatures (libclamav/dsig.c: CLI_NSTR, CLI_ESTR).
CLAMAV_KEY = (
    int(
        "1186409955516453426030700016584531897515277744120277437465994057432431426074641447"
        "6736106064065584474976078889002228342492276248891756555100246777110966959818941043"
        "4699034532232228621591089508178591428456220796841621637175567590476666928698770143"
        "328137383952820383197532047771780196576957695822641224262693037"
    ),
    100001027,
)
# ClamAV's published key for the DSIG line of a container's .info member (libclamav/readdb.c:
# INFO_NSTR, INFO_ESTR): RSA-PSS (SHA-256, 32-byte salt) over the .info lines before it.
CLAMAV_INFO_KEY = (
    int(
        "1108889498304854547365955610662719492392894179179504762059165869741358104332271591217"
        "2496806525381055880964520618400224333320534660299233983755341740679502866829909679955"
        "7343913926683783612215242053966310901051516412708572770803107343209516537005089417174"
        "1916872394250789070290470270758745162169105075430785038339986534648720379846417853739"
        "2211402786481359824461197231102895415093770394216666324484593935762408468516826633192"
        "1408266679234948220458053478099328484548458869717064243605586678627758760720594377033"
        "65380209101697738577515476935085469455279994113145977994084618328482151013142393373316"
        "337519977244732747977"
    ),
    100002049,
)


@dataclass(frozen=True)
class ContainerKeys:
    """The RSA public keys (n, e) a signed container must verify with: the header's (MD5) and
    the .info member's (SHA-256). ClamAV's by default; tests sign with their own."""

    cvd: tuple[int, int] = CLAMAV_KEY
    info: tuple[int, int] = CLAMAV_INFO_KEY


CLAMAV_KEYS = ContainerKeys()
_DIGITS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/"
_DIGIT = {c: i for i, c in enumerate(_DIGITS)}
_SKIPPED_MEMBERS = ("COPYING",)
_SKIPPED_SUFFIXES = (".info", ".cfg")  # metadata, not signatures


def _error(message: str) -> Exception:
    from . import SignatureError

    return SignatureError(message)


@dataclass(frozen=True)
class ContainerInfo:
    """A container's header, and how it was verified (``signature``, ``md5``, ``info``)."""

    path: str
    kind: Literal["cvd", "cld", "cud"]
    build_time_text: str
    version: int
    signatures: int
    flevel: int
    md5: str
    dsig: str
    builder: str
    build_time: int  # unix seconds (STIME)
    verified: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``daily`` for ``/var/lib/clamav/daily.cvd``."""
        return Path(self.path).stem

    def describe(self) -> str:
        how = ", ".join(self.verified) or "not verified"
        return f"{Path(self.path).name} version {self.version} built {self.build_time_text} ({how})"


def parse_header(head: bytes, path: str) -> ContainerInfo:
    """The header's fields; SignatureError when it is not a ClamAV container header."""
    kind = Path(path).suffix.lower().lstrip(".")
    text = head[:HEADER_SIZE].decode("latin-1").rstrip(" \n\r\0")
    fields = text.split(":")
    if fields[0] != "ClamAV-VDB" or len(fields) < 8:
        raise _error(f"{path}: not a ClamAV container (no ClamAV-VDB header)")

    def number(i: int, what: str) -> int:
        f = fields[i].strip() if i < len(fields) else ""
        if not (f.isascii() and f.isdigit()) or len(f) > 18:
            raise _error(f"{path}: header {what} {f[:20]!r} is not a number")
        return int(f)

    return ContainerInfo(
        path=path,
        kind=kind,  # type: ignore[arg-type]
        build_time_text=fields[1].replace("-", ":", 1) if fields[1].count("-") == 1 else fields[1],
        version=number(2, "version"),
        signatures=number(3, "signature count"),
        flevel=number(4, "functionality level"),
        md5=fields[5].strip().lower(),
        dsig=fields[6].strip(),
        builder=fields[7].strip(),
        build_time=number(8, "build time") if len(fields) > 8 else 0,
    )


def _decode(dsig: str, key: tuple[int, int]) -> int | None:
    """``DSIG^e mod n`` from ClamAV's base-64 digits (least significant first)."""
    n, e = key
    if not dsig or len(dsig) > 1024:
        return None
    c = 0
    for i, ch in enumerate(dsig):
        d = _DIGIT.get(ch)
        if d is None:
            return None
        c |= d << (6 * i)
    return pow(c, e, n)


def verify_dsig(md5_hex: str, dsig: str, key: tuple[int, int] = CLAMAV_KEY) -> bool:
    """Whether ``dsig`` is ``md5_hex`` signed with ``key`` (n, e), as libclamav checks it."""
    plain = _decode(dsig, key) if len(md5_hex) == 32 else None
    if plain is None:
        return False
    return (plain % (1 << 128)).to_bytes(16, "big").hex() == md5_hex.lower()


def verify_pss(sha256: bytes, dsig: str, key: tuple[int, int] = CLAMAV_INFO_KEY) -> bool:
    """Whether ``dsig`` is an RSA-PSS signature (SHA-256, MGF1, 32-byte salt, 2048-bit) of a
    message whose SHA-256 is ``sha256``: libclamav's ``cli_versig2`` for .info DSIG lines."""
    em_len, h_len, salt_len = 256, 32, 32
    plain = _decode(dsig, key)
    if plain is None or plain >= 1 << (8 * em_len):
        return False
    em = plain.to_bytes(em_len, "big")
    if em[-1] != 0xBC:
        return False
    masked, h = em[: em_len - h_len - 1], em[em_len - h_len - 1 : -1]
    mask = b"".join(
        hashlib.sha256(h + i.to_bytes(4, "big")).digest()
        for i in range((len(masked) + h_len - 1) // h_len)
    )
    db = bytearray(a ^ b for a, b in zip(masked, mask))
    db[0] &= 0x7F
    sep = db.find(1)
    if sep < 0 or len(db) - sep - 1 != salt_len or any(db[:sep]):
        return False
    salt = bytes(db[sep + 1 :])
    return hashlib.sha256(b"\0" * 8 + sha256 + salt).digest() == h


def _members(body: bytes, path: str) -> list[tuple[str, bytes]]:
    """The archive's regular files, sizes bounded before they are read."""
    compressed = body[:2] == b"\x1f\x8b"
    raw: io.BufferedIOBase = gzip.GzipFile(fileobj=io.BytesIO(body)) if compressed else io.BytesIO(body)  # fmt: skip
    out: list[tuple[str, bytes]] = []
    total = 0
    try:
        with tarfile.open(fileobj=raw, mode="r|") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                if m.size > MAX_MEMBER or total + m.size > MAX_UNPACKED:
                    raise _error(f"{path}: member {m.name!r} too large ({m.size} bytes)")
                total += m.size
                f = tar.extractfile(m)
                if f is None:
                    continue
                out.append((os.path.basename(m.name), f.read()))
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as exc:
        raise _error(f"{path}: damaged archive: {exc}") from None
    return out


def _check_info(
    members: list[tuple[str, bytes]], info: ContainerInfo, keys: ContainerKeys
) -> list[str]:
    """Check every member against the ``.info`` list (NAME:SIZE:SHA256) and, in a signed
    container (.cvd, .cld), the list's own DSIG line; what was verified."""
    infos = [data for name, data in members if name.lower().endswith(".info")]
    signed = info.kind != "cud"
    if not infos:
        if signed:
            raise _error(f"{info.path}: no .info member (a signed container lists its files)")
        return []
    listed: dict[str, tuple[int, str]] = {}
    hashed = hashlib.sha256()
    dsig: str | None = None
    text = infos[0].decode("latin-1")
    for line in text.split("\n")[: -1 if text.endswith("\n") else None]:
        if line.startswith("DSIG:"):
            dsig = line[5:].strip()
            break
        hashed.update(line.encode("latin-1") + b"\n")  # as libclamav hashes each line read
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit():
            listed[parts[0]] = (int(parts[1]), parts[2].lower())
    done = []
    if signed:
        if dsig is None:
            raise _error(f"{info.path}: its .info has no digital signature (DSIG line)")
        if not verify_pss(hashed.digest(), dsig, keys.info):
            raise _error(f"{info.path}: the .info digital signature does not verify")
        done.append("info signature")
    for name, data in members:
        if name in _SKIPPED_MEMBERS or name.lower().endswith(".info"):
            continue
        want = listed.get(name)
        if want is None:
            raise _error(f"{info.path}: member {name} is not listed in its .info")
        if want != (len(data), hashlib.sha256(data).hexdigest()):
            raise _error(f"{info.path}: member {name} does not match its .info (size or SHA256)")
    return [*done, "info"]


def open_container(
    path: str | os.PathLike[str], *, keys: ContainerKeys = CLAMAV_KEYS
) -> tuple[ContainerInfo, list[tuple[str, bytes]]]:
    """Read and verify one container; its header and members. SignatureError names the file
    and what failed (size, header, MD5, digital signature, damaged archive, .info)."""
    spath = os.fspath(path)
    try:
        with open(spath, "rb") as f:
            data = f.read(MAX_CONTAINER + 1)
    except OSError as exc:
        raise _error(f"{spath}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONTAINER:
        raise _error(f"{spath}: larger than {MAX_CONTAINER} bytes")
    if len(data) < HEADER_SIZE:
        raise _error(f"{spath}: shorter than a container header")
    info = parse_header(data, spath)
    body = data[HEADER_SIZE:]
    verified: list[str] = []
    if info.kind in ("cvd", "cud"):
        if hashlib.md5(body).hexdigest() != info.md5:
            raise _error(f"{spath}: MD5 of the archive does not match the header (damaged?)")
        verified.append("md5")
    if info.kind == "cvd":
        if not verify_dsig(info.md5, info.dsig, keys.cvd):
            raise _error(f"{spath}: digital signature does not verify with ClamAV's public key")
        verified.append("signature")
    members = _members(body, spath)
    verified += _check_info(members, info, keys)
    return dataclasses.replace(info, verified=tuple(verified)), members


class DatabaseSet:
    """The files one :func:`~offscan.signatures.load_database` call reads: plain databases,
    containers (opened when built, so a directory's duplicates resolve first) and allowlists."""

    def __init__(self, *, keys: ContainerKeys = CLAMAV_KEYS) -> None:
        self.keys = keys
        self.files: list[tuple[str, str]] = []
        self.allow: list[tuple[str, str]] = []
        self.containers: dict[str, tuple[int, Path]] = {}  # dir/stem -> (version, path)

    @staticmethod
    def loadable(path: Path) -> bool:
        from . import DATABASE_SUFFIXES

        suffix = path.suffix.lower()
        return suffix in (*DATABASE_SUFFIXES, *CONTAINER_SUFFIXES, *allowlist.ALLOWLIST_SUFFIXES)

    def add(self, path: Path, text: str | None = None) -> None:
        """One file named on the command line or found in a directory (``text``: its
        contents when the caller already read it as latin-1 text)."""
        suffix = path.suffix.lower()
        if suffix in CONTAINER_SUFFIXES:
            try:
                with open(path, "rb") as f:
                    version = parse_header(f.read(HEADER_SIZE), str(path)).version
            except OSError as exc:
                raise _error(f"{path}: cannot read: {exc.strerror or exc}") from None
            slot = str(path.with_suffix(""))
            if slot not in self.containers or self.containers[slot][0] < version:
                self.containers[slot] = (version, path)
            return
        if text is None:
            try:
                text = path.read_bytes().decode("latin-1")
            except OSError as exc:
                raise _error(f"{path}: cannot read: {exc.strerror or exc}") from None
        self._file(str(path), text)

    def _file(self, name: str, text: str) -> None:
        if os.path.splitext(name)[1].lower() in allowlist.ALLOWLIST_SUFFIXES:
            self.allow.append((name, text))
        else:
            self.files.append((name, text))

    def build(self) -> PatternDB:
        """Parse everything into one PatternDB (SignatureError on the first bad line)."""
        from . import DATABASE_SUFFIXES, NotApplied, PatternDB

        infos: list[ContainerInfo] = []
        skipped: list[NotApplied] = []
        for _, path in sorted(self.containers.values(), key=lambda v: str(v[1])):
            info, members = open_container(path, keys=self.keys)
            infos.append(info)
            for name, data in members:
                suffix = os.path.splitext(name)[1].lower()
                where = f"{path}:{name}"
                if name in _SKIPPED_MEMBERS or suffix in _SKIPPED_SUFFIXES:
                    continue
                if suffix in DATABASE_SUFFIXES or suffix in allowlist.ALLOWLIST_SUFFIXES:
                    self._file(where, data.decode("latin-1"))
                    continue
                count = sum(1 for ln in data.splitlines() if ln.strip() and not ln.startswith(b"#"))
                skipped.append(
                    NotApplied(
                        f"{count} signatures", where, f"format {suffix or name} not supported"
                    )
                )
        db = PatternDB.from_text(self.files)
        db = allowlist.apply(db, self.allow)
        if infos or skipped:
            h = hashlib.sha256(db.version.encode())
            for i in infos:
                h.update(f"\0{i.name}:{i.version}:{i.md5}".encode())
            db = dataclasses.replace(
                db,
                not_applied=(*db.not_applied, *skipped),
                containers=tuple(infos),
                version="sha256:" + h.hexdigest()[:16] if infos else db.version,
            )
        return db
