"""Uploads that used to be accepted and hurt later: alias blow-ups, non-UTF-8 keys, dtypes and keys safetensors
cannot hold, oversized multipart boundaries. Each is refused with a problem document, and nothing is stored."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.problems import ProblemJSONResponse, problem_response
from service.config import Settings
from service.core.manifest import build_manifest
from service.store import ArtifactStore
from tests.core.test_expansion import TiedLM, alias_state_dict
from tests.hardening.hostile_support import assert_refused

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning"),
]

MIB = 1 << 20


@pytest.fixture
def inproc(tmp_path: Path) -> Iterator[TestClient]:
    # Parsed in-process: these tests are about what happens after the parse, not about the sandbox.
    with TestClient(create_app(Settings(data_dir=tmp_path / "data", sandbox=False))) as c:
        yield c


def save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def upload(client: TestClient, path: Path) -> dict[str, object]:
    r = client.post("/checkpoints", files={"file": (path.name, path.read_bytes())})
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body


def total(client: TestClient) -> int:
    count: int = client.get("/checkpoints").json()["total"]
    return count


# ---- item 1: alias blow-up ---------------------------------------------------------------------------------


def test_alias_blow_up_is_refused_by_the_sandboxed_parser(client: TestClient, tmp_path: Path) -> None:
    # `client` parses in the sandbox's worker processes (the default settings).
    path = save(tmp_path / "alias.pth", alias_state_dict(200))
    r = client.post("/checkpoints", files={"file": ("alias.pth", path.read_bytes())})
    detail = assert_refused(r, status=422, fragment="expands to 209715200 bytes")
    assert r.json()["type"] == "urn:ckpt:problem:expansion-limit-exceeded", detail
    assert r.json()["limit"] == 4 * path.stat().st_size + 64 * MIB
    r = client.post("/diff", files={"a": ("a.pth", path.read_bytes()), "b": ("b.pth", path.read_bytes())})
    assert_refused(r, status=422, fragment="expands to")
    # The same parse refuses a key that is not UTF-8 (the worker's JSON reply must carry it intact).
    bad = save(tmp_path / "bad.pth", {"w\ud800": torch.ones(2)})
    r = client.post("/checkpoints", files={"file": ("bad.pth", bad.read_bytes())})
    assert_refused(r, status=422, fragment="not valid UTF-8")
    assert total(client) == 0


def test_tied_weights_upload_and_convert(inproc: TestClient, tmp_path: Path) -> None:
    path = save(tmp_path / "tied.pth", TiedLM().state_dict())
    art = upload(inproc, path)
    r = inproc.get(f"/checkpoints/{art['id']}/file", params={"format": "safetensors"})
    assert r.status_code == 200, r.text
    out = tmp_path / "tied.safetensors"
    out.write_bytes(r.content)
    tensors = safetensors.torch.load_file(out)
    assert torch.equal(tensors["embed.weight"], tensors["head.weight"])


def test_absolute_cap_applies_to_uploads(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", sandbox=False, max_expanded_bytes=100_000)
    with TestClient(create_app(settings)) as c:
        path = save(tmp_path / "tied.pth", TiedLM().state_dict())
        r = c.post("/checkpoints", files={"file": ("tied.pth", path.read_bytes())})
        assert_refused(r, status=422, fragment="more than the limit of 100000 bytes")


def test_default_cap_is_four_times_the_upload_limit() -> None:
    assert Settings(max_upload_bytes=1000).expanded_bytes_cap() == 4000
    assert Settings(max_upload_bytes=1000, max_expanded_bytes=7).expanded_bytes_cap() == 7


def test_every_safetensors_write_checks_the_bound(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = save(tmp_path / "alias.pth", alias_state_dict(200))
    # Stored by a service with a generous ratio (as an older version stored it without any bound) ...
    with TestClient(create_app(Settings(data_dir=data, sandbox=False, max_expansion_ratio=10_000))) as c:
        art = upload(c, path)
    # ... and then read by one with the default bound: no path that writes safetensors may expand it.
    with TestClient(create_app(Settings(data_dir=data, sandbox=False))) as c:
        r = c.get(f"/checkpoints/{art['id']}/file", params={"format": "safetensors"}, headers={"Range": "bytes=0-0"})
        assert_refused(r, status=422, fragment="the safetensors output expands to 209715200 bytes")
        r = c.post("/strip", json={"checkpoint": art["id"], "output_format": "safetensors"})
        assert_refused(r, status=422, fragment="expands to")
        r = c.post("/architectures", json={"name": "aliases", "from_checkpoint": art["id"]})
        assert r.status_code == 201, r.text
        form = {"architecture": "aliases", "original": art["id"], "trained": art["id"], "output_format": "safetensors"}
        r = c.post("/merge", data=form)
        assert_refused(r, status=422, fragment="expands to")
        assert total(c) == 1


# ---- item 4: keys, dtypes and boundaries ---------------------------------------------------------------------


def test_surrogate_keys_are_refused_at_upload(inproc: TestClient, tmp_path: Path) -> None:
    path = save(tmp_path / "bad.pth", {"w\ud800": torch.ones(2), "ok": torch.ones(1)})
    r = inproc.post("/checkpoints", files={"file": ("bad.pth", path.read_bytes())})
    assert_refused(r, status=422, fragment="not valid UTF-8")
    assert r.json()["keys"] == ["w\\ud800"]
    r = inproc.post("/diff", files={"a": ("a.pth", path.read_bytes()), "b": ("b.pth", path.read_bytes())})
    assert_refused(r, status=422)
    assert total(inproc) == 0


def test_the_problem_renderer_survives_unencodable_values() -> None:
    r = problem_response(None, status=422, title="t", detail="bad \ud800 key", extensions={"keys": ["w\ud800"],
                                                                                      "x": float("nan")})
    assert isinstance(r, ProblemJSONResponse)
    body = json.loads(r.body)
    assert body["detail"] == "bad \\ud800 key"
    assert body["keys"] == ["w\\ud800"]
    assert body["x"] is None


def _unsupported_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tensors = {
            "complex128": torch.ones(2, dtype=torch.complex128),
            "complex32": torch.ones(2, dtype=torch.complex32),
            "bits16": torch.zeros(2, dtype=torch.int16).view(torch.bits16),
            "qint8": torch.quantize_per_tensor(torch.ones(4), 0.1, 3, torch.qint8),
        }
    return {name: (save(tmp_path / f"{name}.pth", {"layer.w": t, "layer.b": torch.ones(1)}), name)
            for name, t in tensors.items()}


@pytest.mark.parametrize("dtype", ["complex128", "complex32", "bits16", "qint8"])
def test_dtypes_safetensors_cannot_hold_are_a_422(inproc: TestClient, tmp_path: Path, dtype: str) -> None:
    path, _ = _unsupported_files(tmp_path)[dtype]
    art = upload(inproc, path)
    r = inproc.get(f"/checkpoints/{art['id']}/file", params={"format": "safetensors"})
    detail = assert_refused(r, status=422, fragment=f"{dtype}: 'layer.w'")
    assert r.json()["keys"] == ["layer.w"] and r.json()["dtypes"] == [dtype], detail
    r = inproc.post("/strip", json={"checkpoint": art["id"], "output_format": "safetensors"})
    assert_refused(r, status=422, fragment=dtype)
    assert inproc.post("/architectures", json={"name": "arch", "from_checkpoint": art["id"]}).status_code == 201
    files = {"original_file": ("o.pth", path.read_bytes()), "trained_file": ("t.pth", path.read_bytes())}
    r = inproc.post("/merge", data={"architecture": "arch", "output_format": "safetensors"}, files=files)
    assert_refused(r, status=422, fragment=dtype)
    assert total(inproc) == 1  # the upload only
    # pth holds every dtype
    r = inproc.post("/strip", json={"checkpoint": art["id"], "output_format": "pth"})
    assert r.status_code == 201, r.text


def test_metadata_key_is_refused_for_safetensors(inproc: TestClient, tmp_path: Path) -> None:
    path = save(tmp_path / "meta.pth", {"__metadata__": torch.ones(2), "b": torch.ones(1)})
    art = upload(inproc, path)
    r = inproc.get(f"/checkpoints/{art['id']}/file", params={"format": "safetensors"})
    assert_refused(r, status=422, fragment="'__metadata__'")
    assert r.json()["keys"] == ["__metadata__"]
    r = inproc.post("/strip", json={"checkpoint": art["id"], "output_format": "safetensors"})
    assert_refused(r, status=422, fragment="'__metadata__'")
    assert total(inproc) == 1


@pytest.mark.parametrize("route", ["/checkpoints", "/diff", "/merge"])
def test_an_oversized_multipart_boundary_is_a_400(inproc: TestClient, route: str) -> None:
    boundary = "b" * 300
    body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--{boundary}--\r\n".encode()
    r = inproc.post(route, content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_refused(r, status=400, fragment="boundary has 300 characters")


@pytest.mark.blobs("local")  # it plants a blob file of the local layout
def test_a_poison_key_stored_before_the_check_gives_no_5xx(tmp_path: Path) -> None:
    # An artifact stored by an older version, which accepted the key: its manifest is given, so no parse refuses it.
    data = tmp_path / "data"
    store = ArtifactStore(data, database_url=Settings(data_dir=data).database_url)
    sd = {"w\ud800": torch.ones(2), "b": torch.ones(1)}
    art = store.store_state_dict(sd, manifest=build_manifest(sd)).artifact.id
    plain = store.store_state_dict({"b": torch.ones(1)}).artifact.id
    with TestClient(create_app(Settings(data_dir=data, sandbox=False))) as c:
        for params in ({}, {"values": "true", "frozen": "true"}):
            r = c.get("/diff", params={"a": art, "b": plain, **params})
            assert r.status_code == 200, r.text
            assert json.loads(r.content)["keys"]["only_in_a"]["keys"] == ["w\\ud800"]
        r = c.get(f"/checkpoints/{art}/file", params={"format": "safetensors"})
        assert_refused(r, status=422, fragment="must be valid UTF-8")
        assert r.json()["keys"] == ["w\\ud800"]
        r = c.post("/strip", json={"checkpoint": art, "output_format": "safetensors"})
        assert_refused(r, status=422, fragment="must be valid UTF-8")
