"""Health, readiness, metrics, auth, docs without a CDN, and the committed OpenAPI contract."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.openapi import render_openapi
from service.config import Settings

REPO = Path(__file__).resolve().parents[2]


def test_health_ready_metrics(client: TestClient, recipe_files: dict[str, Path]) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready["status"] == "ok" and ready["checks"]["store"]["status"] == "ok"
    with recipe_files["original"].open("rb") as fh:
        client.post("/checkpoints", files={"file": ("o.pth", fh)})
    text = client.get("/metrics").text
    assert 'ckpt_http_requests_total{method="POST",route="/checkpoints",status="201"} 1.0' in text
    size = recipe_files["original"].stat().st_size
    assert f"ckpt_bytes_ingested_total {float(size)}" in text


def test_unknown_route_is_problem_json(client: TestClient) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


def test_auth_on(tmp_path: Path, recipe_files: dict[str, Path]) -> None:
    app = create_app(Settings(data_dir=tmp_path / "d", api_tokens="read:r3ad,write:wr1te"))
    with TestClient(app) as c:
        assert c.get("/checkpoints").status_code == 401
        assert c.get("/checkpoints").headers["www-authenticate"].startswith("Bearer")
        assert c.get("/checkpoints", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/checkpoints", headers={"Authorization": "Bearer r3ad"}).status_code == 200
        data = recipe_files["original"].read_bytes()
        r = c.post(
            "/checkpoints",
            content=data,
            headers={"Authorization": "Bearer r3ad", "content-type": "application/octet-stream"},
        )
        assert r.status_code == 403
        r = c.post(
            "/checkpoints",
            content=data,
            headers={"Authorization": "Bearer wr1te", "content-type": "application/octet-stream"},
        )
        assert r.status_code == 201
        assert c.get("/healthz").status_code == 200  # liveness stays open for orchestrators


def test_auth_off_is_open(client: TestClient) -> None:
    assert client.get("/checkpoints").status_code == 200


def test_docs_are_served_without_cdn(client: TestClient) -> None:
    for path in ("/docs", "/redoc"):
        html = client.get(path).text
        assert "cdn" not in html.lower() and "googleapis" not in html
    assert client.get("/static-docs/swagger-ui-bundle.js").status_code == 200
    assert client.get("/static-docs/redoc.standalone.js").status_code == 200


def test_openapi_has_not_drifted() -> None:
    committed = (REPO / "openapi" / "openapi.json").read_text()
    assert json.loads(committed) == json.loads(render_openapi()), (
        "run scripts/openapi.sh and commit the result"
    )


def test_operation_ids_are_stable_and_errors_declared() -> None:
    spec = json.loads(render_openapi())
    ops = {op["operationId"]: op for item in spec["paths"].values() for op in item.values()}
    for op_id in (
        "upload_checkpoint",
        "checkpoint_exists",
        "get_checkpoint",
        "get_manifest",
        "download_checkpoint",
        "list_checkpoints",
        "delete_checkpoint",
        "set_name",
        "list_names",
        "delete_name",
        "strip_checkpoint",
        "diff_checkpoints",
        "diff_uploaded",
        "merge_checkpoints",
        "list_architectures",
        "get_architecture",
        "register_architecture",
        "delete_architecture",
        "healthz",
        "readyz",
        "metrics",
    ):
        assert op_id in ops, op_id
    merge = ops["merge_checkpoints"]["responses"]
    assert merge["422"]["content"]["application/problem+json"]["schema"]["$ref"].endswith("/Problem")
    assert {"400", "404", "413", "503", "507"} <= set(merge)


def test_parser_workers_restart_after_the_app_restarts(tmp_path: Path, recipe_files: dict[str, Path]) -> None:
    app = create_app(Settings(data_dir=tmp_path / "d"))
    data = recipe_files["original"].read_bytes()
    headers = {"content-type": "application/octet-stream"}
    with TestClient(app) as c:
        assert c.post("/checkpoints", content=data, headers=headers).status_code == 201
        sandbox = app.state.services.sandbox
        assert sandbox is not None and sandbox.pids
    assert sandbox.pids == []  # the lifespan stopped them
    with TestClient(app) as c:  # started again: a parse starts a new worker
        r = c.post("/checkpoints", content=recipe_files["trained"].read_bytes(), headers=headers)
        assert r.status_code == 201, r.text


def test_the_service_collects_cycles_less_often(settings: Settings) -> None:
    import gc

    from service.runtime import GC_THRESHOLDS

    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # Python's default
    try:
        with TestClient(create_app(settings)):
            assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)
