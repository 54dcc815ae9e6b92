"""Every file the real frameworks write: uploaded with default settings (no allowlist), read as torch.load reads it.

Needs the `corpus` extra (``pip install -c constraints.txt -e '.[corpus]'``); without it the module is skipped with
that reason. The files are generated once per session by `tests.corpus.generate` (tiny random-init models, fixed
seeds, nothing downloaded).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.core.load import load_checkpoint
from service.core.manifest import build_manifest

_MISSING = [m for m in ("timm", "lightning", "mmengine", "transformers", "accelerate", "omegaconf", "torchvision")
            if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.skipif(bool(_MISSING), reason=f"the corpus extra is not installed (missing: {', '.join(_MISSING)}); "
                       "pip install -c constraints.txt -e '.[corpus]'"),
    pytest.mark.timeout(900),
]

WEIGHTS = ("timm-last", "timm-best", "timm-whole-module", "torchvision-checkpoint", "lightning-epoch",
           "lightning-last", "mmengine-epoch", "hf-save-pretrained", "hf-trainer-model")
NO_WEIGHTS = ("hf-trainer-optimizer", "hf-trainer-scheduler", "hf-trainer-rng", "hf-trainer-args")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from tests.corpus.generate import generate

    files = generate(tmp_path_factory.mktemp("corpus"))
    by_name = {f.name: f for f in files}
    assert sorted(by_name) == sorted(WEIGHTS + NO_WEIGHTS)
    return by_name  # type: ignore[return-value]


@pytest.fixture(scope="module")
def corpus_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    # Default settings: the sandbox parses uploads, no safe_globals.
    with TestClient(create_app(Settings(data_dir=tmp_path_factory.mktemp("corpus-store")))) as client:
        yield client


def _torch_view(path: Path, container_key: str | None) -> dict[str, torch.Tensor]:
    """The state_dict as plain torch sees it (weights_only=False is fine here: this test wrote the file)."""
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    for part in (container_key.split(".") if container_key else []):
        obj = obj[part]
    return obj  # type: ignore[no-any-return]


def _upload(client: TestClient, path: Path) -> dict[str, object]:
    with path.open("rb") as fh:
        r = client.post("/checkpoints", files={"file": (path.name, fh)})
    assert r.status_code in (200, 201), r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", WEIGHTS)
def test_weights_are_what_torch_load_returns(corpus: dict[str, object], name: str) -> None:
    f = corpus[name]
    loaded = load_checkpoint(f.path)  # type: ignore[attr-defined]

    expected = _torch_view(f.path, loaded.container_key)  # type: ignore[attr-defined]
    assert list(loaded.state_dict) == list(expected)
    for key, value in expected.items():
        got = loaded.state_dict[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert torch.equal(got, value), key
    # bit-identical: the fingerprints hash the bytes
    assert build_manifest(loaded.state_dict).entries == build_manifest(dict(expected)).entries


@pytest.mark.parametrize("name", WEIGHTS)
def test_upload_manifest_strip_diff_merge_with_default_settings(
    corpus: dict[str, object], corpus_client: TestClient, name: str
) -> None:
    f = corpus[name]
    client = corpus_client
    art = _upload(client, f.path)  # type: ignore[attr-defined]
    ref = _upload(client, f.reference)  # type: ignore[attr-defined]

    manifest = client.get(f"/checkpoints/{art['id']}/manifest").json()
    expected = _torch_view(f.path, art["container_key"])  # type: ignore[attr-defined, arg-type]
    assert list(manifest["entries"]) == list(expected)
    assert art["key_count"] == len(expected)

    stripped = client.post("/strip", json={"checkpoint": art["id"]})
    assert stripped.status_code in (200, 201), stripped.text

    diff = client.get("/diff", params={"a": ref["id"], "b": art["id"], "normalize_prefixes": True}).json()
    summary = diff["summary"]
    assert summary["only_in_a"] == summary["only_in_b"] == 0, diff["keys"]
    assert summary["shape_mismatch"] == summary["dtype_mismatch"] == 0

    arch = f"corpus-{name}"
    registered = client.post("/architectures", json={"name": arch, "from_checkpoint": ref["id"]})
    assert registered.status_code in (201, 409), registered.text
    merged = client.post("/merge", data={"architecture": arch, "original": ref["id"], "trained": art["id"]})
    assert merged.status_code in (200, 201), merged.text
    assert merged.json()["report"]["verification"]["ok"] is True


@pytest.mark.parametrize("name", NO_WEIGHTS)
def test_files_without_model_weights_say_what_they_are(
    corpus: dict[str, object], corpus_client: TestClient, name: str
) -> None:
    f = corpus[name]
    with f.path.open("rb") as fh:  # type: ignore[attr-defined]
        r = corpus_client.post("/checkpoints", files={"file": (f.path.name, fh)})  # type: ignore[attr-defined]

    assert r.status_code == 422, r.text
    assert f.looks_like in r.json()["detail"]  # type: ignore[attr-defined]


def test_lightning_module_attribute_is_stripped_like_a_wrapper(
    corpus: dict[str, object], corpus_client: TestClient
) -> None:
    # The Trainer's file keeps the LightningModule's `self.net` as "net.*" next to `pytorch-lightning_version`.
    f = corpus["lightning-last"]
    client = corpus_client
    art = _upload(client, f.path)  # type: ignore[attr-defined]
    assert "pytorch-lightning_version" in art["extras"]  # type: ignore[operator]
    raw = client.get(f"/checkpoints/{art['id']}/manifest").json()["entries"]
    assert all(k.startswith("net.") for k in raw)
    bare = torch.load(f.reference, weights_only=True)  # type: ignore[attr-defined]  # the network's own state_dict
    assert list(raw) == ["net." + k for k in bare]
    clean = _upload(client, f.reference)  # type: ignore[attr-defined]

    stripped = client.post("/strip", json={"checkpoint": art["id"]})
    assert stripped.status_code in (200, 201), stripped.text
    assert stripped.json()["report"]["applied"] == {"net.": len(bare)}
    entries = client.get(f"/checkpoints/{stripped.json()['id']}/manifest").json()["entries"]
    assert list(entries) == list(bare)

    diff = client.get("/diff", params={"a": clean["id"], "b": art["id"], "normalize_prefixes": True}).json()
    assert diff["summary"]["unchanged"] == len(bare) and diff["summary"]["only_in_b"] == 0

    arch = "corpus-lightning-net"
    registered = client.post("/architectures", json={"name": arch, "from_checkpoint": clean["id"]})
    assert registered.status_code in (201, 409), registered.text
    merged = client.post("/merge", data={"architecture": arch, "original": clean["id"], "trained": art["id"],
                                         "strip_prefixes": "known", "require_complete": "true"})
    assert merged.status_code in (200, 201), merged.text
    assert merged.json()["report"]["prefixes"]["trained"]["applied"] == {"net.": len(bare)}
