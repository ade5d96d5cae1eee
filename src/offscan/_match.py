"""Dispatcher: the native matcher core when built, else the Python twin.

Everything else imports ``Core`` from here. ``OFFSCAN_NO_EXTENSIONS=1`` forces the twin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _match_py
from ._native import NO_EXTENSIONS, extension

PyCore = _match_py.Core
_ext, NATIVE_IMPORT_ERROR = extension("_match_c")
NativeCore: Any = None if _ext is None else _ext.Core

if TYPE_CHECKING:
    from ._match_py import Core
else:
    Core = PyCore if NativeCore is None else NativeCore

NATIVE = NativeCore is not None

__all__ = ["Core", "NATIVE", "NATIVE_IMPORT_ERROR", "NO_EXTENSIONS", "NativeCore", "PyCore"]
