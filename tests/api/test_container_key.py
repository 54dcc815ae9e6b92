"""container_key as a request option: which state_dict of a training checkpoint upload, strip, diff, merge use."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from tests.factories import make_original


@pytest.fixture
def training_ckpt(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A training checkpoint with the live weights, an EMA copy one level down, and training state."""
    live = make_original().state_dict()
    torch.manual_seed(1)
    ema = {k: (v + torch.randn_like(v) * 0.01 if v.is_floating_point() else v.clone()) for k, v in live.items()}
    path = tmp_path / "last.pth"
    torch.save({"epoch": 3, "state_dict": live, "model": {"ema": ema}, "args": argparse.Namespace(lr=0.1)}, path)
    return path, live, ema


def _upload(client: TestClient, path: Path, **data: str):  # type: ignore[no-untyped-def]
    with path.open("rb") as fh:
        return client.post("/checkpoints", files={"file": (path.name, fh)}, data=data)


def _load(client: TestClient, artifact_id: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{artifact_id}.pth"
    out.write_bytes(client.get(f"/checkpoints/{artifact_id}/file").content)
    return torch.load(out, weights_only=True)  # type: ignore[no-any-return]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_upload_lists_the_candidates(client: TestClient, training_ckpt: tuple[Path, dict, dict]) -> None:
    path, live, _ = training_ckpt

    body = _upload(client, path).json()

    assert body["container_key"] == "state_dict"
    assert body["candidates"] == {"state_dict": len(live), "model.ema": len(live)}
    assert body["extras"]["args"] == "argparse.Namespace"


def test_upload_with_another_container_key_stores_the_upload_and_a_derived_artifact(
    client: TestClient, training_ckpt: tuple[Path, dict, dict], tmp_path: Path
) -> None:
    path, _, ema = training_ckpt

    r = _upload(client, path, container_key="model.ema")

    assert r.status_code == 201, r.text
    derived = r.json()
    lineage = derived["lineage"]
    assert lineage["operation"] == "extract" and lineage["params"] == {"container_key": "model.ema"}
    raw = client.get(f"/checkpoints/{lineage['inputs']['checkpoint']}").json()
    assert raw["size"] == path.stat().st_size and raw["container_key"] == "model.ema"
    assert client.get("/checkpoints").json()["total"] == 2
    assert derived["container_key"] is None and derived["key_count"] == len(ema)
    assert _same(_load(client, derived["id"], tmp_path), ema)


def test_upload_with_the_default_key_answers_with_the_upload(
    client: TestClient, training_ckpt: tuple[Path, dict, dict]
) -> None:
    path, _, _ = training_ckpt

    body = _upload(client, path, container_key="state_dict").json()

    assert body["lineage"] is None and body["size"] == path.stat().st_size
    assert client.get("/checkpoints").json()["total"] == 1


def test_strip_diff_and_merge_take_a_container_key(
    client: TestClient, training_ckpt: tuple[Path, dict, dict], tmp_path: Path
) -> None:
    path, live, ema = training_ckpt
    raw = _upload(client, path).json()["id"]

    stripped = client.post("/strip", json={"checkpoint": raw, "container_key": "model.ema"})
    assert stripped.status_code == 201, stripped.text
    assert stripped.json()["artifact"]["lineage"]["params"]["container_key"] == "model.ema"
    assert _same(_load(client, stripped.json()["id"], tmp_path), ema)

    same = client.get("/diff", params={"a": raw, "b": raw}).json()
    assert same["summary"]["changed"] == 0
    other = client.get("/diff", params={"a": raw, "b": raw, "b_container_key": "model.ema"}).json()
    floats = sum(v.is_floating_point() for v in live.values())
    assert other["summary"]["changed"] == floats
    with path.open("rb") as fa:
        posted = client.post("/diff", files={"a": ("a.pth", fa)}, data={"b": raw, "a_container_key": "model.ema"})
    assert posted.status_code == 200, posted.text
    assert posted.json()["summary"]["changed"] == floats

    with path.open("rb") as fh:
        merged = client.post(
            "/merge",
            data={"architecture": "tiny-convnet", "original": raw, "trained_container_key": "model.ema"},
            files={"trained_file": ("trained.pth", fh)},
        )
    assert merged.status_code == 201, merged.text
    assert merged.json()["artifact"]["lineage"]["params"]["container_keys"] == {"trained": "model.ema"}
    assert _same(_load(client, merged.json()["id"], tmp_path), ema)


def test_an_absent_container_key_names_the_keys(client: TestClient, training_ckpt: tuple[Path, dict, dict]) -> None:
    path, _, _ = training_ckpt

    r = _upload(client, path, container_key="model.nope")

    assert r.status_code == 422
    assert "'ema'" in r.json()["detail"]
    assert client.get("/checkpoints").json()["total"] == 0
