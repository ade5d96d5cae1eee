"""Test helpers for ClamAV containers: build ``.cvd``/``.cld``/``.cud`` files by hand, the way
``sigtool --build`` lays them out (512-byte header, tar or tar.gz, a ``.info`` member with its
DSIG line), signed with test RSA keys (ClamAV's private keys are, of course, not available)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from offscan.signatures.containers import ContainerKeys

_DIGITS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/"
BUILD_TEXT = "02 Dec 2026 10-20 +0000"
BUILD_TIME = 1796206800  # unix seconds


@dataclass(frozen=True)
class SigningKeys:
    """Private halves of a test :class:`ContainerKeys`: a 1024-bit key for the header's MD5
    and a 2048-bit one for the .info RSA-PSS signature (the size libclamav expects)."""

    cvd: rsa.RSAPrivateKey
    info: rsa.RSAPrivateKey

    @property
    def public(self) -> ContainerKeys:
        def pair(k: rsa.RSAPrivateKey) -> tuple[int, int]:
            nums = k.public_key().public_numbers()
            return nums.n, nums.e

        return ContainerKeys(cvd=pair(self.cvd), info=pair(self.info))


@cache
def signing_keys() -> SigningKeys:
    return SigningKeys(
        rsa.generate_private_key(public_exponent=65537, key_size=1024),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def _digits(value: int) -> str:
    out = []
    while value:
        out.append(_DIGITS[value & 63])
        value >>= 6
    return "".join(out)


def sign_md5(md5_hex: str, key: rsa.RSAPrivateKey) -> str:
    """A ClamAV header dsig: the MD5 raised to the private exponent, in base-64 digits."""
    nums = key.private_numbers()
    return _digits(pow(int(md5_hex, 16), nums.d, nums.public_numbers.n))


def sign_info(text: bytes, key: rsa.RSAPrivateKey) -> str:
    """A ClamAV .info DSIG: RSA-PSS (SHA-256, 32-byte salt) of the lines before it."""
    sig = key.sign(
        text, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256()
    )
    return _digits(int.from_bytes(sig, "big"))


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def build_container(
    path: Path,
    files: dict[str, bytes],
    *,
    version: int = 7,
    keys: SigningKeys | None = None,
    info: bool = True,
) -> Path:
    """Write a container at ``path`` (its suffix picks the kind) holding ``files``, with a
    ``NAME.info`` listing each file's size and SHA-256 unless ``info`` is False. ``.cvd`` and
    ``.cld`` are signed with ``keys`` (garbage signatures without), ``.cud`` is unsigned."""
    kind = path.suffix.lstrip(".")
    head_fields = f"ClamAV-VDB:{BUILD_TEXT}:{version}:{len(files)}:90"
    members = {"COPYING": b"test container\n"}
    if info:
        lines = [f"{head_fields}:X:X:tester:{BUILD_TIME}"]
        lines += [f"{n}:{len(d)}:{hashlib.sha256(d).hexdigest()}" for n, d in files.items()]
        listed = ("\n".join(lines) + "\n").encode()
        if kind != "cud":
            dsig = sign_info(listed, keys.info) if keys else "bad"
            listed += f"DSIG:{dsig}\n".encode()
        members[f"{path.stem}.info"] = listed
    members.update(files)
    body = _tar(members)
    if kind in ("cvd", "cud"):
        body = gzip.compress(body, mtime=0)
    md5 = hashlib.md5(body).hexdigest()
    dsig = "X"
    if kind == "cvd":
        dsig = sign_md5(md5, keys.cvd) if keys else "notavalidsignature"
    header = f"{head_fields}:{md5}:{dsig}:tester:{BUILD_TIME}".encode()
    assert len(header) <= 512
    path.write_bytes(header.ljust(512, b" ") + body)
    return path
