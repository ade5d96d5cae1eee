"""Images: directory trees, tar archives, OCI image layouts and disk images, scanned on demand.

Disk images (raw, QCOW2, VMDK, VHD, VHDX, VDI with MBR/GPT/LVM and ext2/3/4, XFS, NTFS, FAT,
exFAT) are read without mounting through the dissect libraries: :mod:`.detect` (magic bytes),
:mod:`.containers`, :mod:`.volumes`, :mod:`.filesystems`, :mod:`.diskscan` (scanning, clones
as base + delta) and :mod:`.diskcache` (per-filesystem records); see docs/disks.md. What
follows is about container images.

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

One module per part: :mod:`.results` (verdicts and reports), :mod:`.sources` (directory and
tar layers), :mod:`.layout` (opening an image, OCI layouts), :mod:`.layers` (layer scanning and
the layer cache), :mod:`.merge` (the merged view and :func:`scan_image`), :mod:`.command` (the
``scan-image`` output), :mod:`.helpers`, :mod:`.errors`. This package only re-exports them; the
``scan-image`` arguments are parsed in :mod:`offscan.cli.images`.
"""

from __future__ import annotations

# Names that were module-level in offscan.images before the split; __all__ stays the public API
# it was (plus run_scan_image), the other names are re-exported explicitly (``as``).
from .command import run_scan_image
from .diskcache import DiskCache, FsRecord
from .diskscan import scan_disk
from .errors import BlobDigestError, ImageError
from .layers import DEFAULT_LAYER_CACHE_ENTRIES, LayerCache, scan_layer
from .layers import LAYER_CACHE_DIR as LAYER_CACHE_DIR
from .layout import MAX_INDEX_DEPTH as MAX_INDEX_DEPTH
from .layout import MAX_JSON_BLOB as MAX_JSON_BLOB
from .layout import REF_ANNOTATION as REF_ANNOTATION
from .layout import Image, open_image
from .merge import scan_image
from .results import EXIT_CLEAN as EXIT_CLEAN
from .results import EXIT_ERROR as EXIT_ERROR
from .results import EXIT_FOUND as EXIT_FOUND
from .results import RECORD_FORMAT as RECORD_FORMAT
from .results import EntryKind as EntryKind
from .results import ImageFile, ImageReport, LayerEntry, LayerRecord, Skipped
from .results import Status as Status
from .sources import OPAQUE_MARKER as OPAQUE_MARKER
from .sources import READ_CHUNK as READ_CHUNK
from .sources import WHITEOUT_PREFIX as WHITEOUT_PREFIX
from .sources import ArchiveLayer as ArchiveLayer
from .sources import DirectoryLayer as DirectoryLayer
from .sources import Layer, Member
from .sources import MemberKind as MemberKind

__all__ = [
    "DEFAULT_LAYER_CACHE_ENTRIES",
    "BlobDigestError",
    "DiskCache",
    "FsRecord",
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
    "open_image",
    "run_scan_image",
    "scan_disk",
    "scan_image",
    "scan_layer",
]
