"""Opening an image: a directory tree, a tar archive or an OCI image layout, as its layers.

An OCI image layout (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``) is the layers of
one manifest applied in order; its index, manifest and config are read and digest-checked
here, its layers only when scanned. Reads the image's metadata files; writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from ..engine import file_kind
from .detect import sniff_file
from .errors import BlobDigestError, ImageError
from .helpers import os_reason
from .sources import ArchiveLayer, DirectoryLayer, Layer, Meter, split_digest

MAX_JSON_BLOB = 4 << 20  # bytes; index, manifests and configs are small, a bigger one is refused
MAX_INDEX_DEPTH = 4  # nested image indexes followed before giving up

REF_ANNOTATION = "org.opencontainers.image.ref.name"
_MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


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
    meter: Meter = field(default_factory=Meter, repr=False)

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
        raise ImageError(f"{spath}: {os_reason(exc)}") from None
    image: Image
    if stat.S_ISDIR(st.st_mode):
        if os.path.lexists(os.path.join(spath, "oci-layout")):
            return _open_oci(spath, ref)
        image = Image(spath, "directory", [])
        image.layers.append(DirectoryLayer(spath, image.meter))
    elif stat.S_ISREG(st.st_mode):
        kind = sniff_file(spath)
        if kind != "tar":
            raise ImageError(f"{spath}: a {kind} disk image, not a tar archive (use scan_disk)")
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
            return desc
        if isinstance(name, str):
            names.append(name)
    raise ImageError(
        f"{root}: no manifest has ref name {ref!r} (refs: {', '.join(names) or 'none'})"
    )


def _blob_path(root: str, desc: dict[str, Any]) -> str:
    digest = desc.get("digest")
    if not isinstance(digest, str):
        raise ImageError(f"{root}: descriptor without a digest: {desc!r:.120}")
    alg, hexdigest = split_digest(digest)  # validated: the path cannot leave blobs/
    path = os.path.join(root, "blobs", alg, hexdigest)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageError(f"{root}: blob {digest}: {os_reason(exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{root}: blob {digest} is not a regular file")
    size = desc.get("size")
    if isinstance(size, int) and size != st.st_size:
        raise BlobDigestError(
            f"{path}: {st.st_size} bytes, but its descriptor says {size} "
            "(the blob is corrupt or was tampered with)"
        )
    return path


def _read_json_blob(root: str, desc: dict[str, Any], meter: Meter) -> dict[str, Any]:
    if not isinstance(desc, dict):
        raise ImageError(f"{root}: bad descriptor {desc!r:.80}")
    path = _blob_path(root, desc)
    alg, expected = split_digest(desc["digest"])
    data = _read_small(path, meter)
    actual = hashlib.new(alg, data).hexdigest()
    if actual != expected:
        raise BlobDigestError(
            f"{path}: content hashes to {alg}:{actual}, not to {desc['digest']} "
            "(digest mismatch: the blob is corrupt or was tampered with)"
        )
    return _parse_json(path, data)


def _read_json(path: str, meter: Meter) -> Any:
    return _parse_json(path, _read_small(path, meter))


def _read_small(path: str, meter: Meter) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BLOB + 1)
    except OSError as exc:
        raise ImageError(f"{path}: {os_reason(exc)}") from None
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
