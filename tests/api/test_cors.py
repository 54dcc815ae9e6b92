"""CKPT_CORS_ORIGINS: a dashboard on another origin can read the API (preflight and the real request)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings

DASH = "https://dash.example.org"


@pytest.fixture
def cors_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", cors_origins=f"{DASH}, http://localhost:3000",
                        api_tokens="read:r0,write:w0")
    with TestClient(create_app(settings)) as client:
        yield client


def test_preflight_is_answered_without_a_token(cors_client: TestClient) -> None:
    r = cors_client.options("/diff", headers={
        "Origin": DASH,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    })
    assert r.status_code == 200, r.text  # not a 405, and not a 401 from auth
    assert r.headers["access-control-allow-origin"] == DASH
    assert "GET" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()


def test_cross_origin_get_carries_cors_headers(cors_client: TestClient, recipe_files: dict[str, Path]) -> None:
    with recipe_files["original"].open("rb") as fh:
        up = cors_client.post("/checkpoints", files={"file": ("o.pth", fh)}, headers={"Authorization": "Bearer w0"})
    artifact = up.json()["id"]
    r = cors_client.get("/diff", params={"a": artifact, "b": artifact},
                        headers={"Origin": DASH, "Authorization": "Bearer r0"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == DASH
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert exposed >= {"etag", "x-checkpoint-id", "retry-after", "content-disposition"}
    blob = cors_client.get(f"/checkpoints/{artifact}/file", headers={"Origin": DASH, "Authorization": "Bearer r0"})
    assert blob.headers["access-control-allow-origin"] == DASH and blob.headers["etag"]
    # An origin that is not listed gets no CORS header: the browser keeps the answer from its page.
    other = cors_client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(client: TestClient) -> None:
    r = client.get("/healthz", headers={"Origin": DASH})
    assert "access-control-allow-origin" not in r.headers
    pre = client.options("/diff", headers={"Origin": DASH, "Access-Control-Request-Method": "GET"})
    assert pre.status_code == 405
