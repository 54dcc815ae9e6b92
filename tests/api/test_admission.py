"""A real uvicorn: a full pool answers 503 with Retry-After before reading the body, and reads never hold
the slots that writes use."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.api.test_real_server import start_server, stop_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    env = {"CKPT_READ_CONCURRENCY": "1", "CKPT_READ_QUEUE": "0", "CKPT_RETRY_AFTER_SECONDS": "7"}
    proc, url = start_server(tmp_path / "data", env=env)
    try:
        yield url
    finally:
        stop_server(proc)


def _admitted(url: str, pool: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf'^ckpt_heavy_requests_admitted\{{pool="{pool}"\}} (\S+)$', text, re.M)
    assert match, text
    return float(match.group(1))


def _wait_admitted(url: str, pool: str, count: float) -> None:
    deadline = time.monotonic() + 30
    while _admitted(url, pool) != count:
        assert time.monotonic() < deadline, f"{pool} pool never reached {count}"
        time.sleep(0.05)


def _open(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _head(length: int) -> bytes:
    return (
        "POST /diff HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_a_full_pool_answers_503_before_the_body_and_writes_go_on(server: str, tmp_path: Path) -> None:
    # One POST /diff that sends its headers and the start of a body, then stalls: it holds the one read slot.
    holder = _open(server)
    holder.sendall(_head(1 << 30) + b'--b\r\nContent-Disposition: form-data; name="a"; filename="a.pth"\r\n\r\nxx')
    _wait_admitted(server, "read", 1)

    # A second read announces a 1 GiB body and sends none of it: the 503 arrives anyway.
    second = _open(server)
    second.sendall(_head(1 << 30))
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = second.recv(65536)
        assert chunk, reply
        reply += chunk
    head = reply.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert head.startswith("http/1.1 503"), head
    assert "retry-after: 7" in head
    assert "application/problem+json" in head
    second.close()

    # The read pool is full, yet a write is admitted at once.
    path = tmp_path / "w.pth"
    torch.save(torch.nn.Linear(4, 3).state_dict(), path)
    r = httpx.post(f"{server}/checkpoints", content=path.read_bytes(),
                   headers={"content-type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 201, r.text

    holder.close()  # the stalled read ends (client gone) and its slot is free again
    _wait_admitted(server, "read", 0)
    ok = httpx.post(f"{server}/diff", data={"a": r.json()["id"], "b": r.json()["id"]}, timeout=60)
    assert ok.status_code == 200, ok.text
