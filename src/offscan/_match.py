"""Dispatcher: the native matcher core when built, else the Python twin.

Everything else imports ``Core`` from here. ``OFFSCAN_NO_EXTENSIONS=1`` forces the twin.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import _match_py

NO_EXTENSIONS = bool(os.environ.get("OFFSCAN_NO_EXTENSIONS"))
PyCore = _match_py.Core
NativeCore = None
NATIVE_IMPORT_ERROR: str | None = None

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._match_py import Core

    NATIVE_IMPORT_ERROR = "disabled by OFFSCAN_NO_EXTENSIONS"
else:
    try:
        from ._match_c import Core

        NativeCore = Core
    except ImportError as exc:  # pragma: no cover - depends on the build
        from ._match_py import Core

        NATIVE_IMPORT_ERROR = str(exc)

NATIVE = NativeCore is not None and Core is NativeCore

__all__ = ["Core", "NATIVE", "NativeCore", "PyCore", "NATIVE_IMPORT_ERROR"]
