from __future__ import annotations

import json

import blake3
import pytest
import torch

from service.core.manifest import build_manifest, compute_schema_fingerprint, dtype_name, fingerprint_tensor
from service.core.types import Manifest
from service.errors import InvalidCheckpoint
from tests.factories import make_original


def _reference(t: torch.Tensor) -> str:
    # An independent route to the same bytes: a full copy through numpy's tobytes (fine for tiny tensors).
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return blake3.blake3(raw).hexdigest(length=16)


def test_fingerprint_is_blake3_of_the_tensor_bytes() -> None:
    t = torch.randn(5, 7)
    fp = fingerprint_tensor(t)
    assert len(fp) == 32 and int(fp, 16) >= 0
    assert fp == _reference(t)


def test_equal_tensors_equal_fingerprints_and_one_element_changes_it() -> None:
    a = torch.randn(64)
    b = a.clone()
    assert fingerprint_tensor(a) == fingerprint_tensor(b)
    b[17] += 1e-3
    assert fingerprint_tensor(a) != fingerprint_tensor(b)


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8, torch.bool]
)
def test_narrow_and_exotic_dtypes(dtype: torch.dtype) -> None:
    a = (torch.randn(3, 5) * 4).to(dtype)
    assert fingerprint_tensor(a) == _reference(a)
    b = a.clone()
    b[1, 2] = torch.tensor(0 if bool(a[1, 2].float() != 0) else 1).to(dtype)
    assert fingerprint_tensor(a) != fingerprint_tensor(b)


def test_non_contiguous_hashes_the_logical_order() -> None:
    x = torch.randn(4, 6)
    t = x.t()
    assert not t.is_contiguous()
    assert fingerprint_tensor(t) == fingerprint_tensor(t.contiguous())
    assert fingerprint_tensor(t) != fingerprint_tensor(x)  # same bytes in memory, different logical order
    view = x[1:3]  # contiguous with a storage offset
    assert fingerprint_tensor(view) == fingerprint_tensor(view.clone())


def test_scalars_empty_and_parameters() -> None:
    empty = fingerprint_tensor(torch.empty(0))
    assert empty == fingerprint_tensor(torch.empty(0, 3, dtype=torch.int64))
    assert empty == blake3.blake3(b"").hexdigest(length=16)
    scalar = torch.tensor(2.5)
    assert fingerprint_tensor(scalar) == _reference(scalar)
    p = torch.nn.Parameter(torch.randn(3))
    assert fingerprint_tensor(p) == fingerprint_tensor(p.detach().clone())


def test_manifest_of_a_real_model() -> None:
    sd = make_original().state_dict()
    manifest = build_manifest(sd)
    assert list(manifest.entries) == list(sd)
    for key, t in sd.items():
        entry = manifest.entries[key]
        assert entry.shape == tuple(t.shape)
        assert entry.dtype == dtype_name(t.dtype)
        assert entry.nbytes == t.numel() * t.element_size()
        assert entry.fingerprint == _reference(t)
    assert manifest.entries["features.1.num_batches_tracked"].dtype == "int64"
    assert manifest.tensor_bytes == sum(t.numel() * t.element_size() for t in sd.values())


def test_manifest_json_round_trip() -> None:
    sd = make_original().state_dict()
    sd["empty"] = torch.empty(0, 4)
    sd["bf16"] = torch.randn(3).to(torch.bfloat16)
    manifest = build_manifest(sd)
    text = json.dumps(manifest.to_dict())
    assert Manifest.from_dict(json.loads(text)) == manifest


def test_schema_fingerprint_depends_on_schema_only() -> None:
    a = make_original(seed=0).state_dict()
    b = make_original(seed=1).state_dict()
    ma, mb = build_manifest(a), build_manifest(b)
    assert ma.entries["head.weight"].fingerprint != mb.entries["head.weight"].fingerprint
    assert ma.schema_fingerprint == mb.schema_fingerprint
    reordered = dict(reversed(list(a.items())))
    assert build_manifest(reordered).schema_fingerprint == ma.schema_fingerprint
    a["head.weight"] = a["head.weight"].half()
    assert build_manifest(a).schema_fingerprint != ma.schema_fingerprint
    assert ma.schema_fingerprint == compute_schema_fingerprint(
        (k, tuple(t.shape), dtype_name(t.dtype)) for k, t in b.items()
    )


def test_non_tensor_values_are_rejected() -> None:
    with pytest.raises(InvalidCheckpoint, match="'step'"):
        build_manifest({"w": torch.zeros(1), "step": 3})  # type: ignore[dict-item]
    with pytest.raises(InvalidCheckpoint, match="meta"):
        build_manifest({"w": torch.empty(2, device="meta")})
