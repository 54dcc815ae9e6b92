"""Hostile requests around valid-looking files: a bit flipped after the client hashed, hostile multipart file names,
and multipart abuse (no boundary, 1001 parts, huge headers, a huge preamble, bodies over the limit with and without
Content-Length, and a Content-Length that lies, on a real server through a raw socket)."""

from __future__ import annotations

import hashlib
import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.hardening import hostile_support
from tests.hardening.builders import make_payload
from tests.hardening.hostile_support import RealServer, assert_clean, assert_refused

# Fixtures shared with the other test_hostile_* modules (the directory's conftest belongs to the fault tests).
data_dir, real_server, real_http = hostile_support.data_dir, hostile_support.real_server, hostile_support.real_http

pytestmark = pytest.mark.timeout(120)

BOUNDARY = b"hostile-boundary"
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}


def valid_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(6.0)}, buffer)
    return buffer.getvalue()


def evil_checkpoint(tmp_path: Path) -> tuple[bytes, Path]:
    marker = tmp_path / "MARKER"
    return make_payload(tmp_path / "evil.pth", kind="os.system", form="zip", marker=marker).read_bytes(), marker


def multipart(parts: list[tuple[bytes, bytes]], *, preamble: bytes = b"") -> bytes:
    body = preamble
    for headers, data in parts:
        body += b"--" + BOUNDARY + b"\r\n" + headers + b"\r\n\r\n" + data + b"\r\n"
    return body + b"--" + BOUNDARY + b"--\r\n"


def file_part(data: bytes, filename: bytes = b"model.pth") -> tuple[bytes, bytes]:
    return b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"', data


# ---- a bit flipped after the client computed its digest ----------------------------------------------------


def test_bit_flipped_after_hashing_is_a_digest_mismatch(client: TestClient, data_dir: Path) -> None:
    data = valid_checkpoint()
    declared = hashlib.sha256(data).hexdigest()
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01

    r = client.post("/checkpoints", files={"file": ("m.pth", bytes(flipped))}, data={"sha256": declared})

    assert_refused(r, status=400, fragment=declared)
    assert r.json()["actual"] == hashlib.sha256(flipped).hexdigest()
    assert_clean(client, data_dir)


def test_bit_flipped_trained_file_of_a_merge_is_a_digest_mismatch(
    client: TestClient, data_dir: Path, recipe_files: dict[str, Path]
) -> None:
    trained = recipe_files["trained"].read_bytes()
    declared = hashlib.sha256(trained).hexdigest()
    flipped = bytearray(trained)
    flipped[-100] ^= 0x80

    r = client.post(
        "/merge",
        data={"architecture": "tiny-convnet", "trained_sha256": declared},
        files={"original_file": ("o.pth", recipe_files["original"].read_bytes()),
               "trained_file": ("t.pth", bytes(flipped))},
    )

    assert_refused(r, status=400, fragment="hashes to")
    assert_clean(client, data_dir)


def test_bit_flip_is_caught_by_a_real_server(real_http: httpx.Client, real_server: RealServer) -> None:
    data = valid_checkpoint()
    declared = hashlib.sha256(data).hexdigest()
    flipped = bytes([data[0] ^ 0x10]) + data[1:]

    r = real_http.post("/checkpoints", files={"file": ("m.pth", flipped)}, data={"sha256": declared})

    assert_refused(r, status=400, fragment=declared)
    assert_clean(real_http, real_server.data_dir)


# ---- hostile file names ------------------------------------------------------------------------------------

HOSTILE_NAMES = {
    "dotdot": b"../../x",
    "safetensors suffix": b"x.safetensors",
    "NUL": b"a\x00b.pth",
    "10 kB": b"n" * 10_000,
}


@pytest.mark.parametrize("case", sorted(HOSTILE_NAMES))
def test_hostile_filename_on_a_payload_is_refused(
    client: TestClient, data_dir: Path, tmp_path: Path, case: str
) -> None:
    evil, marker = evil_checkpoint(tmp_path)

    r = client.post("/checkpoints", content=multipart([file_part(evil, HOSTILE_NAMES[case])]), headers=MULTIPART)

    assert_refused(r)
    assert_clean(client, data_dir, marker)


def test_dotdot_filename_is_metadata_only(client: TestClient, data_dir: Path) -> None:
    r = client.post("/checkpoints", content=multipart([file_part(valid_checkpoint(), b"../../x")]), headers=MULTIPART)

    assert r.status_code == 201, r.text
    assert r.json()["filename"] == "../../x"
    assert not (data_dir.parent / "x").exists() and not (data_dir / "x").exists()


def test_safetensors_name_on_pickle_bytes_is_detected_by_content(client: TestClient) -> None:
    r = client.post("/checkpoints", content=multipart([file_part(valid_checkpoint(), b"x.safetensors")]),
                    headers=MULTIPART)

    assert r.status_code == 201, r.text
    assert r.json()["format"] == "pth-zip"


@pytest.mark.parametrize(("case", "fragment"), [("NUL", "printable"), ("10 kB", "header")])
def test_unusable_filename_on_a_valid_file_is_refused(
    client: TestClient, data_dir: Path, case: str, fragment: str
) -> None:
    body = multipart([file_part(valid_checkpoint(), HOSTILE_NAMES[case])])

    assert_refused(client.post("/checkpoints", content=body, headers=MULTIPART), status=400, fragment=fragment)
    assert_clean(client, data_dir)


@pytest.mark.parametrize("case", ["dotdot", "NUL"])
def test_hostile_filename_on_a_real_server(
    real_http: httpx.Client, real_server: RealServer, tmp_path: Path, case: str
) -> None:
    evil, marker = evil_checkpoint(tmp_path)

    r = real_http.post("/checkpoints", content=multipart([file_part(evil, HOSTILE_NAMES[case])]), headers=MULTIPART)

    assert_refused(r)
    assert_clean(real_http, real_server.data_dir, marker)


# ---- multipart abuse ---------------------------------------------------------------------------------------


@pytest.fixture
def small_client(tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    settings = Settings(data_dir=tmp_path / "small", max_upload_bytes=1 << 20)
    with TestClient(create_app(settings)) as c:
        yield c, settings.data_dir


def test_multipart_without_boundary(client: TestClient, data_dir: Path) -> None:
    r = client.post("/checkpoints", content=multipart([file_part(valid_checkpoint())]),
                    headers={"content-type": "multipart/form-data"})

    assert_refused(r, status=400, fragment="boundary")
    assert_clean(client, data_dir)


@pytest.mark.parametrize("endpoint", ["/checkpoints", "/merge", "/diff"])
def test_a_thousand_and_one_parts(client: TestClient, data_dir: Path, endpoint: str) -> None:
    parts = [(f'Content-Disposition: form-data; name="p{i}"'.encode(), b"x") for i in range(1001)]

    assert_refused(client.post(endpoint, content=multipart(parts), headers=MULTIPART), status=400,
                   fragment="multipart")
    assert_clean(client, data_dir)


def test_oversized_part_headers(client: TestClient, data_dir: Path) -> None:
    headers, data = file_part(valid_checkpoint())
    part = (headers + b"\r\nX-Padding: " + b"p" * (64 << 10), data)

    assert_refused(client.post("/checkpoints", content=multipart([part]), headers=MULTIPART), status=400,
                   fragment="header")
    assert_clean(client, data_dir)


def test_huge_preamble_is_refused(client: TestClient, data_dir: Path, tmp_path: Path) -> None:
    # python-multipart wants the first boundary at the start (no RFC 2046 preamble): refused on the first chunk.
    evil, marker = evil_checkpoint(tmp_path)
    body = multipart([file_part(evil)], preamble=b"preamble " * (2 << 20))  # 18 MiB before the first boundary

    assert_refused(client.post("/checkpoints", content=body, headers=MULTIPART), status=400, fragment="boundary")
    assert_clean(client, data_dir, marker)


def test_body_over_the_limit_with_content_length(small_client: tuple[TestClient, Path]) -> None:
    c, data_dir = small_client
    body = multipart([file_part(b"z" * (3 << 20))])

    assert_refused(c.post("/checkpoints", content=body, headers=MULTIPART), status=413, fragment="limit")
    assert_clean(c, data_dir)


def test_body_over_the_limit_without_content_length(small_client: tuple[TestClient, Path]) -> None:
    c, data_dir = small_client
    body = multipart([file_part(b"z" * (3 << 20))])

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 64 << 10):
            yield body[i : i + 64 << 10]

    r = c.post("/checkpoints", content=chunks(), headers=MULTIPART)

    assert "content-length" not in r.request.headers
    assert_refused(r, status=413, fragment="limit")
    assert_clean(c, data_dir)


def test_deeply_nested_labels_are_refused(client: TestClient, data_dir: Path) -> None:
    lenient = TestClient(client.app, raise_server_exceptions=False)
    labels = '{"a":' + "[" * 2000 + "]" * 2000 + "}"

    r = lenient.post("/checkpoints", files={"file": ("m.pth", valid_checkpoint())}, data={"labels": labels})

    assert_refused(r, status=400)


def _raw_request(url: str, head: bytes, body: bytes, *, read: bool) -> bytes:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        s.sendall(head + body)
        if not read:
            return b""
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except TimeoutError:
            pass  # the server kept the connection open after answering
        return received


def _head(content_length: int) -> bytes:
    return (
        b"POST /checkpoints HTTP/1.1\r\nHost: test\r\n"
        + b"Content-Type: " + MULTIPART["content-type"].encode() + b"\r\n"
        + b"Content-Length: " + str(content_length).encode() + b"\r\n\r\n"
    )


def test_content_length_larger_than_the_body(real_http: httpx.Client, real_server: RealServer) -> None:
    body = multipart([file_part(valid_checkpoint())])

    _raw_request(real_server.url, _head(len(body) + 100_000), body, read=False)  # then the client goes away

    time.sleep(0.5)
    assert_clean(real_http, real_server.data_dir)


def test_content_length_smaller_than_the_body(real_http: httpx.Client, real_server: RealServer) -> None:
    body = multipart([file_part(valid_checkpoint())])

    reply = _raw_request(real_server.url, _head(len(body) // 2), body, read=True)

    status_line = reply.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 4"), reply[:300]
    assert b"application/problem+json" in reply.split(b"\r\n\r\n", 1)[0]
    assert_clean(real_http, real_server.data_dir)


def _form_with_trailing_digest(fields: dict[str, str], trained: bytes, digest: str) -> tuple[bytes, str]:
    # The client's order: text fields, the file, then the file's sha256 (hashed while it was sent).
    boundary = "b0undary7e1"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="trained_file"; filename="t.pth"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + trained + b"\r\n")
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="trained_sha256"\r\n\r\n{digest}\r\n'
                 f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def test_a_digest_that_follows_its_file_is_checked_before_anything_is_stored(
    client: TestClient, data_dir: Path, recipe_files: dict[str, Path]
) -> None:
    original = client.post("/checkpoints", files={"file": ("o.pth", recipe_files["original"].read_bytes())})
    assert original.status_code == 201
    trained = recipe_files["trained"].read_bytes()
    declared = hashlib.sha256(trained).hexdigest()
    flipped = bytearray(trained)
    flipped[-100] ^= 0x80
    fields = {"architecture": "tiny-convnet", "original": original.json()["id"]}

    body, content_type = _form_with_trailing_digest(fields, bytes(flipped), declared)
    r = client.post("/merge", content=body, headers={"Content-Type": content_type})
    assert_refused(r, status=400, fragment="hashes to")
    assert client.get("/checkpoints").json()["total"] == 1  # only the original

    body, content_type = _form_with_trailing_digest(fields, trained, declared)
    r = client.post("/merge", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 201, r.text
    assert r.json()["artifact"]["lineage"]["inputs"]["trained"] == declared
