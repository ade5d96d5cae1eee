"""Dispatcher: the native confined identity lookup when built, else the Python twin.

``confine`` imports ``identify_many`` (and the twin's ``dir_of``, its walk) from here.
``OFFSCAN_NO_EXTENSIONS=1`` forces the twin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _statwalk_py
from ._native import NO_EXTENSIONS, extension
from ._statwalk_py import dir_of

py_identify_many = _statwalk_py.identify_many
_ext, NATIVE_IMPORT_ERROR = extension("_statwalk_c")
native_identify_many: Any = None if _ext is None else _ext.identify_many

if TYPE_CHECKING:
    from ._statwalk_py import identify_many
else:
    identify_many = py_identify_many if native_identify_many is None else native_identify_many

NATIVE = native_identify_many is not None

__all__ = [
    "NATIVE",
    "NATIVE_IMPORT_ERROR",
    "NO_EXTENSIONS",
    "dir_of",
    "identify_many",
    "native_identify_many",
]
