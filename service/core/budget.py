"""The current heavy job of a thread: whether it serves a read or a write, and when its time budget ends.

The API's work pools set it around each job (`job_scope`); long loops call `check_budget()` between keys, and
the parser sandbox reads `current_job()` to give writes their own workers and to cut a parse at the deadline.
Outside a job (scripts, tests) there is no budget and every job counts as a write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from service.errors import TimeBudgetExceeded

__all__ = ["Job", "check_budget", "current_job", "job_scope"]

JobKind = Literal["read", "write"]


@dataclass(frozen=True)
class Job:
    """A heavy job: its kind, and its deadline on the `time.monotonic` clock (None: no budget)."""

    kind: JobKind = "write"
    deadline: float | None = None
    budget: float | None = None  # the budget's length in seconds, for messages

    def remaining(self) -> float | None:
        """Seconds left, or None without a budget."""
        return None if self.deadline is None else self.deadline - time.monotonic()


_NO_JOB = Job()
_local = threading.local()


def current_job() -> Job:
    """The job this thread is running (a budget-less write outside any job)."""
    job: Job | None = getattr(_local, "job", None)
    return job if job is not None else _NO_JOB


@contextmanager
def job_scope(kind: JobKind, budget_seconds: float | None) -> Iterator[Job]:
    """Run the body as one job of `kind`, with `budget_seconds` from now (None: unlimited)."""
    deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
    job = Job(kind, deadline, budget_seconds)
    previous = getattr(_local, "job", None)
    _local.job = job
    try:
        yield job
    finally:
        _local.job = previous


def check_budget() -> None:
    """Raise when the current job has used its time budget.

    Raises:
        TimeBudgetExceeded: The deadline has passed.
    """
    job = current_job()
    if job.deadline is not None and time.monotonic() >= job.deadline:
        raise budget_exceeded(job)


def budget_exceeded(job: Job) -> TimeBudgetExceeded:
    """The error for a job past its deadline."""
    return TimeBudgetExceeded(
        f"the request used its time budget of {job.budget:g} s (CKPT_HEAVY_TIME_BUDGET_SECONDS)",
        budget_seconds=job.budget,
    )
