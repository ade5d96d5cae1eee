"""The pattern store: the version a scanner runs, kept on disk and switched atomically.

:class:`PatternStore` verifies a bundle, test-loads the database it gives, writes the version
into a staging directory, renames it into ``versions/`` and switches the ``current`` symlink
with one rename, so a crash mid-update leaves the old or the new version, never a mix. This
module touches only the store directory it is given (``versions/``, ``tmp/``, ``current`` and
``.lock``); the appliance and every agent use the same store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from .._fsutil import fsync_dir
from ..signatures import PatternDB, SignatureError
from ._common import UpdateError, sha256_hex
from .bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Bundle,
    Kind,
    Manifest,
    apply_delta,
    bundle_bytes,
    diff_lines,
    parse_signature,
)
from .canonical import canonical_lines, join_lines
from .keys import TrustSpec, load_trust

log = logging.getLogger(__name__)

ORIGIN_NAME = "origin.json"  # store only: where and when a version was fetched
DEFAULT_KEEP_VERSIONS = 2  # the active version and the one before it

# Test hook: when set (seconds), PatternStore.apply prints each step to stderr and sleeps before
# doing it, so a test can SIGKILL the process between any two steps.
STEP_DELAY_ENV = "OFFSCAN_TEST_APPLY_STEP_DELAY"


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
                (str(p), join_lines(lines[p.name]).decode("latin-1")) for p in paths
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
            kid, raw = parse_signature(self._read(d / SIGNATURE_NAME))
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
            if len(data) != entry.size or sha256_hex(data) != entry.sha256:
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
            data = bundle_bytes(bundle)
            if source is None and not isinstance(bundle, (bytes, bytearray, memoryview)):
                source = str(Path(bundle).resolve())
            b = Bundle.from_bytes(data, trust=self.trust)  # signature before inflating
        signer = b.verify(self.trust)
        b.check_canonical()
        m = b.manifest
        with self._locked(blocking=True):
            current = self.current_version
            _check_applies_to(m, current)
            try:
                old, _ = self._read_current(verify_signature=False)
            except UpdateError as exc:
                if m.kind == "delta":
                    raise
                # A full bundle repairs a damaged store; everything in it counts as added.
                log.warning("%s; replacing it with full bundle version %d", exc, m.version)
                old = {}
            result = apply_delta(old, b) if m.kind == "delta" else b.lines()
            final = self._version_dir(m.version)
            try:
                # Named by their final paths: same files and content hash as load_database gives
                database = PatternDB.from_text(
                    (str(final / n), join_lines(ls).decode("latin-1"))
                    for n, ls in sorted(result.items())
                )
            except SignatureError as exc:
                raise UpdateError(f"bundle version {m.version} does not load: {exc}") from None
            added, removed = diff_lines(old, result)
            origin = {
                "fetched_from": source,
                "fetched_at": time.time(),
                "kind": m.kind,
                "bundle_sha256": sha256_hex(data),
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
            outputs = [(n, join_lines(ls)) for n, ls in sorted(result.items())]
            outputs += [
                (MANIFEST_NAME, b.manifest_bytes),
                (SIGNATURE_NAME, b.signature or b""),
                (ORIGIN_NAME, (json.dumps(origin, indent=1, sort_keys=True) + "\n").encode()),
            ]
            for name, data in outputs:
                _checkpoint(f"write {name}")
                _write_synced(staging / name, data)
            fsync_dir(staging)
            _checkpoint("rename")
            final = self._version_dir(version)
            if final.exists():  # left by a crash between rename and switch; never current
                shutil.rmtree(final)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(final.parent)
        _checkpoint("link")
        link = self.directory / f".current.{os.getpid()}.{threading.get_ident()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        os.symlink(f"versions/{version}", link)
        _checkpoint("switch")
        os.replace(link, self.directory / "current")
        fsync_dir(self.directory)
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


def _check_applies_to(m: Manifest, current: int | None) -> None:
    """Refuse a bundle that is not newer than ``current``, or a delta for another parent."""
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


def _checkpoint(step: str) -> None:
    delay = os.environ.get(STEP_DELAY_ENV)
    if delay:
        print(f"offscan-apply-step {step}", file=sys.stderr, flush=True)
        time.sleep(float(delay))


def _write_synced(path: Path, data: bytes) -> None:
    # Not atomic_write: the staging directory is the unit that is renamed into place, so each
    # file is created once in it (O_EXCL) and fsynced; _activate then syncs the directory.
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
