"""Upload, read, download, list, delete and names, through the real app in-process."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
from fastapi.testclient import TestClient

from service.api.problems import PROBLEM_MEDIA_TYPE


def _upload(client: TestClient, path: Path, **data: str) -> dict:  # type: ignore[type-arg]
    with path.open("rb") as fh:
        r = client.post("/checkpoints", files={"file": (path.name, fh)}, data=data)
    assert r.status_code in (200, 201), r.text
    return r.json()  # type: ignore[no-any-return]


def test_upload_multipart_then_again_is_200(client: TestClient, recipe_files: dict[str, Path]) -> None:
    path = recipe_files["original"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with path.open("rb") as fh:
        r = client.post("/checkpoints", files={"file": ("orig.pth", fh)}, data={"labels": "team=vision"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] == digest
    assert body["filename"] == "orig.pth"
    assert body["format"] == "pth-zip"
    assert body["labels"] == {"team": "vision"}
    assert body["key_count"] == len(torch.load(path, weights_only=True))
    assert r.headers["location"].endswith(f"/checkpoints/{digest}")
    with path.open("rb") as fh:
        again = client.post("/checkpoints", files={"file": ("other-name.pth", fh)})
    assert again.status_code == 200
    assert again.json()["id"] == digest


def test_upload_raw_body_with_query_options(client: TestClient, recipe_files: dict[str, Path]) -> None:
    data = recipe_files["trained"].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    r = client.post(
        f"/checkpoints?name=trained-run&sha256={digest}&filename=t.pth",
        content=data,
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["names"] == ["trained-run"]
    assert client.get("/checkpoints/trained-run").json()["id"] == digest


def test_digest_mismatch_stores_nothing(client: TestClient, recipe_files: dict[str, Path]) -> None:
    with recipe_files["original"].open("rb") as fh:
        r = client.post("/checkpoints", files={"file": ("o.pth", fh)}, data={"sha256": "0" * 64})
    assert r.status_code == 400
    assert r.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert r.json()["title"] == "Digest mismatch"
    assert client.get("/checkpoints").json()["total"] == 0


def test_head_get_manifest_and_404(client: TestClient, recipe_files: dict[str, Path]) -> None:
    meta = _upload(client, recipe_files["original"])
    assert client.head(f"/checkpoints/{meta['id']}").status_code == 200
    missing = "f" * 64
    assert client.head(f"/checkpoints/{missing}").status_code == 404
    r = client.get(f"/checkpoints/{missing}")
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert missing in r.json()["detail"]
    manifest = client.get(f"/checkpoints/{meta['id']}/manifest").json()
    sd = torch.load(recipe_files["original"], weights_only=True)
    assert set(manifest["entries"]) == set(sd)
    assert manifest["entries"]["head.weight"]["shape"] == list(sd["head.weight"].shape)


def test_download_etag_and_range(client: TestClient, recipe_files: dict[str, Path]) -> None:
    data = recipe_files["original"].read_bytes()
    meta = _upload(client, recipe_files["original"])
    r = client.get(meta["download_url"])
    assert r.status_code == 200 and r.content == data
    etag = r.headers["etag"]
    assert etag == f'"{meta["id"]}"'
    assert client.get(meta["download_url"], headers={"If-None-Match": etag}).status_code == 304
    part = client.get(meta["download_url"], headers={"Range": "bytes=10-99"})
    assert part.status_code == 206
    assert part.content == data[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(data)}"


def test_download_as_safetensors_converts(
    client: TestClient, recipe_files: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    meta = _upload(client, recipe_files["original"])
    r = client.get(f"/checkpoints/{meta['id']}/file", params={"format": "safetensors"})
    assert r.status_code == 200
    out = tmp_path / "x.safetensors"
    out.write_bytes(r.content)
    loaded = load_file(out)
    sd = torch.load(recipe_files["original"], weights_only=True)
    assert set(loaded) == set(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert r.headers["x-checkpoint-id"] == hashlib.sha256(r.content).hexdigest()


def test_list_filters_and_delete_with_names(client: TestClient, recipe_files: dict[str, Path]) -> None:
    a = _upload(client, recipe_files["original"], labels='{"kind": "original"}')
    b = _upload(client, recipe_files["trained"], labels="kind=trained")
    listing = client.get("/checkpoints").json()
    assert listing["total"] == 2 and {i["id"] for i in listing["items"]} == {a["id"], b["id"]}
    only = client.get("/checkpoints", params={"label": "kind=trained"}).json()
    assert [i["id"] for i in only["items"]] == [b["id"]]
    page = client.get("/checkpoints", params={"limit": 1}).json()
    assert len(page["items"]) == 1 and page["next_cursor"]
    rest = client.get("/checkpoints", params={"limit": 1, "cursor": page["next_cursor"]}).json()
    assert {page["items"][0]["id"], rest["items"][0]["id"]} == {a["id"], b["id"]}

    assert client.put("/names/resnet-orig", json={"id": a["id"]}).status_code == 200
    assert client.get("/names").json() == [{"name": "resnet-orig", "id": a["id"]}]
    refused = client.delete(f"/checkpoints/{a['id']}")
    assert refused.status_code == 409 and refused.json()["names"] == ["resnet-orig"]
    assert client.delete("/names/resnet-orig").status_code == 200
    assert client.get("/names/resnet-orig").status_code in (404, 405)
    assert client.delete(f"/checkpoints/{a['id']}").status_code == 200
    assert client.head(f"/checkpoints/{a['id']}").status_code == 404
    assert client.get("/checkpoints").json()["total"] == 1


def test_name_moves_atomically(client: TestClient, recipe_files: dict[str, Path]) -> None:
    a = _upload(client, recipe_files["original"])
    b = _upload(client, recipe_files["trained"])
    client.put("/names/current", json={"id": a["id"]})
    client.put("/names/current", json={"id": b["id"]})
    assert client.get("/checkpoints/current").json()["id"] == b["id"]
    assert client.put("/names/x", json={"id": "f" * 64}).status_code == 404


def test_invalid_refs_are_refused(client: TestClient) -> None:
    for ref in ("..%2F..%2Fetc", "ABCDEF" * 11, "a" * 65):
        r = client.get(f"/checkpoints/{ref}")
        assert r.status_code in (400, 404), ref
        assert r.headers["content-type"] == PROBLEM_MEDIA_TYPE


def test_hostile_upload_is_422_and_stores_nothing(client: TestClient, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            import os

            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "evil": Evil()}, buf)
    r = client.post("/checkpoints", files={"file": ("x.pth", buf.getvalue())})
    assert r.status_code == 422
    body = r.json()
    assert body["title"] == "Unsafe checkpoint"
    assert any("system" in g for g in body["unsafe_globals"])
    assert not marker.exists()
    assert client.get("/checkpoints").json()["total"] == 0
    tmp = Path(client.app.state.services.store.root)  # type: ignore[attr-defined]
    leftovers = [p for p in tmp.rglob("*") if p.is_file() and "tmp" in p.parent.name]
    assert leftovers == []


def test_upload_over_limit_is_413(tmp_path: Path, recipe_files: dict[str, Path]) -> None:
    from service.api.app import create_app
    from service.config import Settings

    app = create_app(Settings(data_dir=tmp_path / "d", max_upload_bytes=1000))
    with TestClient(app) as c:
        r = c.post(
            "/checkpoints",
            content=recipe_files["original"].read_bytes(),
            headers={"content-type": "application/octet-stream"},
        )
        assert r.status_code == 413
        assert r.json()["limit"] == 1000

        # Without Content-Length: enforced while streaming.
        def gen():  # type: ignore[no-untyped-def]
            yield recipe_files["original"].read_bytes()

        r = c.post("/checkpoints", content=gen(), headers={"content-type": "application/octet-stream"})
        assert r.status_code == 413
        assert c.get("/checkpoints").json()["total"] == 0


def test_a_download_by_id_is_immutable_and_by_name_is_revalidated(
    client: TestClient, recipe_files: dict[str, Path]
) -> None:
    first = _upload(client, recipe_files["original"], name="current")
    by_id = client.get(first["download_url"])
    assert "immutable" in by_id.headers["cache-control"]
    by_name = client.get("/checkpoints/current/file")
    assert by_name.headers["cache-control"] == "no-cache"
    etag = by_name.headers["etag"]
    assert client.get("/checkpoints/current/file", headers={"If-None-Match": etag}).status_code == 304

    # The name moves: the same validator no longer matches, and the new bytes come back.
    second = _upload(client, recipe_files["trained"], name="current")
    moved = client.get("/checkpoints/current/file", headers={"If-None-Match": etag})
    assert moved.status_code == 200
    assert moved.headers["cache-control"] == "no-cache"
    assert moved.headers["etag"] == f'"{second["id"]}"'
    assert hashlib.sha256(moved.content).hexdigest() == second["id"]
