"""offscan: an agentless scan offload engine (one scanning appliance per host for many VMs)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .engine import Matcher, ScanResult  # noqa: E402
from .signatures import PatternDB, SignatureError, load_database  # noqa: E402

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

__all__ = ["Matcher", "PatternDB", "ScanResult", "SignatureError", "load_database", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'offscan' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
