"""Short ids: a unique prefix of 8+ hex digits of an id is a ref everywhere; new all-hex names are refused."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.store import ArtifactStore


def _upload(client: TestClient, path: Path, **data: str) -> str:
    with path.open("rb") as fh:
        r = client.post("/checkpoints", files={"file": (path.name, fh)}, data=data)
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def test_an_id_prefix_is_a_ref_everywhere(client: TestClient, recipe_files: dict[str, Path]) -> None:
    full = _upload(client, recipe_files["trained"])
    short = full[:12]  # what `ckpt ls` prints
    assert client.get(f"/checkpoints/{short}").json()["id"] == full
    assert client.head(f"/checkpoints/{full[:8].upper()}").status_code == 200
    assert client.get(f"/checkpoints/{short}/file").status_code == 200
    stripped = client.post("/strip", json={"checkpoint": short})
    assert stripped.status_code == 201, stripped.text
    assert stripped.json()["artifact"]["lineage"]["inputs"]["checkpoint"] == full
    assert client.put("/names/ft", json={"id": short}).json()["id"] == full
    assert client.get("/diff", params={"a": short, "b": stripped.json()["id"][:10]}).status_code == 200
    # Too short, or no match: a plain 404 that says what was looked for.
    assert client.get(f"/checkpoints/{full[:7]}").status_code == 404
    other = "0" * 8 if not full.startswith("0" * 8) else "f" * 8
    missing = client.get(f"/checkpoints/{other}")
    assert missing.status_code == 404 and f"no artifact id starts with '{other}'" in missing.json()["detail"]


def test_an_ambiguous_prefix_is_a_409_listing_the_candidates(
    client: TestClient, settings: Settings, recipe_files: dict[str, Path]
) -> None:
    full = _upload(client, recipe_files["original"])
    # A second artifact whose id shares the first 10 digits (32+ bits of collision cannot be made for real):
    # its index row, published through the index as the store publishes one.
    twin = full[:10] + ("0" if full[10] != "0" else "1") + full[11:]
    store: ArtifactStore = client.app.state.services.store  # type: ignore[attr-defined]
    assert store.index.insert(replace(store.metadata(full), id=twin), store.manifest(full).to_dict())
    r = client.get(f"/checkpoints/{full[:10]}")
    assert r.status_code == 409, r.text
    problem = r.json()
    assert problem["title"] == "Ambiguous reference"
    assert problem["candidates"] == sorted([full, twin])
    assert "give more digits" in problem["detail"]
    assert client.get(f"/checkpoints/{full[:11]}").json()["id"] == full  # one more digit decides


def test_new_all_hex_names_are_refused_existing_ones_keep_working(
    tmp_path: Path, recipe_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    store = ArtifactStore(settings.data_dir, database_url=settings.database_url)
    artifact = store.ingest_file(recipe_files["original"]).artifact
    # A name from before short ids (the index takes it; only the store's API refuses new ones).
    store.index.set_name("deadbeef", artifact.id)
    with caplog.at_level(logging.WARNING, logger="ckpt.service"), TestClient(create_app(settings)) as client:
        assert client.get("/checkpoints/deadbeef").json()["id"] == artifact.id  # the name wins over a prefix
        assert client.put("/names/deadbeef", json={"id": artifact.id}).status_code == 200  # and may move
        refused = client.put("/names/12345678", json={"id": artifact.id})
        assert refused.status_code == 400
        assert "only hex digits" in refused.json()["detail"] and "'12345678'" in refused.json()["detail"]
        with recipe_files["trained"].open("rb") as fh:
            upload = client.post("/checkpoints", files={"file": ("t.pth", fh)}, data={"name": "abcdef0123"})
        assert upload.status_code == 400
        assert client.put("/names/v-12345678", json={"id": artifact.id}).status_code == 200
        assert client.put("/names/1234567", json={"id": artifact.id}).status_code == 200  # 7 digits: no prefix
    assert any("'deadbeef'" in r.getMessage() and "hex" in r.getMessage() for r in caplog.records)


def test_invalid_names_are_explained_in_words(client: TestClient, recipe_files: dict[str, Path]) -> None:
    full = _upload(client, recipe_files["original"])
    r = client.put("/names/-bad", json={"id": full})
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert "letters, digits, '.', '_' and '-', starting with a letter or digit" in detail
    assert "[A-Za-z0-9]" not in detail
