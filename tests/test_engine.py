"""The Matcher on buffers and files, run on both cores: syntax semantics, windows, hashes,
limits and special files."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EICAR, make_db, make_matcher

from offscan import Matcher, ScanResult, _match, engine, load_database

BIG = 1 << 20  # window size that holds every test buffer whole


def call_with_timeout(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, name="call_with_timeout", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"call blocked for more than {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def found(sig: str, data: bytes, impl: str, **kwargs: Any) -> bool:
    """Whether the one-signature ``.ndb`` line ``sig`` matches ``data`` (all window sizes agree)."""
    results = {
        ws: make_matcher(sig, impl, window_size=ws, **kwargs).scan_bytes(data)
        for ws in (BIG, 7, 16)
    }
    assert len(set(results.values())) == 1, results
    return results[BIG].infected


def test_c_extension_loaded() -> None:
    if os.environ.get("OFFSCAN_NO_EXTENSIONS"):
        assert not _match.NATIVE
        assert _match.Core is _match.PyCore
        return
    mod = importlib.import_module("offscan._match_c")
    assert mod.NATIVE is True
    assert _match.NATIVE, f"native core not in use: {_match.NATIVE_IMPORT_ERROR}"
    assert _match.Core is mod.Core
    m = Matcher(make_db("A:0:*:aabb"), impl="auto")
    assert m.native


def test_impl_is_honoured(impl: str) -> None:
    m = make_matcher("A:0:*:aabb", impl)
    assert m.native == (impl == "c")
    assert type(m.core) is (_match.NativeCore if impl == "c" else _match.PyCore)


def test_bad_arguments() -> None:
    db = make_db("A:0:*:aabb")
    with pytest.raises(ValueError, match="impl must be"):
        Matcher(db, impl="fast")
    with pytest.raises(ValueError, match="window_size"):
        Matcher(db, window_size=0)


# -- EICAR ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_db() -> Any:
    return load_database()


def test_eicar_in_bytes(impl: str, default_db: Any) -> None:
    m = Matcher(default_db, impl=impl)
    r = m.scan_bytes(EICAR)
    assert r.status == "infected" and r.infected
    assert r.matches == ("Eicar-Test-Signature",)  # body and MD5 signature share the name
    assert r.size == r.bytes_scanned == len(EICAR)
    assert m.scan_bytes(EICAR + b"\r\n trailing").matches == ("Eicar-Test-Signature",)
    assert m.scan_bytes(b" " + EICAR).status == "clean"  # offset 0 signature, other size
    assert m.scan_bytes(EICAR[:-1]).status == "clean"
    assert m.scan_bytes(b"").status == "clean"


def test_eicar_in_file(impl: str, default_db: Any, tmp_path: Path) -> None:
    m = Matcher(default_db, impl=impl)
    f = tmp_path / "eicar.com"
    f.write_bytes(EICAR)
    r = m.scan_path(f)
    assert r == ScanResult(str(f), "infected", ("Eicar-Test-Signature",), size=68, bytes_scanned=68)
    clean = tmp_path / "clean.txt"
    clean.write_bytes(b"hello world\n" * 1000)
    assert m.scan_path(clean).status == "clean"
    assert m.scan_path(clean).reason is None


def test_eicar_md5_alone(impl: str) -> None:
    db = make_db(hashlib.md5(EICAR).hexdigest() + ":68:Eicar.MD5", name="e.hdb")
    m = Matcher(db, impl=impl)
    assert m.scan_bytes(EICAR).matches == ("Eicar.MD5",)
    assert m.scan_bytes(EICAR + b"\n").status == "clean"


# -- body syntax semantics -----------------------------------------------------------------

H = bytes.fromhex


@pytest.mark.parametrize(
    ("sig", "hits", "misses"),
    [
        ("aabbcc", ["aabbcc", "00aabbcc00"], ["aabbcd", "aabb", "ccbbaa"]),
        ("aabb??cc", ["aabb00cc", "aabbffcc", "99aabbaacc"], ["aabbcc", "aabb00cd", "aabb0000cc"]),
        ("aabba?", ["aabba0", "aabbaf"], ["aabbb0", "aabb9f", "aabb"]),
        ("aabb?a", ["aabb0a", "aabbfa"], ["aabb0b", "aabba0", "aabb"]),
        ("a?aabb", ["a0aabb", "afaabb"], ["b0aabb", "aabb"]),
        (
            "aabb*ccdd",
            ["aabbccdd", "aabb0000ccdd", "aabb" + "00" * 300 + "ccdd"],
            ["ccddaabb", "aabbccd0", "aabbcc"],
        ),
        ("aabb*bbcc", ["aabbbbcc", "aabb00bbcc"], ["aabbcc"]),  # parts never overlap
        (
            "aabb{3}ccdd",
            ["aabb000000ccdd", "aabbaabb000000ccdd"],
            ["aabb0000ccdd", "aabb00000000ccdd", "aabbccdd"],
        ),
        ("aabb{0}ccdd", ["aabbccdd"], ["aabb00ccdd"]),
        ("aabb{-2}ccdd", ["aabbccdd", "aabb00ccdd", "aabb0000ccdd"], ["aabb000000ccdd"]),
        (
            "aabb{2-}ccdd",
            ["aabb0000ccdd", "aabb" + "00" * 500 + "ccdd"],
            ["aabbccdd", "aabb00ccdd"],
        ),
        (
            "aabb{2-3}ccdd",
            ["aabb0000ccdd", "aabb000000ccdd"],
            ["aabb00ccdd", "aabb00000000ccdd", "aabbccdd"],
        ),
        ("aabb[2-3]ccdd", ["aabb0000ccdd", "aabb000000ccdd"], ["aabb00ccdd", "aabb00000000ccdd"]),
        # a later instance of the first part must still be tried when an earlier one is too far
        ("aabb{2-3}ccdd", ["aabb" + "11" * 10 + "aabb0000ccdd"], ["aabb" + "11" * 10 + "ccdd"]),
        (
            "aabb{2-3}ccdd{1}eeff",
            ["aabb0000ccdd00eeff", "aabbaabb0000ccdd00eeff"],
            ["aabb0000ccddeeff", "aabb0000ccdd0000eeff"],
        ),
        (
            "aabb*ccdd{2}eeff",
            ["aabbccdd0000eeff", "aabb00ccdd11ccdd0000eeff"],
            ["aabbccdd00eeff", "ccdd0000eeffaabb"],
        ),
        ("aabb(cc|dd|ee)", ["aabbcc", "aabbdd", "aabbee"], ["aabbff", "aabb"]),
        ("(1122|3344)aabb", ["1122aabb", "3344aabb"], ["1144aabb", "3322aabb", "aabb"]),
        ("aabb!(cc|dd)ee", ["aabb00ee", "aabbffee"], ["aabbccee", "aabbddee", "aabbee"]),
        ("aabb!(ccdd|eeff)", ["aabbccee", "aabbeedd"], ["aabbccdd", "aabbeeff", "aabbcc"]),
        ("aabb!(cc)", ["aabbcd"], ["aabbcc", "aabb"]),
        ("aabb(cc|dd)?e!(00|11)", ["aabbdd3e22"], ["aabbdd3e11", "aabbdd3f22", "aabbee3e22"]),
    ],
)
def test_body_semantics(impl: str, sig: str, hits: list[str], misses: list[str]) -> None:
    for h in hits:
        assert found(f"S:0:*:{sig}", H(h), impl), f"{sig} should match {h}"
    for h in misses:
        assert not found(f"S:0:*:{sig}", H(h), impl), f"{sig} should not match {h}"


@pytest.mark.parametrize(
    ("offset", "data", "expected"),
    [
        ("5", "0000000000aabbcc", True),
        ("5", "00000000aabbcc", False),
        ("5", "000000000000aabbcc", False),
        ("5", "0000000000aabbccaabbcc", True),
        ("0", "aabbcc", True),
        ("0", "00aabbcc", False),
        ("2,3", "0000aabbcc", True),
        ("2,3", "0000000000aabbcc", True),
        ("2,3", "000000000000aabbcc", False),
        ("2,3", "00aabbcc", False),
        ("100", "aabbcc", False),
        ("EOF-3", "0000aabbcc", True),
        ("EOF-3", "0000aabbcc00", False),
        ("EOF-4", "0000aabbcc00", True),
        ("EOF-3", "aabbcc", True),
        ("EOF-9", "aabbcc", False),
        ("EOF-6,2", "aabbcc0000aabbcc", False),
        ("EOF-6,2", "aabbcc00aabbcc0000", True),
        ("EOF-6,2", "aabbcc00aabbcc", False),
        ("EOF-6,2", "00aabbcc0000", True),
    ],
)
def test_offsets(impl: str, offset: str, data: str, expected: bool) -> None:
    assert found(f"S:0:{offset}:aabbcc", H(data), impl) is expected


def test_offset_applies_to_the_first_part(impl: str) -> None:
    sig = "S:0:2:aabb*ccdd"
    assert found(sig, H("0000aabb0000ccdd"), impl)
    assert not found(sig, H("00aabb0000ccdd"), impl)
    assert not found(sig, H("0000ccddaabb"), impl)
    sig = "S:0:EOF-8:aabb{2-4}ccdd"
    assert found(sig, H("99aabb0000ccdd"), impl) is False  # starts at EOF-6
    assert found(sig, H("aabb00000000ccdd"), impl)
    assert found(sig, H("aabb0000ccdd0000"), impl)


def test_several_signatures_and_names(impl: str) -> None:
    text = "First:0:*:aabb\nSecond:0:*:ccdd\nSecond:0:*:eeff\nThird:0:*:1122\n"
    m = make_matcher(text, impl)
    r = m.scan_bytes(H("00eeff00ccdd00aabb"), allmatch=True)
    assert r.matches == ("Second", "First")  # ordered by where the match ends, names once
    assert m.scan_bytes(H("00eeff00ccdd00aabb"), allmatch=False).matches == ("Second",)
    assert m.scan_bytes(H("aabbccdd"), allmatch=False).matches == ("First",)
    assert m.scan_bytes(H("1122aabb")).matches == ("Third", "First")


def test_allmatch_versus_first_match_on_files(impl: str, tmp_path: Path) -> None:
    m = make_matcher("A:0:*:aabbcc\nB:0:*:ddeeff\nC:0:*:112233", impl, window_size=16)
    f = tmp_path / "f"
    f.write_bytes(b"\0" * 100 + H("ddeeff") + b"\0" * 100 + H("aabbcc") + b"\0" * 10)
    assert m.scan_path(f).matches == ("B",)
    r = m.scan_path(f, allmatch=True)
    assert r.matches == ("B", "A") and r.bytes_scanned == r.size == 216
    assert m.scan_path(f).bytes_scanned < r.size  # the first match stops the scan


def test_empty_database_and_empty_input(impl: str, tmp_path: Path) -> None:
    from offscan import PatternDB

    m = Matcher(PatternDB.from_text([]), impl=impl)
    assert m.scan_bytes(b"anything").status == "clean"
    f = tmp_path / "empty"
    f.write_bytes(b"")
    r = make_matcher("A:0:*:aabb", impl).scan_path(f)
    assert r == ScanResult(str(f), "clean", size=0)


def test_buffer_types(impl: str) -> None:
    m = make_matcher("A:0:*:aabbcc", impl)
    data = H("00aabbcc00")
    for buf in (data, bytearray(data), memoryview(data), memoryview(bytearray(data))):
        assert m.scan_bytes(buf).matches == ("A",)


def test_digest(impl: str, tmp_path: Path) -> None:
    m = make_matcher("A:0:*:aabbcc", impl, window_size=7)
    data = os.urandom(1000) + H("aabbcc")
    want = hashlib.sha256(data).hexdigest()
    assert m.scan_bytes(data, digest=True).digest == want
    assert m.scan_bytes(data).digest is None
    f = tmp_path / "f"
    f.write_bytes(data)
    r = m.scan_path(f, digest=True)  # first match, but the digest still needs every byte
    assert r.digest == want and r.matches == ("A",) and r.bytes_scanned == len(data)


# -- windows -------------------------------------------------------------------------------

WINDOW_SIGS = "\n".join(
    [
        "Star:0:*:aabbcc*ddeeff",
        "Range:0:*:112233{100-200}445566",
        "Exact:0:*:778899{300}0a0b0c",
        "Long:0:*:" + "".join(f"{b:02x}" for b in range(0x40, 0x60)),
        "Eof:0:EOF-10:cafe??babe",
        "Abs:0:37,5:f00d(11|22)f00d",
        "Chain:0:*:d00d{-20}e00e*f00f{5-}a00a",
        "Neg:0:*:beef!(00|ff)beef",
    ]
)


def planted() -> bytes:
    """Random bytes with every WINDOW_SIGS signature planted across many window edges."""
    rng = np.random.default_rng(7)
    data = bytearray(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())

    def put(at: int, hexs: str) -> None:
        data[at : at + len(hexs) // 2] = H(hexs)

    put(3, "aabbcc")
    put(3000, "ddeeff")  # '*' spanning hundreds of windows
    put(500, "112233")
    put(503 + 150, "445566")
    put(1200, "778899")
    put(1203 + 300, "0a0b0c")
    put(2000, "".join(f"{b:02x}" for b in range(0x40, 0x60)))  # longer than a tiny window
    put(40, "f00d22f00d")
    put(2500, "d00d")
    put(2504 + 13, "e00e")
    put(3300, "f00f")
    put(3304 + 9, "a00a")
    put(3600, "beef01beef")
    put(len(data) - 10, "cafe00babe")
    return bytes(data)


@pytest.mark.parametrize("window_size", [7, 16, 64, 1000, BIG])
def test_matches_across_window_edges(impl: str, window_size: int, tmp_path: Path) -> None:
    data = planted()
    db = make_db(WINDOW_SIGS)
    every = tuple(s.name for s in db.body)
    whole = Matcher(db, impl=impl, window_size=BIG).scan_bytes(data)
    assert set(whole.matches) == set(every)
    m = Matcher(db, impl=impl, window_size=window_size)
    assert m.scan_bytes(data) == whole
    f = tmp_path / "planted"
    f.write_bytes(data)
    assert m.scan_path(f, allmatch=True) == _replace(whole, path=str(f))
    assert m.scan_path(f).matches == whole.matches[:1]


def test_matches_straddling_every_position(impl: str) -> None:
    """Slide one signature across a window edge one byte at a time."""
    sig = "S:0:*:aabb??cc{2-3}ddee"
    instance = H("aabb00cc0000ddee")
    m = make_matcher(sig, impl, window_size=16)
    for at in range(40):
        data = bytes(at) + instance + bytes(5)
        assert m.scan_bytes(data).matches == ("S",), at
        assert m.scan_bytes(data[:-6]).status == "clean", at


def test_eof_offset_in_windowed_file(impl: str, tmp_path: Path) -> None:
    m = make_matcher("E:0:EOF-6:aabb*ccdd", impl, window_size=7)
    f = tmp_path / "f"
    for tail, expected in [
        ("aabb0000ccdd", "infected"),
        ("aabbccdd0000", "infected"),
        ("00aabbccdd00", "clean"),  # aabb starts at EOF-5
        ("0000aabbccdd", "clean"),
        ("aabbccdd" + "00" * 4, "clean"),  # EOF-8
        ("aabb00000000", "clean"),
    ]:
        f.write_bytes(bytes(100) + H(tail))
        assert m.scan_path(f).status == expected, tail
        assert m.scan_path(f, allmatch=True).status == expected, tail


def _replace(r: ScanResult, **kw: Any) -> ScanResult:
    d = r.to_json()
    d.update(kw)
    return ScanResult(**d)


# -- hash signatures -----------------------------------------------------------------------


def test_hash_signatures(impl: str) -> None:
    data = b"some content\n"
    text = [
        ("h.hdb", f"{hashlib.md5(data).hexdigest()}:{len(data)}:Md5.Sig\n"),
        (
            "h.hsb",
            (
                f"{hashlib.sha1(data).hexdigest()}:{len(data)}:Sha1.Sig\n"
                f"{hashlib.sha256(data).hexdigest()}:*:Sha256.Any\n"
                f"{hashlib.sha256(data).hexdigest()}:{len(data) + 1}:Sha256.WrongSize\n"
            ),
        ),
        ("b.ndb", "Body:0:*:636f6e74656e74\n"),
    ]
    from offscan import PatternDB

    m = Matcher(PatternDB.from_text(text), impl=impl, window_size=4)
    r = m.scan_bytes(data)
    assert r.matches == ("Body", "Md5.Sig", "Sha1.Sig", "Sha256.Any")
    assert m.scan_bytes(data, allmatch=False).matches == ("Body",)
    assert m.scan_bytes(data + b"x").matches == ("Body",)
    assert m.scan_bytes(b"x" + data[1:]).matches == ("Body",)
    assert m.scan_bytes(b"").status == "clean"


def test_hash_of_empty_file(impl: str, tmp_path: Path) -> None:
    db = make_db(hashlib.md5(b"").hexdigest() + ":0:Empty", name="e.hdb")
    f = tmp_path / "empty"
    f.write_bytes(b"")
    assert Matcher(db, impl=impl).scan_path(f).matches == ("Empty",)


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the algorithm of every hashlib.new call the engine makes."""
    calls: list[str] = []
    real = hashlib.new

    def counting(name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(engine.hashlib, "new", counting)
    return calls


def test_digest_only_when_a_hash_signature_has_that_size(
    impl: str, hash_calls: list[str], tmp_path: Path
) -> None:
    data = b"x" * 100
    db = make_db(
        f"{hashlib.md5(data).hexdigest()}:100:Md5.100\n{hashlib.md5(b'y').hexdigest()}:1:Md5.1",
        name="h.hdb",
    )
    m = Matcher(db, impl=impl)
    assert m.scan_bytes(b"z" * 50).status == "clean"
    assert hash_calls == []
    f = tmp_path / "f"
    f.write_bytes(b"z" * 99)
    assert m.scan_path(f).status == "clean"
    assert hash_calls == []
    assert m.scan_bytes(data).matches == ("Md5.100",)
    assert hash_calls == ["md5"]
    hash_calls.clear()
    f.write_bytes(data)
    assert m.scan_path(f).matches == ("Md5.100",)
    assert hash_calls == ["md5"]


def test_any_size_hash_signature_is_always_computed(impl: str, hash_calls: list[str]) -> None:
    db = make_db(f"{hashlib.sha1(b'abc').hexdigest()}:*:Sha1.Any", name="h.hsb")
    m = Matcher(db, impl=impl)
    assert m.scan_bytes(b"abc").matches == ("Sha1.Any",)
    assert m.scan_bytes(b"abcd").status == "clean"
    assert hash_calls == ["sha1", "sha1"]


def test_no_hash_signatures_no_digest(impl: str, hash_calls: list[str]) -> None:
    m = make_matcher("A:0:*:aabb", impl)
    m.scan_bytes(b"x" * 1000)
    assert hash_calls == []
    m.scan_bytes(b"x", digest=True)
    assert hash_calls == ["sha256"]


# -- limits --------------------------------------------------------------------------------


def test_max_file_size(impl: str, tmp_path: Path) -> None:
    m = make_matcher("A:0:*:aabb", impl, max_file_size=100)
    r = m.scan_bytes(b"\xaa\xbb" * 51)
    assert r.status == "error"
    assert r.reason == "file size 102 exceeds max file size 100 bytes"
    assert r.matches == ()
    assert m.scan_bytes(b"\xaa\xbb" * 50).status == "infected"
    f = tmp_path / "big"
    f.write_bytes(b"\xaa\xbb" * 51)
    r = m.scan_path(f)
    assert (r.status, r.size, r.path) == ("error", 102, str(f))
    assert "exceeds max file size 100 bytes" in (r.reason or "")


class SlowCore:
    """Wraps a core so each window takes ``delay`` seconds (deterministic time limits)."""

    def __init__(self, core: Any, delay: float, on_call: Callable[[int], None] | None = None):
        self.core, self.delay, self.on_call, self.calls = core, delay, on_call, 0

    def find(self, buf: Any, min_end: int, done: np.ndarray) -> Any:
        self.calls += 1
        if self.on_call:
            self.on_call(self.calls)
        time.sleep(self.delay)
        return self.core.find(buf, min_end, done)


def test_max_scan_time(impl: str, tmp_path: Path) -> None:
    m = make_matcher("A:0:*:aabb", impl, window_size=10, max_scan_time=0.05)
    m.core = SlowCore(m.core, 0.03)
    data = bytes(1000) + H("aabb")
    r = m.scan_bytes(data)
    assert r.status == "error"
    assert r.reason == "scan time limit of 0.05 s exceeded"
    assert 0 < r.bytes_scanned < len(data)
    assert m.core.calls < 10
    f = tmp_path / "f"
    f.write_bytes(data)
    r = m.scan_path(f)
    assert r.status == "error" and "scan time limit" in (r.reason or "")


# -- special and troublesome files ---------------------------------------------------------


def test_fifo_never_blocks(impl: str, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    m = make_matcher("A:0:*:aabb", impl)
    r = call_with_timeout(lambda: m.scan_path(fifo))
    assert r.status == "error" and r.reason == "not a regular file (FIFO)"
    # with a writer attached, too (opening succeeds, the fd is then refused)
    wfd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        os.write(wfd, H("aabb"))
        r = call_with_timeout(lambda: m.scan_path(fifo))
        assert r.status == "error" and "FIFO" in (r.reason or "")
    finally:
        os.close(wfd)


def test_pipe_fd_is_refused(impl: str) -> None:
    rfd, wfd = os.pipe()
    try:
        r = call_with_timeout(lambda: make_matcher("A:0:*:aabb", impl).scan_fd(rfd))
        assert r.status == "error" and r.reason == "not a regular file (FIFO)"
    finally:
        os.close(rfd)
        os.close(wfd)


def test_char_device(impl: str) -> None:
    m = make_matcher("A:0:*:aabb", impl)
    r = call_with_timeout(lambda: m.scan_path("/dev/null"))
    assert r == ScanResult("/dev/null", "error", reason="not a regular file (character device)")
    if os.path.exists("/dev/zero"):
        assert call_with_timeout(lambda: m.scan_path("/dev/zero")).status == "error"


def test_unix_socket_file(impl: str) -> None:
    with tempfile.TemporaryDirectory(prefix="offscan-") as d:  # short path: sun_path <= 107
        path = os.path.join(d, "s")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(path)
            s.listen(1)
            r = call_with_timeout(lambda: make_matcher("A:0:*:aabb", impl).scan_path(path))
    assert r.status == "error" and r.reason == "not a regular file (socket)"


def test_directory(impl: str, tmp_path: Path) -> None:
    r = make_matcher("A:0:*:aabb", impl).scan_path(tmp_path)
    assert r.status == "error" and r.reason == "not a regular file (directory)"


def test_missing_file(impl: str, tmp_path: Path) -> None:
    r = make_matcher("A:0:*:aabb", impl).scan_path(tmp_path / "nope")
    assert r == ScanResult(str(tmp_path / "nope"), "error", reason="no such file (vanished?)")


def test_symlink_loop(impl: str, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    m = make_matcher("A:0:*:aabb", impl)
    r = m.scan_path(a)
    assert r.status == "error" and "too many levels of symbolic links" in (r.reason or "")


def test_symlinks_followed_or_not(impl: str, tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.write_bytes(H("00aabb00"))
    link = tmp_path / "l"
    link.symlink_to(target)
    m = make_matcher("A:0:*:aabb", impl)
    assert m.scan_path(link).matches == ("A",)
    r = m.scan_path(link, follow_symlinks=False)
    assert r.status == "error" and r.reason == "not a regular file (symbolic link)"


def test_vanishing_file_between_stat_and_open(
    impl: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"data")
    real_open = os.open

    def vanish(path: Any, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path) == str(f):
            os.unlink(f)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(engine.os, "open", vanish)
    r = make_matcher("A:0:*:aabb", impl).scan_path(f)
    assert r.status == "error" and r.reason == "no such file (vanished?)"


def test_permission_denied_reason(
    impl: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"data")

    def denied(*args: Any, **kwargs: Any) -> int:
        raise PermissionError(13, "Permission denied", str(f))

    monkeypatch.setattr(engine.os, "open", denied)
    r = make_matcher("A:0:*:aabb", impl).scan_path(f)
    assert r.status == "error" and r.reason == "permission denied"


def test_unreadable_file(impl: str) -> None:
    """chmod 000 for real. Root reads anything, so as root the scan runs in a forked child that
    dropped to nobody (modules are already imported, so it needs no access to /root)."""
    m = make_matcher("A:0:*:aabb", impl)
    d = tempfile.mkdtemp(prefix="offscan-unreadable-")
    try:
        os.chmod(d, 0o755)
        f = os.path.join(d, "secret")
        with open(f, "wb") as fh:
            fh.write(H("aabb"))
        os.chmod(f, 0)
        if os.geteuid() != 0:
            r = m.scan_path(f)
        else:
            r = _scan_as_nobody(m, f)
        assert r.status == "error" and r.reason == "permission denied"
    finally:
        os.chmod(os.path.join(d, "secret"), 0o600)
        os.unlink(os.path.join(d, "secret"))
        os.rmdir(d)


def _scan_as_nobody(m: Matcher, path: str) -> ScanResult:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            r = m.scan_path(path)
            os.write(wfd, json.dumps(r.to_json()).encode())
        except BaseException as exc:
            os.write(wfd, json.dumps({"child_error": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as fh:
        out = json.loads(fh.read() or b"{}")
    os.waitpid(pid, 0)
    if "child_error" in out:
        pytest.skip(f"cannot drop root privileges here: {out['child_error']}")
    return ScanResult(**out)


def test_file_changing_while_read(impl: str, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(bytes(200))
    m = make_matcher("A:0:*:aabb", impl, window_size=16)

    def grow(call: int) -> None:
        if call == 2:
            with open(f, "ab") as fh:
                fh.write(b"more")

    m.core = SlowCore(m.core, 0, grow)
    r = m.scan_path(f)
    assert r.changed and r.status == "clean"

    f.write_bytes(bytes(200))

    def rewrite(call: int) -> None:  # same size, new content and mtime
        if call == 2:
            time.sleep(0.01)
            with open(f, "r+b") as fh:
                fh.write(b"x")

    m.core = SlowCore(m.core.core, 0, rewrite)
    assert m.scan_path(f).changed

    f.write_bytes(bytes(200))

    def shrink(call: int) -> None:
        if call == 2:
            os.truncate(f, 50)

    m.core = SlowCore(m.core.core, 0, shrink)
    r = m.scan_path(f)
    assert r.changed and r.status != "infected"

    f.write_bytes(bytes(200))
    m.core = m.core.core
    assert not m.scan_path(f).changed


def test_scan_fd_keeps_file_offset(impl: str, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(bytes(100) + H("aabb"))
    with open(f, "rb") as fh:
        fh.seek(10)
        r = make_matcher("A:0:*:aabb", impl, window_size=7).scan_fd(fh.fileno(), path="x")
        assert r.matches == ("A",) and r.path == "x"
        assert os.lseek(fh.fileno(), 0, os.SEEK_CUR) == 10


def test_scan_fd_write_only_descriptor(impl: str, tmp_path: Path) -> None:
    f = tmp_path / "f"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"abc")
        r = make_matcher("A:0:*:aabb", impl).scan_fd(fd)
        assert r.status == "error" and r.reason
    finally:
        os.close(fd)


def test_large_sparse_file_bounded_memory(impl: str, tmp_path: Path) -> None:
    size = 50 << 20
    tail = H("1122334455") + H("66778899")
    f = tmp_path / "sparse"
    with open(f, "wb") as fh:
        fh.truncate(size - len(tail))
        fh.seek(size - len(tail))
        fh.write(tail)
    assert os.stat(f).st_blocks * 512 < size // 4  # really sparse (if the fs supports it)
    text = "Tail:0:*:1122334455*66778899\nAtEof:0:EOF-9:1122334455??778899\nHead:0:0:0000aabb"
    m = make_matcher(text, impl, max_file_size=size)
    tracemalloc.start()
    try:
        r = m.scan_path(f, allmatch=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.matches == ("Tail", "AtEof")
    assert r.bytes_scanned == r.size == size
    assert peak < 16 * m.window_size, f"peak {peak} bytes for a {size}-byte file"


def test_matcher_shared_between_threads(impl: str) -> None:
    m = make_matcher(WINDOW_SIGS, impl, window_size=64)
    data = planted()
    want = m.scan_bytes(data)
    results: list[ScanResult] = []

    def work() -> None:
        for _ in range(5):
            results.append(m.scan_bytes(data))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [want] * 20


def test_result_json_roundtrip() -> None:
    r = ScanResult("p", "infected", ("A",), size=3, bytes_scanned=3, elapsed=0.5)
    d = json.loads(json.dumps(r.to_json()))
    assert d["matches"] == ["A"] and d["status"] == "infected" and d["changed"] is False
    assert r == ScanResult("p", "infected", ("A",), size=3, bytes_scanned=3, elapsed=9.0)


def test_per_scan_work_does_not_grow_with_unhit_signatures(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small file against a big database must not pay per signature (the appliance scans
    many small files): offsets are resolved only for signatures whose first part hit."""
    from offscan.signatures import Offset

    text = "\n".join(f"S{i}:0:{i % 7},3:{i:08x}aabb" for i in range(2000))
    m = make_matcher(text, impl)
    calls: list[Offset] = []
    real = Offset.start_range

    def counting(self: Offset, size: int) -> Any:
        calls.append(self)
        return real(self, size)

    monkeypatch.setattr(Offset, "start_range", counting)
    assert m.scan_bytes(b"hello world").status == "clean"
    assert calls == []
    assert m.scan_bytes(b"\0\0\0\0\0\0\x07\xd0\xaa\xbb").status == "clean"  # S2000: absent
    assert m.scan_bytes(b"\0\0\x00\x00\x00\x07\xaa\xbb").matches == ("S7",)
    assert len(calls) == 1
