"""Images: directory trees, tar archives and OCI image layouts, scanned on demand as a VM would be.

An image is a stack of *layers*, lowest first. A directory tree or a plain tar archive is a
one-layer image; an OCI image layout (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``) is
the layers of one manifest applied in order, whiteouts honoured (``.wh.NAME`` deletes ``NAME``
from lower layers, ``.wh..wh..opq`` hides everything lower layers put in its directory).

Each layer is read once, as a stream: members are matched straight out of the (compressed)
archive with ``tarfile`` in stream mode; nothing is ever extracted or written, so a member named
``../evil`` or ``/etc/x`` cannot land anywhere. The per-file verdicts of a layer form a
:class:`LayerRecord` cached by ``(layer digest, pattern version)`` in a :class:`LayerCache`, in
memory and optionally under a state directory, so a layer shared by several images is matched
once. The verdict of an image is the verdicts of the files visible in its merged view.

Digests are always checked: a blob whose content does not hash to its name is refused with
:class:`BlobDigestError`, also when its layer is served from the cache (otherwise replacing a
cached clean layer's bytes while keeping its name would smuggle content past the scanner). The
check reads the blob but neither decompresses nor matches it, so ``bytes_read`` counts it while
``bytes_scanned`` does not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import lzma
import os
import re
import stat
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from . import __version__
from .engine import DEFAULT_MAX_FILE_SIZE, DEFAULT_SCAN_TIMEOUT, Matcher, file_kind, parse_size
from .signatures import SignatureError, load_database

__all__ = [
    "DEFAULT_LAYER_CACHE_ENTRIES",
    "BlobDigestError",
    "Image",
    "ImageError",
    "ImageFile",
    "ImageReport",
    "Layer",
    "LayerCache",
    "LayerEntry",
    "LayerRecord",
    "Member",
    "Skipped",
    "add_scan_image_arguments",
    "cmd_scan_image",
    "open_image",
    "scan_image",
    "scan_layer",
]

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20  # bytes per read from a blob, an archive or a file
MAX_JSON_BLOB = 4 << 20  # bytes; index, manifests and configs are small, a bigger one is refused
MAX_INDEX_DEPTH = 4  # nested image indexes followed before giving up
DEFAULT_LAYER_CACHE_ENTRIES = 1024  # layer records kept in memory
LAYER_CACHE_DIR = "image-layers"  # under the state directory
RECORD_FORMAT = 1  # version of the persisted layer record

EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR = 0, 1, 2

REF_ANNOTATION = "org.opencontainers.image.ref.name"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_DIGEST_HEX = {"sha256": 64, "sha512": 128}  # algorithms OCI registers, and their hex lengths
_DIGEST_RE = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Status = Literal["clean", "infected", "error"]
MemberKind = Literal["file", "dir", "hardlink", "other", "whiteout", "opaque", "error"]
EntryKind = Literal["file", "dir", "link", "other", "whiteout", "opaque"]


class ImageError(Exception):
    """An image that cannot be scanned: missing, of no supported kind, or malformed."""


class BlobDigestError(ImageError):
    """A blob whose content does not hash to the digest it is named by (corrupt or tampered)."""


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class ImageFile:
    """The verdict for one regular file of an image, by its path inside the image.

    ``layer`` names the layer the file comes from (its digest, or ``dir:PATH``); ``digest`` is
    the SHA-256 hex digest of the content when it was read whole.
    """

    path: str
    status: Status
    matches: tuple[str, ...] = ()
    size: int = 0
    digest: str | None = None
    reason: str | None = None
    layer: str | None = None

    @property
    def infected(self) -> bool:
        return self.status == "infected"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "status": self.status,
            "matches": list(self.matches),
            "size": self.size,
            "digest": self.digest,
            "reason": self.reason,
            "layer": self.layer,
        }


@dataclass(frozen=True, slots=True)
class Skipped:
    """An entry of an image that is not scanned (symlink, device, FIFO, ...) and why."""

    path: str
    reason: str
    layer: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason, "layer": self.layer}


@dataclass(frozen=True, slots=True)
class LayerEntry:
    """One entry of a scanned layer, in archive order.

    ``file`` carries a regular file's verdict, ``skipped`` a non-regular entry; ``link`` is a
    hard link whose target was not in the same layer (resolved against the merged view);
    ``whiteout`` and ``opaque`` are the OCI markers (only OCI layers have them).
    """

    kind: EntryKind
    path: str
    file: ImageFile | None = None
    skipped: Skipped | None = None
    target: str | None = None


@dataclass(frozen=True, slots=True)
class LayerRecord:
    """Everything an image scan needs from one layer, without reading it again.

    A record is valid for one pattern version. Records holding errors are only cached when every
    error is a file over ``max_file_size`` (deterministic for that limit); timeouts and read
    errors must be retried.
    """

    layer: str
    pattern_version: str
    entries: tuple[LayerEntry, ...]
    max_file_size: int
    warnings: tuple[str, ...] = ()
    bytes_scanned: int = 0

    @property
    def files(self) -> list[ImageFile]:
        return [e.file for e in self.entries if e.file is not None]

    @property
    def limited(self) -> bool:
        """Some file was over the size limit (the record then depends on that limit)."""
        return any(f.status == "error" for f in self.files)

    @property
    def cacheable(self) -> bool:
        return all(f.status != "error" or f.size > self.max_file_size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        entries: list[dict[str, Any]] = []
        for e in self.entries:
            d: dict[str, Any] = {"k": e.kind, "p": e.path}
            if e.file is not None:
                f = e.file
                d.update(s=f.status, m=list(f.matches), n=f.size, d=f.digest, r=f.reason)
            if e.skipped is not None:
                d["r"] = e.skipped.reason
            if e.target is not None:
                d["t"] = e.target
            entries.append(d)
        return {
            "format": RECORD_FORMAT,
            "layer": self.layer,
            "pattern_version": self.pattern_version,
            "max_file_size": self.max_file_size,
            "warnings": list(self.warnings),
            "entries": entries,
        }

    @classmethod
    def from_json(cls, data: Any) -> LayerRecord:
        """Rebuild a persisted record; raises ValueError/TypeError/KeyError when malformed."""
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise ValueError("not a layer record of a known format")
        layer, version = data["layer"], data["pattern_version"]
        max_size = data["max_file_size"]
        if not (isinstance(layer, str) and isinstance(version, str) and isinstance(max_size, int)):
            raise TypeError("bad record header")
        entries = []
        for d in data["entries"]:
            kind, path = d["k"], d["p"]
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"bad path {path!r}")
            if kind == "file":
                if d["s"] not in ("clean", "infected", "error"):
                    raise ValueError(f"bad status {d['s']!r}")
                matches = tuple(d["m"])
                if not all(isinstance(m, str) for m in matches):
                    raise TypeError("bad match names")
                f = ImageFile(path, d["s"], matches, int(d["n"]), d["d"], d["r"], layer)
                entries.append(LayerEntry("file", path, file=f))
            elif kind == "other":
                entries.append(LayerEntry("other", path, skipped=Skipped(path, str(d["r"]), layer)))
            elif kind == "link":
                entries.append(LayerEntry("link", path, target=str(d["t"])))
            elif kind in ("dir", "whiteout", "opaque"):
                entries.append(LayerEntry(kind, path))
            else:
                raise ValueError(f"bad entry kind {kind!r}")
        warnings = tuple(str(w) for w in data.get("warnings", ()))
        return cls(layer, version, tuple(entries), max_size, warnings)


@dataclass
class ImageReport:
    """The result of scanning an image: the verdicts of the files visible in its merged view.

    ``layers`` lists ``(digest, "scanned" | "cached")`` lowest first; ``bytes_read`` counts
    every byte read from the image's storage (including digest checks of cached layers),
    ``bytes_scanned`` the file content matched in this run.
    """

    image: str
    kind: str
    pattern_version: str
    files: list[ImageFile] = field(default_factory=list)
    layers: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    whiteouts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ref: str | None = None
    manifest: str | None = None
    layer: str | None = None  # set when one layer was scanned alone
    bytes_read: int = 0
    bytes_scanned: int = 0
    elapsed: float = 0.0

    @property
    def infected(self) -> list[ImageFile]:
        return [f for f in self.files if f.infected]

    @property
    def errors(self) -> list[ImageFile]:
        return [f for f in self.files if f.status == "error"]

    @property
    def layers_scanned(self) -> int:
        return sum(1 for _, how in self.layers if how == "scanned")

    @property
    def layers_cached(self) -> int:
        return sum(1 for _, how in self.layers if how == "cached")

    @property
    def exit_code(self) -> int:
        """clamscan's convention: 2 when any file could not be scanned, else 1 when infected."""
        if self.errors:
            return EXIT_ERROR
        return EXIT_FOUND if self.infected else EXIT_CLEAN

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "kind": self.kind,
            "ref": self.ref,
            "manifest": self.manifest,
            "layer": self.layer,
            "pattern_version": self.pattern_version,
            "layers": [{"digest": d, "source": how} for d, how in self.layers],
            "files": [f.to_json() for f in self.files],
            "infected": [f.path for f in self.infected],
            "skipped": [s.to_json() for s in self.skipped],
            "whiteouts": self.whiteouts,
            "warnings": self.warnings,
            "bytes_read": self.bytes_read,
            "bytes_scanned": self.bytes_scanned,
            "elapsed": round(self.elapsed, 6),
        }


# ---------------------------------------------------------------------------------------------
# Image sources


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


class _Meter:
    """Bytes read from an image's storage, shared by its layers."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class _MemberUnreadable(Exception):
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

    def __init__(self, root: str, meter: _Meter) -> None:
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
                yield Member(
                    rel or "/", "error", reason=f"cannot list directory: {_os_reason(exc)}"
                )
                continue
            subdirs = []
            for entry in entries:
                path = f"{rel}/{entry.name}"
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    yield Member(path, "error", reason=_os_reason(exc))
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
                raise _MemberUnreadable(_os_reason(exc)) from None
            try:
                st2 = os.fstat(fd)
                if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (
                    st.st_dev,
                    st.st_ino,
                ):
                    raise _MemberUnreadable("replaced while the image was scanned")
                while True:
                    try:
                        chunk = os.read(fd, READ_CHUNK)
                    except OSError as exc:
                        raise _MemberUnreadable(_os_reason(exc)) from None
                    if not chunk:
                        return
                    meter.bytes += len(chunk)
                    yield chunk
            finally:
                os.close(fd)

        return read


class _HashingReader:
    """A file object that hashes and counts every byte read through it."""

    def __init__(self, f: Any, algorithm: str, meter: _Meter) -> None:
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
        meter: _Meter,
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
        alg, _ = _split_digest(self.digest)
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
            raise ImageError(f"{self.path}: cannot read: {_os_reason(exc)}") from None

    def members(self, warnings: list[str]) -> Generator[Member, None, None]:
        alg, _ = _split_digest(self.digest)
        with self._open() as raw:
            if raw.read(len(_ZSTD_MAGIC)) == _ZSTD_MAGIC:
                raise ImageError(f"{self.path}: zstd-compressed layers are not supported")
            raw.seek(0)
            reader = _HashingReader(raw, alg, self._meter)
            try:
                yield from self._stream(reader, warnings)
            except _STREAM_ERRORS as exc:
                # A broken stream in a blob whose digest is wrong is a digest error first.
                self._check(alg, reader.drain())
                raise ImageError(
                    f"{self.path}: not a readable tar archive (plain, gzip, bzip2 or xz): {exc}"
                ) from None
            self._check(alg, reader.drain())

    def _stream(self, reader: _HashingReader, warnings: list[str]) -> Generator[Member, None, None]:
        with tarfile.open(fileobj=reader, mode="r|*") as tf:  # type: ignore[call-overload]
            for ti in tf:
                path, warning = _normalise(ti.name)
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
                    target, warning = _normalise(ti.linkname)
                    if warning:
                        warnings.append(warning)
                    if target is None:
                        yield Member(path, "other", reason="hard link to the image root")
                    else:
                        yield Member(path, "hardlink", target=target)
                elif ti.issym():
                    yield Member(path, "other", reason="symbolic link, not followed")
                else:
                    yield Member(path, "other", reason=f"not a regular file ({_tar_kind(ti)})")

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


_STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


class _StreamBroken(Exception):
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
        except _STREAM_ERRORS as exc:
            raise _StreamBroken(exc) from exc

    return read


@dataclass
class Image:
    """An image opened for scanning: its kind (``directory``, ``tar``, ``oci``) and layers."""

    path: str
    kind: str
    layers: list[Layer]
    ref: str | None = None
    manifest: str | None = None
    config: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    meter: _Meter = field(default_factory=_Meter, repr=False)

    def find_layer(self, spec: str) -> Layer:
        """The layer named by a full digest, its hex part, or a unique prefix of either."""
        if self.kind == "directory":
            raise ImageError(f"{self.path}: a directory tree has no layer digests; drop --layer")
        spec = spec.strip().lower()
        hits = []
        for layer in self.layers:
            digest = layer.digest or ""
            hexpart = digest.split(":", 1)[-1]
            if spec in (digest, hexpart):
                return layer
            if len(spec) >= 4 and (digest.startswith(spec) or hexpart.startswith(spec)):
                hits.append(layer)
        unique = {layer.digest for layer in hits}
        if len(unique) == 1:
            return hits[0]
        known = ", ".join(str(layer.digest) for layer in self.layers) or "none"
        what = "is ambiguous" if hits else "matches no layer"
        raise ImageError(f"{self.path}: --layer {spec} {what} (layers: {known})")


def open_image(path: str | os.PathLike[str], *, ref: str | None = None) -> Image:
    """Open a directory tree, a tar archive or an OCI image layout for scanning.

    An OCI layout's index, manifest and config are read and digest-checked here; layers are
    only read when scanned. ``ref`` picks a manifest by its ``org.opencontainers.image.ref.name``
    annotation (OCI layouts only). Raises :class:`ImageError`.
    """
    spath = os.fspath(path)
    try:
        st = os.stat(spath)
    except OSError as exc:
        raise ImageError(f"{spath}: {_os_reason(exc)}") from None
    image: Image
    if stat.S_ISDIR(st.st_mode):
        if os.path.lexists(os.path.join(spath, "oci-layout")):
            return _open_oci(spath, ref)
        image = Image(spath, "directory", [])
        image.layers.append(DirectoryLayer(spath, image.meter))
    elif stat.S_ISREG(st.st_mode):
        image = Image(spath, "tar", [])
        image.layers.append(ArchiveLayer(spath, image.meter))
    else:
        raise ImageError(
            f"{spath}: not a directory, tar archive or OCI layout ({file_kind(st.st_mode)})"
        )
    if ref is not None:
        raise ImageError(
            f"{spath}: --ref picks a manifest of an OCI layout; this is a {image.kind}"
        )
    return image


def _open_oci(root: str, ref: str | None) -> Image:
    image = Image(root, "oci", [], ref=ref)
    layout = _read_json(os.path.join(root, "oci-layout"), image.meter)
    if not isinstance(layout, dict) or "imageLayoutVersion" not in layout:
        raise ImageError(f"{root}/oci-layout: no imageLayoutVersion; not an OCI image layout")
    index = _read_json(os.path.join(root, "index.json"), image.meter)
    desc = _pick_manifest(root, index, ref)
    for _ in range(MAX_INDEX_DEPTH):
        media_type = desc.get("mediaType")
        blob = _read_json_blob(root, desc, image.meter)
        is_index = media_type in _INDEX_TYPES or (
            media_type not in _MANIFEST_TYPES and "manifests" in blob and "layers" not in blob
        )
        if not is_index:
            break
        desc = _pick_manifest(root, blob, None)  # a nested index (multi-platform): its first
    else:
        raise ImageError(f"{root}: image indexes nested deeper than {MAX_INDEX_DEPTH}")
    image.manifest = desc["digest"]
    layers = blob.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{root}: manifest {image.manifest} has no layers list")
    config_desc = blob.get("config")
    if isinstance(config_desc, dict):
        image.config = _read_json_blob(root, config_desc, image.meter)
        diff_ids = (image.config.get("rootfs") or {}).get("diff_ids")
        if isinstance(diff_ids, list) and len(diff_ids) != len(layers):
            image.warnings.append(f"config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
    for ld in layers:
        if not isinstance(ld, dict):
            raise ImageError(f"{root}: manifest {image.manifest}: bad layer descriptor {ld!r:.80}")
        media_type = str(ld.get("mediaType", ""))
        if "zstd" in media_type:
            raise ImageError(
                f"{root}: layer {ld.get('digest')}: zstd-compressed layers are not supported"
            )
        blob_path = _blob_path(root, ld)
        image.layers.append(
            ArchiveLayer(
                blob_path, image.meter, digest=ld["digest"], whiteouts=True, media_type=media_type
            )
        )
    return image


def _pick_manifest(root: str, index: Any, ref: str | None) -> dict[str, Any]:
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(f"{root}: the image index lists no manifests")
    if ref is None:
        first = manifests[0]
        if not isinstance(first, dict):
            raise ImageError(f"{root}: bad manifest descriptor {first!r:.80}")
        return first
    names = []
    for desc in manifests:
        annotations = desc.get("annotations") if isinstance(desc, dict) else None
        name = annotations.get(REF_ANNOTATION) if isinstance(annotations, dict) else None
        if name == ref:
            return desc  # type: ignore[no-any-return]
        if isinstance(name, str):
            names.append(name)
    raise ImageError(
        f"{root}: no manifest has ref name {ref!r} (refs: {', '.join(names) or 'none'})"
    )


def _split_digest(digest: str | None) -> tuple[str, str]:
    m = _DIGEST_RE.match(digest or "")
    if not m or len(m.group(2)) != _DIGEST_HEX[m.group(1)]:
        raise ImageError(f"bad digest {digest!r}: expected sha256:<64 hex> or sha512:<128 hex>")
    return m.group(1), m.group(2)


def _blob_path(root: str, desc: dict[str, Any]) -> str:
    digest = desc.get("digest")
    if not isinstance(digest, str):
        raise ImageError(f"{root}: descriptor without a digest: {desc!r:.120}")
    alg, hexdigest = _split_digest(digest)  # validated: the path cannot leave blobs/
    path = os.path.join(root, "blobs", alg, hexdigest)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageError(f"{root}: blob {digest}: {_os_reason(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{root}: blob {digest} is not a regular file")
    size = desc.get("size")
    if isinstance(size, int) and size != st.st_size:
        raise BlobDigestError(
            f"{path}: {st.st_size} bytes, but its descriptor says {size} "
            "(the blob is corrupt or was tampered with)"
        )
    return path


def _read_json_blob(root: str, desc: dict[str, Any], meter: _Meter) -> dict[str, Any]:
    if not isinstance(desc, dict):
        raise ImageError(f"{root}: bad descriptor {desc!r:.80}")
    path = _blob_path(root, desc)
    alg, expected = _split_digest(desc["digest"])
    data = _read_small(path, meter)
    actual = hashlib.new(alg, data).hexdigest()
    if actual != expected:
        raise BlobDigestError(
            f"{path}: content hashes to {alg}:{actual}, not to {desc['digest']} "
            "(digest mismatch: the blob is corrupt or was tampered with)"
        )
    return _parse_json(path, data)


def _read_json(path: str, meter: _Meter) -> Any:
    return _parse_json(path, _read_small(path, meter))


def _read_small(path: str, meter: _Meter) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BLOB + 1)
    except OSError as exc:
        raise ImageError(f"{path}: {_os_reason(exc)}") from None
    meter.bytes += len(data)
    if len(data) > MAX_JSON_BLOB:
        raise ImageError(
            f"{path}: larger than {MAX_JSON_BLOB} bytes; not an index, manifest or config"
        )
    return data


def _parse_json(path: str, data: bytes) -> Any:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ImageError(f"{path}: expected a JSON object")
    return value


# ---------------------------------------------------------------------------------------------
# Layer scanning and the layer cache


def scan_layer(layer: Layer, matcher: Matcher) -> LayerRecord:
    """Read one layer once and match every regular file in it.

    Hard links to a file earlier in the same layer take that file's verdict without a second
    read. Raises :class:`ImageError` (or :class:`BlobDigestError`) for an unreadable layer.
    """
    label = layer.digest or layer.label
    entries: list[LayerEntry] = []
    warnings: list[str] = []
    files: dict[str, ImageFile] = {}
    scanned = 0
    members = layer.members(warnings)
    for m in members:
        if m.kind == "file":
            try:
                f = _scan_member(m, matcher, label)
            except _StreamBroken as exc:
                # Let the layer's reader turn it into a digest or format error.
                members.throw(exc.cause)
                raise ImageError(f"{label}: {exc}") from None
            scanned += f.size if f.status != "error" else 0
            files[m.path] = f
            entries.append(LayerEntry("file", m.path, file=f))
        elif m.kind == "error":
            entries.append(
                LayerEntry(
                    "file", m.path, file=ImageFile(m.path, "error", reason=m.reason, layer=label)
                )
            )
        elif m.kind == "hardlink":
            assert m.target is not None
            target = files.get(m.target)
            if target is not None:
                f = _at(target, m.path)
                files[m.path] = f
                entries.append(LayerEntry("file", m.path, file=f))
            else:
                entries.append(LayerEntry("link", m.path, target=m.target))
        elif m.kind == "other":
            files.pop(m.path, None)
            entries.append(
                LayerEntry(
                    "other", m.path, skipped=Skipped(m.path, m.reason or "not scanned", label)
                )
            )
        else:
            if m.kind == "dir":
                files.pop(m.path, None)
            entries.append(LayerEntry(m.kind, m.path))  # type: ignore[arg-type]
    if any(e.path == "/oci-layout" for e in entries) and any(
        e.path == "/index.json" for e in entries
    ):
        warnings.append(
            "this archive holds an OCI image layout: its layers were scanned as "
            "opaque blobs; extract it and scan the directory to scan the layers"
        )
    return LayerRecord(
        label,
        matcher.version,
        tuple(entries),
        matcher.max_file_size,
        tuple(dict.fromkeys(warnings)),
        scanned,
    )


def _scan_member(m: Member, matcher: Matcher, layer: str) -> ImageFile:
    if m.size > matcher.max_file_size:
        return ImageFile(
            m.path,
            "error",
            size=m.size,
            layer=layer,
            reason=f"file size {m.size} exceeds max file size {matcher.max_file_size} bytes",
        )
    assert m.read is not None
    chunks = m.read()
    try:
        r = matcher.scan_chunks(chunks, m.size, path=m.path, allmatch=True, digest=True)
    except _MemberUnreadable as exc:
        return ImageFile(m.path, "error", size=m.size, reason=str(exc), layer=layer)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return ImageFile(m.path, r.status, r.matches, r.size, r.digest, r.reason, layer)


def _at(f: ImageFile, path: str) -> ImageFile:
    return ImageFile(path, f.status, f.matches, f.size, f.digest, f.reason, f.layer)


class LayerCache:
    """Layer records by ``(layer digest, pattern version)``: an LRU in memory, and JSON files
    under ``state_dir/image-layers/`` when a state directory is given, so a layer shared by
    several images, in this run or a later one, is matched once per pattern version.

    Files are written atomically (temp file + rename); an unreadable or malformed file is a
    miss, never an error. Counts ``hits`` and ``misses``. Safe to share between threads.
    """

    def __init__(
        self,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        max_entries: int = DEFAULT_LAYER_CACHE_ENTRIES,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._memory: OrderedDict[tuple[str, str], LayerRecord] = OrderedDict()
        self.dir: str | None = None
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        if state_dir is not None:
            self.dir = os.path.join(os.fspath(state_dir), LAYER_CACHE_DIR)
            try:
                os.makedirs(self.dir, exist_ok=True)
            except OSError as exc:
                raise ImageError(
                    f"state directory {os.fspath(state_dir)}: {_os_reason(exc)}"
                ) from None

    def get(self, digest: str, pattern_version: str) -> LayerRecord | None:
        key = (digest, pattern_version)
        with self._lock:
            record = self._memory.get(key)
            if record is not None:
                self._memory.move_to_end(key)
        if record is None:
            record = self._load(digest, pattern_version)  # disk reads outside the lock
            if record is not None:
                self._remember(key, record)
        with self._lock:
            if record is None:
                self.misses += 1
            else:
                self.hits += 1
        return record

    def put(self, record: LayerRecord) -> None:
        """Keep ``record`` (when it is cacheable) in memory and, with a state dir, on disk."""
        if not record.cacheable:
            return
        self._remember((record.layer, record.pattern_version), record)
        if self.dir is None:
            return
        path = self._path(record.layer, record.pattern_version)
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)
            try:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    json.dump(record.to_json(), f, separators=(",", ":"))
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:  # a full disk costs a rescan later, not this scan
            log.warning("cannot persist layer record %s: %s", path, exc)

    def _remember(self, key: tuple[str, str], record: LayerRecord) -> None:
        with self._lock:
            self._memory[key] = record
            self._memory.move_to_end(key)
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)

    def _path(self, digest: str, pattern_version: str) -> str:
        assert self.dir is not None
        alg, hexdigest = _split_digest(digest)
        version_key = hashlib.sha256(pattern_version.encode()).hexdigest()[:16]
        return os.path.join(self.dir, f"{alg}-{hexdigest}.{version_key}.json")

    def _load(self, digest: str, pattern_version: str) -> LayerRecord | None:
        if self.dir is None:
            return None
        path = self._path(digest, pattern_version)
        try:
            with open(path, "rb") as f:
                data = json.load(f)
            record = LayerRecord.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring unreadable layer record %s: %s", path, exc)
            return None
        if (record.layer, record.pattern_version) != (digest, pattern_version):
            log.warning("ignoring layer record %s: it is for another layer or version", path)
            return None
        return record


def _layer_record(layer: Layer, matcher: Matcher, cache: LayerCache) -> tuple[LayerRecord, str]:
    digest = layer.digest  # for a plain tar this hashes the archive
    if digest is None:
        return scan_layer(layer, matcher), "scanned"
    record = cache.get(digest, matcher.version)
    if record is not None and record.limited and record.max_file_size != matcher.max_file_size:
        record = None  # size-limit errors hold for that limit only
    if record is not None:
        layer.verify()
        return record, "cached"
    record = scan_layer(layer, matcher)
    cache.put(record)
    return record, "scanned"


# ---------------------------------------------------------------------------------------------
# The merged view
#
# A tree of dicts: a dict is a directory, an ImageFile a regular file, a Skipped any other
# non-directory entry. Applying a layer first applies its whiteouts (they only hide what lower
# layers put there), then adds its entries in archive order; a later entry replaces an earlier
# one, a non-directory replaces a whole directory tree and vice versa, as extraction would.

_Node = Any  # dict[str, _Node] | ImageFile | Skipped


def _parent(
    root: dict[str, _Node], path: str, *, create: bool
) -> tuple[dict[str, _Node] | None, str]:
    parts = path.strip("/").split("/")
    node = root
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            if not create:
                return None, parts[-1]
            child = node[part] = {}
        node = child
    return node, parts[-1]


def _apply(root: dict[str, _Node], record: LayerRecord) -> None:
    for e in record.entries:
        if e.kind == "whiteout":
            parent, name = _parent(root, e.path, create=False)
            if parent is not None:
                parent.pop(name, None)
        elif e.kind == "opaque":
            if e.path == "/":
                root.clear()
                continue
            parent, name = _parent(root, e.path, create=False)
            node = parent.get(name) if parent is not None else None
            if isinstance(node, dict):
                node.clear()
    for e in record.entries:
        if e.kind in ("whiteout", "opaque"):
            continue
        if e.path == "/":
            continue
        parent, name = _parent(root, e.path, create=True)
        assert parent is not None
        if e.kind == "dir":
            if not isinstance(parent.get(name), dict):
                parent[name] = {}
        elif e.kind == "file":
            parent[name] = e.file
        elif e.kind == "other":
            parent[name] = e.skipped
        elif e.kind == "link":
            assert e.target is not None
            tparent, tname = _parent(root, e.target, create=False)
            target = tparent.get(tname) if tparent is not None else None
            if isinstance(target, ImageFile):
                parent[name] = _at(target, e.path)
            else:
                parent[name] = Skipped(
                    e.path,
                    f"hard link to {e.target}, which is not a regular file in the image",
                    record.layer,
                )


def _visible(root: dict[str, _Node]) -> tuple[list[ImageFile], list[Skipped]]:
    files: list[ImageFile] = []
    skipped: list[Skipped] = []
    stack: list[tuple[str, dict[str, _Node]]] = [("", root)]
    while stack:
        prefix, node = stack.pop()
        for name in sorted(node, reverse=True):
            child = node[name]
            path = f"{prefix}/{name}"
            if isinstance(child, dict):
                stack.append((path, child))
            elif isinstance(child, ImageFile):
                files.append(child if child.path == path else _at(child, path))
            else:
                skipped.append(child)
    files.sort(key=lambda f: f.path)
    skipped.sort(key=lambda s: s.path)
    return files, skipped


def scan_image(
    path: str | os.PathLike[str],
    matcher: Matcher,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    ref: str | None = None,
    layer_cache: LayerCache | None = None,
    layer: str | None = None,
) -> ImageReport:
    """Scan a directory tree, tar archive or OCI image layout; report its merged view.

    Each layer is matched at most once per pattern version: records come from ``layer_cache``
    (or a cache built on ``state_dir``; give one or the other). ``layer`` scans that one layer
    alone (whiteouts are listed, not applied). Raises :class:`ImageError`.
    """
    t0 = time.monotonic()
    if layer_cache is not None and state_dir is not None:
        raise ValueError("give state_dir or layer_cache, not both")
    cache = layer_cache if layer_cache is not None else LayerCache(state_dir=state_dir)
    image = open_image(path, ref=ref)
    report = ImageReport(
        os.fspath(path),
        image.kind,
        matcher.version,
        ref=ref,
        manifest=image.manifest,
        warnings=list(image.warnings),
    )
    layers = image.layers
    if layer is not None:
        chosen = image.find_layer(layer)
        layers = [chosen]
        report.layer = chosen.digest
    root: dict[str, _Node] = {}
    for lay in layers:
        record, how = _layer_record(lay, matcher, cache)
        report.layers.append((record.layer, how))
        report.warnings.extend(w for w in record.warnings if w not in report.warnings)
        if how == "scanned":
            report.bytes_scanned += record.bytes_scanned
        if layer is not None:
            report.whiteouts = sorted(e.path for e in record.entries if e.kind == "whiteout")
            report.whiteouts += sorted(
                f"{e.path} (opaque)" for e in record.entries if e.kind == "opaque"
            )
        _apply(root, record)
    report.files, report.skipped = _visible(root)
    report.bytes_read = image.meter.bytes
    report.elapsed = time.monotonic() - t0
    return report


# ---------------------------------------------------------------------------------------------
# Command line: offscan scan-image


def add_scan_image_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``offscan scan-image`` (the CLI registers the subcommand)."""
    parser.add_argument(
        "path",
        metavar="PATH",
        help="directory tree, tar archive (.tar, .gz, .bz2, .xz) or OCI layout",
    )
    parser.add_argument(
        "-d",
        "--database",
        action="append",
        default=[],
        metavar="DB",
        help="signature file or directory (repeatable; default: shipped patterns/)",
    )
    parser.add_argument(
        "--state",
        metavar="DIR",
        help="keep layer verdicts in DIR so later runs do not rescan shared layers",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--layer",
        metavar="DIGEST",
        help="scan this layer alone (its own files; whiteouts listed, not applied)",
    )
    parser.add_argument(
        "--ref", metavar="NAME", help="OCI layout: the manifest whose ref.name annotation is NAME"
    )
    parser.add_argument("-i", "--infected", action="store_true", help="print infected files only")
    parser.add_argument(
        "--impl",
        choices=["auto", "c", "py"],
        default="auto",
        help="matcher core (default: native when built)",
    )
    parser.add_argument("--max-filesize", type=parse_size, default=DEFAULT_MAX_FILE_SIZE, metavar="SIZE")
    parser.add_argument(
        "--max-scantime", type=float, default=DEFAULT_SCAN_TIMEOUT, metavar="SECONDS"
    )


def cmd_scan_image(args: argparse.Namespace) -> int:
    """``offscan scan-image``: clamscan-like lines ``IMAGE:/path: Sig FOUND`` and a summary.

    Exit status 0 clean, 1 infected, 2 on any error (as clamscan).
    """
    out = sys.stdout
    try:
        db = load_database(*args.database)
        matcher = Matcher(
            db, impl=args.impl, max_file_size=args.max_filesize, max_scan_time=args.max_scantime
        )
        report = scan_image(
            args.path, matcher, state_dir=args.state, ref=args.ref, layer=args.layer
        )
    except (SignatureError, ImageError, RuntimeError, OSError) as exc:
        print(f"offscan: {_printable(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        out.write(json.dumps(report.to_json()) + "\n")
        return report.exit_code
    for w in report.warnings:
        print(f"offscan: warning: {_printable(w)}", file=sys.stderr)
    image = _printable(args.path)
    for f in report.files:
        where = f"{image}:{_printable(f.path)}"
        if f.status == "error":
            out.write(f"{where}: {_printable(f.reason or 'error')} ERROR\n")
        elif f.infected:
            for name in f.matches:
                out.write(f"{where}: {name} FOUND\n")
        elif not args.infected:
            out.write(f"{where}: OK\n")
    if report.layer is not None:
        for w in report.whiteouts:
            out.write(f"{image}:{_printable(w)}: whiteout (not applied)\n")
    what = {"directory": "directory tree", "tar": "tar archive", "oci": "OCI image layout"}
    title = what.get(report.kind, report.kind)
    if report.ref:
        title += f", ref {report.ref}"
    if report.manifest:
        title += f", manifest {report.manifest}"
    if report.layer:
        title += f"; layer {report.layer} alone, whiteouts not applied"
    out.write(
        "\n----------- IMAGE SCAN SUMMARY -----------\n"
        f"Image: {image} ({title})\n"
        f"Known viruses: {db.signature_count}\n"
        f"Engine version: offscan {__version__} ({'native' if matcher.native else 'python'})\n"
        f"Layers: {len(report.layers)} ({report.layers_scanned} scanned, "
        f"{report.layers_cached} from cache)\n"
        f"Scanned files: {len(report.files) - len(report.errors)}\n"
        f"Infected files: {len(report.infected)}\n"
        + (f"Skipped (not regular files): {len(report.skipped)}\n" if report.skipped else "")
        + (f"Total errors: {len(report.errors)}\n" if report.errors else "")
        + f"Data read: {report.bytes_read / 1e6:.2f} MB ({report.bytes_read} bytes)\n"
        f"Data scanned: {report.bytes_scanned / 1e6:.2f} MB ({report.bytes_scanned} bytes)\n"
        f"Time: {report.elapsed:.3f} sec\n"
    )
    out.flush()
    return report.exit_code


# ---------------------------------------------------------------------------------------------
# Helpers


def _normalise(name: str) -> tuple[str | None, str | None]:
    """A member name as an absolute path inside the image, and a warning when the name tried to
    leave it (``../x``, ``/etc/x``): such names are resolved lexically and clamped at the image
    root, as container runtimes do. Nothing is ever written, so no name can reach the host."""
    parts: list[str] = []
    escaped = name.startswith("/")
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            else:
                escaped = True
            continue
        parts.append(part)
    path = "/" + "/".join(parts) if parts else None
    warning = None
    if escaped:
        warning = (
            f"member name {name!r} points outside the image; scanned as "
            f"{path or '/'!r} (nothing is extracted)"
        )
    return path, warning


def _printable(text: str) -> str:
    """A path safe to print: undecodable bytes and control characters escaped, so a file name
    cannot forge output lines."""
    raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)


def _tar_kind(ti: tarfile.TarInfo) -> str:
    if ti.ischr():
        return "character device"
    if ti.isblk():
        return "block device"
    if ti.isfifo():
        return "FIFO"
    return f"tar type {ti.type!r}"


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
