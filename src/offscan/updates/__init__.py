"""Pattern updates: signed full and delta bundles, an on-disk store, an HTTP server and a client.

A *bundle* is a zip file (``.osb``) holding ``manifest.json``, an optional detached Ed25519
signature ``manifest.sig`` over the manifest's exact bytes, and signature files. The manifest
names every other member with its SHA-256, so one signature check covers the whole bundle.
A *full* bundle holds the complete database of version N; a *delta* holds only the lines added
and removed since its parent version and the digests of the database it must produce.

:class:`PatternStore` keeps the active version on disk and switches versions atomically (a
``current`` symlink replaced with one rename), so a crash mid-update leaves the old or the new
version, never a mix. :class:`UpdateServer` serves a directory of bundles with a small
``latest`` index and ETags; :class:`UpdateClient` fetches only what a store lacks. The
appliance and every agent use the same store and client. See ``docs/updates.md``.

Modules: ``canonical`` (canonical signature files), ``keys`` (Ed25519 keys), ``bundle``
(manifest and bundle, full and delta), ``store`` (:class:`PatternStore`), ``server``
(:class:`UpdateServer`), ``client`` (:class:`UpdateClient`) and ``commands`` (the work of each
``offscan patterns`` action; its parser is :mod:`offscan.cli.patterns`). This package only
re-exports them.
"""

from __future__ import annotations

from ._common import UpdateError
from .bundle import (
    BUNDLE_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_BUNDLE_SIZE,
    MAX_MANIFEST_SIZE,
    MAX_MEMBERS,
    MAX_UNPACKED_SIZE,
    SIGNATURE_NAME,
    SIGNATURE_SCHEME,
    Bundle,
    FileEntry,
    Kind,
    Manifest,
    build_delta,
    build_full,
    read_bundle,
)
from .canonical import canonical_lines, read_signature_dir
from .client import DEFAULT_TIMEOUT, UpdateClient, plan_updates
from .commands import EXIT_ERROR, EXIT_OK, EXIT_REJECTED
from .keys import TrustSpec, generate_key, key_id, load_private_key, load_trust
from .server import (
    DEFAULT_PORT,
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    INDEX_PATH,
    MAX_INDEX_SIZE,
    SERVER_POLL_INTERVAL,
    BundleEntry,
    UpdateServer,
)
from .store import (
    DEFAULT_KEEP_VERSIONS,
    ORIGIN_NAME,
    STEP_DELAY_ENV,
    AppliedUpdate,
    PatternStore,
)

__all__ = [
    "AppliedUpdate",
    "Bundle",
    "BundleEntry",
    "FileEntry",
    "Manifest",
    "PatternStore",
    "UpdateClient",
    "UpdateError",
    "UpdateServer",
    "build_delta",
    "build_full",
    "canonical_lines",
    "generate_key",
    "key_id",
    "load_private_key",
    "load_trust",
    "plan_updates",
    "read_bundle",
    "read_signature_dir",
    # the former single module's format constants, limits, exit codes and type aliases
    "BUNDLE_SUFFIX",
    "DEFAULT_KEEP_VERSIONS",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_REJECTED",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FORMAT",
    "INDEX_FORMAT_VERSION",
    "INDEX_PATH",
    "MANIFEST_NAME",
    "MAX_BUNDLE_SIZE",
    "MAX_INDEX_SIZE",
    "MAX_MANIFEST_SIZE",
    "MAX_MEMBERS",
    "MAX_UNPACKED_SIZE",
    "ORIGIN_NAME",
    "SERVER_POLL_INTERVAL",
    "SIGNATURE_NAME",
    "SIGNATURE_SCHEME",
    "STEP_DELAY_ENV",
    "Kind",
    "TrustSpec",
]
