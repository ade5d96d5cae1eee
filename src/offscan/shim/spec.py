"""What the shim is told to protect: :class:`VMSpec` and the rules for VM names.

A plain value module: parsing and validating ``NAME=DIR`` and ``CLONE=BASE`` texts, no I/O.
The command line (``offscan.cli.shim``), agent mode, the lab and embedders build specs here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


@dataclass(frozen=True)
class VMSpec:
    """A VM to protect: its name, the host directory holding its files, its lineage and policy."""

    name: str
    root: str
    clone_of: str | None = None
    policy: dict[str, Any] | None = None

    @classmethod
    def parse(cls, text: str) -> VMSpec:
        """``NAME=DIR`` as given to ``offscan shim --vm``."""
        name, sep, root = text.partition("=")
        if not sep or not name or not root:
            raise ValueError(f"expected NAME=DIR, got {text!r}")
        if not _VM_NAME.match(name):
            raise ValueError(
                f"bad VM name {name!r}: use letters, digits, '.', '_' and '-' "
                "(starting with a letter or digit, at most 128 characters)"
            )
        return cls(name=name, root=root)


def parse_clone_of(text: str) -> tuple[str, str]:
    """``CLONE=BASE`` (two VM names) as given to ``offscan shim --clone-of``."""
    clone, sep, base = text.partition("=")
    if not sep or not _VM_NAME.match(clone) or not _VM_NAME.match(base):
        raise ValueError(f"expected CLONE=BASE (two VM names), got {text!r}")
    return clone, base
