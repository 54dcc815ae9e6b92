"""Every limit setting reaches every operation: built once into the app's `Operations`, never a library default.

Artifacts are stored by an app with the default limits; a second app over the same directory, with one limit
setting made small, must then refuse every operation that opens a checkpoint: upload, strip, convert, merge
(stored refs and an uploaded file), and value diffs (stored refs and uploaded files). Before `Operations`, the
routes and `ArtifactStore.load` fell back to the library's `ArchiveLimits()` and let all but the upload through.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings

SMALL = {
    "max_keys": 1,
    "archive_max_total_bytes": 64,
    "archive_max_name_length": 5,
}


@pytest.fixture
def stored(tmp_path: Path, recipe_files: dict[str, Path]) -> dict[str, str]:
    """The recipe's two files, stored (and named) by an app with the default limits."""
    app = create_app(Settings(data_dir=tmp_path / "data", sandbox=False))
    ids: dict[str, str] = {}
    with TestClient(app) as c:
        for role, path in recipe_files.items():
            with path.open("rb") as fh:
                r = c.post("/checkpoints", files={"file": (path.name, fh)})
            assert r.status_code == 201, r.text
            ids[role] = r.json()["id"]
    return ids


@pytest.fixture(params=sorted(SMALL))
def strict(request: pytest.FixtureRequest, tmp_path: Path, stored: dict[str, str]) -> Iterator[TestClient]:
    """An app over the same directory with one limit setting made small."""
    setting: str = request.param
    settings = Settings(data_dir=tmp_path / "data", sandbox=False, **{setting: SMALL[setting]})
    with TestClient(create_app(settings)) as c:
        yield c


def fresh_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(6.0), "b": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def assert_limit(r: httpx.Response, what: str) -> None:
    assert r.status_code == 422, f"{what}: {r.status_code} {r.text}"
    body = r.json()
    assert body["type"] == "urn:ckpt:problem:archive-limit-exceeded", f"{what}: {body}"


def test_each_limit_setting_is_enforced_by_every_operation(
    strict: TestClient, stored: dict[str, str], recipe_files: dict[str, Path]
) -> None:
    original, trained = stored["original"], stored["trained"]
    trained_bytes = recipe_files["trained"].read_bytes()

    assert_limit(strict.post("/checkpoints", files={"file": ("new.pth", fresh_checkpoint())}), "upload")
    assert_limit(strict.post("/checkpoints", content=fresh_checkpoint(),
                             headers={"content-type": "application/octet-stream"}), "raw upload")
    assert_limit(strict.post("/strip", json={"checkpoint": trained}), "strip")
    assert_limit(strict.get(f"/checkpoints/{original}/file", params={"format": "safetensors"}), "convert")
    assert_limit(strict.post("/merge", data={"architecture": "tiny-convnet", "original": original,
                                             "trained": trained}), "merge of stored refs")
    assert_limit(strict.post("/merge", data={"architecture": "tiny-convnet", "original": original},
                             files={"trained_file": ("t.pth", trained_bytes)}), "merge of an upload")
    assert_limit(strict.get("/diff", params={"a": original, "b": trained, "values": "true"}), "value diff")
    assert_limit(strict.post("/diff", params={"values": "true"},
                             files={"a": ("a.pth", fresh_checkpoint()), "b": ("b.pth", trained_bytes)}),
                 "diff of uploads")
    # Nothing new was stored by any of them.
    assert strict.get("/checkpoints").json()["total"] == 2


def test_the_same_operations_pass_with_the_default_limits(tmp_path: Path, stored: dict[str, str]) -> None:
    # The control: what the strict app refuses is not refused for another reason.
    with TestClient(create_app(Settings(data_dir=tmp_path / "data", sandbox=False))) as c:
        original, trained = stored["original"], stored["trained"]
        assert c.post("/strip", json={"checkpoint": trained}).status_code == 201
        assert c.get(f"/checkpoints/{original}/file", params={"format": "safetensors"}).status_code == 200
        merged = c.post("/merge", data={"architecture": "tiny-convnet", "original": original, "trained": trained})
        assert merged.status_code == 201, merged.text
        assert c.get("/diff", params={"a": original, "b": trained, "values": "true"}).status_code == 200


def test_max_upload_bytes_is_enforced_by_every_upload(tmp_path: Path, stored: dict[str, str]) -> None:
    data = fresh_checkpoint()
    settings = Settings(data_dir=tmp_path / "data", sandbox=False, max_upload_bytes=len(data) - 1)
    with TestClient(create_app(settings)) as c:
        original = stored["original"]
        for what, r in {
            "upload": c.post("/checkpoints", files={"file": ("n.pth", data)}),
            "raw upload": c.post("/checkpoints", content=data, headers={"content-type": "application/octet-stream"}),
            "merge": c.post("/merge", data={"architecture": "tiny-convnet", "original": original},
                            files={"trained_file": ("t.pth", data)}),
            "diff": c.post("/diff", data={"b": original}, files={"a": ("a.pth", data)}),
        }.items():
            assert r.status_code == 413, f"{what}: {r.status_code} {r.text}"
