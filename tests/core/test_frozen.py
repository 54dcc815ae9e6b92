from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch

from service.core.frozen import check_frozen, check_frozen_manifests
from service.core.manifest import build_manifest
from service.core.prefixes import strip_prefixes
from service.core.types import StateDict
from tests.factories import make_original, make_trained

FROZEN_PARAMS = [
    "features.0.weight",
    "features.1.weight",
    "features.1.bias",
    "features.3.weight",
    "features.4.weight",
    "features.4.bias",
]


@pytest.fixture(scope="module")
def recipe() -> tuple[StateDict, StateDict]:
    original = make_original()
    trained = strip_prefixes(make_trained(original, steps=2).state_dict()).state_dict
    return original.state_dict(), trained


def test_the_frozen_backbone_is_unchanged(recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    backbone = {k: v for k, v in original.items() if k.startswith("features.")}
    report = check_frozen(backbone, trained)
    assert report.ok
    assert report.checked == len(FROZEN_PARAMS)  # BN buffers are left out: the recipe drops them
    assert report.changed == report.missing == report.mismatched == ()
    by_prefix = check_frozen(original, trained, prefixes=["features"])
    assert by_prefix.ok and by_prefix.checked == len(FROZEN_PARAMS)
    assert check_frozen(original, trained, prefixes=["features."]).checked == len(FROZEN_PARAMS)


def test_the_trained_head_is_reported_with_max_abs(recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    report = check_frozen(original, trained)
    assert not report.ok
    assert report.changed == ("head.bias", "head.weight")
    for key in report.changed:
        direct = float((original[key].double() - trained[key].double()).abs().max())
        assert report.max_abs[key] == pytest.approx(direct, rel=1e-12)
    assert report.missing == ()
    json.dumps(report.to_dict(), allow_nan=False)


def test_buffers_count_when_asked(recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    report = check_frozen(original, trained, prefixes=["features"], parameters_only=False)
    assert not report.ok
    assert set(report.missing) == {
        f"features.{i}.{n}" for i in (1, 4) for n in ("running_mean", "running_var", "num_batches_tracked")
    }


def test_atol_and_special_values() -> None:
    w = torch.randn(4, 4)
    nudged = w.clone()
    nudged[0, 0] += 1e-4
    assert not check_frozen({"w": w}, {"w": nudged}).ok
    assert check_frozen({"w": w}, {"w": nudged}, atol=1e-3).ok

    nan = torch.tensor([1.0, float("nan"), float("inf")])
    assert check_frozen({"x": nan}, {"x": nan.clone()}).ok  # NaN in both places and equal infinities
    moved = torch.tensor([float("nan"), 1.0, float("inf")])
    report = check_frozen({"x": nan}, {"x": moved})
    assert report.changed == ("x",) and math.isinf(report.max_abs["x"])
    assert report.to_dict()["max_abs"] == {"x": None}


def test_shape_mismatch_non_contiguous_and_dtype() -> None:
    w = torch.randn(3, 5)
    assert check_frozen({"w": w}, {"w": torch.zeros(5, 3)}).mismatched == ("w",)
    assert check_frozen({"w": w.t()}, {"w": w.t().contiguous()}).ok
    cast = check_frozen({"w": w.half().float()}, {"w": w.half()})
    assert cast.ok  # same values in another dtype: unchanged by value
    assert not check_frozen_manifests(
        build_manifest({"w": w.half().float()}), build_manifest({"w": w.half()})
    ).ok  # ... but not by bytes


def test_manifest_variant_agrees(recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    mo, mt = build_manifest(original), build_manifest(trained)
    by_value = check_frozen(original, trained)
    by_hash = check_frozen_manifests(mo, mt)
    assert by_hash.changed == by_value.changed
    assert by_hash.checked == by_value.checked
    assert by_hash.max_abs == {}
    assert check_frozen_manifests(mo, mt, prefixes=["features"]).ok
    missing = OrderedDict(trained)
    del missing["features.0.weight"]
    report = check_frozen_manifests(mo, build_manifest(missing), prefixes=["features"])
    assert report.missing == ("features.0.weight",) and not report.ok
