"""Sharded checkpoints in: the files transformers writes go in as one artifact, checked against their index."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.problems import PROBLEM_MEDIA_TYPE
from service.api.uploads import MAX_FILE_PARTS
from service.config import Settings
from service.core.manifest import build_manifest
from service.core.sharding import MAX_INDEX_BYTES
from service.store import inspect_checkpoint
from tests.sharded import index_of, save_sharded, shard_files, tiny_bert


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def post_files(
    client: TestClient, url: str, field: str, files: Sequence[Path], *, sha_field: str | None = None,
    names: Sequence[str] | None = None, data: dict[str, Any] | None = None,
) -> httpx.Response:
    """POST the files as repeated `field` parts, in the order given, with one `sha_field` value each."""
    parts = [(field, (name, path.read_bytes(), "application/octet-stream"))
             for name, path in zip(names or [p.name for p in files], files, strict=True)]
    form: dict[str, Any] = dict(data or {})
    if sha_field is not None:
        form[sha_field] = [sha(p) for p in files]
    return client.post(url, files=parts, data=form)


def stored(client: TestClient) -> int:
    return int(client.get("/checkpoints").json()["total"])


def leftover_uploads(settings: Settings) -> list[Path]:
    return list((settings.data_dir / "tmp").glob("upload-*"))


@pytest.fixture(scope="module")
def bert() -> Any:
    return tiny_bert(seed=0)


@pytest.fixture(scope="module")
def shards_dir(bert: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sharded(bert, tmp_path_factory.mktemp("st") / "checkpoint-500")


@pytest.fixture(scope="module")
def bin_dir(bert: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sharded(bert, tmp_path_factory.mktemp("bin") / "checkpoint-500", bin=True)


@pytest.fixture
def copy_dir(shards_dir: Path, tmp_path: Path) -> Path:
    """A copy of the safetensors shards a test may tamper with."""
    return Path(shutil.copytree(shards_dir, tmp_path / "copy"))


def save_file_bytes(state_dict: dict[str, torch.Tensor], **kwargs: Any) -> bytes:
    return safetensors.torch.save(  # type: ignore[no-any-return]
        {k: v.contiguous() for k, v in state_dict.items()}, **kwargs)


def test_safetensors_shards_become_the_file_save_file_writes(
    client: TestClient, settings: Settings, bert: Any, shards_dir: Path, tmp_path: Path
) -> None:
    files = shard_files(shards_dir)
    assert len(files) >= 4, "the fixture must really be sharded"
    # Parts in another order than the file names: the shards are still combined in their names' order.
    r = post_files(client, "/checkpoints", "file", files[::-1], sha_field="sha256", data={"name": "bert-st"})
    assert r.status_code == 201, r.text
    art = r.json()
    # One file, byte for byte what safetensors.save_file writes for the whole state_dict.
    expected = save_file_bytes(bert.state_dict(), metadata={"format": "pt"})
    assert art["id"] == hashlib.sha256(expected).hexdigest()
    assert (art["format"], art["key_count"], art["filename"], art["names"]) == (
        "safetensors", len(bert.state_dict()), "model.safetensors", ["bert-st"])
    lineage = art["lineage"]
    assert lineage["operation"] == "combine" and lineage["inputs"] == {}
    assert [(s["filename"], s["sha256"]) for s in lineage["params"]["shards"]] == [(p.name, sha(p)) for p in files[1:]]
    assert lineage["params"]["index"]["sha256"] == sha(files[0])
    assert stored(client) == 1  # the shards themselves are not artifacts
    assert not leftover_uploads(settings)
    # The manifest kept for it is the one the file would give when parsed again.
    raw = client.get(f"/checkpoints/{art['id']}/file").content
    assert raw == expected
    (tmp_path / "combined.safetensors").write_bytes(raw)
    manifest = client.get(f"/checkpoints/{art['id']}/manifest").json()["entries"]
    again = inspect_checkpoint(tmp_path / "combined.safetensors").manifest.to_dict()["entries"]
    assert list(manifest) == list(again) and manifest == again


def test_bin_shards_become_one_pth(client: TestClient, settings: Settings, bert: Any, bin_dir: Path) -> None:
    files = shard_files(bin_dir)
    assert files[0].name == "pytorch_model.bin.index.json" and len(files) >= 4
    r = post_files(client, "/checkpoints", "file", files, sha_field="sha256")
    assert r.status_code == 201, r.text
    art = r.json()
    assert (art["format"], art["key_count"], art["filename"]) == ("pth-zip", 39, "pytorch_model.bin")
    assert {s["format"] for s in art["lineage"]["params"]["shards"]} == {"pth-zip"}
    raw = client.get(f"/checkpoints/{art['id']}/file").content
    loaded = torch.load(io.BytesIO(raw), weights_only=True)
    reference = bert.state_dict()
    assert list(loaded) == sorted(loaded, key=list(reference).index)  # the shards' order, which is the model's
    for key, tensor in reference.items():
        assert torch.equal(loaded[key], tensor), key
    manifest = client.get(f"/checkpoints/{art['id']}/manifest").json()["entries"]
    assert manifest == build_manifest(loaded).to_dict()["entries"]
    # The same shards combine to the same bytes: the second upload finds the artifact.
    again = post_files(client, "/checkpoints", "file", files[::-1])
    assert (again.status_code, again.json()["id"]) == (200, art["id"])
    assert not leftover_uploads(settings)


@pytest.mark.parametrize("bin", [False, True], ids=["safetensors", "bin"])
def test_merge_of_sharded_trained_is_verified_with_nothing_filled(
    client: TestClient, settings: Settings, bert: Any, tmp_path: Path, bin: bool
) -> None:
    reference = tmp_path / "reference.safetensors"
    reference.write_bytes(save_file_bytes(bert.state_dict()))
    with reference.open("rb") as fh:
        assert client.post("/checkpoints", files={"file": ("reference.safetensors", fh)},
                           data={"name": "bert-base"}).status_code == 201
    assert client.post("/architectures", json={"name": "tiny-bert", "from_checkpoint": "bert-base"}).status_code == 201
    trained = tiny_bert(seed=1)
    files = shard_files(save_sharded(trained, tmp_path / "trained", bin=bin))
    r = post_files(client, "/merge", "trained_file", files, sha_field="trained_sha256",
                   data={"original": "bert-base", "architecture": "tiny-bert", "output_format": "safetensors"})
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    assert report["verification"]["ok"] is True
    assert report["filled"] == [] and report["provenance_counts"] == {"trained": 39, "original": 0}
    merged = safetensors.torch.load(client.get(f"/checkpoints/{r.json()['id']}/file").content)
    for key, tensor in trained.state_dict().items():
        assert torch.equal(merged[key], tensor), key
    combined = client.get("/checkpoints", params={"operation": "combine"}).json()["items"]
    assert len(combined) == 1 and combined[0]["key_count"] == 39  # the trained input, stored as one artifact
    assert stored(client) == 3
    assert not leftover_uploads(settings)


def test_diff_of_shards_against_a_stored_file_stores_nothing(
    client: TestClient, settings: Settings, bert: Any, shards_dir: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "reference.pth"
    torch.save(bert.state_dict(), reference)
    with reference.open("rb") as fh:
        ref_id = client.post("/checkpoints", files={"file": ("reference.pth", fh)}).json()["id"]
    r = post_files(client, "/diff", "a", shard_files(shards_dir), sha_field="a_sha256", data={"b": ref_id})
    assert r.status_code == 200, r.text
    assert r.json()["summary"] == {"only_in_a": 0, "only_in_b": 0, "shape_mismatch": 0, "dtype_mismatch": 0,
                                   "changed": 0, "unchanged": 39}
    assert stored(client) == 1
    assert not leftover_uploads(settings)


def _drop_shard(d: Path) -> list[Path]:
    files = shard_files(d)
    return [files[0], *files[2:]]


def _extra_shard(d: Path) -> list[Path]:
    extra = d / "extra.safetensors"
    safetensors.torch.save_file({"extra.weight": torch.ones(2)}, extra)
    return [*shard_files(d), extra]


def _edit_index(edit: Any) -> Any:
    def tamper(d: Path) -> list[Path]:
        path, index = index_of(d)
        edit(index["weight_map"])
        path.write_text(json.dumps(index))
        return shard_files(d)
    return tamper


FIRST = "embeddings.LayerNorm.bias"


def _move_key(weight_map: dict[str, str]) -> None:
    weight_map[FIRST] = next(f for f in sorted(set(weight_map.values())) if f != weight_map[FIRST])


@pytest.mark.parametrize(
    ("tamper", "field", "expected"),
    [
        (_drop_shard, "missing_files", ["model-00001-of-00006.safetensors"]),
        (_extra_shard, "unexpected_files", ["extra.safetensors"]),
        (_edit_index(_move_key), "misplaced_keys", [FIRST]),
        (_edit_index(lambda m: m.pop(FIRST)), "unexpected_keys", [FIRST]),
        (_edit_index(lambda m: m.update({"pooler.extra": m[FIRST]})), "missing_keys", ["pooler.extra"]),
    ],
    ids=["index-names-a-file-not-sent", "file-not-in-index", "key-in-another-shard", "key-not-in-index",
         "index-key-in-no-shard"],
)
def test_shards_that_do_not_match_their_index_are_422(
    client: TestClient, settings: Settings, copy_dir: Path, tamper: Any, field: str, expected: list[str]
) -> None:
    files = tamper(copy_dir)
    assert [p.name for p in shard_files(copy_dir)][1:3] == ["model-00001-of-00006.safetensors",
                                                            "model-00002-of-00006.safetensors"]
    r = post_files(client, "/checkpoints", "file", files)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == PROBLEM_MEDIA_TYPE
    problem = r.json()
    assert problem["title"] == "Inconsistent shards"
    assert problem[field] == expected
    assert expected[0] in problem["detail"]
    assert stored(client) == 0
    assert not leftover_uploads(settings)


def test_shards_without_an_index_combine_when_disjoint_and_422_when_they_overlap(
    client: TestClient, tmp_path: Path
) -> None:
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    safetensors.torch.save_file({"x.weight": torch.ones(3), "shared": torch.zeros(1)}, a)
    safetensors.torch.save_file({"y.weight": torch.ones(2)}, b)
    safetensors.torch.save_file({"shared": torch.zeros(1), "z": torch.ones(1)}, c)
    r = post_files(client, "/checkpoints", "file", [b, a])
    assert r.status_code == 201, r.text
    assert (r.json()["key_count"], r.json()["filename"]) == (3, None)
    assert [s["filename"] for s in r.json()["lineage"]["params"]["shards"]] == ["a.safetensors", "b.safetensors"]
    r = post_files(client, "/checkpoints", "file", [a, b, c])
    assert r.status_code == 422, r.text
    assert r.json()["overlapping_keys"] == ["shared"]
    assert r.json()["files"] == ["a.safetensors", "c.safetensors"]
    assert stored(client) == 1


def test_the_request_total_is_413_while_streaming_and_each_part_has_the_file_limit(
    tmp_path: Path, shards_dir: Path
) -> None:
    files = shard_files(shards_dir)
    total = sum(p.stat().st_size for p in files)
    largest = max(p.stat().st_size for p in files)
    for settings, limit in (
        (Settings(data_dir=tmp_path / "a", max_request_bytes=total - 1), total - 1),
        (Settings(data_dir=tmp_path / "b", max_upload_bytes=largest - 1), largest - 1),
    ):
        with TestClient(create_app(settings)) as client:
            r = post_files(client, "/checkpoints", "file", files)
            assert r.status_code == 413, r.text
            assert (r.json()["title"], r.json()["limit"]) == ("Payload too large", limit)
            assert stored(client) == 0
            assert not leftover_uploads(settings)
    # The default bound is 8 x the per-file limit.
    assert Settings(data_dir=tmp_path, max_upload_bytes=1000).request_bytes_cap() == 8000


def test_sha256_repeats_once_per_file_part_in_order(client: TestClient, shards_dir: Path) -> None:
    files = shard_files(shards_dir)
    digests = [sha(p) for p in files]
    parts = [("file", (p.name, p.read_bytes())) for p in files]
    swapped = [digests[0], digests[2], digests[1], *digests[3:]]
    r = client.post("/checkpoints", files=parts, data={"sha256": swapped})
    assert r.status_code == 400 and r.json()["title"] == "Digest mismatch", r.text
    r = client.post("/checkpoints", files=parts, data={"sha256": digests[:-1]})
    assert r.status_code == 400, r.text
    assert f"{len(digests) - 1} 'sha256' values for {len(files)} 'file' file parts" in r.json()["detail"]
    assert stored(client) == 0
    assert client.post("/checkpoints", files=parts, data={"sha256": digests}).status_code == 201


def _index_bytes(weight_map: dict[str, str]) -> bytes:
    return json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}).encode()


def test_hostile_shard_sets_are_refused(client: TestClient, settings: Settings, copy_dir: Path) -> None:
    files = shard_files(copy_dir)
    index, first = files[0], files[1]

    def send(parts: list[tuple[str, bytes]]) -> httpx.Response:
        return client.post("/checkpoints", files=[("file", (name, data)) for name, data in parts])

    def refused(r: httpx.Response, status: int = 422) -> dict[str, Any]:
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == PROBLEM_MEDIA_TYPE
        return r.json()  # type: ignore[no-any-return]

    # A shard sent twice.
    problem = refused(send([(p.name, p.read_bytes()) for p in [*files, first]]))
    assert problem["files"] == [first.name] and "twice" in problem["detail"]
    # ".." and path separators in the part's file name, and in the index's.
    problem = refused(send([(index.name, index.read_bytes()), (f"../{first.name}", first.read_bytes())]))
    assert "not a plain file name" in problem["detail"]
    problem = refused(send([("model.safetensors.index.json", _index_bytes({"w": ".."})), ("..", first.read_bytes())]))
    assert "not a plain file name" in problem["detail"]
    # An index alone, two indexes, an index that is not JSON, a key twice in its weight_map.
    assert refused(send([(index.name, index.read_bytes())]))["missing_files"] == [p.name for p in files[1:]]
    problem = refused(send([(p.name, p.read_bytes()) for p in files] + [("b.index.json", index.read_bytes())]))
    assert "more than one shard index" in problem["detail"]
    assert "not valid JSON" in refused(send([("m.index.json", b"{nope"), (first.name, first.read_bytes())]))["detail"]
    twice = b'{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}'
    assert "given twice" in refused(send([("m.index.json", twice), (first.name, first.read_bytes())]))["detail"]
    # container_key is for one file.
    r = client.post("/checkpoints", files=[("file", (p.name, p.read_bytes())) for p in files],
                    data={"container_key": "model"})
    assert refused(r, 400)["title"] == "Invalid request"
    # More file parts than a request may have: refused while parsing, before any is inspected.
    r = send([(f"part-{i}.safetensors", b"x") for i in range(MAX_FILE_PARTS + 1)])
    assert f"too many file parts (more than {MAX_FILE_PARTS})" in refused(r, 400)["detail"]
    assert stored(client) == 0
    assert not leftover_uploads(settings)


def test_a_huge_weight_map_is_refused_before_any_shard_is_parsed(tmp_path: Path, shards_dir: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_keys=1000)
    first = shard_files(shards_dir)[1]
    huge = _index_bytes({f"layer.{i}.weight": first.name for i in range(1001)})
    with TestClient(create_app(settings)) as client:
        r = client.post("/checkpoints", files=[("file", ("model.safetensors.index.json", huge)),
                                               ("file", (first.name, first.read_bytes()))])
        assert r.status_code == 422, r.text
        assert (r.json()["title"], r.json()["limit"]) == ("Inconsistent shards", 1000)
        assert "1001 keys, more than the limit of 1000" in r.json()["detail"]
        assert stored(client) == 0


def test_an_index_larger_than_an_index_can_be_is_413_while_it_arrives(
    client: TestClient, settings: Settings, shards_dir: Path
) -> None:
    first = shard_files(shards_dir)[1]
    huge = b'{"weight_map": {"' + b"k" * MAX_INDEX_BYTES + b'": "x"}}'
    r = client.post("/checkpoints", files=[("file", ("model.safetensors.index.json", huge)),
                                           ("file", (first.name, first.read_bytes()))])
    assert r.status_code == 413, r.text[:300]
    assert r.json()["limit"] == MAX_INDEX_BYTES
    assert stored(client) == 0
    assert not leftover_uploads(settings)


@pytest.fixture
def no_sandbox(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(data_dir=tmp_path / "data", sandbox=False))) as c:
        yield c


def test_each_shard_is_parsed_like_a_single_upload(no_sandbox: TestClient, copy_dir: Path) -> None:
    # A damaged shard is refused with the error a single upload of it gets.
    files = shard_files(copy_dir)
    files[2].write_bytes(files[2].read_bytes()[:-7])
    single = no_sandbox.post("/checkpoints", files={"file": (files[2].name, files[2].read_bytes())})
    r = post_files(no_sandbox, "/checkpoints", "file", files)
    assert single.status_code == r.status_code == 422
    assert r.json()["title"] == single.json()["title"] and r.json()["detail"] == single.json()["detail"]
