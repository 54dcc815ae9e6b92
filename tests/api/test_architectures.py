"""The architecture registry over HTTP: list, show, register code-free specs, delete."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.factories import TinyConvNet


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


def test_matches_ranks_the_architectures_by_fit_after_prefix_alignment(
    client: TestClient, recipe_files: dict[str, Path]
) -> None:
    plain = client.get("/architectures").json()
    assert set(plain) == {"items", "issues"}  # unchanged without ?matches

    narrow = {k: {"shape": list(v.shape), "dtype": "float32" if v.is_floating_point() else "int64"}
              for k, v in TinyConvNet(num_classes=5).state_dict().items()}
    assert client.post("/architectures", json={"name": "tiny-5-classes", "keys": narrow}).status_code == 201
    with recipe_files["trained"].open("rb") as fh:  # DataParallel "module.*", no BatchNorm running stats
        trained = client.post("/checkpoints", files={"file": ("t.pth", fh)}).json()["id"]

    body = client.get("/architectures", params={"matches": trained[:12]}).json()
    assert [a["name"] for a in body["items"]] == sorted([a["name"] for a in plain["items"]] + ["tiny-5-classes"])
    matches = body["matches"]
    assert matches["checkpoint"] == trained and matches["key_count"] == 8
    ranking = {m["name"]: m for m in matches["ranking"]}
    assert [m["name"] for m in matches["ranking"]][:2] == ["tiny-convnet", "tiny-5-classes"]
    assert [m["name"] for m in matches["ranking"]][-1] == "mlp-bn"
    best = ranking["tiny-convnet"]
    assert (best["matched"], best["missing"], best["unexpected"], best["shape_mismatches"]) == (8, 6, 0, 0)
    assert best["transform"]["strip_wrappers"] is True and best["score"] == 8 / 14
    narrow_fit = ranking["tiny-5-classes"]
    assert narrow_fit["matched"] == 8 and narrow_fit["shape_mismatches"] == 2  # head.weight, head.bias
    assert narrow_fit["score"] == 6 / 14
    assert ranking["mlp-bn"]["score"] < narrow_fit["score"]

    # a Lightning-style container attribute is aligned the same way
    held = torch.nn.Module()
    held.net = TinyConvNet()
    buf = io.BytesIO()
    torch.save(held.state_dict(), buf)
    net = client.post("/checkpoints", files={"file": ("net.pth", buf.getvalue())}).json()["id"]
    top = client.get("/architectures", params={"matches": net}).json()["matches"]["ranking"][0]
    assert top["name"] == "tiny-convnet" and top["score"] == 1.0 and top["transform"]["strip_lead"] == "net."

    assert client.get("/architectures", params={"matches": "f" * 64}).status_code == 404
    assert client.get("/architectures", params={"matches": "not a ref!"}).status_code == 400
