"""The verdict cache's exceptions, in a module of their own so every part can raise them.

Touches nothing: it only defines exception classes.
"""

from __future__ import annotations


class CacheError(RuntimeError):
    """The verdict cache cannot use its state directory."""


class StateDirLockedError(CacheError):
    """Another process (or another VerdictCache in this one) already uses the state directory."""


class LogCorruptError(CacheError):
    """The verdict log is not an offscan verdict log (wrong header), so it is left untouched."""
