"""GET /diff?values=true: per-module change figures, the same definition the merge report uses, cached per pair."""

from __future__ import annotations

from pathlib import Path

import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.operations import Source, diff_checkpoints


def _upload(client: TestClient, path: Path) -> str:
    with path.open("rb") as fh:
        r = client.post("/checkpoints", files={"file": (path.name, fh)})
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


def test_values_diff_has_per_module_changes_equal_to_the_merge_rollup(
    client: TestClient, recipe_files: dict[str, Path]
) -> None:
    a = _upload(client, recipe_files["original"])
    with recipe_files["trained"].open("rb") as fh:
        merged = client.post("/merge", data={"architecture": "tiny-convnet", "original": a},
                             files={"trained_file": ("trained.pth", fh)})
    assert merged.status_code == 201, merged.text
    b = merged.json()["id"]
    d = client.get("/diff", params={"a": a, "b": b, "values": True})
    assert d.status_code == 200, d.text
    body = d.json()
    modules = body["changes"]["modules"]
    assert modules["head"]["changed_keys"] == 2 and modules["features.0"]["changed_keys"] == 0
    assert body["values"]["head.weight"]["changed"] == modules["head.weight".rpartition(".")[0]]["changed"] - (
        body["values"]["head.bias"]["changed"]
    )
    # The merge's rollup (trained vs original) and the diff's (result vs original) are the same figures; the
    # merge's leaves out the BatchNorm stats the trained file lacked, which the diff sees as unchanged.
    rollup = merged.json()["report"]["changes"]["modules"]
    assert modules["head"] == rollup["head"]
    assert rollup["features"]["numel"] == modules["features"]["numel"] - 2 * (8 + 16) - 2  # mean, var, count
    for field in ("changed", "changed_keys"):
        assert modules[""][field] == rollup[""][field]
    assert body["changes"]["rel_change"] == modules[""]["rel_change"]
    only_head = client.get("/diff", params={"a": a, "b": b, "values": True, "key_prefix": "head."}).json()
    assert set(only_head["changes"]["modules"]) == {"", "head"}


def test_value_figures_are_computed_once_per_pair(
    app: FastAPI, client: TestClient, recipe_files: dict[str, Path], tmp_path: Path
) -> None:
    a = _upload(client, recipe_files["original"])
    sd = torch.load(recipe_files["original"], weights_only=True)
    sd["head.bias"] = sd["head.bias"] + 1
    torch.save(sd, tmp_path / "b.pth")
    b = _upload(client, tmp_path / "b.pth")
    store = app.state.services.store
    caches = app.state.services.operations.caches  # the caches belong to the service's Operations
    first = diff_checkpoints(store, Source(artifact_id=a), Source(artifact_id=b), values=True, caches=caches)
    second = diff_checkpoints(store, Source(artifact_id=a), Source(artifact_id=b), values=True, frozen=["head."],
                              caches=caches)
    assert first.changes is not None and second.changes is first.changes  # the cached object, not a recomputation
    assert second.frozen is not None and second.frozen["changed"] == ["head.bias"]
    assert abs(second.frozen["max_abs"]["head.bias"] - 1.0) < 1e-6
    other = diff_checkpoints(store, Source(artifact_id=b), Source(artifact_id=a), values=True, caches=caches)
    assert other.changes is not first.changes  # (a, b) and (b, a) differ: rel change is relative to a
