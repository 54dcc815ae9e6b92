"""Import by reference against a real Ceph RGW: POST /checkpoints/import, s3:// refs in POST /merge, the client
and the CLI. The service reads the objects itself with the standard AWS settings (pointed at the test's Ceph);
only prefixes in CKPT_IMPORT_ALLOWED are readable, and what it reads gets the same checks as an upload."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.client import CheckpointClient, RetryPolicy
from service.client.cli import build_parser
from service.client.cli import main as cli_main
from service.config import Settings
from tests._services import S3Service
from tests.core.hostile import make_rce_zip
from tests.hardening.hostile_support import assert_refused

pytestmark = pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")

AppFactory = Callable[..., TestClient]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def aws_env(ceph_s3: S3Service, monkeypatch: pytest.MonkeyPatch) -> S3Service:
    """The standard AWS variables point at the test's Ceph: the service finds the endpoint and keys there."""
    for key, value in ceph_s3.env().items():
        monkeypatch.setenv(key, value)
    return ceph_s3


@pytest.fixture
def put(aws_env: S3Service, s3_bucket: str) -> Callable[[str, Path], str]:
    """Put a local file at a key of the test's bucket; returns its s3:// URL."""
    s3 = aws_env.client()

    def put(key: str, path: Path) -> str:
        s3.upload_file(str(path), s3_bucket, key)
        return f"s3://{s3_bucket}/{key}"

    return put


@pytest.fixture
def make_app(tmp_path: Path, aws_env: S3Service) -> Iterator[AppFactory]:
    clients: list[TestClient] = []

    def make(*, name: str = "data", **settings: Any) -> TestClient:
        if name != "data":
            # Another service with a store of its own: its own index too (CKPT_DATABASE_URL names this test's).
            settings.setdefault("database_url", f"sqlite:///{tmp_path / name / 'index.sqlite3'}")
        client = TestClient(create_app(Settings(data_dir=tmp_path / name, **settings)))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def app(make_app: AppFactory, s3_bucket: str) -> TestClient:
    """A service that may read s3://BUCKET/allowed/ and nothing else."""
    return make_app(import_allowed=f"s3://{s3_bucket}/allowed/")


def total(client: TestClient) -> int:
    count: int = client.get("/checkpoints").json()["total"]
    return count


def assert_nothing_left(client: TestClient, data_dir: Path, *, stored: int = 0) -> None:
    assert total(client) == stored
    assert os.listdir(data_dir / "tmp") == []


# ---- POST /checkpoints/import ------------------------------------------------------------------------------------


def test_import_stores_the_object_like_an_upload_and_records_its_source(
    app: TestClient, make_app: AppFactory, put: Callable[[str, Path], str], recipe_files: dict[str, Path],
    s3_bucket: str,
) -> None:
    url = put("allowed/run-7/original.pth", recipe_files["original"])
    r = app.post("/checkpoints/import", json={"url": url, "name": "orig", "labels": {"run": "7"}})
    assert r.status_code == 201, r.text
    art = r.json()
    assert art["id"] == sha(recipe_files["original"])
    assert r.headers["location"].endswith(f"/checkpoints/{art['id']}")
    assert art["filename"] == "original.pth" and art["names"] == ["orig"] and art["labels"] == {"run": "7"}
    lineage = art["lineage"]
    assert lineage["operation"] == "import" and lineage["inputs"] == {}
    assert lineage["params"]["url"] == url
    assert lineage["params"]["size"] == recipe_files["original"].stat().st_size
    assert lineage["params"]["etag"] and lineage["params"]["last_modified"]
    # The same bytes as uploaded, the same parse as an upload's.
    assert app.get(f"/checkpoints/{art['id']}/file").content == recipe_files["original"].read_bytes()
    uploaded = make_app(name="uploaded")
    with recipe_files["original"].open("rb") as fh:
        up = uploaded.post("/checkpoints", files={"file": ("original.pth", fh)}).json()
    for field in ("id", "size", "format", "key_count", "tensor_bytes", "schema_fingerprint", "has_metadata"):
        assert art[field] == up[field], field
    assert app.get("/checkpoints/orig/manifest").json() == uploaded.get(f"/checkpoints/{up['id']}/manifest").json()
    assert app.get("/checkpoints", params={"operation": "import"}).json()["total"] == 1


def test_a_repeated_import_is_the_same_artifact_and_a_changed_object_a_new_one(
    app: TestClient, put: Callable[[str, Path], str], recipe_files: dict[str, Path]
) -> None:
    url = put("allowed/model.pth", recipe_files["original"])
    first = app.post("/checkpoints/import", json={"url": url})
    assert first.status_code == 201, first.text
    gets: list[str] = []  # the GETs the service's own S3 client sends from here on (botocore's event hooks)
    importer = app.app.state.services.operations.importer  # type: ignore[attr-defined]
    importer._client().meta.events.register("before-call.s3.GetObject", lambda **kw: gets.append("GET"))
    again = app.post("/checkpoints/import", json={"url": url, "labels": {"ignored": "yes"}})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"] and again.json()["labels"] == {}
    assert gets == []  # the same object version: a HEAD, no download
    # The same bytes under another key: the same artifact.
    other = app.post("/checkpoints/import", json={"url": put("allowed/copy.pth", recipe_files["original"])})
    assert other.status_code == 200 and other.json()["id"] == first.json()["id"]
    assert total(app) == 1
    # Deleted, then imported again: stored again (what the service remembers of the object is only a shortcut).
    assert app.delete(f"/checkpoints/{first.json()['id']}").status_code == 200
    back = app.post("/checkpoints/import", json={"url": url})
    assert back.status_code == 201 and back.json()["id"] == first.json()["id"]
    assert gets == ["GET", "GET"]  # the copy under another key, and this one
    # The object overwritten with other bytes: the new bytes are read, not the remembered version.
    put("allowed/model.pth", recipe_files["trained"])
    changed = app.post("/checkpoints/import", json={"url": url})
    assert changed.status_code == 201, changed.text
    assert changed.json()["id"] == sha(recipe_files["trained"])


def test_an_upload_then_an_import_of_the_same_bytes_keeps_the_upload(
    app: TestClient, put: Callable[[str, Path], str], recipe_files: dict[str, Path]
) -> None:
    with recipe_files["original"].open("rb") as fh:
        up = app.post("/checkpoints", files={"file": ("orig.pth", fh)})
    assert up.status_code == 201
    r = app.post("/checkpoints/import", json={"url": put("allowed/o.pth", recipe_files["original"])})
    assert r.status_code == 200 and r.json()["id"] == up.json()["id"]
    assert r.json()["lineage"] is None and r.json()["filename"] == "orig.pth"


def test_import_is_off_without_an_allowlist(
    make_app: AppFactory, put: Callable[[str, Path], str], recipe_files: dict[str, Path], tmp_path: Path
) -> None:
    client = make_app()
    url = put("allowed/model.pth", recipe_files["original"])
    r = client.post("/checkpoints/import", json={"url": url})
    detail = assert_refused(r, status=403, fragment="CKPT_IMPORT_ALLOWED")
    assert "off" in detail and r.json()["setting"] == "CKPT_IMPORT_ALLOWED"
    assert_nothing_left(client, tmp_path / "data")


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("s3://{b}/secret/model.pth", 403),  # the object exists, outside the allowed prefix
        ("s3://{b}/allowed-not/model.pth", 403),  # a prefix is a folder, not a string prefix
        ("s3://other-{b}/allowed/model.pth", 403),
        ("s3://{b}/allowed/../secret/model.pth", 400),
        ("s3://{b}/allowed/./model.pth", 400),
        ("s3://{b}/allowed//model.pth", 400),
        ("s3://{b}/allowed/", 400),
        ("s3://{b}", 400),
        ("s3://{b}/allowed/model.pth?versionId=1", 400),
        ("http://127.0.0.1:1/{b}/allowed/model.pth", 400),
        ("file:///etc/passwd", 400),
        ("/etc/passwd", 400),
    ],
)
def test_refused_urls_read_nothing(
    app: TestClient, put: Callable[[str, Path], str], recipe_files: dict[str, Path], s3_bucket: str, tmp_path: Path,
    url: str, status: int,
) -> None:
    put("secret/model.pth", recipe_files["original"])
    put("allowed-not/model.pth", recipe_files["original"])
    r = app.post("/checkpoints/import", json={"url": url.format(b=s3_bucket)})
    detail = assert_refused(r, status=status)
    if status == 403:
        assert "CKPT_IMPORT_ALLOWED" in detail
    assert_nothing_left(app, tmp_path / "data")


@pytest.mark.parametrize("raw", ["s3://", "http://bucket/", "s3://b/x/../y/", "bucket/prefix/", "s3://ok-bucket/,ftp://x"])
def test_a_bad_allowlist_stops_start_up(raw: str) -> None:
    with pytest.raises(ValueError, match="CKPT_IMPORT_ALLOWED entry"):
        Settings(import_allowed=raw)
    prefixes = Settings(import_allowed=" s3://ok-bucket , s3://ok-bucket/team-a ,").import_prefixes()
    assert [p.url for p in prefixes] == ["s3://ok-bucket/", "s3://ok-bucket/team-a/"]


def test_unknown_fields_are_refused(app: TestClient, s3_bucket: str) -> None:
    r = app.post("/checkpoints/import", json={"url": f"s3://{s3_bucket}/allowed/a.pth", "sha256": "0" * 64})
    assert r.status_code == 422 and "sha256" in r.text


def test_a_missing_object_or_bucket_is_404(app: TestClient, make_app: AppFactory, s3_bucket: str,
                                           tmp_path: Path) -> None:
    url = f"s3://{s3_bucket}/allowed/nothing-here.pth"
    r = app.post("/checkpoints/import", json={"url": url})
    assert_refused(r, status=404, fragment="no object")
    assert r.json()["url"] == url
    other = make_app(name="other", import_allowed="s3://no-such-bucket-h21b/")
    assert_refused(other.post("/checkpoints/import", json={"url": "s3://no-such-bucket-h21b/x.pth"}), status=404)
    assert_nothing_left(app, tmp_path / "data")


def test_a_hostile_object_is_refused_by_the_sandboxed_parse_and_nothing_is_stored(
    app: TestClient, put: Callable[[str, Path], str], tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    url = put("allowed/evil.pth", make_rce_zip(tmp_path / "evil.pth", marker))
    r = app.post("/checkpoints/import", json={"url": url})
    assert_refused(r, status=422)
    assert r.json()["unsafe_globals"], r.json()
    assert not marker.exists()
    assert_nothing_left(app, tmp_path / "data")


def test_an_object_over_the_upload_limit_is_413_from_its_head(
    make_app: AppFactory, put: Callable[[str, Path], str], recipe_files: dict[str, Path], s3_bucket: str,
    tmp_path: Path,
) -> None:
    size = recipe_files["original"].stat().st_size
    client = make_app(import_allowed=f"s3://{s3_bucket}/", max_upload_bytes=size - 1)
    r = client.post("/checkpoints/import", json={"url": put("big.pth", recipe_files["original"])})
    # The HEAD's size is refused before any GET (a refusal while streaming would say "upload exceeds").
    assert_refused(r, status=413, fragment=f"has {size} bytes")
    assert_nothing_left(client, tmp_path / "data")


@pytest.mark.blobs("local")  # it points the AWS_* settings elsewhere, the S3 blob store with them
def test_an_unreachable_store_or_bad_keys_are_502(
    app: TestClient, put: Callable[[str, Path], str], recipe_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch, make_app: AppFactory, s3_bucket: str, tmp_path: Path,
) -> None:
    url = put("allowed/model.pth", recipe_files["original"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    wrong_keys = make_app(name="wrong", import_allowed=f"s3://{s3_bucket}/allowed/")
    r = wrong_keys.post("/checkpoints/import", json={"url": url})
    assert r.status_code == 502, r.text
    assert "refused" in r.json()["detail"] and r.json()["url"] == url
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    down = make_app(name="down", import_allowed=f"s3://{s3_bucket}/allowed/")
    r = down.post("/checkpoints/import", json={"url": url})
    assert r.status_code == 502 and "could not be reached" in r.json()["detail"], r.text
    assert_nothing_left(down, tmp_path / "down")


def test_a_container_key_gives_the_derived_state_dict(
    app: TestClient, put: Callable[[str, Path], str], recipe_files: dict[str, Path], tmp_path: Path
) -> None:
    sd = torch.load(recipe_files["original"], weights_only=True)
    path = tmp_path / "training.pth"
    torch.save({"model": sd, "ema": {k: v.clone() + 1 if v.is_floating_point() else v for k, v in sd.items()}}, path)
    url = put("allowed/training.pth", path)
    r = app.post("/checkpoints/import", json={"url": url, "container_key": "ema"})
    assert r.status_code == 201, r.text
    art = r.json()
    assert art["lineage"]["operation"] == "extract" and art["container_key"] is None
    raw = app.get(f"/checkpoints/{art['lineage']['inputs']['checkpoint']}").json()
    assert raw["id"] == sha(path) and raw["lineage"]["operation"] == "import"
    again = app.post("/checkpoints/import", json={"url": url, "container_key": "ema"})
    assert again.status_code == 200 and again.json()["id"] == art["id"]


# ---- s3:// refs in POST /merge ------------------------------------------------------------------------------


def test_merge_by_reference_equals_the_merge_of_uploads(
    app: TestClient, put: Callable[[str, Path], str], recipe_files: dict[str, Path]
) -> None:
    original = put("allowed/original.pth", recipe_files["original"])
    trained = put("allowed/run-1/trained.pth", recipe_files["trained"])
    r = app.post("/merge", data={"architecture": "tiny-convnet", "original": original, "trained": trained,
                                 "frozen_prefixes": "features."})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["report"]["verification"]["ok"] and body["report"]["frozen"]["changed"] == []
    inputs = body["artifact"]["lineage"]["inputs"]
    assert inputs == {"original": sha(recipe_files["original"]), "trained": sha(recipe_files["trained"])}
    for role, url in (("original", original), ("trained", trained)):
        lineage = app.get(f"/checkpoints/{inputs[role]}").json()["lineage"]
        assert lineage["operation"] == "import" and lineage["params"]["url"] == url
    # The upload path gives the very same bytes, so the same artifact.
    with recipe_files["original"].open("rb") as o, recipe_files["trained"].open("rb") as t:
        by_upload = app.post("/merge", data={"architecture": "tiny-convnet", "frozen_prefixes": "features."},
                             files={"original_file": ("o.pth", o), "trained_file": ("t.pth", t)})
    assert by_upload.status_code == 200, by_upload.text
    assert by_upload.json()["id"] == body["id"]
    assert by_upload.json()["report"]["changes"] == body["report"]["changes"]
    # A JSON body and a mix of a stored name and an object do too.
    app.put("/names/orig", json={"id": inputs["original"]})
    as_json = app.post("/merge", json={"architecture": "tiny-convnet", "original": "orig", "trained": trained,
                                       "frozen_prefixes": ["features."], "labels": {"via": "json"}})
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["id"] == body["id"]
    assert total(app) == 3


def test_a_merge_by_reference_that_fails_stores_nothing(
    app: TestClient, put: Callable[[str, Path], str], recipe_files: dict[str, Path], s3_bucket: str, tmp_path: Path
) -> None:
    original = put("allowed/original.pth", recipe_files["original"])
    trained = put("allowed/trained.pth", recipe_files["trained"])
    data_dir = tmp_path / "data"
    # Verification fails (another architecture): neither imported input is kept.
    r = app.post("/merge", data={"architecture": "mlp-bn", "original": original, "trained": trained})
    assert_refused(r, status=422)
    assert_nothing_left(app, data_dir)
    # One side missing: the other side's download is dropped too.
    r = app.post("/merge", data={"architecture": "tiny-convnet", "original": original,
                                 "trained": f"s3://{s3_bucket}/allowed/missing.pth"})
    assert_refused(r, status=404)
    assert_nothing_left(app, data_dir)
    # A hostile object: refused by the sandboxed parse, the other side's download dropped too.
    marker = tmp_path / "pwned"
    evil = put("allowed/evil.pth", make_rce_zip(tmp_path / "evil.pth", marker))
    r = app.post("/merge", data={"architecture": "tiny-convnet", "original": original, "trained": evil})
    assert_refused(r, status=422)
    assert not marker.exists()
    assert_nothing_left(app, data_dir)
    # One side outside the allowlist: refused before anything is read, naming the field.
    r = app.post("/merge", data={"architecture": "tiny-convnet", "original": original,
                                 "trained": f"s3://{s3_bucket}/elsewhere/trained.pth"})
    assert_refused(r, status=403, fragment="CKPT_IMPORT_ALLOWED")
    r = app.post("/merge", data={"architecture": "tiny-convnet", "original": "ftp://x/y.pth", "trained": trained})
    assert_refused(r, status=400, fragment="original")
    assert_nothing_left(app, data_dir)


def test_a_json_merge_body_is_checked_like_a_form(recipe_files: dict[str, Path], tmp_path: Path) -> None:
    # No object store needed: these are refused before anything is read.
    with TestClient(create_app(Settings(data_dir=tmp_path / "plain"))) as client:
        _json_merges(client, recipe_files)


def _json_merges(client: TestClient, recipe_files: dict[str, Path]) -> None:
    for body, fragment in (
        (b"[1, 2]", "object of fields"),
        (b"{not json", "not valid JSON"),
        (b'{"architecture": "tiny-convnet", "original_file": "x"}', "unknown JSON fields"),
        (b'{"architecture": "tiny-convnet", "labels": {"a": 1}}', "'labels'"),
        (b'{"architecture": "tiny-convnet", "trained": "x"}', "exactly one of 'original'"),
    ):
        r = client.post("/merge", content=body, headers={"content-type": "application/json"})
        assert_refused(r, status=400, fragment=fragment)
    with recipe_files["original"].open("rb") as fh:
        original = client.post("/checkpoints", files={"file": ("o.pth", fh)}).json()["id"]
    with recipe_files["trained"].open("rb") as fh:
        trained = client.post("/checkpoints", files={"file": ("t.pth", fh)}).json()["id"]
    r = client.post("/merge", json={"architecture": "tiny-convnet", "original": original, "trained": trained,
                                    "drop_unexpected": False, "frozen_atol": 0, "strip_prefixes": "auto"})
    assert r.status_code == 201, r.text


# ---- client and CLI -------------------------------------------------------------------------------------


def test_client_import_url_and_merge_by_reference(
    app: TestClient, put: Callable[[str, Path], str], recipe_files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = CheckpointClient(http=app, retry=RetryPolicy(attempts=1))
    url = put("allowed/original.pth", recipe_files["original"])
    first = ckpt.import_url(url, name="orig", labels={"k": "v"})
    assert first.created and first.artifact.id == sha(recipe_files["original"])
    assert first.artifact.names == ["orig"] and first.artifact.labels == {"k": "v"}
    assert not ckpt.import_url(url).created
    trained = put("allowed/trained.pth", recipe_files["trained"])
    out = ckpt.merge("orig", trained, architecture="tiny-convnet")
    assert out.report["verification"]["ok"] and out.created

    assert cli_main(["import", url, "--name", "again"], http=app) == 0
    assert capsys.readouterr().out.startswith(f"already stored: {first.artifact.id}")
    assert cli_main(["--json", "import", trained], http=app) == 0
    assert json.loads(capsys.readouterr().out)["created"] is False
    assert cli_main(["merge", url, trained, "-a", "tiny-convnet", "--name", "final"], http=app) == 0
    assert f"already stored {out.id}" in capsys.readouterr().out
    assert cli_main(["import", "s3://elsewhere/x.pth"], http=app) == 1
    assert "CKPT_IMPORT_ALLOWED" in capsys.readouterr().err


# ---- the shards of one checkpoint -------------------------------------------------------------------------


def test_the_shards_of_a_checkpoint_import_as_one_artifact_like_uploaded_shards(
    app: TestClient, make_app: AppFactory, put: Callable[[str, Path], str], tmp_path: Path, s3_bucket: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sharded = pytest.importorskip("tests.sharded", reason="the corpus extra (transformers) is not installed")
    directory = sharded.save_sharded(sharded.tiny_bert(seed=3), tmp_path / "checkpoint-500")
    files = sharded.shard_files(directory)
    assert len(files) >= 4, "the fixture must really be sharded"
    urls = [put(f"allowed/run-3/{f.name}", f) for f in files]
    r = app.post("/checkpoints/import", json={"urls": urls[::-1], "name": "bert"})
    assert r.status_code == 201, r.text
    art = r.json()
    assert (art["format"], art["names"], art["filename"]) == ("safetensors", ["bert"], "model.safetensors")
    lineage = art["lineage"]
    assert lineage["operation"] == "combine" and lineage["params"]["urls"] == urls[::-1]
    assert [s["sha256"] for s in lineage["params"]["shards"]] == [sha(f) for f in files[1:]]
    assert total(app) == 1  # the shards themselves are not artifacts
    # The same shards uploaded: the same artifact.
    parts = [("file", (f.name, f.read_bytes(), "application/octet-stream")) for f in files]
    assert app.post("/checkpoints", files=parts).json()["id"] == art["id"]
    assert cli_main(["import", *urls], http=app) == 0
    assert capsys.readouterr().out.startswith(f"already stored: {art['id']}")
    assert_nothing_left(app, tmp_path / "data", stored=1)
    # A shard missing from the objects named: refused against the index, nothing stored.
    fresh = make_app(name="fresh", import_allowed=f"s3://{s3_bucket}/allowed/")
    assert_refused(fresh.post("/checkpoints/import", json={"urls": urls[:-1]}), status=422)
    assert_nothing_left(fresh, tmp_path / "fresh")
    # Together over the request limit: 413 from the HEADs, before any download.
    small = make_app(name="small", import_allowed=f"s3://{s3_bucket}/allowed/",
                     max_request_bytes=sum(f.stat().st_size for f in files) - 1)
    assert_refused(small.post("/checkpoints/import", json={"urls": urls}), status=413, fragment="together")
    assert_nothing_left(small, tmp_path / "small")


def test_url_and_urls_are_exclusive(app: TestClient, s3_bucket: str) -> None:
    one = f"s3://{s3_bucket}/allowed/a.safetensors"
    assert_refused(app.post("/checkpoints/import", json={}), status=400, fragment="exactly one")
    assert_refused(app.post("/checkpoints/import", json={"url": one, "urls": [one]}), status=400)
    r = app.post("/checkpoints/import", json={"urls": [one], "container_key": "ema"})
    assert_refused(r, status=400, fragment="container_key")
    r = app.post("/checkpoints/import", json={"urls": [one, f"s3://{s3_bucket}/elsewhere/b.safetensors"]})
    assert_refused(r, status=403)
    assert "urls[1]" in app.post("/checkpoints/import", json={"urls": [one, "ftp://x/y"]}).json()["detail"]


def test_ckpt_import_keeps_the_service_url_apart_from_the_objects() -> None:
    args = build_parser().parse_args(["import", "s3://b/k/a.safetensors", "s3://b/k/b.safetensors",
                                      "--url", "http://ckpt:8000"])
    assert args.url == "http://ckpt:8000" and args.objects == ["s3://b/k/a.safetensors", "s3://b/k/b.safetensors"]
