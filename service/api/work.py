"""Bounded concurrency for heavy work (parsing, merging, value diffs), run off the event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

from service.errors import Overloaded

T = TypeVar("T")


class WorkPool:
    """At most `concurrency` jobs run in threads and `queue` more wait; past that callers get `Overloaded`."""

    def __init__(self, *, concurrency: int, queue: int, retry_after: int) -> None:
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._capacity = concurrency + queue
        self._retry_after = retry_after
        self._inflight = 0

    @property
    def inflight(self) -> int:
        return self._inflight

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` in a worker thread, or raise Overloaded when the pool and its queue are full."""
        if self._inflight >= self._capacity:
            raise Overloaded(
                f"{self._inflight} heavy jobs are running or queued; retry in {self._retry_after} s",
                retry_after=self._retry_after,
            )
        self._inflight += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        finally:
            self._inflight -= 1
