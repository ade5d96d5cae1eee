"""Layers as streams of members: a directory tree, or a tar archive (plain or compressed).

Each layer is read once, as a stream: members are matched straight out of the (compressed)
archive with ``tarfile`` in stream mode; nothing is ever extracted or written, so a member
named ``../evil`` or ``/etc/x`` cannot land anywhere. An archive's digest is checked as it is
read (:class:`~.errors.BlobDigestError` on a mismatch). Reads the files and archives it is
given; writes nothing.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ..engine import file_kind
from .errors import BlobDigestError, ImageError
from .helpers import normalise, os_reason, tar_kind

READ_CHUNK = 1 << 20  # bytes per read from a blob, an archive or a file

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_DIGEST_HEX = {"sha256": 64, "sha512": 128}  # algorithms OCI registers, and their hex lengths
_DIGEST_RE = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

MemberKind = Literal["file", "dir", "hardlink", "other", "whiteout", "opaque", "error"]


@dataclass(frozen=True, slots=True)
class Member:
    """One entry of a layer as its reader meets it.

    For a regular file, ``read()`` yields the content in chunks; it is only valid until the
    layer's iterator moves on (tar layers are read as one stream). ``target`` is a hard link's
    normalised target; ``reason`` says why an ``other`` or ``error`` entry is not scanned.
    """

    path: str
    kind: MemberKind
    size: int = 0
    read: Callable[[], Iterator[bytes]] | None = None
    target: str | None = None
    reason: str | None = None


class Meter:
    """Bytes read from an image's storage, shared by its layers."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class MemberUnreadable(Exception):
    """A file of a directory tree that could not be read (the scan goes on)."""


class Layer:
    """A layer of an image: a digest (None when it has none, as a directory tree) and members."""

    label: str
    whiteouts: bool = False  # whether .wh. names are OCI markers rather than plain names

    @property
    def digest(self) -> str | None:
        raise NotImplementedError

    def members(self, warnings: list[str]) -> Generator[Member, None, None]:
        """The layer's entries, in storage order; checks the digest at the end of the stream."""
        raise NotImplementedError

    def verify(self) -> None:
        """Check the layer's bytes still hash to its digest (no-op when there is none)."""


class DirectoryLayer(Layer):
    """A directory tree as a layer; symlinks are not followed, special files are skipped."""

    def __init__(self, root: str, meter: Meter) -> None:
        self.root = os.path.abspath(root)
        self.label = f"dir:{self.root}"
        self._meter = meter

    @property
    def digest(self) -> str | None:
        return None

    def members(self, warnings: list[str]) -> Generator[Member, None, None]:
        stack = [("", self.root)]  # depth-first without recursion (trees can be deep)
        while stack:
            rel, full = stack.pop()
            try:
                with os.scandir(full) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                yield Member(rel or "/", "error", reason=f"cannot list directory: {os_reason(exc)}")
                continue
            subdirs = []
            for entry in entries:
                path = f"{rel}/{entry.name}"
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    yield Member(path, "error", reason=os_reason(exc))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append((path, entry.path))
                elif stat.S_ISREG(st.st_mode):
                    yield Member(path, "file", st.st_size, read=self._reader(entry.path, st))
                elif stat.S_ISLNK(st.st_mode):
                    yield Member(path, "other", reason="symbolic link, not followed")
                else:
                    yield Member(
                        path, "other", reason=f"not a regular file ({file_kind(st.st_mode)})"
                    )
            stack.extend(reversed(subdirs))

    def _reader(self, full: str, st: os.stat_result) -> Callable[[], Iterator[bytes]]:
        meter = self._meter

        def read() -> Iterator[bytes]:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            try:
                fd = os.open(full, flags)
            except OSError as exc:
                raise MemberUnreadable(os_reason(exc)) from None
            try:
                st2 = os.fstat(fd)
                if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (
                    st.st_dev,
                    st.st_ino,
                ):
                    raise MemberUnreadable("replaced while the image was scanned")
                while True:
                    try:
                        chunk = os.read(fd, READ_CHUNK)
                    except OSError as exc:
                        raise MemberUnreadable(os_reason(exc)) from None
                    if not chunk:
                        return
                    meter.bytes += len(chunk)
                    yield chunk
            finally:
                os.close(fd)

        return read


class _HashingReader:
    """A file object that hashes and counts every byte read through it."""

    def __init__(self, f: Any, algorithm: str, meter: Meter) -> None:
        self._f = f
        self._h = hashlib.new(algorithm)
        self._meter = meter

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._h.update(data)
        self._meter.bytes += len(data)
        return data

    def drain(self) -> str:
        while self.read(READ_CHUNK):
            pass
        return self._h.hexdigest()


class ArchiveLayer(Layer):
    """A tar archive (plain, gzip, bzip2 or xz) as a layer, read as one stream.

    ``digest`` is the expected ``alg:hex`` of an OCI blob, checked while the stream is read;
    for a plain archive it is computed (one extra read) the first time it is asked for.
    """

    def __init__(
        self,
        path: str,
        meter: Meter,
        *,
        digest: str | None = None,
        whiteouts: bool = False,
        media_type: str | None = None,
    ) -> None:
        self.path = path
        self._meter = meter
        self._digest = digest
        self._verified = False
        self.whiteouts = whiteouts
        self.media_type = media_type
        self.label = digest or f"tar:{path}"

    @property
    def digest(self) -> str | None:
        if self._digest is None:
            self._digest = "sha256:" + self._hash("sha256")
            self._verified = True
            self.label = self._digest
        return self._digest

    def verify(self) -> None:
        if self._verified:
            return
        alg, _ = split_digest(self.digest)
        self._check(alg, self._hash(alg))

    def _check(self, alg: str, actual: str) -> None:
        expected = self.digest
        if f"{alg}:{actual}" != expected:
            raise BlobDigestError(
                f"{self.path}: content hashes to {alg}:{actual}, not to {expected} "
                "(digest mismatch: the blob is corrupt, was tampered with, or changed while "
                "it was read)"
            )
        self._verified = True

    def _hash(self, alg: str) -> str:
        with self._open() as f:
            return _HashingReader(f, alg, self._meter).drain()

    def _open(self) -> Any:
        try:
            return open(self.path, "rb")
        except OSError as exc:
            raise ImageError(f"{self.path}: cannot read: {os_reason(exc)}") from None

    def members(self, warnings: list[str]) -> Generator[Member, None, None]:
        alg, _ = split_digest(self.digest)
        with self._open() as raw:
            if raw.read(len(_ZSTD_MAGIC)) == _ZSTD_MAGIC:
                raise ImageError(f"{self.path}: zstd-compressed layers are not supported")
            raw.seek(0)
            reader = _HashingReader(raw, alg, self._meter)
            try:
                yield from self._stream(reader, warnings)
            except STREAM_ERRORS as exc:
                # A broken stream in a blob whose digest is wrong is a digest error first.
                self._check(alg, reader.drain())
                raise ImageError(
                    f"{self.path}: not a readable tar archive (plain, gzip, bzip2 or xz): {exc}"
                ) from None
            self._check(alg, reader.drain())

    def _stream(self, reader: _HashingReader, warnings: list[str]) -> Generator[Member, None, None]:
        with tarfile.open(fileobj=reader, mode="r|*") as tf:  # type: ignore[call-overload]
            for ti in tf:
                path, warning = normalise(ti.name)
                if warning:
                    warnings.append(warning)
                if path is None:
                    continue
                name = path.rsplit("/", 1)[1]
                if self.whiteouts and name.startswith(WHITEOUT_PREFIX):
                    member = self._whiteout(path, name, warnings)
                    if member is not None:
                        yield member
                elif ti.isreg():
                    yield Member(path, "file", ti.size, read=_tar_reader(tf, ti))
                elif ti.isdir():
                    yield Member(path, "dir")
                elif ti.islnk():
                    target, warning = normalise(ti.linkname)
                    if warning:
                        warnings.append(warning)
                    if target is None:
                        yield Member(path, "other", reason="hard link to the image root")
                    else:
                        yield Member(path, "hardlink", target=target)
                elif ti.issym():
                    yield Member(path, "other", reason="symbolic link, not followed")
                else:
                    yield Member(path, "other", reason=f"not a regular file ({tar_kind(ti)})")

    @staticmethod
    def _whiteout(path: str, name: str, warnings: list[str]) -> Member | None:
        parent = path.rsplit("/", 1)[0] or "/"
        if name == OPAQUE_MARKER:
            return Member(parent, "opaque")
        if name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return None  # reserved aufs metadata (.wh..wh.plnk, ...): no effect on the view
        target = name[len(WHITEOUT_PREFIX) :]
        if target in ("", ".", ".."):
            warnings.append(f"ignored whiteout {path!r}: it names no file")
            return None
        return Member(f"{parent.rstrip('/')}/{target}", "whiteout")


STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


class StreamBroken(Exception):
    """The archive stream failed while a member was read; thrown back into the layer's reader."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _tar_reader(tf: tarfile.TarFile, ti: tarfile.TarInfo) -> Callable[[], Iterator[bytes]]:
    def read() -> Iterator[bytes]:
        try:
            f = tf.extractfile(ti)
            if f is None:  # pragma: no cover - isreg() members always have a file object
                return
            while chunk := f.read(READ_CHUNK):
                yield chunk
        except STREAM_ERRORS as exc:
            raise StreamBroken(exc) from exc

    return read


def split_digest(digest: str | None) -> tuple[str, str]:
    m = _DIGEST_RE.match(digest or "")
    if not m or len(m.group(2)) != _DIGEST_HEX[m.group(1)]:
        raise ImageError(f"bad digest {digest!r}: expected sha256:<64 hex> or sha512:<128 hex>")
    return m.group(1), m.group(2)
