"""What an outsider (no token) or a read-only user can do to a real `ckpt serve` before or around authentication:
made-up methods and paths against /metrics' cardinality, huge, malformed and stalled JSON bodies against the auth
check and the body limits. Raw sockets where the point is what the server does before a body has arrived."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.hardening.servers import MemorySampler, Server, start_server, stop_server, tree_memory

pytestmark = pytest.mark.timeout(300)

WRITE_TOKEN = "w-secret"
READ_TOKEN = "r-secret"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server with tokens, the default 1 MiB JSON limit, and a short body idle timeout."""
    base = tmp_path_factory.mktemp("outsiders")
    env = {
        "CKPT_API_TOKENS": f"write:{WRITE_TOKEN},read:{READ_TOKEN}",
        "CKPT_BODY_IDLE_TIMEOUT_SECONDS": "1",
        "CKPT_SANDBOX": "false",
    }
    srv = start_server(base / "data", log_path=base / "server.log", env=env)
    try:
        yield srv
    finally:
        stop_server(srv)


def series(metrics_text: str) -> int:
    return sum(1 for line in metrics_text.splitlines() if line.startswith("ckpt_http_"))


def test_made_up_methods_and_paths_do_not_add_metrics_series(server: Server, figures: dict[str, Any]) -> None:
    def burst(start: int, count: int) -> None:
        with server.client(timeout=30) as http:
            for i in range(start, start + count):
                # 1 KB method tokens on unmatched paths (404) and on a real route (405).
                method = f"M{i:05d}" + "X" * 1000
                path = f"/nowhere/{i}" if i % 2 else "/checkpoints"
                r = http.request(method, path)
                assert r.status_code in (404, 405), r.text

    burst(0, 20)
    httpx.get(f"{server.url}/metrics")  # /metrics counts itself too
    before = series(httpx.get(f"{server.url}/metrics").text)
    burst(20, 3000)
    text = httpx.get(f"{server.url}/metrics").text
    after = series(text)
    figures.update(series_before=before, series_after_3000_odd_requests=after, metrics_bytes=len(text))
    assert after == before
    assert 'method="other"' in text
    assert "MXXX" not in text and "M00021" not in text


# ---- raw HTTP/1.1 ----------------------------------------------------------------------------------------------


def connect(server: Server) -> socket.socket:
    parts = urlsplit(server.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    return sock


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """Status and problem body of one response (the server closes or sends Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    header_block, _, body = data.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, json.loads(body) if body else {}
