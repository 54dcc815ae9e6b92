"""Bounded concurrency for heavy work (parsing, merging, value diffs), run off the event loop.

Reads and writes get separate pools, so read-scope requests (POST /diff, value diffs, converted downloads)
can fill only their own slots and never delay an upload, a strip or a merge. A request is admitted to its pool
*before* its body is read (`admit`): when the pool and its queue are full the client gets a 503 with
Retry-After at once, instead of after uploading gigabytes. Each job runs under a time budget (`job_scope`):
loops check it between keys and the parser sandbox cuts a parse at it, replacing the worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio
import anyio.to_thread

from service.core.budget import JobKind, job_scope
from service.errors import Overloaded

T = TypeVar("T")


class Admission:
    """A place in a pool, held from before the body is read until the request's heavy work is done."""

    def __init__(self, pool: WorkPool) -> None:
        self._pool = pool

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` in a worker thread of the pool, as a job of its kind under its time budget."""
        pool = self._pool

        def job() -> T:
            with job_scope(pool.kind, pool.time_budget):
                return fn(*args)

        return await anyio.to_thread.run_sync(job, limiter=pool._limiter)


class WorkPool:
    """At most `concurrency` jobs run in threads and `queue` more wait; past that callers get `Overloaded`."""

    def __init__(
        self,
        *,
        concurrency: int,
        queue: int,
        retry_after: int,
        kind: JobKind = "write",
        time_budget: float | None = None,
    ) -> None:
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._capacity = concurrency + queue
        self._retry_after = retry_after
        self._inflight = 0
        self.kind: JobKind = kind
        self.time_budget = time_budget

    @property
    def inflight(self) -> int:
        """Admitted requests: running, queued, or still receiving their body."""
        return self._inflight

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[Admission]:
        """Hold a place in the pool, or raise Overloaded at once when the pool and its queue are full."""
        if self._inflight >= self._capacity:
            raise Overloaded(
                f"{self._inflight} heavy {self.kind} jobs are running or queued; retry in {self._retry_after} s",
                retry_after=self._retry_after,
            )
        self._inflight += 1
        try:
            yield Admission(self)
        finally:
            self._inflight -= 1

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Admit and run `fn(*args)` in a worker thread, or raise Overloaded when the pool is full."""
        async with self.admit() as slot:
            return await slot.run(fn, *args)
