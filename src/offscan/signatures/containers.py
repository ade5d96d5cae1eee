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
    "CLAMAV_KEY",
    "CONTAINER_SUFFIXES",
    "ContainerInfo",
    "DatabaseSet",
    "open_container",
    "parse_header",
    "verify_dsig",
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


def verify_dsig(md5_hex: str, dsig: str, key: tuple[int, int] = CLAMAV_KEY) -> bool:
    """Whether ``dsig`` is ``md5_hex`` signed with ``key`` (n, e), as libclamav checks it."""
    n, e = key
    if len(md5_hex) != 32 or not dsig or len(dsig) > 1024:
        return False
    c = 0
    for i, ch in enumerate(dsig):
        d = _DIGIT.get(ch)
        if d is None:
            return False
        c |= d << (6 * i)
    plain = pow(c, e, n) % (1 << 128)
    return plain.to_bytes(16, "big").hex() == md5_hex.lower()


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


def _check_info(members: list[tuple[str, bytes]], info: ContainerInfo) -> bool:
    """Check every member against the ``.info`` list (NAME:SIZE:SHA256); False if none."""
    infos = [data for name, data in members if name.lower().endswith(".info")]
    if not infos:
        return False
    listed: dict[str, tuple[int, str]] = {}
    for line in infos[0].decode("latin-1").splitlines()[1:]:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit():
            listed[parts[0]] = (int(parts[1]), parts[2].lower())
    for name, data in members:
        if name in _SKIPPED_MEMBERS or name.lower().endswith(".info"):
            continue
        want = listed.get(name)
        if want is None:
            raise _error(f"{info.path}: member {name} is not listed in its .info")
        if want != (len(data), hashlib.sha256(data).hexdigest()):
            raise _error(f"{info.path}: member {name} does not match its .info (size or SHA256)")
    return True


def open_container(
    path: str | os.PathLike[str], *, key: tuple[int, int] = CLAMAV_KEY
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
        if not verify_dsig(info.md5, info.dsig, key):
            raise _error(f"{spath}: digital signature does not verify with ClamAV's public key")
        verified.append("signature")
    members = _members(body, spath)
    if _check_info(members, info):
        verified.append("info")
    return dataclasses.replace(info, verified=tuple(verified)), members


class DatabaseSet:
    """The files one :func:`~offscan.signatures.load_database` call reads: plain databases,
    containers (opened when built, so a directory's duplicates resolve first) and allowlists."""

    def __init__(self, *, key: tuple[int, int] = CLAMAV_KEY) -> None:
        self.key = key
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
            info, members = open_container(path, key=self.key)
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
