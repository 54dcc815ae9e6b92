from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn

from service.core.manifest import build_manifest
from service.core.types import StateDict
from service.core.verify import (
    ArchitectureSpec,
    TensorSpec,
    build_meta_module,
    spec_from_manifest,
    spec_from_module,
    verify_state_dict,
)
from service.errors import InvalidArchitecture
from tests.factories import MLPBN, TinyConvNet, make_original


def _sd() -> StateDict:
    return make_original().state_dict()


def _spec() -> ArchitectureSpec:
    return spec_from_module(build_meta_module(TinyConvNet))


ARCHITECTURES = [pytest.param(TinyConvNet, id="factory"), pytest.param(None, id="spec")]


def _arch(kind: Any) -> Any:
    return kind if kind is not None else _spec()


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_ok(kind: Any) -> None:
    report = verify_state_dict(_sd(), _arch(kind))
    assert report.ok
    assert report.missing == report.unexpected == ()
    assert report.error is None and report.by_module == {}
    assert report.expected_keys == len(_sd())
    assert report.schema_fingerprint == build_manifest(_sd()).schema_fingerprint
    json.dumps(report.to_dict())


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_missing(kind: Any) -> None:
    sd = _sd()
    del sd["features.0.weight"]
    report = verify_state_dict(sd, _arch(kind))
    assert not report.ok
    assert report.missing == ("features.0.weight",)
    assert report.by_module == {"features.0": {"missing": ["features.0.weight"]}}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_unexpected(kind: Any) -> None:
    sd = _sd()
    sd["aux.weight"] = torch.zeros(2)
    report = verify_state_dict(sd, _arch(kind))
    assert not report.ok
    assert report.unexpected == ("aux.weight",)
    assert report.missing == ()


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_shape_mismatch_does_not_hide_other_findings(kind: Any) -> None:
    sd = _sd()
    sd["head.weight"] = torch.zeros(3, 16)
    del sd["features.3.weight"]
    sd["aux.bias"] = torch.zeros(1)
    report = verify_state_dict(sd, _arch(kind))
    assert not report.ok
    assert report.error is None
    assert report.shape_mismatches == {"head.weight": {"expected": [10, 16], "got": [3, 16]}}
    assert report.missing == ("features.3.weight",)
    assert report.unexpected == ("aux.bias",)
    assert report.by_module["head"] == {"shape_mismatch": ["head.weight"]}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_dtype_mismatch(kind: Any) -> None:
    sd = _sd()
    sd["head.weight"] = sd["head.weight"].half()
    sd["features.1.num_batches_tracked"] = sd["features.1.num_batches_tracked"].float()
    report = verify_state_dict(sd, _arch(kind))
    assert not report.ok
    assert report.error is None
    assert report.dtype_mismatches == {
        "features.1.num_batches_tracked": {"expected": "int64", "got": "float32"},
        "head.weight": {"expected": "float32", "got": "float16"},
    }
    assert report.missing == report.unexpected == ()


def test_input_is_not_modified() -> None:
    sd = _sd()
    before = {k: v for k, v in sd.items()}
    meta_before = {k: dict(v) for k, v in sd._metadata.items()}  # type: ignore[attr-defined]
    assert verify_state_dict(sd, TinyConvNet).ok
    assert all(sd[k] is v for k, v in before.items()) and len(sd) == len(before)
    assert {k: dict(v) for k, v in sd._metadata.items()} == meta_before  # type: ignore[attr-defined]


def test_batchnorm_fills_num_batches_tracked_without_metadata() -> None:
    sd = _sd()
    del sd["features.1.num_batches_tracked"]
    # With `_metadata` (BatchNorm version 2) the key is reported missing ...
    with_meta = verify_state_dict(sd, TinyConvNet)
    assert with_meta.missing == ("features.1.num_batches_tracked",)
    # ... without it, load_state_dict fills it silently: reported as filled_by_load, not as missing.
    bare = verify_state_dict(OrderedDict(sd), TinyConvNet)
    assert bare.missing == ()
    assert bare.filled_by_load == ("features.1.num_batches_tracked",)
    # The spec comparison has no such rule.
    assert verify_state_dict(OrderedDict(sd), _spec()).missing == ("features.1.num_batches_tracked",)


class _Picky(nn.Linear):
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        errors.append("picky refuses")


def test_other_load_errors_are_reported_not_raised() -> None:
    sd = nn.Linear(2, 3).state_dict()
    report = verify_state_dict(sd, lambda: _Picky(2, 3))
    assert not report.ok
    assert report.error is not None and "picky refuses" in report.error
    assert report.missing == report.unexpected == ()


def test_factory_errors_raise_invalid_architecture() -> None:
    def broken() -> nn.Module:
        raise ValueError("nope")

    with pytest.raises(InvalidArchitecture, match="nope"):
        verify_state_dict({}, broken)
    with pytest.raises(InvalidArchitecture):
        build_meta_module(lambda: 3)  # type: ignore[arg-type, return-value]


def _huge() -> nn.Module:
    # Refuse to build off the meta device: 100k x 100k float32 would be 40 GB.
    assert torch.empty(0).device.type == "meta", "built outside the meta device"
    return nn.Linear(100_000, 100_000)


def test_meta_device_allocates_nothing() -> None:
    module = build_meta_module(_huge)
    assert all(p.is_meta for p in module.parameters())
    spec = spec_from_module(module)
    assert spec.keys["weight"] == TensorSpec((100_000, 100_000), "float32")
    meta_sd = {
        "weight": torch.empty(100_000, 100_000, device="meta"),
        "bias": torch.empty(100_000, device="meta"),
    }
    assert verify_state_dict(meta_sd, _huge).ok
    small = {"weight": torch.zeros(3, 3), "bias": torch.zeros(100_000)}
    report = verify_state_dict(small, _huge)
    assert report.shape_mismatches == {"weight": {"expected": [100_000, 100_000], "got": [3, 3]}}
    assert report.missing == report.unexpected == () and report.error is None


def test_spec_round_trip_and_fingerprints() -> None:
    spec = spec_from_module(build_meta_module(lambda: MLPBN(dim=4, depth=2)))
    again = ArchitectureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert list(again.keys) == list(spec.keys)
    real = MLPBN(dim=4, depth=2).state_dict()
    manifest = build_manifest(real)
    assert spec.schema_fingerprint == manifest.schema_fingerprint
    assert spec_from_manifest(manifest) == spec
    with pytest.raises(InvalidArchitecture):
        ArchitectureSpec.from_dict({"keys": {"w": {"shape": [2], "dtype": "float99"}}})
    with pytest.raises(InvalidArchitecture):
        ArchitectureSpec.from_dict({"nothing": 1})
