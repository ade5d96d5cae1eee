"""What an image scan produces: per-file verdicts, layer records and the image report.

:class:`LayerRecord` is also the unit the layer cache persists (``to_json``/``from_json``).
Pure data: this module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

RECORD_FORMAT = 1  # version of the persisted layer record

EXIT_CLEAN, EXIT_FOUND, EXIT_ERROR = 0, 1, 2

Status = Literal["clean", "infected", "error"]
EntryKind = Literal["file", "dir", "link", "other", "whiteout", "opaque"]


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
    # Disk images: files matched in this run, files whose verdict a clone inherited from its
    # base unread, and bytes read to compare a clone's changed clusters with its base.
    files_read: int = 0
    files_inherited: int = 0
    bytes_compared: int = 0

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
            "files_read": self.files_read,
            "files_inherited": self.files_inherited,
            "bytes_compared": self.bytes_compared,
            "elapsed": round(self.elapsed, 6),
        }
