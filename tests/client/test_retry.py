"""Retries: an httpx.MockTransport stands in for the SERVER; the thing under test is the real client."""

from __future__ import annotations

import email.utils
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.client import (
    CheckpointClient,
    OverloadedError,
    RetryPolicy,
    ServiceError,
    TransportError,
)
from service.client.client import _retry_after

ID = "ab" * 32
Handler = Callable[[httpx.Request], httpx.Response]


def _artifact(artifact_id: str = ID) -> dict[str, Any]:
    return {
        "id": artifact_id, "size": 3, "created": "2025-01-01T00:00:00Z", "format": "pth-zip", "key_count": 1,
        "tensor_bytes": 4, "schema_fingerprint": "f" * 64, "has_metadata": False,
        "download_url": f"http://svc/checkpoints/{artifact_id}/file",
    }


def _overloaded(retry_after: int = 7) -> httpx.Response:
    return httpx.Response(
        503, headers={"Retry-After": str(retry_after), "Content-Type": "application/problem+json"},
        json={"type": "urn:ckpt:problem:overloaded", "title": "Service overloaded", "status": 503,
              "detail": "busy", "retry_after": retry_after})


class Server:
    """A scripted server: answers requests with the next response of a script, and records them."""

    def __init__(self, *script: httpx.Response | Exception | Handler) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.bodies.append(request.read())
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, Exception):
            raise step
        if callable(step) and not isinstance(step, httpx.Response):
            return step(request)
        return step


def _client(server: Server, *, attempts: int = 4) -> tuple[CheckpointClient, list[float]]:
    sleeps: list[float] = []
    http = httpx.Client(transport=httpx.MockTransport(server), base_url="http://svc")
    return CheckpointClient(http=http, retry=RetryPolicy(attempts=attempts), sleep=sleeps.append), sleeps


def test_get_retries_503_honouring_retry_after() -> None:
    server = Server(_overloaded(7), _overloaded(3), httpx.Response(200, json=_artifact()))
    ckpt, sleeps = _client(server)
    assert ckpt.get(ID).id == ID
    assert len(server.requests) == 3
    assert sleeps == [7.0, 3.0]


def test_retries_are_bounded() -> None:
    server = Server(_overloaded(1))
    ckpt, sleeps = _client(server, attempts=3)
    with pytest.raises(OverloadedError) as info:
        ckpt.get(ID)
    assert len(server.requests) == 3 and sleeps == [1.0, 1.0]
    assert info.value.retry_after == 1.0 and info.value.status == 503


def test_retry_after_is_capped() -> None:
    server = Server(_overloaded(3600), httpx.Response(200, json=_artifact()))
    sleeps: list[float] = []
    http = httpx.Client(transport=httpx.MockTransport(server), base_url="http://svc")
    CheckpointClient(http=http, retry=RetryPolicy(max_delay=5.0), sleep=sleeps.append).get(ID)
    assert sleeps == [5.0]


def test_merge_is_not_retried_on_503() -> None:
    server = Server(_overloaded(3), httpx.Response(201, json={}))
    ckpt, sleeps = _client(server)
    with pytest.raises(OverloadedError) as info:
        ckpt.merge("orig", "trained", architecture="tiny-convnet")
    assert info.value.retry_after == 3.0
    assert len(server.requests) == 1 and sleeps == []


def _merged(artifact_id: str = ID) -> httpx.Response:
    return httpx.Response(201, json={"id": artifact_id, "created": True, "download_url": "x",
                                     "artifact": _artifact(artifact_id), "report": {}})


def test_merge_of_stored_ids_is_retried_on_connection_errors_and_502() -> None:
    # Behind a load balancer: the replica died mid-request (connection reset), then the proxy answered 502.
    original, trained = "ab" * 32, "cd" * 32
    server = Server(httpx.RemoteProtocolError("peer closed"), httpx.Response(502, text="bad gateway"), _merged())
    ckpt, sleeps = _client(server)
    assert ckpt.merge(original, trained, architecture="tiny-convnet", name="final").id == ID
    assert len(server.requests) == 3 and len(sleeps) == 2
    fields = [body.split(server.requests[i].headers["content-type"].split("boundary=")[1].encode())
              for i, body in enumerate(server.bodies)]
    assert fields[0] == fields[2]  # the same fields again (the multipart boundary is new), name included
    assert b'name="original"\r\n\r\n' + original.encode() in server.bodies[2]


def test_merge_that_uploads_or_names_an_input_is_not_retried(tmp_path: Path) -> None:
    trained = tmp_path / "trained.pth"
    trained.write_bytes(b"not sent twice")
    for original, source in (("ab" * 32, trained), ("convnet-pretrained", "cd" * 32)):
        server = Server(httpx.Response(502, text="bad gateway"), _merged())
        ckpt, sleeps = _client(server)
        with pytest.raises(ServiceError) as info:
            ckpt.merge(original, source, architecture="tiny-convnet")
        assert info.value.status == 502
        assert len(server.requests) == 1 and sleeps == []


def test_connection_errors_retry_idempotent_calls_only() -> None:
    server = Server(httpx.ConnectError("refused"), httpx.Response(200, json=[{"name": "n", "id": ID}]))
    ckpt, sleeps = _client(server)
    assert [n.name for n in ckpt.list_names()] == ["n"]
    assert len(server.requests) == 2 and len(sleeps) == 1 and 0 < sleeps[0] <= 0.5

    server = Server(httpx.ConnectError("refused"), httpx.Response(201, json={}))
    ckpt, sleeps = _client(server)
    with pytest.raises(TransportError) as info:
        ckpt.strip("trained")
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(server.requests) == 1 and sleeps == []


def test_backoff_grows_exponentially_without_retry_after() -> None:
    server = Server(httpx.Response(502, text="bad gateway"))
    ckpt, sleeps = _client(server, attempts=4)
    with pytest.raises(ServiceError) as info:
        ckpt.health()
    assert info.value.status == 502 and info.value.detail == "bad gateway"  # a non-JSON body still explains
    assert len(sleeps) == 3
    for retry, delay in enumerate(sleeps):
        assert 0.5 * 2**retry * 0.5 <= delay <= 0.5 * 2**retry


def test_push_is_retried_and_resends_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "blob.pth"
    path.write_bytes(bytes(range(256)) * 50)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    server = Server(
        httpx.Response(404),  # HEAD: not stored yet
        _overloaded(2),
        httpx.Response(201, json=_artifact(digest)),
    )
    ckpt, sleeps = _client(server)
    result = ckpt.push(path)
    assert result.uploaded and result.created and result.artifact.id == digest
    posts = [i for i, r in enumerate(server.requests) if r.method == "POST"]
    assert len(posts) == 2 and sleeps == [2.0]
    for i in posts:  # both attempts carried the full bytes and the digest
        assert server.bodies[i] == path.read_bytes()
        assert server.requests[i].url.params["sha256"] == digest


def test_download_is_retried_when_the_connection_breaks(tmp_path: Path) -> None:
    payload = b"checkpoint bytes" * 100
    digest = hashlib.sha256(payload).hexdigest()

    class Broken(httpx.SyncByteStream):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield payload[:10]
            raise httpx.ReadError("connection reset")

    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"X-Checkpoint-Id": digest}, stream=Broken())

    server = Server(broken, httpx.Response(200, headers={"X-Checkpoint-Id": digest}, content=payload))
    ckpt, sleeps = _client(server)
    result = ckpt.pull(digest, tmp_path / "x.pth")
    assert result.path.read_bytes() == payload
    assert len(server.requests) == 2 and len(sleeps) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.pth"]


def test_ready_is_asked_once_and_not_ready_is_an_answer() -> None:
    body = {"status": "unavailable", "checks": {"store": {"status": "unavailable", "detail": "EROFS"}}}
    server = Server(httpx.Response(503, json=body))
    ckpt, sleeps = _client(server)
    health = ckpt.ready()
    assert health.status == "unavailable" and len(server.requests) == 1 and sleeps == []


def test_unreachable_service_raises_transport_error() -> None:
    sleeps: list[float] = []
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    with CheckpointClient("http://127.0.0.1:9", retry=RetryPolicy(attempts=2), sleep=sleeps.append) as ckpt:
        with pytest.raises(TransportError):
            ckpt.health()
    assert len(sleeps) == 1


def test_retry_after_http_date() -> None:
    future = email.utils.formatdate(time.time() + 120, usegmt=True)
    delay = _retry_after(httpx.Response(503, headers={"Retry-After": future}))
    assert delay is not None and 100 < delay <= 120
    assert _retry_after(httpx.Response(503, headers={"Retry-After": "soon"})) is None
    assert _retry_after(httpx.Response(503)) is None


def test_token_is_sent_as_bearer() -> None:
    server = Server(httpx.Response(200, json={"status": "ok", "checks": {}}))
    http = httpx.Client(transport=httpx.MockTransport(server), base_url="http://svc")
    CheckpointClient(http=http, token="s3cret").health()
    assert server.requests[0].headers["authorization"] == "Bearer s3cret"


def test_base_url_with_an_injected_client() -> None:
    server = Server(httpx.Response(200, json={"status": "ok", "checks": {}}))
    http = httpx.Client(transport=httpx.MockTransport(server))
    ckpt = CheckpointClient("http://other:8000/prefix", http=http)
    ckpt.health()
    assert str(server.requests[0].url) == "http://other:8000/prefix/healthz"
    assert ckpt.base_url == "http://other:8000/prefix"
