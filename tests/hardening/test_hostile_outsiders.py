"""What an outsider (no token) or a read-only user can do to a real `ckpt serve` before or around authentication:
made-up methods and paths against /metrics' cardinality, huge, malformed and stalled JSON bodies against the auth
check and the body limits. Raw sockets where the point is what the server does before a body has arrived."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
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


HUNDRED_MIB = 100 << 20
JSON_ROUTES = [("PUT", "/names/x"), ("POST", "/strip"), ("POST", "/architectures")]
WRITE_ROUTES = [*JSON_ROUTES, ("POST", "/checkpoints"), ("POST", "/merge"), ("DELETE", "/names/x")]


@pytest.mark.parametrize(("method", "path"), WRITE_ROUTES)
def test_no_token_is_refused_from_the_headers_before_any_body_byte(server: Server, method: str, path: str) -> None:
    # Only the headers are sent, announcing 100 MiB: a server that waited for the body would never answer.
    with connect(server) as sock:
        sock.sendall(head(method, path, {"Content-Type": "application/json", "Content-Length": str(HUNDRED_MIB)}))
        status, body = read_response(sock)
    assert status == 401 and body["type"] == "urn:ckpt:problem:unauthorized"


@pytest.mark.parametrize(("method", "path"), WRITE_ROUTES)
def test_a_read_token_is_refused_a_write_before_any_body_byte(server: Server, method: str, path: str) -> None:
    headers = {"Content-Type": "application/json", "Content-Length": str(HUNDRED_MIB),
               "Authorization": f"Bearer {READ_TOKEN}"}
    with connect(server) as sock:
        sock.sendall(head(method, path, headers))
        status, body = read_response(sock)
    assert status == 403 and body["type"] == "urn:ckpt:problem:forbidden"


@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
def test_bad_json_without_a_token_is_401_not_422(server: Server, method: str, path: str) -> None:
    r = httpx.request(method, server.url + path, content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401


@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
def test_a_json_body_over_the_limit_by_content_length_is_413_before_reading(
    server: Server, method: str, path: str
) -> None:
    headers = {"Content-Type": "application/json", "Content-Length": str((1 << 20) + 1),
               "Authorization": f"Bearer {WRITE_TOKEN}"}
    with connect(server) as sock:
        sock.sendall(head(method, path, headers))
        status, body = read_response(sock)
    assert status == 413 and body["limit"] == 1 << 20


@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
def test_a_chunked_json_body_over_the_limit_is_413_while_reading(server: Server, method: str, path: str) -> None:
    headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked",
               "Authorization": f"Bearer {WRITE_TOKEN}"}
    piece = b"[" + b"[]," * (64 << 10)  # about 192 KiB a chunk, never closed
    with connect(server) as sock:
        sock.sendall(head(method, path, headers))
        for _ in range(6):  # over 1 MiB in all, then nothing more: the answer must not need the end
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        status, body = read_response(sock)
    assert status == 413 and body["limit"] == 1 << 20


@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
def test_a_stalled_json_body_is_408(server: Server, method: str, path: str) -> None:
    headers = {"Content-Type": "application/json", "Content-Length": "100",
               "Authorization": f"Bearer {WRITE_TOKEN}"}
    with connect(server) as sock:
        sock.sendall(head(method, path, headers) + b'{"id": ')  # and then nothing: the fixture's idle time is 1 s
        status, body = read_response(sock)
    assert status == 408 and body["type"] == "urn:ckpt:problem:request-timeout"


def test_a_json_body_under_the_limit_still_works(server: Server) -> None:
    auth = {"Authorization": f"Bearer {WRITE_TOKEN}"}
    spec = {"name": "tiny-spec", "keys": {"w": {"shape": [2, 3], "dtype": "float32"}}}
    padded = json.dumps(spec) + " " * ((1 << 20) - len(json.dumps(spec)))  # exactly the limit
    r = httpx.post(f"{server.url}/architectures", content=padded.encode(),
                   headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    r = httpx.put(f"{server.url}/names/x", json={"id": "0" * 64}, headers=auth)
    assert r.status_code == 404  # parsed and run: no such artifact


def test_a_100_mib_body_in_flight_without_a_token(server: Server, figures: dict[str, Any]) -> None:
    # The attack of the review: a 100 MiB `[[],[],...]` body streamed at full speed without a token.
    body_piece = b"[]," * ((1 << 20) // 3)
    headers = {"Content-Type": "application/json", "Content-Length": str(HUNDRED_MIB)}
    sent = 0

    def send_body(sock: socket.socket) -> None:
        nonlocal sent
        try:
            while sent < HUNDRED_MIB:
                chunk = body_piece[: HUNDRED_MIB - sent]
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server closed the connection after its answer

    before = tree_memory(server.pid).rss_anon
    with MemorySampler(server.pid) as memory, connect(server) as sock:
        start = time.perf_counter()
        sock.sendall(head("PUT", "/names/x", headers))
        sender = threading.Thread(target=send_body, args=(sock,), daemon=True)
        sender.start()
        status, _ = read_response(sock)
        seconds = time.perf_counter() - start
        with contextlib.suppress(OSError):  # the server may have reset it already
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(30)
    figures.update(
        seconds_to_401=round(seconds, 4),
        body_bytes_sent_before_close=sent,
        api_rss_anon_before_mib=round(before / 2**20, 1),
        api_rss_anon_peak_mib=round(memory.peak_rss_anon / 2**20, 1),
    )
    assert status == 401
    # The body is never buffered: far less than its size reaches the server's memory.
    assert memory.peak_rss_anon - before < 32 << 20
