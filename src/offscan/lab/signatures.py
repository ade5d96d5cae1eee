"""The signature databases the lab's scanners load: generated ClamAV ``.ndb`` bodies plus EICAR.

Version 1 is what every scanner starts with; version 2 (the update workload) adds 1 % more and
one that detects the shared tool binary of every VM. Writes only the database directory given.
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

from .image import TOOL_MARKER

V2_SIGNATURE = "Offscan.Lab.RemoteAdmin-V2"


def _eicar_lines() -> list[str]:
    text = resources.files("offscan.patterns").joinpath("offscan.ndb").read_text()
    return [line for line in text.splitlines() if line.strip()]


def build_signatures(count: int, *, seed: int = 1, version: int = 1) -> dict[str, list[str]]:
    """A ClamAV-format database: ``count`` generated ``.ndb`` body signatures (static runs of
    8-24 random bytes, some split by ``??``, ``{n-m}`` or ``*`` gaps; offsets ``*`` or ``0``)
    plus the shipped EICAR signature. Version 2 adds 1 % more and one that detects the shared
    :data:`TOOL_PATH` binary of every VM (an update that finds a threat already on disk)."""
    rng = random.Random(f"sigs-{seed}")
    lines = _eicar_lines()
    for i in range(count):
        parts = [
            rng.randbytes(rng.randint(8, 24)).hex() for _ in range(rng.choice((1, 1, 1, 2, 3)))
        ]
        body = parts[0]
        for p in parts[1:]:
            body += rng.choice(("*", f"{{0-{rng.randint(4, 64)}}}", "??")) + p
        offset = "0" if rng.random() < 0.05 else "*"
        lines.append(f"Offscan.Lab.Gen-{i}:0:{offset}:{body}")
    if version >= 2:
        extra = random.Random(f"sigs-v2-{seed}")
        for i in range(max(10, count // 100)):
            lines.append(f"Offscan.Lab.V2-{i}:0:*:{extra.randbytes(16).hex()}")
        lines.append(f"{V2_SIGNATURE}:0:*:{TOOL_MARKER.hex()}")
    return {"lab.ndb": lines}


def write_database(directory: Path, db: dict[str, list[str]]) -> list[str]:
    """Write ``db`` (file name -> lines) into ``directory``; returns the paths. Scratch input of
    one run in the work directory, read once by the scanners it starts: a plain write."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, lines in db.items():
        (directory / name).write_text("\n".join(lines) + "\n")
        paths.append(str(directory / name))
    return paths
