"""Sharded checkpoints out: transformers' index and safetensors shards, computed on the fly and never stored."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.problems import PROBLEM_MEDIA_TYPE
from service.config import Settings
from tests.api.test_real_server import start_server, stop_server
from tests.sharded import load_pretrained, save_sharded, shard_files, split_torch_state_dict_into_shards, tiny_bert

SIZE = "10KB"  # the word embeddings (12.8 KB) are larger: a shard of their own, as huggingface_hub does it


@pytest.fixture(scope="module")
def bert() -> Any:
    return tiny_bert(seed=3)


def upload_pth(client: TestClient, state_dict: dict[str, torch.Tensor]) -> str:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    r = client.post("/checkpoints", files={"file": ("model.pth", buffer.getvalue())})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_the_index_is_transformers_layout_split_like_huggingface_hub(client: TestClient, bert: Any) -> None:
    state_dict = bert.state_dict()
    artifact = upload_pth(client, state_dict)
    r = client.get(f"/checkpoints/{artifact}/shards", params={"max_shard_size": SIZE})
    assert r.status_code == 200, r.text
    index = r.json()
    hub = split_torch_state_dict_into_shards(state_dict, max_shard_size=SIZE)
    assert hub.is_sharded and len(hub.filename_to_tensors) >= 5
    assert index["metadata"] == {"total_size": hub.metadata["total_size"]}
    assert index["weight_map"] == hub.tensor_to_filename
    assert [s["name"] for s in index["shards"]] == list(hub.filename_to_tensors)
    assert [s["key_count"] for s in index["shards"]] == [len(v) for v in hub.filename_to_tensors.values()]
    assert index["shards"][0]["url"].endswith(f"/checkpoints/{artifact}/shards/1?max_shard_size={SIZE}")
    assert (index["id"], index["max_shard_size"]) == (artifact, 10_000)
    assert client.get("/checkpoints").json()["total"] == 1  # nothing is stored


def test_shards_are_the_same_bytes_every_time_and_what_save_file_writes(client: TestClient, bert: Any) -> None:
    state_dict = bert.state_dict()
    artifact = upload_pth(client, state_dict)
    index = client.get(f"/checkpoints/{artifact}/shards", params={"max_shard_size": SIZE}).json()
    for number, shard in enumerate(index["shards"], start=1):
        first, second = client.get(shard["url"]), client.get(f"/checkpoints/{artifact}/shards/{number}",
                                                            params={"max_shard_size": SIZE})
        assert first.status_code == 200, first.text
        assert first.content == second.content
        assert int(first.headers["content-length"]) == shard["size"] == len(first.content)
        assert first.headers["content-disposition"] == f'attachment; filename="{shard["name"]}"'
        keys = [k for k, name in index["weight_map"].items() if name == shard["name"]]
        expected = safetensors.torch.save({k: state_dict[k].contiguous() for k in keys}, metadata={"format": "pt"})
        assert first.content == expected
    # Another size gives another split of the same tensors.
    one = client.get(f"/checkpoints/{artifact}/shards", params={"max_shard_size": "1GB"}).json()
    assert [s["name"] for s in one["shards"]] == ["model-00001-of-00001.safetensors"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    proc, url = start_server(tmp_path / "data")
    try:
        yield url
    finally:
        stop_server(proc)


def download_sharded(url: str, ref: str, directory: Path, max_shard_size: str) -> None:
    """What a user does with curl: the index, then every shard it lists, into the model's directory."""
    index = httpx.get(f"{url}/checkpoints/{ref}/shards", params={"max_shard_size": max_shard_size}).json()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": index["metadata"], "weight_map": index["weight_map"]}))
    for shard in index["shards"]:
        with httpx.stream("GET", shard["url"]) as response, (directory / shard["name"]).open("wb") as out:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                out.write(chunk)
        assert (directory / shard["name"]).stat().st_size == shard["size"]


@pytest.mark.parametrize("bin", [False, True], ids=["safetensors-in", "bin-in"])
def test_from_pretrained_loads_the_downloaded_shards(
    server: str, bert: Any, tmp_path: Path, bin: bool
) -> None:
    # Sharded in (as transformers or huggingface_hub wrote it), sharded out with another size, over real HTTP.
    files = shard_files(save_sharded(bert, tmp_path / "in", bin=bin))
    parts = [("file", (p.name, p.read_bytes())) for p in files]
    r = httpx.post(f"{server}/checkpoints", files=parts, data={"sha256": [hashlib.sha256(p.read_bytes()).hexdigest()
                                                                          for p in files]}, timeout=60)
    assert r.status_code == 201, r.text
    out = tmp_path / "out"
    out.mkdir()
    bert.config.save_pretrained(out)
    download_sharded(server, r.json()["id"], out, "30KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 3
    loaded = load_pretrained(out)
    expected = bert.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def test_errors(client: TestClient, bert: Any, tmp_path: Path) -> None:
    artifact = upload_pth(client, bert.state_dict())
    count = len(client.get(f"/checkpoints/{artifact}/shards", params={"max_shard_size": SIZE}).json()["shards"])
    r = client.get(f"/checkpoints/{artifact}/shards/{count + 1}", params={"max_shard_size": SIZE})
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM_MEDIA_TYPE, r.text
    assert r.json()["title"] == "Shard not found" and f"has {count} shards" in r.json()["detail"]
    for bad in ("5XB", "0", "-1", "GB", "1e400"):
        r = client.get(f"/checkpoints/{artifact}/shards", params={"max_shard_size": bad})
        assert r.status_code == 400, (bad, r.text)
    assert client.get(f"/checkpoints/{'0' * 64}/shards").status_code == 404
    # A dtype safetensors cannot hold: refused before a byte is sent, naming the key.
    odd = upload_pth(client, {"w": torch.ones(2), "c": torch.ones(2, dtype=torch.complex128)})
    for path in ("shards", "shards/1"):
        r = client.get(f"/checkpoints/{odd}/{path}")
        assert r.status_code == 422, r.text
        assert r.json()["keys"] == ["c"] and "complex128" in r.json()["detail"]


def test_shards_need_a_read_token(tmp_path: Path, bert: Any) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_tokens="read:r-token,write:w-token")
    with TestClient(create_app(settings)) as client:
        buffer = io.BytesIO()
        torch.save(bert.state_dict(), buffer)
        artifact = client.post("/checkpoints", files={"file": ("m.pth", buffer.getvalue())},
                               headers={"Authorization": "Bearer w-token"}).json()["id"]
        assert client.get(f"/checkpoints/{artifact}/shards").status_code == 401
        assert client.get(f"/checkpoints/{artifact}/shards/1").status_code == 401
        read = {"Authorization": "Bearer r-token"}
        index = client.get(f"/checkpoints/{artifact}/shards", headers=read)
        assert index.status_code == 200
        assert client.get(index.json()["shards"][0]["url"], headers=read).status_code == 200
