"""Fuzzing bundle reading (issue 14): manifests, zip containers and signatures.

Bounded for CI (``OFFSCAN_FUZZ_EXAMPLES``, default 150 per test); ``make fuzz`` raises it.
The property: a hostile bundle is an :class:`UpdateError` (never another exception), and
what is accepted with ``trust`` verifies, matches its manifest and stays within its sizes.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offscan.updates import UpdateError, build_full, generate_key, load_private_key, load_trust
from offscan.updates.bundle import MANIFEST_NAME, SIGNATURE_NAME, Bundle, Manifest

EXAMPLES = int(os.environ.get("OFFSCAN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 60), 1 << 60) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=10,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict[str, object]]:
    d = tmp_path_factory.mktemp("keys")
    generate_key(d / "k")
    return load_private_key(d / "k.key"), load_trust(d / "k.pub")


def _good(key: object) -> Bundle:
    lines = {"daily.ndb": ["Sig.A:0:*:41424344454647", "Sig.B:0:*:5a5a5a5a5a5a"]}
    return build_full(lines, 3).signed(key)  # type: ignore[arg-type]


@st.composite
def manifests(draw: st.DrawFn) -> bytes:
    """Manifest documents near the real shape, with fields replaced by any JSON."""
    doc: dict[str, object] = {
        "format": "offscan-bundle",
        "format_version": 1,
        "kind": draw(st.sampled_from(["full", "delta", "other"])),
        "version": 2,
        "parent": None,
        "created": "2026-01-01T00:00:00Z",
        "files": {"daily.ndb": {"sha256": "0" * 64, "size": 3, "signatures": 1}},
    }
    for key in draw(st.lists(st.sampled_from(sorted(doc) + ["result"]), max_size=3)):
        doc[key] = draw(json_values)
    return json.dumps(doc).encode()


@FUZZ
@given(manifests() | st.binary(max_size=200))
def test_any_manifest_parses_or_is_an_update_error(data: bytes) -> None:
    try:
        m = Manifest.parse(data)
    except UpdateError as exc:
        assert str(exc)
        return
    assert m.kind in ("full", "delta") and m.version >= 1 and m.result


@st.composite
def containers(draw: st.DrawFn, base: bytes) -> bytes:
    """A real signed bundle, mutated: bytes flipped or cut, or its members rewritten."""
    how = draw(st.integers(0, 2))
    if how == 0:
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    if how == 1:
        return base[: draw(st.integers(0, len(base)))]
    members = {
        MANIFEST_NAME: draw(manifests() | st.just(Bundle.from_bytes(base).manifest_bytes)),
        SIGNATURE_NAME: draw(st.binary(max_size=120) | st.just(Bundle.from_bytes(base).signature)),
        "daily.ndb": draw(st.binary(max_size=300)),
    }
    for extra in draw(st.lists(st.sampled_from(["added/daily.ndb", "x", "../evil"]), max_size=2)):
        members[extra] = draw(st.binary(max_size=50))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, body in members.items():
            if body is not None and draw(st.integers(0, 9)) < 9:
                zf.writestr(name, body)
    return buf.getvalue()


def test_bundle_containers_are_read_or_refused(keys: tuple[object, dict[str, object]]) -> None:
    key, trust = keys
    good = _good(key)
    base = good.to_bytes()

    @FUZZ
    @given(containers(base))
    def check(data: bytes) -> None:
        for t in (None, trust):
            try:
                b = Bundle.from_bytes(data, trust=t)  # type: ignore[arg-type]
            except UpdateError as exc:
                assert str(exc)
                continue
            assert set(b.members) == set(b.manifest.files)
            for name, entry in b.manifest.files.items():
                assert len(b.members[name]) == entry.size
            if t is not None:
                assert b.verify(t) and b.manifest_bytes == good.manifest_bytes  # type: ignore[arg-type]

    check()
    assert Bundle.from_bytes(base, trust=trust).verify(trust) == good.signer  # type: ignore[arg-type]


def test_a_bundle_file_on_disk_is_bounded_too(
    tmp_path: Path, keys: tuple[object, dict[str, object]]
) -> None:
    key, trust = keys
    path = tmp_path / "b.osb"
    path.write_bytes(_good(key).to_bytes())
    from offscan.updates import read_bundle

    assert read_bundle(path, trust=trust).version == 3  # type: ignore[arg-type]
    with pytest.raises(UpdateError, match="cannot read"):
        read_bundle(tmp_path / "missing.osb")
