"""Quantized and integer tensors: fingerprints cover every field that changes a value; the frozen check sees them.

Also the fingerprint version of stored manifests: a manifest written before it existed is recomputed on first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import torch

from service.core.diff import diff_manifests
from service.core.frozen import check_frozen, check_frozen_manifests
from service.core.manifest import FINGERPRINT_VERSION, build_manifest, fingerprint_tensor
from service.store import ArtifactStore

# quantize_per_tensor / quantize_per_channel are deprecated in torch 2.13 (they still work, and checkpoints hold
# them); loading a quantized tensor goes through TypedStorage, which torch also warns about.
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning"),
]

VALUES = torch.linspace(-1, 1, 12).reshape(3, 4)


def per_tensor(scale: float = 0.1, zero_point: int = 3, dtype: torch.dtype = torch.qint8) -> torch.Tensor:
    return torch.quantize_per_tensor(VALUES, scale, zero_point, dtype)


def per_channel(scales: tuple[float, ...] = (0.1, 0.2, 0.3), axis: int = 0) -> torch.Tensor:
    n = VALUES.shape[axis]
    s = torch.tensor(scales[:n], dtype=torch.float64)
    return torch.quantize_per_channel(VALUES, s, torch.zeros(n, dtype=torch.int64), axis, torch.qint8)


def test_fingerprint_is_stable_for_the_same_quantized_tensor() -> None:
    assert fingerprint_tensor(per_tensor()) == fingerprint_tensor(per_tensor())
    assert fingerprint_tensor(per_channel()) == fingerprint_tensor(per_channel())


def test_scale_change_with_the_same_int_repr_changes_the_fingerprint() -> None:
    a = per_tensor(scale=0.1)
    b = torch._make_per_tensor_quantized_tensor(a.int_repr(), 0.2, 3)
    assert torch.equal(a.int_repr(), b.int_repr())
    assert fingerprint_tensor(a) != fingerprint_tensor(b)


def test_zero_point_change_with_the_same_int_repr_changes_the_fingerprint() -> None:
    a = per_tensor(zero_point=3)
    b = torch._make_per_tensor_quantized_tensor(a.int_repr(), 0.1, 4)
    assert fingerprint_tensor(a) != fingerprint_tensor(b)


def test_per_channel_scales_and_axis_change_the_fingerprint() -> None:
    a = per_channel((0.1, 0.2, 0.3))
    same_repr = torch._make_per_channel_quantized_tensor(
        a.int_repr(), torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64), torch.zeros(3, dtype=torch.int64), 0
    )
    assert fingerprint_tensor(a) != fingerprint_tensor(same_repr)
    square = torch.quantize_per_channel(torch.ones(3, 3), torch.ones(3, dtype=torch.float64),
                                        torch.zeros(3, dtype=torch.int64), 0, torch.qint8)
    other_axis = torch._make_per_channel_quantized_tensor(
        square.int_repr(), torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), 1
    )
    assert fingerprint_tensor(square) != fingerprint_tensor(other_axis)


def test_dtype_change_with_the_same_bytes_changes_the_fingerprint() -> None:
    a = torch._make_per_tensor_quantized_tensor(torch.full((4,), 5, dtype=torch.int8), 0.1, 0)
    b = torch._make_per_tensor_quantized_tensor(torch.full((4,), 5, dtype=torch.uint8), 0.1, 0)
    assert a.dtype != b.dtype
    assert fingerprint_tensor(a) != fingerprint_tensor(b)


def test_plain_tensors_hash_as_in_version_1() -> None:
    t = torch.arange(10, dtype=torch.float32)
    assert fingerprint_tensor(t) == blake3.blake3(t.numpy().tobytes()).hexdigest(length=16)


def test_manifest_records_the_fingerprint_version() -> None:
    manifest = build_manifest({"w": torch.ones(2)})
    assert manifest.to_dict()["fingerprint_version"] == FINGERPRINT_VERSION == 2


def test_frozen_manifest_check_sees_a_quantized_scale_change() -> None:
    a = per_tensor(scale=0.1)
    b = torch._make_per_tensor_quantized_tensor(a.int_repr(), 0.2, 3)
    report = check_frozen_manifests(build_manifest({"q.weight": a}), build_manifest({"q.weight": b}))
    assert report.checked == 1
    assert report.changed == ("q.weight",)
    assert diff_manifests(build_manifest({"q.weight": a}), build_manifest({"q.weight": b})).changed == ("q.weight",)


def test_frozen_checks_integer_tensors_by_equality() -> None:
    before = {"emb.codes": torch.arange(6, dtype=torch.int64), "w": torch.ones(2)}
    after = {"emb.codes": torch.arange(6, dtype=torch.int64) + (torch.arange(6) == 5), "w": torch.ones(2)}
    by_values = check_frozen(before, after)
    assert by_values.checked == 2
    assert by_values.changed == ("emb.codes",)
    assert by_values.max_abs == {"emb.codes": 1.0}
    assert check_frozen_manifests(build_manifest(before), build_manifest(after)).changed == ("emb.codes",)
    assert check_frozen(before, before).ok


def test_frozen_value_check_compares_quantized_values() -> None:
    a = per_tensor(scale=0.1)
    rescaled = torch._make_per_tensor_quantized_tensor(a.int_repr(), 0.2, 3)
    report = check_frozen({"q": a}, {"q": rescaled})
    assert report.changed == ("q",)
    assert report.max_abs["q"] == pytest.approx(float((a.dequantize() - rescaled.dequantize()).abs().max()))
    assert check_frozen({"q": a}, {"q": per_tensor(scale=0.1)}).ok


# ---- manifests written with fingerprint version 1 ------------------------------------------------------------


def _v1(tensor: torch.Tensor) -> str:
    # What version 1 stored for a quantized tensor: the hash of its int_repr alone.
    return blake3.blake3(tensor.int_repr().contiguous().numpy().tobytes()).hexdigest(length=16)


def _rewrite_as_v1(store: ArtifactStore, artifact_id: str, quantized: dict[str, torch.Tensor]) -> None:
    # The manifest as version 1 wrote it (no fingerprint_version, int_repr hashes), stored in its place.
    data = store.manifest(artifact_id).to_dict()
    del data["fingerprint_version"]
    for key, tensor in quantized.items():
        data["entries"][key]["fingerprint"] = _v1(tensor)
    assert store.index.update_manifest(artifact_id, data)


@pytest.fixture
def two_scales(tmp_path: Path) -> Iterator[tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    a = {"q.weight": per_tensor(scale=0.1), "bias": torch.ones(3)}
    b = {"q.weight": torch._make_per_tensor_quantized_tensor(a["q.weight"].int_repr(), 0.2, 3), "bias": torch.ones(3)}
    pa, pb = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(a, pa)
    torch.save(b, pb)
    yield pa, pb, a, b


def test_an_old_manifest_is_recomputed_on_first_use(
    tmp_path: Path, two_scales: tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]
) -> None:
    pa, pb, a, b = two_scales
    root = tmp_path / "store"
    first = ArtifactStore(root)
    old_id = first.ingest_file(pa).artifact.id
    _rewrite_as_v1(first, old_id, {"q.weight": a["q.weight"]})
    store = ArtifactStore(root)  # a new process: nothing cached
    new_id = store.ingest_file(pb).artifact.id

    old = store.manifest(old_id)
    assert old.fingerprint_version == FINGERPRINT_VERSION
    assert old.entries["q.weight"].fingerprint == fingerprint_tensor(a["q.weight"]) != _v1(a["q.weight"])
    assert old.entries["bias"] == build_manifest(a).entries["bias"]
    # The old artifact vs the new one differs in scale only: a change, not "unchanged".
    assert diff_manifests(old, store.manifest(new_id)).changed == ("q.weight",)
    # The stored manifest is rewritten once, so the next process does not recompute it.
    rewritten = store.index.manifest(old_id)
    assert rewritten is not None
    assert rewritten["fingerprint_version"] == FINGERPRINT_VERSION
    assert rewritten["entries"]["q.weight"]["fingerprint"] == fingerprint_tensor(a["q.weight"])
    assert ArtifactStore(root).manifest(old_id) == old


def test_an_old_manifest_without_quantized_tensors_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "store"
    src = tmp_path / "plain.pth"
    torch.save({"w": torch.ones(3), "n": torch.arange(3)}, src)
    first = ArtifactStore(root)
    artifact_id = first.ingest_file(src).artifact.id
    _rewrite_as_v1(first, artifact_id, {})
    before = first.index.manifest(artifact_id)
    manifest = ArtifactStore(root).manifest(artifact_id)
    assert manifest.fingerprint_version == FINGERPRINT_VERSION
    assert manifest.entries == build_manifest(torch.load(src, weights_only=True)).entries
    assert first.index.manifest(artifact_id) == before  # the same fingerprints: no rewrite needed
