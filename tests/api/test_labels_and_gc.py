"""Labels that stick (dedup merge, PATCH, `ckpt label`) and retention GC (`POST /admin/gc`, `ckpt gc`, the schedule).

Each test runs on both index backends (tests/api/conftest.py). Artifacts are aged by rewriting `created` in the
index, which is what the policy reads.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from service.api.app import create_app
from service.client.cli import main
from service.config import Settings
from service.operations import MergeOptions, Source
from service.registry.builtins import TinyConvNet
from service.store import ArtifactStore
from tests.api.test_real_server import start_server, stop_server
from tests.factories import make_original, state_dict_of
from tests.store.test_retention import age

W = {"Authorization": "Bearer w1"}
A = {"Authorization": "Bearer a1"}


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", api_tokens="read:r1,write:w1,admin:a1", sandbox=False, **kw)


def _upload(client: TestClient, path: Path, *labels: str) -> httpx.Response:
    with path.open("rb") as fh:
        params = {"labels": ",".join(labels)} if labels else {}
        return client.post("/checkpoints", files={"file": (path.name, fh)}, params=params, headers=W)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Three different real checkpoints."""
    out = {}
    for seed, key in enumerate(("original", "trained_0", "trained_1")):
        out[key] = tmp_path / f"{key}.pth"
        torch.save(state_dict_of(make_original(seed)), out[key])
    return out


def test_labels_given_with_stored_bytes_are_merged(tmp_path: Path, files: dict[str, Path]) -> None:
    with TestClient(create_app(_settings(tmp_path))) as client:
        first = _upload(client, files["original"], "stage=raw", "team=a")
        assert first.status_code == 201 and first.json()["labels_changed"] is None
        again = _upload(client, files["original"], "stage=pretrained", "run=7")
        assert again.status_code == 200
        assert again.json()["labels"] == {"run": "7", "stage": "pretrained", "team": "a"}
        assert again.json()["labels_changed"] == {"added": ["run"], "changed": ["stage"], "removed": []}
        found = client.get("/checkpoints", params={"label": "stage=pretrained"}, headers=W).json()
        assert [i["id"] for i in found["items"]] == [first.json()["id"]]


def test_patch_sets_and_deletes_labels(tmp_path: Path, files: dict[str, Path],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with TestClient(create_app(_settings(tmp_path))) as client:
        artifact_id = _upload(client, files["original"], "old=x", "keep=y").json()["id"]
        client.put("/names/base", json={"id": artifact_id}, headers=W)
        r = client.patch("/checkpoints/base", json={"labels": {"new": "1", "keep": "z", "old": None}}, headers=W)
        assert r.status_code == 200, r.text
        assert r.json()["labels"] == {"keep": "z", "new": "1"}
        assert r.json()["labels_changed"] == {"added": ["new"], "changed": ["keep"], "removed": ["old"]}
        assert client.get(f"/checkpoints/{artifact_id}", headers=W).json()["labels"] == {"keep": "z", "new": "1"}
        # scopes, unknown refs, bad keys and values: problems, and nothing changed
        body = {"labels": {"x": "1"}}
        assert client.patch("/checkpoints/base", json=body).status_code == 401
        assert client.patch("/checkpoints/base", json=body, headers={"Authorization": "Bearer r1"}).status_code == 403
        missing = client.patch("/checkpoints/nope", json=body, headers=W)
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
        bad = client.patch("/checkpoints/base", json={"labels": {"bad key": "1", "ok": "2"}}, headers=W)
        assert bad.status_code == 400 and "'bad key'" in bad.json()["detail"]
        assert client.patch("/checkpoints/base", json={"labels": {"k": "v" * 300}}, headers=W).status_code == 400
        assert client.patch("/checkpoints/base", json={"labels": {"k": 1}}, headers=W).status_code == 422
        assert client.patch("/checkpoints/base", json={"labels": {}, "x": 1}, headers=W).status_code == 422
        assert client.get(f"/checkpoints/{artifact_id}", headers=W).json()["labels"] == {"keep": "z", "new": "1"}
        # the CLI: k=v sets, k- deletes
        assert main(["label", "base", "stage=ft", "new-", "--token", "w1"], http=client) == 0
        out = capsys.readouterr().out
        assert "added: stage" in out and "removed: new" in out
        assert client.get(f"/checkpoints/{artifact_id}", headers=W).json()["labels"] == {"keep": "z", "stage": "ft"}


def test_gc_is_admin_only_dry_run_by_default_and_applies(tmp_path: Path, files: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    settings = _settings(tmp_path, retention_days=1, retention_keep_last=1, retention_label_keys="stage")
    with TestClient(create_app(settings)) as client:
        store: ArtifactStore = client.app.state.services.store  # type: ignore[attr-defined]
        named = _upload(client, files["original"]).json()["id"]
        client.put("/names/keep", json={"id": named}, headers=W)
        old = _upload(client, files["trained_0"]).json()["id"]
        staged = _upload(client, files["trained_1"], "stage=a").json()["id"]
        for artifact_id in (named, old, staged):
            age(store, artifact_id)
        assert client.post("/admin/gc").status_code == 401
        assert client.post("/admin/gc", headers=W).status_code == 403
        dry = client.post("/admin/gc", headers=A)
        assert dry.status_code == 200, dry.text
        assert dry.json()["dry_run"] is True and [i["id"] for i in dry.json()["removed"]] == [old]
        assert dry.json()["bytes"] == files["trained_0"].stat().st_size
        assert client.get(f"/checkpoints/{old}", headers=W).status_code == 200  # nothing changed
        assert main(["gc", "--token", "a1"], http=client) == 0
        assert f"would remove 1 artifacts, {dry.json()['bytes']} bytes" in capsys.readouterr().out
        assert client.get(f"/checkpoints/{old}", headers=W).status_code == 200
        assert main(["gc", "--apply", "--token", "a1", "--json"], http=client) == 0
        applied = json.loads(capsys.readouterr().out)
        assert applied["dry_run"] is False and [i["id"] for i in applied["removed"]] == [old]
        assert client.get(f"/checkpoints/{old}", headers=W).status_code == 404
        assert client.get(f"/checkpoints/{named}", headers=W).status_code == 200
        assert client.get(f"/checkpoints/{staged}", headers=W).status_code == 200
        assert client.post("/admin/gc", json={"dry_run": "maybe"}, headers=A).status_code == 422


def test_gc_off_by_default(tmp_path: Path, files: dict[str, Path]) -> None:
    with TestClient(create_app(_settings(tmp_path))) as client:
        artifact_id = _upload(client, files["original"]).json()["id"]
        age(client.app.state.services.store, artifact_id)  # type: ignore[attr-defined]
        r = client.post("/admin/gc", json={"dry_run": False}, headers=A)
        assert r.json()["enabled"] is False and r.json()["removed"] == []
        assert client.get(f"/checkpoints/{artifact_id}", headers=W).status_code == 200


def test_a_real_server_applies_the_policy_on_its_schedule(tmp_path: Path, files: dict[str, Path],
                                                          database_url: str | None) -> None:
    env = {"CKPT_API_TOKENS": "write:w1,admin:a1", "CKPT_RETENTION_DAYS": "1", "CKPT_GC_INTERVAL_SECONDS": "1",
           "CKPT_SANDBOX": "false"}
    proc, url = start_server(tmp_path / "data", env=env)
    try:
        with httpx.Client(base_url=url, headers=W, timeout=30) as http:
            ids = []
            for key in ("original", "trained_0"):
                with files[key].open("rb") as fh:
                    ids.append(http.post("/checkpoints", files={"file": (key, fh)}).json()["id"])
            http.put("/names/keep", json={"id": ids[0]})
            # age them through a store on the same index (the server's own data directory and database)
            store = ArtifactStore(tmp_path / "data", database_url=database_url)
            for artifact_id in ids:
                age(store, artifact_id)
            store.close()
            deadline = time.monotonic() + 60
            while http.get(f"/checkpoints/{ids[1]}").status_code != 404 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert http.get(f"/checkpoints/{ids[1]}").status_code == 404
            assert http.get(f"/checkpoints/{ids[0]}").status_code == 200
    finally:
        stop_server(proc)


# A real architecture whose factory, once armed, waits: it holds a merge in flight after its inputs are resolved
# and loaded, at the strict verification (which builds the model), so that GC can run meanwhile.
ARMED = threading.Event()
ENTERED = threading.Event()
RELEASE = threading.Event()


def waiting_convnet() -> nn.Module:
    if ARMED.is_set():
        ENTERED.set()
        RELEASE.wait(60)
    return TinyConvNet()


def test_gc_apply_during_a_merge_keeps_its_inputs(tmp_path: Path, recipe_files: dict[str, Path]) -> None:
    cfg = tmp_path / "ckpt.toml"
    cfg.write_text(f'[architectures.waiting]\nfactory = "{__name__}:waiting_convnet"\n')
    settings = _settings(tmp_path, retention_days=1, config=cfg)
    ARMED.clear(), ENTERED.clear(), RELEASE.clear()
    with TestClient(create_app(settings)) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        original = _upload(client, recipe_files["original"]).json()["id"]
        trained = _upload(client, recipe_files["trained"]).json()["id"]
        for artifact_id in (original, trained):
            age(services.store, artifact_id)
        result: dict[str, object] = {}

        def merge() -> None:
            try:
                result["merged"] = services.operations.merge(
                    original=Source(artifact_id=original), trained=Source(artifact_id=trained),
                    options=MergeOptions(architecture="waiting"))
            except Exception as exc:  # reported by the assertion below
                result["error"] = exc

        ARMED.set()
        worker = threading.Thread(target=merge)
        worker.start()
        try:
            assert ENTERED.wait(60), result
            gc = client.post("/admin/gc", json={"dry_run": False}, headers=A)
        finally:
            RELEASE.set()
            worker.join(60)
        assert gc.status_code == 200 and gc.json()["removed"] == [], gc.text
        assert "error" not in result, result
        merged = result["merged"]
        assert client.get(f"/checkpoints/{merged.artifact.id}", headers=W).status_code == 200  # type: ignore[attr-defined]
        for artifact_id in (original, trained):
            assert client.get(f"/checkpoints/{artifact_id}", headers=W).status_code == 200
        # without the merge in flight the same inputs would go, had the result not kept them as its lineage
        client.delete(f"/checkpoints/{merged.artifact.id}", headers=W)  # type: ignore[attr-defined]
        gone = client.post("/admin/gc", json={"dry_run": False}, headers=A).json()["removed"]
        assert {i["id"] for i in gone} == {original, trained}


def test_a_merge_whose_result_exists_merges_its_labels(tmp_path: Path, recipe_files: dict[str, Path]) -> None:
    with TestClient(create_app(_settings(tmp_path))) as client:
        original = _upload(client, recipe_files["original"]).json()["id"]

        def merge(labels: str) -> httpx.Response:
            with recipe_files["trained"].open("rb") as fh:
                return client.post("/merge", data={"architecture": "tiny-convnet", "original": original,
                                                   "labels": labels},
                                   files={"trained_file": ("trained.pth", fh)}, headers=W)

        first = merge("stage=candidate")
        assert first.status_code == 201, first.text
        assert first.json()["artifact"]["labels_changed"] is None
        again = merge("stage=release,run=2")
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert again.json()["artifact"]["labels"] == {"run": "2", "stage": "release"}
        assert again.json()["artifact"]["labels_changed"] == {"added": ["run"], "changed": ["stage"], "removed": []}
