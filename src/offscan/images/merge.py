"""The merged view of an image's layers, and :func:`scan_image`, which builds it.

A tree of dicts: a dict is a directory, an ImageFile a regular file, a Skipped any other
non-directory entry. Applying a layer first applies its whiteouts (they only hide what lower
layers put there), then adds its entries in archive order; a later entry replaces an earlier
one, a non-directory replaces a whole directory tree and vice versa, as extraction would.

Reads the image (through its layers) and the layer cache; writes only what the cache writes.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..engine import Matcher
from .detect import disk_kind
from .diskscan import scan_disk
from .errors import ImageError
from .layers import LayerCache, at_path, layer_record
from .layout import open_image
from .results import ImageFile, ImageReport, LayerRecord, Skipped

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
                parent[name] = at_path(target, e.path)
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
                files.append(child if child.path == path else at_path(child, path))
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
    A disk image (QCOW2, VMDK, VHD, VHDX, VDI, raw) is scanned by :func:`.diskscan.scan_disk`.

    Each layer is matched at most once per pattern version: records come from ``layer_cache``
    (or a cache built on ``state_dir``; give one or the other). ``layer`` scans that one layer
    alone (whiteouts are listed, not applied). Raises :class:`ImageError`.
    """
    t0 = time.monotonic()
    if layer_cache is not None and state_dir is not None:
        raise ValueError("give state_dir or layer_cache, not both")
    kind = disk_kind(path)
    if kind is not None:
        if ref is not None or layer is not None:
            raise ImageError(f"{os.fspath(path)}: --ref and --layer are for tar and OCI images")
        return scan_disk(path, matcher, state_dir=state_dir, kind=kind)
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
        record, how = layer_record(lay, matcher, cache)
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
