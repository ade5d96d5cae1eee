"""Which asyncio event loop runs the appliance (and the shim): uvloop where it is installed.

uvloop (libuv under asyncio's API) makes the loop's own work (polling, callbacks, timers,
task switches) several times cheaper, which is most of what the appliance does per cached
verdict. It is optional: without it, or with ``OFFSCAN_LOOP=asyncio``, the stdlib loop runs
the same code. The choice is ``auto`` (uvloop if it imports), ``uvloop`` (required: an error
if it is missing) or ``asyncio``; the ``--loop`` option of ``offscan serve`` / ``shim`` or
the ``OFFSCAN_LOOP`` environment variable makes it. Touches nothing but the loop it makes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LOOPS", "EventLoopError", "loop_factory", "loop_name", "run"]

T = TypeVar("T")

LOOPS = ("auto", "uvloop", "asyncio")
ENV = "OFFSCAN_LOOP"


class EventLoopError(RuntimeError):
    """The event loop asked for cannot be had (an unknown name, uvloop not installed)."""


def loop_factory(choice: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for the chosen loop (``choice``, else ``$OFFSCAN_LOOP``, else ``auto``);
    None means asyncio's own default loop."""
    choice = (choice or os.environ.get(ENV) or "auto").strip().lower()
    if choice not in LOOPS:
        raise EventLoopError(f"unknown event loop {choice!r} (choose auto, uvloop or asyncio)")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise EventLoopError("uvloop is not installed (pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], *, loop: str | None = None) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    try:
        factory = loop_factory(loop)
    except EventLoopError:
        main.close()  # never awaited: say so quietly instead of a "never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """``uvloop`` or ``asyncio``: which kind of loop ``loop`` (default: the running one) is."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
