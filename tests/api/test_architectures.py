"""The architecture registry over HTTP: list, show, register code-free specs, delete."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings


def test_builtins_listed_with_fingerprints(client: TestClient) -> None:
    body = client.get("/architectures").json()
    names = {a["name"]: a for a in body["items"]}
    assert {"tiny-convnet", "mlp-bn"} <= set(names)
    tiny = names["tiny-convnet"]
    assert tiny["source"] == "builtin" and tiny["key_count"] == 14 and len(tiny["schema_fingerprint"]) == 64
    full = client.get("/architectures/tiny-convnet").json()
    assert full["keys"]["head.weight"] == {"shape": [10, 16], "dtype": "float32"}
    assert full["keys"]["features.1.num_batches_tracked"]["dtype"] == "int64"
    assert client.get("/architectures/nope").status_code == 404


def test_register_spec_from_checkpoint_and_merge_against_it(
    client: TestClient, recipe_files: dict[str, Path]
) -> None:
    with recipe_files["original"].open("rb") as fh:
        orig = client.post("/checkpoints", files={"file": ("o.pth", fh)}).json()["id"]
    r = client.post("/architectures", json={"name": "from-orig", "from_checkpoint": orig})
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "spec" and r.json()["key_count"] == 14
    assert (
        client.post("/architectures", json={"name": "from-orig", "from_checkpoint": orig}).status_code == 409
    )
    with recipe_files["trained"].open("rb") as fh:
        m = client.post(
            "/merge",
            data={"architecture": "from-orig", "original": orig},
            files={"trained_file": ("t.pth", fh)},
        )
    assert m.status_code == 201, m.text
    assert client.delete("/architectures/from-orig").status_code == 204
    assert client.get("/architectures/from-orig").status_code == 404
    assert client.delete("/architectures/tiny-convnet").status_code == 409


def test_register_explicit_keys_and_invalid_specs(client: TestClient) -> None:
    spec = {
        "name": "two-keys",
        "keys": {"w": {"shape": [2, 3], "dtype": "float32"}, "b": {"shape": [2], "dtype": "float32"}},
    }
    r = client.post("/architectures", json=spec)
    assert r.status_code == 201 and r.json()["keys"]["w"]["shape"] == [2, 3]
    assert client.post("/architectures", json={"name": "bad name!", "keys": {}}).status_code == 422
    assert client.post("/architectures", json={"name": "neither"}).status_code == 422


def test_specs_persist_across_apps(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d")
    spec = {"name": "persisted", "keys": {"w": {"shape": [1], "dtype": "float32"}}}
    with TestClient(create_app(settings)) as c1:
        assert c1.post("/architectures", json=spec).status_code == 201
    with TestClient(create_app(settings)) as c2:
        assert c2.get("/architectures/persisted").json()["source"] == "spec"


def test_config_file_factories_and_broken_ones(tmp_path: Path) -> None:
    cfg = tmp_path / "ckpt.toml"
    cfg.write_text(
        '[architectures.wide-mlp]\nfactory = "service.registry.builtins:mlp_bn"\nkwargs = { dim = 64, depth = 2 }\n'
        '[architectures.broken]\nfactory = "no_such_module:build"\n'
    )
    with TestClient(create_app(Settings(data_dir=tmp_path / "d", config=cfg))) as c:
        body = c.get("/architectures").json()
        names = {a["name"]: a for a in body["items"]}
        assert names["wide-mlp"]["source"] == "config"
        assert c.get("/architectures/wide-mlp").json()["keys"]["blocks.0.0.weight"]["shape"] == [64, 64]
        assert "broken" not in names
        assert any(i["name"] == "broken" for i in body["issues"])
