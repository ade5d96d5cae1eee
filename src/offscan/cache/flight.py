"""Single-flight: concurrent asyncio callers asking for the same key share one execution.

The last question of the scan pipeline, *is someone already scanning this content?* Pure
asyncio bookkeeping: no I/O, no threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class SingleFlight:
    """Concurrent asyncio callers asking for the same key share one execution.

    The first caller's ``fn()`` runs in its own task; later callers with the same key await
    that task, so they all get its result or its exception. A caller that is cancelled leaves
    the others waiting; the shared task is cancelled only when every caller has gone. The key
    is forgotten as the execution completes, so the next call runs ``fn`` again.
    """

    def __init__(self) -> None:
        self._calls: dict[Hashable, _Call] = {}

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._calls

    def lead(self, key: Hashable) -> asyncio.Future[Any] | None:
        """Claim ``key`` for a result the caller produces itself (a bulk match of many
        contents in one thread-pool job): returns the future to complete (``set_result`` /
        ``set_exception``; it may have been cancelled by then, if every joiner left), or None
        if the key is already being worked on (join it with :meth:`run`). Until the future is
        done, :meth:`run` callers with this key wait for it instead of running ``fn``."""
        if key in self._calls:
            return None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[key] = _Call(fut)
        fut.add_done_callback(lambda f: self._forget(key, f))
        return fut

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        call = self._calls.get(key)
        if call is None:
            call = _Call(asyncio.ensure_future(self._execute(key, fn)))
            # Also on completion: a task cancelled before its first step never runs _execute.
            call.task.add_done_callback(lambda t: self._forget(key, t))
            self._calls[key] = call
        task = call.task
        call.waiters += 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done() and call.waiters == 1:
                task.cancel()  # nobody else wants the result
            raise
        finally:
            call.waiters -= 1

    async def _execute(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        finally:
            # Forget the key before the task completes, so no new caller joins a finished run.
            self._forget(key, asyncio.current_task())

    def _forget(self, key: Hashable, task: asyncio.Future[Any] | None) -> None:
        call = self._calls.get(key)
        if call is not None and call.task is task:
            del self._calls[key]


class _Call:
    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Future[Any]) -> None:
        self.task = task
        self.waiters = 0
