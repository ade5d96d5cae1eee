"""The lab's disk images: a deterministic master image and the VMs copied from it.

Plans the master's files (kinds, sizes, which are shared by every VM), makes their content
from a seeded corpus, and writes the master and each VM as plain directories under the work
directory it is given. Touches only the paths it is handed; no processes, no scanners.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_SHARED, LabError

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_PATH = "home/user/Downloads/eicar.com"  # planted in the first VM only
TOOL_PATH = "opt/app/bin/updater"  # shared binary that pattern version 2 detects
TOOL_MARKER = b"offscan-lab-v2-marker:remote-admin-beacon"


@dataclass(frozen=True)
class ImageFile:
    """One file of the master image: where it lives, what kind of content, how big."""

    relpath: str
    kind: str
    size: int
    shared: bool  # identical on every VM (else each VM has its own content at this path)


# kind: (weight, min size, max size, directories); sizes are drawn log-uniformly
KINDS: dict[str, tuple[float, int, int, tuple[str, ...]]] = {
    "config": (0.25, 200, 8 << 10, ("etc", "etc/app.d", "opt/app/conf")),
    "script": (0.15, 500, 30 << 10, ("usr/bin", "opt/app/scripts", "usr/lib/python3/site")),
    "text": (0.20, 1 << 10, 60 << 10, ("usr/share/doc", "home/user/docs", "opt/app/docs")),
    "log": (0.10, 4 << 10, 400 << 10, ("var/log", "var/log/app")),
    "binary": (0.22, 16 << 10, 512 << 10, ("usr/lib", "usr/bin", "opt/app/lib")),
    "archive": (0.08, 32 << 10, 1 << 20, ("opt/app/pkg", "var/cache/pkg")),
}
_EXT = {
    "config": ".conf",
    "script": ".sh",
    "text": ".txt",
    "log": ".log",
    "binary": ".so",
    "archive": ".jar",
}
_WORDS = [
    "kernel",
    "driver",
    "config",
    "service",
    "update",
    "policy",
    "session",
    "desktop",
    "profile",
    "cache",
    "registry",
    "user",
    "network",
    "packet",
    "report",
    "invoice",
    "budget",
    "meeting",
    "archive",
    "backup",
    "system",
    "library",
    "module",
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "this",
    "that",
    "be",
    "are",
    "was",
    "it",
    "an",
    "or",
    "not",
    "have",
    "has",
    "which",
    "server",
    "client",
    "request",
    "response",
    "timeout",
    "error",
    "warning",
    "started",
    "stopped",
    "enabled",
    "disabled",
]


def plan_image(files: int, *, shared: float = DEFAULT_SHARED, seed: int = 1) -> list[ImageFile]:
    """A deterministic image layout: ``files`` files of mixed kinds and sizes, the first
    ``shared`` share of them identical across VMs (system files), the rest per VM (logs,
    user documents, host configs). Always holds :data:`TOOL_PATH` (shared)."""
    if files < 1:
        raise LabError("--files must be at least 1")
    if not 0.0 <= shared <= 1.0:
        raise LabError("--shared must be between 0 and 1")
    rng = random.Random(f"plan-{seed}")
    kinds = list(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    n_shared = max(1, round(files * shared))
    plan = [ImageFile(TOOL_PATH, "binary", 64 << 10, True)]
    for i in range(1, files):
        kind = rng.choices(kinds, weights)[0]
        _, lo, hi, dirs = KINDS[kind]
        size = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        plan.append(
            ImageFile(f"{rng.choice(dirs)}/{kind}{i:04d}{_EXT[kind]}", kind, size, i < n_shared)
        )
    return plan


class ContentMaker:
    """Makes file content of a kind and size, fast and deterministic (seeded per file)."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"corpus-{seed}")
        words = [rng.choice(_WORDS) for _ in range(200_000)]
        self.corpus = " ".join(words).encode()  # ~1.3 MB of text to slice documents from

    def make(self, kind: str, size: int, key: str) -> bytes:
        rng = random.Random(key)
        tag = f"{key}\n".encode()
        if kind in ("text", "script", "config", "log"):
            start = rng.randrange(0, max(1, len(self.corpus) - size))
            body = self.corpus[start : start + size]
            if kind == "config":
                body = b"\n".join(
                    b"key%d = %s" % (j, w) for j, w in enumerate(body.split(b" ")[: size // 12])
                )
            elif kind == "log":
                lines = body.split(b" ")
                body = b"\n".join(
                    b"2024-05-%02d host svc[%d]: %s"
                    % (1 + j % 28, 100 + j, b" ".join(lines[j : j + 8]))
                    for j in range(0, len(lines), 8)
                )
            elif kind == "script":
                body = b"#!/bin/sh\n" + body.replace(b" the ", b"\necho ")
            return (tag + body)[: max(size, len(tag))]
        if kind == "binary":
            head = b"\x7fELF\x02\x01\x01\x00" + bytes(56)
            strings = self.corpus[rng.randrange(0, len(self.corpus) - 4096) :][:4096].replace(
                b" ", b"\x00"
            )
            code = rng.randbytes(max(0, size - len(head) - len(strings) - len(tag)) * 3 // 4)
            pad = bytes(max(0, size - len(head) - len(strings) - len(tag) - len(code)))
            return (head + tag + code + pad + strings)[:size]
        return (b"PK\x03\x04" + tag + rng.randbytes(size))[:size]  # archive: incompressible


def write_file(path: Path, data: bytes) -> None:
    """Write a VM's (or the master's) file, making its directories; scratch data, no fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def append_file(path: Path, data: bytes) -> None:
    """Append to a VM's file (a growing log), making its directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(data)


def build_master(root: Path, plan: Sequence[ImageFile], maker: ContentMaker, seed: int) -> int:
    """Write the master image; returns its size in bytes."""
    total = 0
    for f in plan:
        data = maker.make(f.kind, f.size, f"master-{seed}-{f.relpath}")
        if f.relpath == TOOL_PATH:
            data = data[:4096] + TOOL_MARKER + data[4096 + len(TOOL_MARKER) :]
        write_file(root / f.relpath, data)
        total += len(data)
    return total


@dataclass
class LabVM:
    """A VM of the lab: a directory on this host and the files expected to get verdicts."""

    name: str
    root: str
    files: list[str]
    bytes: int = 0


def build_vm(
    root: Path,
    name: str,
    index: int,
    master: Path,
    plan: Sequence[ImageFile],
    maker: ContentMaker,
    seed: int,
) -> LabVM:
    """A VM as a plain copy of the master's shared files plus its own content for the rest
    (and the EICAR test file in VM 0)."""
    files, total = [], 0
    for f in plan:
        dest = root / f.relpath
        if f.shared:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(master / f.relpath, dest)
            total += f.size
        else:
            data = maker.make(f.kind, f.size, f"vm-{seed}-{index}-{f.relpath}")
            write_file(dest, data)
            total += len(data)
        files.append(f.relpath)
    if index == 0:
        write_file(root / EICAR_PATH, EICAR)
        files.append(EICAR_PATH)
        total += len(EICAR)
    return LabVM(name, str(root), files, total)
