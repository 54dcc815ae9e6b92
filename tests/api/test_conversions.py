"""Downloads with ?format= are reads: the converted bytes come from the conversion cache, never the artifacts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from service.api.app import create_app
from service.config import Settings
from service.store import ArtifactStore

READ = {"Authorization": "Bearer r-tok"}
WRITE = {"Authorization": "Bearer w-tok"}


def _secured(tmp_path: Path) -> TestClient:
    return TestClient(create_app(Settings(data_dir=tmp_path / "data", api_tokens="read:r-tok,write:w-tok")))


def _upload(client: TestClient, path: Path, headers: dict[str, str] | None = None) -> str:
    r = client.post("/checkpoints", content=path.read_bytes(), headers={
        "content-type": "application/octet-stream", **(headers or {})})
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def test_read_token_download_as_safetensors_adds_no_artifact(
    tmp_path: Path, recipe_files: dict[str, Path]
) -> None:
    with _secured(tmp_path) as client:
        artifact = _upload(client, recipe_files["original"], WRITE)
        before = client.get("/checkpoints", headers=READ).json()
        r = client.get(f"/checkpoints/{artifact}/file", params={"format": "safetensors"}, headers=READ)
        assert r.status_code == 200, r.text
        after = client.get("/checkpoints", headers=READ).json()
        assert after == before
        assert after["total"] == 1
        assert client.get("/checkpoints", params={"operation": "convert"}, headers=READ).json()["total"] == 0
        digest = hashlib.sha256(r.content).hexdigest()
        assert r.headers["x-checkpoint-id"] == digest
        assert r.headers["etag"] == f'"{digest}"'
        # The converted id is not an artifact either.
        assert client.head(f"/checkpoints/{digest}", headers=READ).status_code == 404
    out = tmp_path / "x.safetensors"
    out.write_bytes(r.content)
    original = torch.load(recipe_files["original"], weights_only=True)
    converted = load_file(out)
    assert set(converted) == set(original)
    assert all(torch.equal(converted[k], original[k]) for k in original)


def test_repeated_conversion_is_served_from_the_cache(client: TestClient, recipe_files: dict[str, Path]) -> None:
    store: ArtifactStore = client.app.state.services.store  # type: ignore[attr-defined]
    artifact = _upload(client, recipe_files["original"])
    url = f"/checkpoints/{artifact}/file"
    first = client.get(url, params={"format": "safetensors"})
    assert first.status_code == 200
    assert store.conversions.conversions == 1
    cached = store.conversions.get(artifact, "safetensors")
    assert cached is not None and cached.sha256 == hashlib.sha256(first.content).hexdigest()
    stat = os.stat(cached.path)

    second = client.get(url, params={"format": "safetensors"})
    assert second.content == first.content
    assert second.headers["x-checkpoint-id"] == first.headers["x-checkpoint-id"]
    assert store.conversions.conversions == 1  # no second conversion
    again = os.stat(cached.path)
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    part = client.get(url, params={"format": "safetensors"}, headers={"Range": "bytes=8-99"})
    assert part.status_code == 206
    assert part.content == first.content[8:100]
    assert part.headers["content-range"] == f"bytes 8-99/{len(first.content)}"
    etag = first.headers["etag"]
    assert client.get(url, params={"format": "safetensors"}, headers={"If-None-Match": etag}).status_code == 304
    assert store.conversions.conversions == 1
    # The stored format needs no conversion and keeps the artifact's own id.
    plain = client.get(url)
    assert plain.headers["x-checkpoint-id"] == artifact


def test_strip_and_merge_to_safetensors_still_store_artifacts(
    client: TestClient, recipe_files: dict[str, Path]
) -> None:
    trained = _upload(client, recipe_files["trained"])
    r = client.post("/strip", json={"checkpoint": trained, "output_format": "safetensors"})
    assert r.status_code == 201, r.text
    assert r.json()["artifact"]["format"] == "safetensors"
    listing = client.get("/checkpoints", params={"operation": "strip"}).json()
    assert listing["total"] == 1
