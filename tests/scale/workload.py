"""What the scale-out test's clients do, and the ledger of what the service acknowledged to them.

A call the client saw succeed is acknowledged: its artifact must exist at the end, with bytes that hash to its
id, and a name it set must still point there unless a later attempt on the same name may have moved it. A call
that failed (after the client's own retries) is unacknowledged: whatever it did may or may not have happened,
and both are correct. Only failures a dying replica explains are accepted: the connection (TransportError), or
the proxy's or an overloaded replica's 502/503/504. Anything else is recorded as unexpected and fails the test.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from service.client import CheckpointClient, RetryPolicy, ServiceError, TransportError

T = TypeVar("T")
# Statuses a replica that died (or is busy) explains; the client has already retried what it may.
EXPLAINED_STATUSES = frozenset({502, 503, 504})


@dataclass
class NameEvent:
    artifact_id: str | None  # None: unknown (a merge that failed would have pointed the name at its result)
    acknowledged: bool


@dataclass
class Ledger:
    """Thread-safe record of requests, acknowledged and unacknowledged calls, and what they stored."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    retries: int = 0
    acknowledged: Counter[str] = field(default_factory=Counter)
    unacknowledged: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    artifacts: set[str] = field(default_factory=set)
    names: dict[str, list[NameEvent]] = field(default_factory=lambda: defaultdict(list))

    @contextmanager
    def client(self, base_url: str, *, timeout: float = 120) -> Iterator[CheckpointClient]:
        """Our client against `base_url`, counting every request sent and every retry it makes."""

        def count(_: httpx.Request) -> None:
            with self.lock:
                self.requests += 1

        def sleep(seconds: float) -> None:
            with self.lock:
                self.retries += 1
            threading.Event().wait(seconds)

        # Enough attempts to outlast haproxy's two failed checks (about 2 s) and a replica's restart.
        with httpx.Client(base_url=base_url, timeout=timeout, event_hooks={"request": [count]}) as http:
            yield CheckpointClient(http=http, retry=RetryPolicy(attempts=6, backoff=0.5, max_delay=4), sleep=sleep)

    @contextmanager
    def call(self, kind: str, *, name: str | None = None, target: str | None = None
             ) -> Iterator[Callable[[str], None]]:
        """Run one client call: `with ledger.call("merge", name=n) as stored: stored(result.id)`.

        On success the call is acknowledged and what `stored` was given is recorded (the artifacts; the last one
        is the name's new target). On failure it is unacknowledged, and the name may have moved to `target` (None:
        to an artifact not known here); a failure no dying replica explains is also recorded as unexpected. A
        failed call raises `Failed`, so that the caller skips what depended on it.
        """
        outcome: list[str] = []
        try:
            yield outcome.append
        except TransportError as exc:
            self._failed(kind, name, target, f"{kind}: {exc}", explained=True)
            raise Failed from exc
        except ServiceError as exc:
            self._failed(kind, name, target, f"{kind}: {exc}", explained=exc.status in EXPLAINED_STATUSES)
            raise Failed from exc
        with self.lock:
            self.acknowledged[kind] += 1
            self.artifacts.update(outcome)
            if name is not None:
                self.names[name].append(NameEvent(outcome[-1] if outcome else None, True))

    def _failed(self, kind: str, name: str | None, target: str | None, message: str, *, explained: bool) -> None:
        with self.lock:
            self.unacknowledged[kind] += 1
            if not explained:
                self.unexpected.append(message)
            if name is not None:
                self.names[name].append(NameEvent(target, False))

    def totals(self) -> dict[str, int]:
        with self.lock:
            return {"requests": self.requests, "retries": self.retries,
                    "acknowledged": sum(self.acknowledged.values()),
                    "unacknowledged": sum(self.unacknowledged.values()), "artifacts": len(self.artifacts)}


class Failed(Exception):
    """A call failed; the ledger has recorded it (raised out of `Ledger.call` to skip what depended on it)."""


@dataclass(frozen=True)
class Allowed:
    """What a name may point to at the end: one of `ids`; any live artifact when `any_id`; nothing when
    `absent`."""

    ids: frozenset[str]
    any_id: bool
    absent: bool

    def admits(self, target: str | None) -> bool:
        if target is None:
            return self.absent
        return self.any_id or target in self.ids


def allowed_targets(events: list[NameEvent]) -> Allowed:
    """The last acknowledged target, or what any later failed attempt may have set. Names are never deleted
    here, so a name may be absent only when no attempt on it was acknowledged."""
    last_ack = max((i for i, e in enumerate(events) if e.acknowledged), default=-1)
    later = events[max(last_ack, 0):]
    return Allowed(frozenset(e.artifact_id for e in later if e.artifact_id is not None),
                   any_id=any(e.artifact_id is None for e in later), absent=last_ack < 0)


def sha256_of(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
