"""offscan: an agentless scan offload engine (one scanning appliance per host for many VMs)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .engine import Matcher, ScanResult
from .signatures import PatternDB, SignatureError, load_database

# Public names of the heavier parts, imported on first use so `import offscan` stays light.
_LAZY = {
    "Appliance": "appliance",
    "Shim": "shim",
    "VMSpec": "shim",
    "Agent": "agent",
    "ApplianceClient": "protocol",
    "ProtocolError": "protocol",
    "RequestError": "protocol",
    "VerdictCache": "cache",
    "IdentityMemo": "cache",
    "Vault": "quarantine",
    "PatternStore": "updates",
    "UpdateClient": "updates",
    "UpdateServer": "updates",
    "UpdateError": "updates",
    "scan_image": "images",
}

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from .agent import Agent
    from .appliance import Appliance
    from .cache import IdentityMemo, VerdictCache
    from .images import scan_image
    from .protocol import ApplianceClient, ProtocolError, RequestError
    from .quarantine import Vault
    from .shim import Shim, VMSpec
    from .updates import PatternStore, UpdateClient, UpdateError, UpdateServer

__all__ = [
    "Matcher",
    "PatternDB",
    "ScanResult",
    "SignatureError",
    "load_database",
    "__version__",
    "Agent",
    "Appliance",
    "ApplianceClient",
    "IdentityMemo",
    "PatternStore",
    "ProtocolError",
    "RequestError",
    "Shim",
    "UpdateClient",
    "UpdateError",
    "UpdateServer",
    "VMSpec",
    "Vault",
    "VerdictCache",
    "scan_image",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'offscan' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
