"""One read per file: the digest (SHA-256) and the match come from the same bytes.

Bytes read are counted by the kernel (``rchar`` in /proc/self/io, which counts every byte a
read or pread returned), not by offscan's own counters, so a second read cannot hide.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from conftest import EICAR, make_matcher
from test_pipeline import EICAR_SIG, Rig

from offscan.engine import PREREAD_LIMIT, read_digest

SIZE = 3 << 20  # bytes: several match windows


def rchar(scope: str = "thread-self") -> int:
    with open(f"/proc/{scope}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/*/io")


def _content() -> bytes:
    body = bytearray(os.urandom(SIZE))
    body[SIZE // 2 : SIZE // 2 + len(EICAR)] = EICAR
    return bytes(body)


def test_digest_and_match_read_the_file_once(impl: str, tmp_path: Path) -> None:
    data = _content()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    m = make_matcher(f"Eicar-Test-Signature:0:*:{EICAR.hex()}", impl)
    fd = os.open(path, os.O_RDONLY)
    try:
        before = rchar()
        read = read_digest(fd, SIZE)
        res = m.scan_fd(fd, preread=read.data, allmatch=True, digest=True)
        delta = rchar() - before
    finally:
        os.close(fd)
    assert read.digest == hashlib.sha256(data).digest() and read.nread == SIZE
    assert res.infected and res.digest == hashlib.sha256(data).hexdigest()
    assert res.bytes_scanned == SIZE and not res.changed
    assert SIZE <= delta < SIZE + 4096  # the file once (+ the /proc read itself)


def test_preread_of_another_size_is_not_trusted(impl: str, tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100 + EICAR)
    m = make_matcher(f"Eicar-Test-Signature:0:*:{EICAR.hex()}", impl)
    fd = os.open(path, os.O_RDONLY)
    try:
        res = m.scan_fd(fd, preread=b"clean but short")
    finally:
        os.close(fd)
    assert res.infected  # the file itself was read


def test_large_files_are_hashed_without_keeping_them(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = os.urandom(PREREAD_LIMIT + 12345)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        read = read_digest(fd)
    finally:
        os.close(fd)
    assert read.data is None and read.nread == len(data)
    assert read.digest == hashlib.sha256(data).digest()


def test_pipeline_cache_miss_reads_the_file_once(impl: str, tmp_path: Path) -> None:
    rig = Rig(tmp_path, make_matcher(EICAR_SIG, impl))
    try:
        rig.write("new.bin", _content())
        before = rchar("self")
        out = asyncio.run(rig.scan("new.bin"))
        delta = rchar("self") - before
        assert out["status"] == "infected"
        assert rig.counters.bytes_read == SIZE
        assert rig.counters.contents_matched == 1
        assert SIZE <= delta < SIZE + 64 * 1024, delta  # not 2 x SIZE
        # the same content again: served from the identity memo, nothing read
        before = rchar("self")
        asyncio.run(rig.scan("new.bin"))
        assert rchar("self") - before < 64 * 1024
        assert rig.counters.bytes_read == SIZE
    finally:
        rig.close()
