"""Signed download URLs: POST /checkpoints/{ref}/download-url, and the file route accepting the signature."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.signing import DownloadSigner, load_signing_secret
from service.config import Settings
from tests.factories import make_original, save_pth

READ = {"Authorization": "Bearer r1"}
WRITE = {"Authorization": "Bearer w1"}


@pytest.fixture
def secured(tmp_path: Path) -> TestClient:
    settings = Settings(data_dir=tmp_path / "data", api_tokens="read:r1,write:w1", sandbox=False)
    with TestClient(create_app(settings)) as client:
        yield client


def _upload(client: TestClient, tmp_path: Path, seed: int) -> str:
    path = save_pth(make_original(seed).state_dict(), tmp_path / f"m{seed}.pth")
    r = client.post("/checkpoints", files={"file": (path.name, path.read_bytes())}, headers=WRITE)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _signed(client: TestClient, ref: str, fmt: str = "pth") -> tuple[str, dict[str, str]]:
    r = client.post(f"/checkpoints/{ref}/download-url", params={"format": fmt}, headers=READ)
    assert r.status_code == 200, r.text
    parts = urlsplit(r.json()["url"])
    return parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}


def test_a_signed_url_downloads_without_a_token(secured: TestClient, tmp_path: Path) -> None:
    artifact = _upload(secured, tmp_path, 0)
    assert secured.get(f"/checkpoints/{artifact}/file").status_code == 401
    r = secured.post(f"/checkpoints/{artifact}/download-url", headers=READ)
    body = r.json()
    assert r.status_code == 200 and body["id"] == artifact and body["format"] == "pth"
    assert time.time() < body["expires"] <= time.time() + 301
    got = secured.get(body["url"])
    assert got.status_code == 200
    assert hashlib.sha256(got.content).hexdigest() == artifact


def test_a_signed_safetensors_url_converts(secured: TestClient, tmp_path: Path) -> None:
    artifact = _upload(secured, tmp_path, 0)
    path, query = _signed(secured, artifact, "safetensors")
    got = secured.get(path, params=query)
    assert got.status_code == 200
    assert got.content[8:9] == b"{"  # a safetensors header follows its 8-byte length


def test_the_url_needs_a_read_token(secured: TestClient, tmp_path: Path) -> None:
    artifact = _upload(secured, tmp_path, 0)
    assert secured.post(f"/checkpoints/{artifact}/download-url").status_code == 401
    bad = {"Authorization": "Bearer x"}
    assert secured.post(f"/checkpoints/{artifact}/download-url", headers=bad).status_code == 401


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ("tampered", 403),
        ("other artifact", 403),
        ("other format", 403),
        ("later expiry", 403),
        ("no expiry", 401),
        ("expired", 401),
    ],
)
def test_a_signature_opens_only_its_artifact_and_format_until_it_expires(
    secured: TestClient, tmp_path: Path, change: str, status: int
) -> None:
    artifact, other = _upload(secured, tmp_path, 0), _upload(secured, tmp_path, 1)
    path, query = _signed(secured, artifact)
    if change == "tampered":
        query["sig"] = ("0" if query["sig"][0] != "0" else "1") + query["sig"][1:]
    elif change == "other artifact":
        path = path.replace(artifact, other)
    elif change == "other format":
        query["format"] = "safetensors"
    elif change == "later expiry":
        query["expires"] = str(int(query["expires"]) + 3600)
    elif change == "no expiry":
        del query["expires"]
    elif change == "expired":
        signer: DownloadSigner = secured.app.state.services.signer  # type: ignore[attr-defined]
        expires, sig = signer.sign(artifact, "pth", now=time.time() - 3600)
        query.update(expires=str(expires), sig=sig)
    r = secured.get(f"{path}?{urlencode(query)}")
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"


def test_a_name_ref_is_signed_for_the_id_it_points_to(secured: TestClient, tmp_path: Path) -> None:
    artifact = _upload(secured, tmp_path, 0)
    assert secured.put("/names/base", json={"id": artifact}, headers=WRITE).status_code == 200
    path, query = _signed(secured, "base")
    assert path == f"/checkpoints/{artifact}/file"
    assert secured.get(path, params=query).status_code == 200


def test_the_generated_secret_is_private_and_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = load_signing_secret(None, data)
    key = data / "url-signing.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert load_signing_secret(None, data) == first
    assert load_signing_secret("configured-secret", data) == b"configured-secret"
    assert [p.name for p in data.iterdir()] == ["url-signing.key"]  # no temp file left


def test_urls_survive_a_restart_and_a_configured_secret_replaces_the_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = Settings(data_dir=data, api_tokens="read:r1,write:w1", sandbox=False)
    with TestClient(create_app(settings)) as client:
        artifact = _upload(client, tmp_path, 0)
        path, query = _signed(client, artifact)
    with TestClient(create_app(settings)) as client:
        assert client.get(path, params=query).status_code == 200
    other = Settings(data_dir=data, api_tokens="read:r1", url_signing_secret="another-secret-0123456789abcdef")
    with TestClient(create_app(other)) as client:
        assert client.get(path, params=query).status_code == 403


def test_an_open_service_also_signs(client: TestClient, tmp_path: Path) -> None:
    path = save_pth({"w": torch.ones(2)}, tmp_path / "w.pth")
    artifact = client.post("/checkpoints", files={"file": ("w.pth", path.read_bytes())}).json()["id"]
    r = client.post(f"/checkpoints/{artifact}/download-url")
    assert r.status_code == 200
    assert client.get(r.json()["url"]).status_code == 200
