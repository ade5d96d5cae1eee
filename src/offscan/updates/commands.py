"""The work of each ``offscan patterns ACTION``: build, diff, keygen, sign, verify, apply, fetch,
status and serve, as functions of typed arguments that print their result and return an exit
status.

The parser lives in :mod:`offscan.cli.patterns`; :func:`run_action` maps the errors of any
action to its message and exit status (1 if a bundle was rejected, 2 on other errors). Besides
stdout and stderr, an action touches only the files and store its arguments name (bundles are
written atomically, so a server watching the directory never sees a partial one) and, for
``fetch`` and ``serve``, the network.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .._fsutil import atomic_write
from ..signatures import SignatureError
from ._common import InputMissing, UpdateError
from .bundle import Bundle, build_delta, build_full, read_bundle
from .canonical import read_signature_dir
from .client import UpdateClient
from .keys import generate_key, load_private_key, load_trust
from .server import DEFAULT_PORT, UpdateServer
from .store import PatternStore

EXIT_OK, EXIT_REJECTED, EXIT_ERROR = 0, 1, 2
REJECTING_ACTIONS = ("verify", "apply")  # their UpdateError means "this bundle is refused"


def run_action(action: str, work: Callable[[], int]) -> int:
    """Run ``offscan patterns ACTION``: 0 on success, 1 if a bundle is rejected, 2 on errors."""
    try:
        return int(work())
    except (UpdateError, SignatureError) as exc:
        print(f"offscan patterns {action}: {exc}", file=sys.stderr)
        rejected = action in REJECTING_ACTIONS and not isinstance(exc, InputMissing)
        return EXIT_REJECTED if rejected else EXIT_ERROR
    except OSError as exc:
        print(f"offscan patterns {action}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def write_bundle(bundle: Bundle, output: str | os.PathLike[str]) -> int:
    """Write ``bundle`` to ``output``; returns its size in bytes."""
    data = bundle.to_bytes()
    # Atomic, so a server watching the directory never sees a partial bundle; durable (fsync),
    # since a published bundle is what clients will fetch after the publisher's next reboot.
    atomic_write(output, data, fsync=True)
    return len(data)


def _maybe_sign(bundle: Bundle, key: str | None) -> Bundle:
    return bundle.signed(load_private_key(key)) if key else bundle


def _signed_note(bundle: Bundle) -> str:
    return f", signed by {bundle.signer}" if bundle.signature else ", unsigned"


def build(directory: str, *, version: int, output: str, key: str | None = None) -> int:
    """``build``: a full bundle of ``version`` from a directory of signature files."""
    bundle = _maybe_sign(build_full(directory, version), key)
    size = write_bundle(bundle, output)
    print(f"{output}: {bundle.manifest.describe()}, {size} bytes{_signed_note(bundle)}")
    return EXIT_OK


def _side(
    path: str, version: int | None, what: str, trust: Mapping[str, Ed25519PublicKey] | None
) -> tuple[dict[str, list[str]], int]:
    if Path(path).is_dir():
        if version is None:
            raise UpdateError(f"{path} is a directory: give its version with --{what}")
        return read_signature_dir(path), version
    b = read_bundle(path, trust=trust or None)
    if trust:
        b.verify(trust)
    else:
        b.check_digests()
    if b.kind != "full":
        raise UpdateError(f"{path}: diff needs full bundles or directories, not a delta")
    if version is not None and version != b.version:
        raise UpdateError(f"{path} is version {b.version}, not {version}")
    return b.lines(), b.version


def diff(
    old: str,
    new: str,
    *,
    output: str,
    version: int | None = None,
    parent: int | None = None,
    key: str | None = None,
    trust: Sequence[str] | None = None,
) -> int:
    """``diff``: a delta from ``old`` to ``new`` (full bundles or directories of signatures)."""
    trusted = load_trust(trust) if trust else None
    old_lines, parent = _side(old, parent, "parent", trusted)
    new_lines, version = _side(new, version, "version", trusted)
    bundle = _maybe_sign(build_delta(old_lines, new_lines, version, parent), key)
    size = write_bundle(bundle, output)
    print(f"{output}: {bundle.manifest.describe()}, {size} bytes{_signed_note(bundle)}")
    return EXIT_OK


def keygen(output: str, *, force: bool = False) -> int:
    """``keygen``: a new signing key pair ``OUTPUT.key`` and ``OUTPUT.pub``."""
    key, pub, kid = generate_key(output, force=force)
    print(
        f"{key}: private key (keep it secret)\n"
        f"{pub}: public key, id {kid} (give to clients as --trust)"
    )
    return EXIT_OK


def sign(bundle_path: str, *, key: str, output: str | None = None) -> int:
    """``sign``: sign a bundle in place, or into ``output``."""
    bundle = read_bundle(bundle_path)
    bundle.check_digests()
    signed = bundle.signed(load_private_key(key))
    size = write_bundle(signed, output or bundle_path)
    print(
        f"{output or bundle_path}: {bundle.manifest.describe()}, {size} bytes, "
        f"signed by {signed.signer}"
    )
    return EXIT_OK


def verify(bundle_path: str, *, trust: Sequence[str], as_json: bool = False) -> int:
    """``verify``: check a bundle's signature, digests and canonical form."""
    trusted = load_trust(trust)
    bundle = read_bundle(bundle_path, trust=trusted)
    kid = bundle.verify(trusted)
    bundle.check_canonical()
    m = bundle.manifest
    if as_json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "kind": m.kind,
                    "version": m.version,
                    "parent": m.parent,
                    "created": m.created,
                    "signer": kid,
                    "files": {n: e.signatures for n, e in m.result.items()},
                }
            )
        )
    else:
        print(f"{bundle_path}: OK: {m.describe()}, signed by {kid}")
    return EXIT_OK


def apply(bundle_path: str, *, store: str, trust: Sequence[str]) -> int:
    """``apply``: apply a bundle file to a pattern store."""
    applied = PatternStore(store, trust).apply(bundle_path)
    print(f"{store}: {applied.summary()}")
    return EXIT_OK


def fetch(url: str, *, store: str, trust: Sequence[str]) -> int:
    """``fetch``: bring a pattern store to an update server's latest version, once."""
    pattern_store = PatternStore(store, trust)
    client = UpdateClient(url, pattern_store)
    applied = client.update()
    for a in applied:
        print(f"{store}: {a.summary()}")
    if not applied:
        print(f"{store}: up to date at version {pattern_store.current_version}")
    print(f"{client.bytes_transferred} bytes transferred in {client.requests} request(s)")
    return EXIT_OK


def status(*, store: str, trust: Sequence[str], as_json: bool = False) -> int:
    """``status``: a pattern store's version and where it came from (never creates one)."""
    if not Path(store).is_dir():
        raise InputMissing(f"{store}: no pattern store there (apply or fetch creates one)")
    st = PatternStore(store, trust).status()
    if as_json:
        print(json.dumps(st))
    elif st["version"] is None:
        print(f"{store}: no pattern version yet")
    else:
        when = (
            datetime.fromtimestamp(st["fetched_at"], UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            if st["fetched_at"]
            else "?"
        )
        print(f"version   {st['version']} ({st['signatures']} signatures, created {st['created']})")
        print(
            f"fetched   {when} from {st['fetched_from'] or '?'} "
            f"({st['kind']}, signed by {st['signer']})"
        )
    return EXIT_OK


def serve(directory: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> int:
    """``serve``: serve a directory of bundles over HTTP until interrupted."""
    server = UpdateServer(directory, host=host, port=port)
    index = server.index()
    print(
        f"serving {len(index['bundles'])} bundle(s) from {directory} at {server.url} "
        f"(latest version {index['latest']})",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return EXIT_OK
