"""POST /admin/fsck: admin scope only; `ckpt fsck` prints its report."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.client.cli import main
from service.config import Settings


@pytest.mark.blobs("local")  # it damages a blob file of the local layout
def test_fsck_needs_an_admin_token_and_reports(tmp_path: Path, recipe_files: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_tokens="read:r1,write:w1,admin:a1", sandbox=False)
    with TestClient(create_app(settings)) as client:
        with recipe_files["original"].open("rb") as fh:
            r = client.post("/checkpoints", files={"file": ("o.pth", fh)}, headers={"Authorization": "Bearer w1"})
        artifact_id = r.json()["id"]
        assert client.post("/admin/fsck").status_code == 401
        assert client.post("/admin/fsck", headers={"Authorization": "Bearer w1"}).status_code == 403
        ok = client.post("/admin/fsck", params={"deep": "true"}, headers={"Authorization": "Bearer a1"})
        assert ok.status_code == 200 and ok.json()["ok"] is True and ok.json()["checked"] == 1

        os.unlink(client.app.state.services.store.blob_path(artifact_id))  # type: ignore[attr-defined]
        assert main(["fsck", "--token", "a1"], http=client) == 1
        out = capsys.readouterr().out
        assert "PROBLEMS FOUND" in out and f"blob missing: {artifact_id}" in out
        assert main(["fsck", "--token", "a1", "--repair"], http=client) == 1  # it reports what it found...
        assert f"repaired: unpublished {artifact_id}" in capsys.readouterr().out
        assert main(["fsck", "--token", "a1", "--json"], http=client) == 0  # ...and then all is well
        assert client.get(f"/checkpoints/{artifact_id}", headers={"Authorization": "Bearer r1"}).status_code == 404
