"""Dispatcher: the native confined identity lookup when built, else the Python twin.

``confine`` imports ``identify_many`` (and the twin's ``dir_of``, its walk) from here. ``OFFSCAN_NO_EXTENSIONS=1`` forces the twin.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import _statwalk_py
from ._statwalk_py import dir_of

NO_EXTENSIONS = bool(os.environ.get("OFFSCAN_NO_EXTENSIONS"))
py_identify_many = _statwalk_py.identify_many
native_identify_many = None
NATIVE_IMPORT_ERROR: str | None = None

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._statwalk_py import identify_many

    NATIVE_IMPORT_ERROR = "disabled by OFFSCAN_NO_EXTENSIONS"
else:
    try:
        from ._statwalk_c import identify_many

        native_identify_many = identify_many
    except ImportError as exc:  # pragma: no cover - depends on the build
        from ._statwalk_py import identify_many

        NATIVE_IMPORT_ERROR = str(exc)

NATIVE = native_identify_many is not None and identify_many is native_identify_many

__all__ = ["NATIVE", "NATIVE_IMPORT_ERROR", "dir_of", "identify_many", "native_identify_many"]
