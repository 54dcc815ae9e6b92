"""CheckpointClient against the real app in-process (the TestClient is injected), every method."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.client import (
    AuthError,
    BadRequestError,
    CheckpointClient,
    ConflictError,
    IntegrityError,
    NotFoundError,
    RetryPolicy,
    UnsafeCheckpointError,
    VerificationError,
    sha256_file,
)
from service.config import Settings
from service.errors import CheckpointServiceError
from tests.client.conftest import RequestLog
from tests.factories import TinyConvNet

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(sd, dict)
    return sd


# -- health ----------------------------------------------------------------------------------------


def test_health_and_ready(ckpt: CheckpointClient) -> None:
    assert ckpt.health().status == "ok"
    ready = ckpt.ready()
    assert ready.status == "ok"
    assert ready.checks["store"].status == "ok"


# -- push, dedup, exists, get, manifest ------------------------------------------------------------


def test_push_streams_the_file_with_its_digest(ckpt: CheckpointClient, recipe_files: dict[str, Path],
                                               request_log: RequestLog) -> None:
    path = recipe_files["original"]
    seen: list[tuple[int, int | None]] = []
    result = ckpt.push(path, name="orig", labels={"stage": "pretrained"},
                       progress=lambda d, t: seen.append((d, t)))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert result.uploaded and result.created
    assert result.artifact.id == digest
    assert result.artifact.names == ["orig"]
    assert result.artifact.labels == {"stage": "pretrained"}
    assert result.artifact.filename == "original.pth"
    [post] = request_log.calls("POST", "/checkpoints")
    assert post.url.params["sha256"] == digest
    assert post.headers["content-type"] == "application/octet-stream"
    assert int(post.headers["content-length"]) == path.stat().st_size
    # progress: monotonic, ends at the file size
    size = path.stat().st_size
    assert seen and seen[-1] == (size, size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert result.to_dict()["artifact"]["id"] == digest


def test_second_push_sends_no_body_and_still_names(ckpt: CheckpointClient, recipe_files: dict[str, Path],
                                                   request_log: RequestLog) -> None:
    path = recipe_files["original"]
    first = ckpt.push(path, name="a")
    request_log.clear()
    second = ckpt.push(path, name="b")
    assert not second.uploaded and not second.created
    assert second.artifact.id == first.artifact.id
    assert sorted(second.artifact.names) == ["a", "b"]
    # HEAD said it exists: no upload at all, only the name was set.
    assert request_log.calls("POST") == []
    assert [r.method for r in request_log.requests] == ["HEAD", "PUT", "GET"]


def test_exists_get_and_manifest(ckpt: CheckpointClient, recipe_files: dict[str, Path]) -> None:
    path = recipe_files["original"]
    digest = sha256_file(path)
    assert not ckpt.exists(digest)
    ckpt.push(path, name="orig")
    assert ckpt.exists(digest) and ckpt.exists("orig")
    meta = ckpt.get("orig")
    assert meta.id == digest and meta.size == path.stat().st_size
    manifest = ckpt.manifest(digest)
    sd = _state_dict(path)
    assert set(manifest.entries) == set(sd)
    for key, tensor in sd.items():
        assert manifest.entries[key].shape == list(tensor.shape)
        assert manifest.entries[key].dtype == str(tensor.dtype).removeprefix("torch.")


class _Evaluates:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return eval, ("1 + 1",)


def test_unsafe_push_raises_with_the_globals(ckpt: CheckpointClient, tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=0.1), "hook": _Evaluates()}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        ckpt.push(path)
    assert info.value.status == 422
    assert info.value.unsafe_globals == ["builtins.eval"]  # argparse.Namespace is an inert placeholder
    assert not ckpt.exists(sha256_file(path))


# -- pull ------------------------------------------------------------------------------------------


def test_pull_to_file_and_directory_verified(ckpt: CheckpointClient, recipe_files: dict[str, Path],
                                             tmp_path: Path) -> None:
    path = recipe_files["original"]
    ckpt.push(path, name="orig")
    seen: list[tuple[int, int | None]] = []
    out = tmp_path / "out" / "copy.pth"
    out.parent.mkdir()
    result = ckpt.pull("orig", out, progress=lambda d, t: seen.append((d, t)))
    assert result.path == out and out.read_bytes() == path.read_bytes()
    assert result.id == sha256_file(path) and result.size == path.stat().st_size
    assert seen[-1] == (result.size, result.size)
    into_dir = ckpt.pull(result.id, tmp_path / "out")
    assert into_dir.path.parent == tmp_path / "out"
    assert into_dir.path.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["copy.pth", into_dir.path.name])


def test_pull_converts_to_safetensors(ckpt: CheckpointClient, recipe_files: dict[str, Path],
                                      tmp_path: Path) -> None:
    ckpt.push(recipe_files["original"], name="orig")
    result = ckpt.pull("orig", tmp_path / "orig.safetensors", format="safetensors")
    assert result.id != sha256_file(recipe_files["original"])
    assert result.id == sha256_file(result.path)
    from safetensors.torch import load_file

    converted = load_file(str(result.path))
    original = _state_dict(recipe_files["original"])
    assert set(converted) == set(original)
    assert all(torch.equal(converted[k], original[k]) for k in original)


class _FlipFirstByte(httpx.BaseTransport):
    """Stands between the client and the real app: corrupts the body of every download."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if not request.url.path.endswith("/file"):
            return response
        body = bytearray(response.read())
        body[len(body) // 2] ^= 0xFF
        return httpx.Response(response.status_code, headers=response.headers, content=bytes(body))


def test_tampered_download_raises_and_leaves_no_file(client: TestClient, recipe_files: dict[str, Path],
                                                     tmp_path: Path) -> None:
    CheckpointClient(http=client).push(recipe_files["original"], name="orig")
    with httpx.Client(transport=_FlipFirstByte(client._transport), base_url=str(client.base_url)) as http:
        ckpt = CheckpointClient(http=http, retry=RetryPolicy(attempts=1))
        dest_dir = tmp_path / "dl"
        dest_dir.mkdir()
        with pytest.raises(IntegrityError) as info:
            ckpt.pull("orig", dest_dir / "final.pth")
        assert info.value.expected == sha256_file(recipe_files["original"])
        assert info.value.actual != info.value.expected
        assert list(dest_dir.iterdir()) == []  # neither the file nor a temp file


# -- list, names, delete ---------------------------------------------------------------------------


def test_list_pages_and_iter(ckpt: CheckpointClient, recipe_files: dict[str, Path]) -> None:
    a = ckpt.push(recipe_files["original"], name="orig", labels={"kind": "original"}).artifact
    b = ckpt.push(recipe_files["trained"], labels={"kind": "trained"}).artifact
    page = ckpt.list_checkpoints(limit=1)
    assert page.total == 2 and len(page.items) == 1 and page.next_cursor is not None
    rest = ckpt.list_checkpoints(limit=1, cursor=page.next_cursor)
    assert {page.items[0].id, rest.items[0].id} == {a.id, b.id}
    assert {x.id for x in ckpt.iter_checkpoints(page_size=1)} == {a.id, b.id}
    assert [x.id for x in ckpt.list_checkpoints(label="kind=trained").items] == [b.id]
    assert [x.id for x in ckpt.list_checkpoints(name="orig").items] == [a.id]


def test_names_set_list_delete(ckpt: CheckpointClient, recipe_files: dict[str, Path]) -> None:
    art = ckpt.push(recipe_files["original"]).artifact
    out = ckpt.set_name("best", art.id)
    assert (out.name, out.id) == ("best", art.id)
    assert ckpt.set_name("alias", "best").id == art.id  # a name may point through another name
    assert [(n.name, n.id) for n in ckpt.list_names()] == [("alias", art.id), ("best", art.id)]
    ckpt.delete_name("alias")
    assert [n.name for n in ckpt.list_names()] == ["best"]
    with pytest.raises(NotFoundError) as info:
        ckpt.delete_name("alias")
    assert info.value.status == 404 and info.value.problem["status"] == 404


def test_delete_refuses_named_artifacts_unless_forced(ckpt: CheckpointClient,
                                                      recipe_files: dict[str, Path]) -> None:
    art = ckpt.push(recipe_files["original"], name="orig").artifact
    with pytest.raises(ConflictError) as info:
        ckpt.delete(art.id)
    assert info.value.status == 409
    assert info.value.problem["names"] == ["orig"]
    result = ckpt.delete(art.id, force=True)
    assert result.id == art.id and result.names_removed == ("orig",)
    assert not ckpt.exists(art.id)
    assert ckpt.list_names() == []


def test_errors_are_typed_and_carry_the_problem(ckpt: CheckpointClient) -> None:
    with pytest.raises(NotFoundError) as info:
        ckpt.get("0" * 64)
    err = info.value
    assert isinstance(err, CheckpointServiceError)  # one root for in-process and remote failures
    assert err.status == 404 and err.title == "Artifact not found"
    assert err.problem["type"] == "urn:ckpt:problem:artifact-not-found"
    assert err.detail and err.detail in str(err)
    with pytest.raises(BadRequestError):
        ckpt.get("not a ref!")
    assert ckpt.exists("0" * 64) is False


# -- strip, diff -----------------------------------------------------------------------------------


def test_strip(ckpt: CheckpointClient, recipe_files: dict[str, Path]) -> None:
    ckpt.push(recipe_files["trained"], name="trained")
    result = ckpt.strip("trained", name="trained-stripped")
    assert result.artifact.names == ["trained-stripped"]
    keys = set(ckpt.manifest(result.id).entries)
    expected = {k.removeprefix("module.") for k in _state_dict(recipe_files["trained"])}
    assert keys == expected
    again = ckpt.strip("trained")
    assert again.id == result.id and not again.created


def test_diff_stored_refs(ckpt: CheckpointClient, recipe_files: dict[str, Path],
                          request_log: RequestLog) -> None:
    ckpt.push(recipe_files["original"], name="orig")
    ckpt.push(recipe_files["trained"], name="trained")
    request_log.clear()
    diff = ckpt.diff("orig", "trained", normalize_prefixes=True, frozen=True)
    assert [r.method for r in request_log.requests] == ["GET"]
    original = _state_dict(recipe_files["original"])
    bn_stats = sorted(k for k in original if k.endswith(BN_STATS))
    assert diff.normalized
    assert diff.keys["only_in_a"].keys == bn_stats
    assert diff.summary["only_in_b"] == 0
    assert set(diff.keys["changed"].keys) == {"head.weight", "head.bias"}  # only the head was trained
    assert diff.frozen is not None and sorted(diff.frozen["changed"]) == ["head.bias", "head.weight"]
    narrow = ckpt.diff("orig", "trained", normalize_prefixes=True, categories=["changed"], key_prefix="head.")
    assert list(narrow.keys) == ["changed"]


def test_diff_local_files_posts_both_and_stores_nothing(ckpt: CheckpointClient, recipe_files: dict[str, Path],
                                                        request_log: RequestLog) -> None:
    diff = ckpt.diff(recipe_files["original"], recipe_files["trained"], normalize_prefixes=True)
    assert [r.method for r in request_log.requests] == ["HEAD", "HEAD", "POST"]
    assert diff.a == sha256_file(recipe_files["original"])
    assert diff.b == sha256_file(recipe_files["trained"])
    assert diff.summary["only_in_a"] == 6 and diff.summary["changed"] == 2
    assert ckpt.list_checkpoints().total == 0


def test_diff_local_file_the_service_has_goes_by_id(ckpt: CheckpointClient, recipe_files: dict[str, Path],
                                                   request_log: RequestLog) -> None:
    ckpt.push(recipe_files["trained"])
    ckpt.push(recipe_files["original"], name="orig")
    request_log.clear()
    diff = ckpt.diff("orig", recipe_files["trained"], normalize_prefixes=True)
    assert [r.method for r in request_log.requests] == ["HEAD", "GET"]
    assert diff.b == sha256_file(recipe_files["trained"])
    ckpt.delete(diff.b)
    request_log.clear()
    # The service no longer has the local file: the stored side is fetched, both go to POST /diff.
    again = ckpt.diff("orig", recipe_files["trained"], normalize_prefixes=True)
    assert [(r.method, r.url.path.rsplit("/", 1)[-1]) for r in request_log.requests] == [
        ("HEAD", diff.b), ("GET", "file"), ("POST", "diff")]
    assert (again.a, again.b, again.summary) == (diff.a, diff.b, diff.summary)
    assert not ckpt.exists(diff.b)  # a diff stores nothing


# -- merge -----------------------------------------------------------------------------------------


def test_merge_uploads_new_files_and_writes_the_verified_result(ckpt: CheckpointClient,
                                                                recipe_files: dict[str, Path],
                                                                tmp_path: Path) -> None:
    seen: list[tuple[int, int | None]] = []
    out = tmp_path / "final.pth"
    result = ckpt.merge(recipe_files["original"], recipe_files["trained"], architecture="tiny-convnet",
                        name="final", output=out, progress=lambda d, t: seen.append((d, t)))
    assert result.report["verification"]["ok"] is True
    assert result.artifact.names == ["final"]
    assert sha256_file(out) == result.id
    # the uploads were committed too: both inputs are stored now, and the lineage points at them
    assert ckpt.exists(sha256_file(recipe_files["original"]))
    assert ckpt.exists(sha256_file(recipe_files["trained"]))
    lineage = ckpt.get("final").lineage
    assert lineage is not None and lineage.inputs == {"original": sha256_file(recipe_files["original"]),
                                                      "trained": sha256_file(recipe_files["trained"])}
    # the result loads strictly into a fresh model, with the trained head and the original BN stats
    final = _state_dict(out)
    TinyConvNet().load_state_dict(final, strict=True)
    original, trained = _state_dict(recipe_files["original"]), _state_dict(recipe_files["trained"])
    assert torch.equal(final["head.weight"], trained["module.head.weight"])
    assert torch.equal(final["features.1.running_var"], original["features.1.running_var"])
    uploaded = recipe_files["original"].stat().st_size + recipe_files["trained"].stat().st_size
    assert (uploaded, uploaded) in seen  # the uploads, then the download
    assert seen[-1] == (out.stat().st_size, out.stat().st_size)


def test_merge_sends_a_ref_for_an_original_the_service_has_and_streams_the_trained_file(
        ckpt: CheckpointClient, recipe_files: dict[str, Path], request_log: RequestLog) -> None:
    ckpt.push(recipe_files["original"], name="orig")
    request_log.clear()
    result = ckpt.merge(recipe_files["original"], recipe_files["trained"], architecture="tiny-convnet")
    assert result.report["verification"]["ok"] is True
    [post] = request_log.calls("POST", "/merge")
    # The original as a ref; the trained file (not hashed and asked for first) and a few options.
    trained_size = recipe_files["trained"].stat().st_size
    assert trained_size < int(post.headers["content-length"]) < trained_size + 2048
    assert [r.method for r in request_log.requests] == ["HEAD", "POST"]
    lineage = result.artifact.lineage
    assert lineage is not None and lineage.inputs["trained"] == sha256_file(recipe_files["trained"])


def test_merge_verification_failure_carries_the_keys(ckpt: CheckpointClient,
                                                     recipe_files: dict[str, Path]) -> None:
    ckpt.push(recipe_files["original"], name="orig")
    before = ckpt.list_checkpoints().total
    with pytest.raises(VerificationError) as info:
        ckpt.merge("orig", recipe_files["trained"], architecture="mlp-bn")
    err = info.value
    assert err.status == 422
    assert "blocks.0.1.running_mean" in err.missing_keys
    assert "features.0.weight" in err.unexpected_keys
    assert err.missing_keys == sorted(err.missing_keys)
    assert err.report["verification"]["ok"] is False
    assert ckpt.list_checkpoints().total == before  # a failed merge stores nothing


def test_merge_result_does_not_depend_on_dedup(client: TestClient, recipe_files: dict[str, Path],
                                               tmp_path: Path) -> None:
    uploaded = CheckpointClient(http=client).merge(recipe_files["original"], recipe_files["trained"],
                                                   architecture="tiny-convnet")
    from service.api.app import create_app

    with TestClient(create_app(Settings(data_dir=tmp_path / "other"))) as other:
        ckpt = CheckpointClient(http=other)
        ckpt.push(recipe_files["original"])
        ckpt.push(recipe_files["trained"])
        by_ref = ckpt.merge(recipe_files["original"], recipe_files["trained"], architecture="tiny-convnet")
    assert uploaded.report["metadata"] == by_ref.report["metadata"] == "trained"
    assert uploaded.id == by_ref.id


def test_merge_unknown_architecture(ckpt: CheckpointClient) -> None:
    with pytest.raises(NotFoundError):
        ckpt.merge("a", "b", architecture="no-such-arch")


# -- architectures ---------------------------------------------------------------------------------


def test_architectures_list_get_register_delete(ckpt: CheckpointClient,
                                                recipe_files: dict[str, Path]) -> None:
    names = {a.name for a in ckpt.list_architectures().items}
    assert {"tiny-convnet", "mlp-bn"} <= names
    tiny = ckpt.get_architecture("tiny-convnet")
    assert tiny.keys is not None and set(tiny.keys) == set(TinyConvNet().state_dict())
    ckpt.push(recipe_files["original"], name="orig")
    spec = ckpt.register_architecture("tiny-spec", from_checkpoint="orig", description="from a file")
    assert spec.schema_fingerprint == tiny.schema_fingerprint
    explicit = ckpt.register_architecture("one-key", keys={"w": {"shape": [2, 3], "dtype": "float32"}})
    assert explicit.key_count == 1
    with pytest.raises(ConflictError):
        ckpt.register_architecture("tiny-spec", from_checkpoint="orig")
    with pytest.raises(ValueError):
        ckpt.register_architecture("neither")
    ckpt.delete_architecture("tiny-spec")
    with pytest.raises(NotFoundError):
        ckpt.get_architecture("tiny-spec")
    with pytest.raises(ConflictError):
        ckpt.delete_architecture("tiny-convnet")  # built-ins cannot be removed


# -- auth ------------------------------------------------------------------------------------------


@pytest.fixture
def secured_client(tmp_path: Path) -> TestClient:
    from service.api.app import create_app

    settings = Settings(data_dir=tmp_path / "secured", api_tokens="read:r-token,write:w-token")
    app: FastAPI = create_app(settings)
    return TestClient(app)


def test_tokens(secured_client: TestClient, recipe_files: dict[str, Path]) -> None:
    with secured_client as http:
        with pytest.raises(AuthError) as info:
            CheckpointClient(http=http).list_checkpoints()
        assert info.value.status == 401
        with pytest.raises(AuthError) as info:
            CheckpointClient(http=http, token="r-token").push(recipe_files["original"])
        assert info.value.status == 403
        art = CheckpointClient(http=http, token="w-token").push(recipe_files["original"]).artifact
        assert CheckpointClient(http=http, token="r-token").get(art.id).id == art.id
