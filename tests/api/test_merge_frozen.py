"""POST /merge: the frozen check only where the caller names the frozen part; per-module change figures always."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient


def _upload(client: TestClient, path: Path) -> str:
    with path.open("rb") as fh:
        r = client.post("/checkpoints", files={"file": (path.name, fh)})
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def _trained_bytes(recipe_files: dict[str, Path], edit: dict[str, torch.Tensor] | None = None) -> bytes:
    sd = dict(torch.load(recipe_files["trained"], weights_only=True))
    sd.update(edit or {})
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def _merge(client: TestClient, original: str, trained: bytes, **fields: str):  # type: ignore[no-untyped-def]
    return client.post(
        "/merge",
        data={"architecture": "tiny-convnet", "original": original, **fields},
        files={"trained_file": ("trained.pth", trained)},
    )


def test_without_frozen_prefixes_there_is_no_frozen_check_only_the_change_rollup(
    client: TestClient, recipe_files: dict[str, Path]
) -> None:
    orig = _upload(client, recipe_files["original"])
    r = _merge(client, orig, _trained_bytes(recipe_files))
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    assert report["frozen"] is None
    assert not any("frozen" in w for w in report["warnings"])
    modules = report["changes"]["modules"]
    original = torch.load(recipe_files["original"], weights_only=True)
    trained = torch.load(recipe_files["trained"], weights_only=True)
    assert modules["head"]["changed_keys"] == 2 and modules["head"]["keys"] == 2
    assert modules["features"]["changed_keys"] == 0 and modules["features"]["rel_change"] == 0.0
    head = ("head.weight", "head.bias")
    diff = torch.cat([(trained[f"module.{k}"] - original[k]).reshape(-1).double() for k in head])
    base = torch.cat([original[k].reshape(-1).double() for k in head])
    assert abs(modules["head"]["rel_change"] - float(diff.norm() / base.norm())) < 1e-9
    assert abs(modules["head"]["max_abs"] - float(diff.abs().max())) < 1e-9


def test_changed_frozen_tensor_is_a_warning_with_its_max_abs_and_relative_change(
    client: TestClient, recipe_files: dict[str, Path]
) -> None:
    orig = _upload(client, recipe_files["original"])
    original = torch.load(recipe_files["original"], weights_only=True)
    moved = original["features.0.weight"].clone()
    moved[0, 0, 0, 0] += 0.25
    r = _merge(client, orig, _trained_bytes(recipe_files, {"module.features.0.weight": moved}),
               frozen_prefixes="features.")
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    frozen = report["frozen"]
    assert frozen["changed"] == ["features.0.weight"] and frozen["ok"] is False
    assert abs(frozen["max_abs"]["features.0.weight"] - 0.25) < 1e-6
    rel = float(0.25 / original["features.0.weight"].double().norm())
    assert abs(frozen["rel_change"]["features.0.weight"] - rel) < 1e-6
    warning = next(w for w in report["warnings"] if "frozen" in w)
    assert "'features.0.weight' (max abs 0.25, relative " in warning
    assert "head" not in warning  # the trained head is not part of the frozen part


def test_require_frozen_makes_a_changed_frozen_tensor_a_422_that_stores_nothing(
    client: TestClient, recipe_files: dict[str, Path]
) -> None:
    orig = _upload(client, recipe_files["original"])
    before = client.get("/checkpoints").json()["total"]
    original = torch.load(recipe_files["original"], weights_only=True)
    moved = original["features.1.bias"] + 1.0
    trained = _trained_bytes(recipe_files, {"module.features.1.bias": moved})
    r = _merge(client, orig, trained, frozen_prefixes="features.", require_frozen="true")
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["title"] == "Frozen part changed"
    assert problem["changed_keys"] == ["features.1.bias"]
    assert "'features.1.bias' (max abs 1," in problem["detail"]
    assert client.get("/checkpoints").json()["total"] == before
    # An unchanged frozen part passes.
    ok = _merge(client, orig, _trained_bytes(recipe_files), frozen_prefixes="features.", require_frozen="true")
    assert ok.status_code == 201, ok.text
    assert ok.json()["report"]["frozen"]["ok"] is True
    # require_frozen names nothing to check without frozen_prefixes.
    bad = _merge(client, orig, trained, require_frozen="true")
    assert bad.status_code == 400 and "frozen_prefixes" in bad.json()["detail"]


def test_frozen_atol_accepts_a_bfloat16_round_trip(client: TestClient, recipe_files: dict[str, Path]) -> None:
    orig = _upload(client, recipe_files["original"])
    original = torch.load(recipe_files["original"], weights_only=True)
    rounded = original["features.0.weight"].to(torch.bfloat16).to(torch.float32)
    assert not torch.equal(rounded, original["features.0.weight"])
    trained = _trained_bytes(recipe_files, {"module.features.0.weight": rounded})
    strict = _merge(client, orig, trained, frozen_prefixes="features.", require_frozen="true")
    assert strict.status_code == 422
    loose = _merge(client, orig, trained, frozen_prefixes="features.", require_frozen="true", frozen_atol="0.02")
    assert loose.status_code == 201, loose.text
    frozen = loose.json()["report"]["frozen"]
    assert frozen["ok"] is True and frozen["changed"] == [] and frozen["within_atol"] == ["features.0.weight"]
    assert _merge(client, orig, trained, frozen_prefixes="features.", frozen_atol="-1").status_code == 400


def test_unchanged_norms_are_remembered_across_merges_of_one_original(
    app: FastAPI, client: TestClient, recipe_files: dict[str, Path]
) -> None:
    orig = _upload(client, recipe_files["original"])
    first = _merge(client, orig, _trained_bytes(recipe_files))
    entry = app.state.services.store.manifest(orig).entries["features.0.weight"]
    original = torch.load(recipe_files["original"], weights_only=True)
    remembered = app.state.services.operations.caches.sq_norms.get((entry.fingerprint, entry.dtype, tuple(entry.shape)))
    assert remembered == pytest.approx(float(original["features.0.weight"].double().pow(2).sum()), rel=1e-12)
    again = _merge(client, orig, _trained_bytes(recipe_files, {"module.head.bias": torch.zeros(10)}))
    assert again.status_code == 201
    # The backbone's figures are the same whether computed or remembered.
    assert again.json()["report"]["changes"]["modules"]["features"] == first.json()["report"]["changes"]["modules"][
        "features"
    ]
