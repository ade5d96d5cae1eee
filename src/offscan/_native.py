"""The one rule every dispatcher (``_match``, ``_statwalk``) loads its Cython extension by.

``OFFSCAN_NO_EXTENSIONS=1`` forces the pure-Python twins; an extension that does not import
(not built, or it refused this CPU) leaves its twin in use and says why, so the tests that
require the extension fail with that reason instead of passing on the twin.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS = bool(os.environ.get("OFFSCAN_NO_EXTENSIONS"))


def extension(name: str) -> tuple[ModuleType | None, str | None]:
    """The extension module ``offscan.<name>``, or None and the reason it is not in use."""
    if NO_EXTENSIONS:
        return None, "disabled by OFFSCAN_NO_EXTENSIONS"
    try:
        return importlib.import_module(f"{__package__}.{name}"), None
    except ImportError as exc:  # pragma: no cover - depends on the build
        return None, str(exc)
