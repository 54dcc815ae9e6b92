"""Downloads from the S3 blob store (a real Ceph RGW): ranged streaming, and 307 to a presigned URL that the
client follows without its bearer token. Plus: a bad CKPT_STORAGE_URL stops start-up."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.client.client import CheckpointClient
from service.config import Settings
from service.errors import InvalidSettings
from tests.api.test_real_server import start_server, stop_server
from tests.factories import make_original, save_pth, state_dict_of


def _upload(client: TestClient, path: Path) -> str:
    response = client.post("/checkpoints", files={"file": (path.name, path.read_bytes())})
    assert response.status_code == 201, response.text
    artifact_id: str = response.json()["id"]
    return artifact_id


@pytest.mark.index("sqlite")
@pytest.mark.blobs("local")
@pytest.mark.parametrize("url", ["http://bucket/prefix", "s3://", "/srv/blobs", "s3://bucket/p?versionId=1", "file:///x"])
def test_a_bad_storage_url_stops_start_up(tmp_path: Path, url: str) -> None:
    with pytest.raises(InvalidSettings) as info:
        create_app(Settings(data_dir=tmp_path, storage_url=url))
    assert info.value.setting == "CKPT_STORAGE_URL"


@pytest.mark.blobs("s3")
def test_downloads_stream_byte_ranges_from_the_object_store(
    client: TestClient, app: FastAPI, tmp_path: Path
) -> None:
    path = save_pth(state_dict_of(make_original(3)), tmp_path / "m.pth")
    data = path.read_bytes()
    artifact_id = _upload(client, path)
    store = app.state.services.store
    assert not store.blobs_are_local
    assert store.blobs.exists(artifact_id)  # the bytes are in the bucket, put before the row was written
    store.blobs.cache.discard(artifact_id)

    whole = client.get(f"/checkpoints/{artifact_id}/file")
    assert whole.status_code == 200
    assert whole.content == data
    assert whole.headers["x-checkpoint-id"] == artifact_id
    assert whole.headers["accept-ranges"] == "bytes"
    assert int(whole.headers["content-length"]) == len(data)

    part = client.get(f"/checkpoints/{artifact_id}/file", headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206
    assert part.content == data[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    suffix = client.get(f"/checkpoints/{artifact_id}/file", headers={"Range": "bytes=-10"})
    assert suffix.status_code == 206 and suffix.content == data[-10:]
    several = client.get(f"/checkpoints/{artifact_id}/file", headers={"Range": "bytes=0-3,200-203"})
    assert several.status_code == 206
    assert several.headers["content-type"].startswith("multipart/byteranges")
    assert data[0:4] in several.content and data[200:204] in several.content
    beyond = client.get(f"/checkpoints/{artifact_id}/file", headers={"Range": f"bytes={len(data) + 5}-"})
    assert beyond.status_code == 416
    # a stale If-Range sends the whole blob; the current ETag honours the range
    stale = client.get(f"/checkpoints/{artifact_id}/file", headers={"Range": "bytes=0-9", "If-Range": '"x"'})
    assert stale.status_code == 200 and stale.content == data
    fresh = client.get(f"/checkpoints/{artifact_id}/file",
                       headers={"Range": "bytes=0-9", "If-Range": f'"{artifact_id}"'})
    assert fresh.status_code == 206 and fresh.content == data[:10]
    assert client.get(f"/checkpoints/{artifact_id}/file",
                      headers={"If-None-Match": f'"{artifact_id}"'}).status_code == 304
    # streamed from ranged GETs: nothing of the blob was copied into the local cache
    assert artifact_id not in store.blobs.cache
    # ...while a merge-style load pins a cached copy
    assert store.load(artifact_id).state_dict.keys() == state_dict_of(make_original(3)).keys()
    assert artifact_id in store.blobs.cache


@pytest.mark.blobs("s3")
def test_a_presigned_redirect_is_followed_without_the_bearer_token(tmp_path: Path) -> None:
    # CKPT_STORAGE_URL and the AWS_* settings point at this test's bucket on Ceph (tests/conftest.py).
    endpoint = httpx.URL(os.environ["AWS_ENDPOINT_URL"])
    public = f"http://localhost:{endpoint.port}"  # the name clients use for the store
    env = {"CKPT_API_TOKENS": "write:sekrit", "CKPT_S3_PRESIGNED_DOWNLOADS": "true",
           "CKPT_S3_PUBLIC_ENDPOINT": public, "CKPT_SANDBOX": "false"}
    proc, url = start_server(tmp_path / "data", env=env)
    try:
        path = save_pth(state_dict_of(make_original(5)), tmp_path / "m.pth")
        with CheckpointClient(url, token="sekrit") as ckpt:
            artifact_id = ckpt.push(path).artifact.id
            answer = httpx.get(f"{url}/checkpoints/{artifact_id}/file", headers={"Authorization": "Bearer sekrit"})
            assert answer.status_code == 307
            location = httpx.URL(answer.headers["location"])
            assert (location.host, location.port) == ("localhost", endpoint.port)
            assert answer.headers["x-checkpoint-id"] == artifact_id
            # The store refuses a presigned URL that also carries an Authorization header (two auth mechanisms):
            # so a client that forwarded the token would fail here.
            assert httpx.get(location, headers={"Authorization": "Bearer sekrit"}).status_code == 400
            assert httpx.get(location).content == path.read_bytes()

            pulled = ckpt.pull(artifact_id, tmp_path / "out.pth")
            assert pulled.id == artifact_id
            assert hashlib.sha256((tmp_path / "out.pth").read_bytes()).hexdigest() == artifact_id
            # and by name, where the client cannot know the id in advance: it keeps the one the service announced
            ckpt.set_name("prod", artifact_id)
            assert ckpt.pull("prod", tmp_path / "by-name.pth").id == artifact_id
        unauthenticated = httpx.get(f"{url}/checkpoints/{artifact_id}/file")
        assert unauthenticated.status_code == 401  # the redirect itself needs the token
    finally:
        stop_server(proc)
