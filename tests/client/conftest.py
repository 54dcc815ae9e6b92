"""The client against the real app in-process: the Starlette TestClient is injected as the httpx client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi.testclient import TestClient

from service.client import CheckpointClient, RetryPolicy


@dataclass
class RequestLog:
    """Every request the client sent, recorded by an httpx event hook on the real transport."""

    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> None:
        self.requests.append(request)

    def calls(self, method: str, path_prefix: str = "") -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path.startswith(path_prefix)]

    def clear(self) -> None:
        self.requests.clear()


@pytest.fixture
def request_log(client: TestClient) -> Iterator[RequestLog]:
    log = RequestLog()
    client.event_hooks["request"].append(log)
    yield log
    client.event_hooks["request"].remove(log)


@pytest.fixture
def ckpt(client: TestClient, request_log: RequestLog) -> CheckpointClient:
    sleeps: list[float] = []
    # No real waiting in tests; the in-process app never sends 503 here anyway.
    return CheckpointClient(http=client, retry=RetryPolicy(attempts=2), sleep=sleeps.append)
