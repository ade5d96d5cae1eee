"""What every part of the appliance shares: the request-level failure, the clock, fd hygiene.

A leaf module (no sibling imports). It touches nothing but the file descriptors it is handed:
:func:`close_fds` closes descriptors a client passed in, and :class:`SystemClock` only reads the
system clocks. Parts take a :class:`Clock` so that tests can run them on a fake one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..protocol.messages import ErrorCode

# One logger for every part of the appliance, named as before the split, so that operators'
# log filters and the log lines themselves stay the same.
log = logging.getLogger("offscan.appliance")


class RequestFailed(Exception):
    """A request-level failure, answered with an ``error`` frame carrying the request id;
    ``code`` is one of the protocol's error codes."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ErrorCode = code


class Clock(Protocol):
    """Where the appliance reads the time: ``time()`` stamps records (unix seconds),
    ``monotonic()`` measures durations and latencies."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...


class SystemClock:
    """The real clocks (:func:`time.time` and :func:`time.monotonic`)."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()


def close_fds(fds: list[int]) -> None:
    """Close (and remove) every descriptor in ``fds``; errors are ignored."""
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())
