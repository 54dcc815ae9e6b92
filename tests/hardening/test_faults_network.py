"""Misbehaving clients against a real `ckpt serve`, over raw sockets.

- A client that sends the headers and part of the body, then disconnects (FIN or RST): once the server
  notices, no temp file remains, nothing is stored, and the server still answers.
- Slow clients sending one byte a second (in the request line and headers, in a multipart body, in a raw
  body) do not stall anyone: while they trickle, other uploads, downloads and merges complete. Each slow
  upload is then finished at full speed and stored.
"""

from __future__ import annotations

import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hardening.servers import (
    MID,
    Server,
    checkpoint_bytes,
    disk_state,
    download_digest,
    list_artifacts,
    mlp_original,
    mlp_trained,
    random_checkpoint,
    sha256_hex,
    start_server,
    stop_server,
    tmp_entries,
    wait_until,
)

BOUNDARY = "hardeningboundary7f3a"
TRICKLE_CAP_SECONDS = 240  # a sanity bound only: the slow clients stop as soon as the others are done


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("network")
    config = root / "ckpt.toml"
    config.write_text('[architectures.mid-mlp]\nfactory = "service.registry.builtins:mlp_bn"\n'
                      f"kwargs = {{ dim = {MID['dim']}, depth = {MID['depth']} }}\n")
    srv = start_server(root / "data", log_path=root / "server.log", config=config)
    with srv.client() as client:
        r = client.post("/checkpoints", files={"file": ("o.pth", checkpoint_bytes(mlp_original(0)))},
                        data={"name": "orig"})
        assert r.status_code == 201, r.text
    try:
        yield srv
    finally:
        stop_server(srv)
    assert srv.server_errors() == [], srv.server_errors()[0]


def _multipart(fields: dict[str, str], files: dict[str, bytes]) -> bytes:
    out = bytearray()
    for name, value in fields.items():
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    for name, data in files.items():
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.pth\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        out += data + b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


def _request(server: Server, path: str, body: bytes, content_type: str) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def _upload_request(server: Server, data: bytes, *, raw: bool) -> bytes:
    if raw:
        return _request(server, "/checkpoints", data, "application/octet-stream")
    return _request(server, "/checkpoints", _multipart({}, {"file": data}),
                    f"multipart/form-data; boundary={BOUNDARY}")


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    sock.settimeout(120)
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    status_line, _, rest = bytes(data).partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def _uploads_in_tmp(server: Server) -> list[str]:
    return [e for e in tmp_entries(server.data_dir) if e.startswith(("upload-", "work-"))]


# ---- disconnects --------------------------------------------------------------------------------------------

def _disconnect_cases() -> list[Any]:
    cases = []
    for kind in ("multipart", "raw", "merge", "diff"):
        for how in ("close", "reset"):
            cases.append(pytest.param(kind, how, id=f"{kind}-{how}"))
    return cases


@pytest.mark.parametrize(("kind", "how"), _disconnect_cases())
def test_client_disconnecting_mid_upload_leaves_nothing(server: Server, kind: str, how: str) -> None:
    data = random_checkpoint(zlib.crc32(f"{kind}-{how}".encode()), floats=3 << 20)  # 12 MB: several 2 MB blocks
    if kind in ("multipart", "raw"):
        request = _upload_request(server, data, raw=kind == "raw")
    elif kind == "merge":
        body = _multipart({"architecture": "mid-mlp", "original": "orig"}, {"trained_file": data})
        request = _request(server, "/merge", body, f"multipart/form-data; boundary={BOUNDARY}")
    else:
        body = _multipart({}, {"a": data, "b": data})
        request = _request(server, "/diff", body, f"multipart/form-data; boundary={BOUNDARY}")
    with server.client() as client:
        before = {a["id"] for a in list_artifacts(client)}
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(request[: len(request) // 3])
        # The server has started streaming into a temp file: the disconnect below is what has to remove it.
        assert wait_until(lambda: _uploads_in_tmp(server) != [], timeout=30), tmp_entries(server.data_dir)
    finally:
        if how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert wait_until(lambda: _uploads_in_tmp(server) == [], timeout=60), tmp_entries(server.data_dir)
    with server.client() as client:
        assert client.get("/healthz").status_code == 200
        assert {a["id"] for a in list_artifacts(client)} == before
        assert client.head(f"/checkpoints/{sha256_hex(data)}").status_code == 404
        # ... and the same bytes, sent whole, are accepted afterwards.
        if kind in ("multipart", "raw"):
            r = client.post("/checkpoints", files={"file": ("c.pth", data)})
            assert r.status_code == 201 and r.json()["id"] == sha256_hex(data), r.text
            assert client.delete(f"/checkpoints/{sha256_hex(data)}").status_code == 200
    assert disk_state(server.data_dir).problems == []


# ---- slow clients -------------------------------------------------------------------------------------------

@dataclass
class Trickler:
    """Sends `request[:fast]` at once, then one byte a second until told to hurry (or for at most
    TRICKLE_CAP_SECONDS), then the rest at once, and reads the response."""

    server: Server
    request: bytes
    fast: int = 0
    hurry: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    status: int | None = None
    body: bytes = b""
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.server.port)) as sock:
                sock.sendall(self.request[: self.fast])
                self.sent = self.fast
                for _ in range(TRICKLE_CAP_SECONDS):
                    if self.hurry.wait(1.0):
                        break
                    sock.sendall(self.request[self.sent : self.sent + 1])
                    self.sent += 1
                sock.sendall(self.request[self.sent :])
                self.status, self.body = _read_response(sock)
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_slow_clients_do_not_stall_others(server: Server, figures: dict[str, Any]) -> None:
    slow_data = {k: random_checkpoint(100 + i, floats=4096) for i, k in enumerate(("head", "multipart", "raw"))}
    # One still in its request line and headers; two with their headers sent and their body trickling (the
    # multipart one from inside its file part).
    tricklers = {"head": Trickler(server, _upload_request(server, slow_data["head"], raw=True))}
    for kind in ("multipart", "raw"):
        request = _upload_request(server, slow_data[kind], raw=kind == "raw")
        fast = request.index(b"\r\n\r\n") + 4 + (200 if kind == "multipart" else 0)
        tricklers[kind] = Trickler(server, request, fast)
    for t in tricklers.values():
        t.thread.start()
    assert wait_until(lambda: all(t.sent >= t.fast + 2 for t in tricklers.values()), timeout=60)

    done: list[str] = []
    original = mlp_original(0)
    with server.client(timeout=60) as client:
        for i in range(3):
            data = random_checkpoint(200 + i, floats=1 << 20)
            r = client.post("/checkpoints", files={"file": ("fast.pth", data)}, data={"name": f"fast-{i}"})
            assert r.status_code == 201, r.text
            assert download_digest(client, r.json()["id"])[:2] == (200, sha256_hex(data))
            done.append(f"upload+download {i}")
        r = client.post("/merge", files={"trained_file": ("t.pth", checkpoint_bytes(mlp_trained(original, 7)))},
                        data={"architecture": "mid-mlp", "original": "orig"})
        assert r.status_code == 201, r.text
        done.append("merge")
        assert client.get("/checkpoints").status_code == 200
        assert client.get("/names").status_code == 200
        done.append("list")
        # All of this finished while every slow client was still trickling, without an answer yet.
        for kind, t in tricklers.items():
            assert t.thread.is_alive() and t.status is None and t.error is None, (kind, t.error)
        trickled = {k: t.sent - t.fast for k, t in tricklers.items()}
        for t in tricklers.values():
            t.hurry.set()
        for t in tricklers.values():
            t.thread.join(120)
        for kind, t in tricklers.items():
            assert t.error is None, (kind, t.error)
            assert t.status == 201, (kind, t.status, t.body[:300])
            assert client.head(f"/checkpoints/{sha256_hex(slow_data[kind])}").status_code == 200
    figures.update(slow_clients=len(tricklers), bytes_trickled=trickled, completed_meanwhile=done)


def test_a_stalled_body_is_cut_off_with_408_and_leaves_nothing(tmp_path: Path) -> None:
    from tests.api import test_real_server as real

    data_dir = tmp_path / "data"
    proc, url = real.start_server(data_dir, env={"CKPT_BODY_IDLE_TIMEOUT_SECONDS": "1"})
    try:
        host, port = url.removeprefix("http://").split(":")
        head = (f"POST /checkpoints HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
                "Content-Length: 1000000\r\n\r\n").encode()
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(head + b"PK\x03\x04" + b"\x00" * 1000)  # then nothing more
            reply = b""
            while chunk := s.recv(65536):  # the server closes the connection after its 408
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"application/problem+json" in reply and b"no request body bytes" in reply
        assert list((data_dir / "tmp").iterdir()) == []
        assert httpx.get(f"{url}/checkpoints").json()["total"] == 0
    finally:
        real.stop_server(proc)
