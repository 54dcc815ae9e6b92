from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from service.core.diff import CATEGORIES, diff_manifests, diff_values
from service.core.manifest import build_manifest
from service.core.prefixes import strip_prefixes
from tests.factories import make_original, make_trained


def _pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    same = torch.randn(4)
    changed = torch.randn(3, 3)
    a = {
        "blk.same": same,
        "blk.changed": changed,
        "blk.shape": torch.randn(2, 3),
        "blk.dtype": torch.randn(5),
        "blk.only_a": torch.randn(1),
        "top": torch.zeros(2),
    }
    changed_b = changed.clone()
    changed_b[0, 0] += 1.0
    b = {
        "blk.same": same.clone(),
        "blk.changed": changed_b,
        "blk.shape": torch.randn(3, 2),
        "blk.dtype": a["blk.dtype"].half(),
        "head.only_b": torch.randn(2),
        "top": torch.zeros(2),
    }
    return a, b


def test_each_category_and_details() -> None:
    a, b = _pair()
    diff = diff_manifests(build_manifest(a), build_manifest(b))
    assert diff.only_in_a == ("blk.only_a",)
    assert diff.only_in_b == ("head.only_b",)
    assert diff.shape_mismatch == ("blk.shape",)
    assert diff.dtype_mismatch == ("blk.dtype",)
    assert diff.changed == ("blk.changed",)
    assert diff.unchanged == ("blk.same", "top")
    assert diff.shape_details == {"blk.shape": ((2, 3), (3, 2))}
    assert diff.dtype_details == {"blk.dtype": ("float32", "float16")}
    assert diff.summary == {
        "only_in_a": 1,
        "only_in_b": 1,
        "shape_mismatch": 1,
        "dtype_mismatch": 1,
        "changed": 1,
        "unchanged": 2,
    }
    assert list(diff.summary) == list(CATEGORIES)
    assert not diff.identical
    data = json.loads(json.dumps(diff.to_dict()))
    assert data["shape_details"] == {"blk.shape": {"a": [2, 3], "b": [3, 2]}}
    assert data["summary"] == diff.summary


def test_module_rollup() -> None:
    a, b = _pair()
    diff = diff_manifests(build_manifest(a), build_manifest(b))
    assert set(diff.modules) == {"blk", "head", ""}
    assert diff.modules["blk"] == {
        "only_in_a": 1,
        "only_in_b": 0,
        "shape_mismatch": 1,
        "dtype_mismatch": 1,
        "changed": 1,
        "unchanged": 1,
    }
    assert diff.modules["head"]["only_in_b"] == 1
    assert diff.modules[""]["unchanged"] == 1
    total = sum(sum(c.values()) for c in diff.modules.values())
    assert total == sum(diff.summary.values())


def test_recipe_original_vs_trained() -> None:
    original = make_original()
    trained = strip_prefixes(make_trained(original, steps=2).state_dict()).state_dict
    diff = diff_manifests(build_manifest(original.state_dict()), build_manifest(trained))
    assert set(diff.only_in_a) == {
        f"features.{i}.{n}" for i in (1, 4) for n in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert diff.changed == ("head.bias", "head.weight")
    assert diff.unchanged == tuple(sorted(k for k in trained if k.startswith("features.")))
    assert diff.modules["features.1"]["only_in_a"] == 3


def test_normalize_prefixes() -> None:
    sd = make_original().state_dict()
    wrapped = OrderedDict(("module." + k, v) for k, v in sd.items())
    ma, mb = build_manifest(sd), build_manifest(wrapped)
    raw = diff_manifests(ma, mb)
    assert len(raw.only_in_a) == len(sd) and len(raw.only_in_b) == len(sd)
    assert not raw.normalized
    normalized = diff_manifests(ma, mb, normalize_prefixes=True)
    assert normalized.normalized
    assert normalized.unchanged == tuple(sorted(sd))
    assert normalized.identical
    assert normalized.collisions == {}


def test_normalize_collision_keeps_the_first_and_notes_it() -> None:
    first, second = torch.zeros(2), torch.ones(2)
    mb = build_manifest({"module.w": first, "w": second})
    diff = diff_manifests(build_manifest({"w": torch.zeros(2)}), mb, normalize_prefixes=True)
    assert diff.unchanged == ("w",)  # "module.w" came first and equals a's "w"
    assert diff.collisions == {"b": {"w": ["module.w", "w"]}}


def _direct(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    d = (a64 - b64).abs()
    return {
        "max_abs": float(d.max()),
        "mean_abs": float(d.mean()),
        "rel_l2": float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(a64)),
        "cosine": float(F.cosine_similarity(a64, b64, dim=0)),
    }


# Tensors of up to min(2**16, chunk_elements) elements are compared in batches, larger ones in chunks.
PATHS = [pytest.param(1 << 22, id="batched"), pytest.param(3, id="chunked")]


@pytest.mark.parametrize("chunk_elements", PATHS)
def test_diff_values_match_a_direct_computation(chunk_elements: int) -> None:
    torch.manual_seed(3)
    a = {"w": torch.randn(10, 10), "b": torch.randn(7)}
    b = {"w": a["w"] + 0.1 * torch.randn(10, 10), "b": torch.randn(7)}
    stats = diff_values(a, b, chunk_elements=chunk_elements)
    assert list(stats) == ["w", "b"]
    for key in a:
        expected = _direct(a[key], b[key])
        got = stats[key]
        for name, value in expected.items():
            assert getattr(got, name) == pytest.approx(value, rel=1e-9), (key, name)
        assert (got.nan_a, got.inf_a, got.nan_b, got.inf_b) == (0, 0, 0, 0)
        assert got.numel == got.finite == a[key].numel()


def test_identical_values() -> None:
    t = torch.randn(5)
    s = diff_values({"t": t}, {"t": t.clone()})["t"]
    assert (s.max_abs, s.mean_abs, s.rel_l2) == (0.0, 0.0, 0.0)
    assert s.cosine == pytest.approx(1.0)


@pytest.mark.parametrize("chunk_elements", PATHS)
def test_nan_and_inf_are_counted_and_excluded(chunk_elements: int) -> None:
    a = torch.tensor([1.0, float("nan"), 3.0, float("inf"), 5.0, 6.0])
    b = torch.tensor([1.5, 2.0, float("nan"), 4.0, float("-inf"), 6.0])
    clean = torch.arange(4.0)
    stats = diff_values({"c": clean, "x": a}, {"c": clean + 1, "x": b}, chunk_elements=chunk_elements)
    assert stats["c"].max_abs == 1.0 and stats["c"].nan_a == 0  # a neighbour in the batch is unaffected
    s = stats["x"]
    assert (s.nan_a, s.inf_a, s.nan_b, s.inf_b) == (1, 1, 1, 1)
    finite = torch.isfinite(a) & torch.isfinite(b)
    expected = _direct(a[finite], b[finite])
    assert s.finite == int(finite.sum())
    for name, value in expected.items():
        assert getattr(s, name) == pytest.approx(value, rel=1e-12)
    json.dumps(s.to_dict(), allow_nan=False)


@pytest.mark.parametrize("chunk_elements", PATHS)
def test_undefined_statistics_become_none_in_json(chunk_elements: int) -> None:
    nan = torch.full((3,), float("nan"))
    s = diff_values({"x": nan}, {"x": nan.clone()}, chunk_elements=chunk_elements)["x"]
    assert s.nan_a == s.nan_b == 3 and s.finite == 0
    assert math.isnan(s.max_abs)
    data = s.to_dict()
    assert data["max_abs"] is None and data["cosine"] is None
    json.dumps(data, allow_nan=False)
    zero = diff_values({"z": torch.zeros(3)}, {"z": torch.ones(3)}, chunk_elements=chunk_elements)["z"]
    assert math.isnan(zero.rel_l2) and zero.to_dict()["rel_l2"] is None
    empty = diff_values({"e": torch.empty(0)}, {"e": torch.empty(0)}, chunk_elements=chunk_elements)["e"]
    assert empty.max_abs == 0.0 and empty.numel == 0


def test_chunking_gives_the_same_numbers() -> None:
    torch.manual_seed(5)
    a = {"w": torch.randn(13, 11), "t": torch.randn(9, 6).t(), "s": torch.tensor(2.0)}
    b = {"w": torch.randn(13, 11), "t": torch.randn(9, 6).t(), "s": torch.tensor(-1.0)}
    assert not a["t"].is_contiguous()
    one = diff_values(a, b, chunk_elements=1 << 22)
    tiny = diff_values(a, b, chunk_elements=7)
    for key in a:
        for name in ("max_abs", "mean_abs", "rel_l2", "cosine"):
            assert getattr(tiny[key], name) == pytest.approx(getattr(one[key], name), rel=1e-12)
        expected = _direct(a[key], b[key])
        assert one[key].max_abs == pytest.approx(expected["max_abs"])
        assert tiny[key].mean_abs == pytest.approx(expected["mean_abs"])


@pytest.mark.parametrize("chunk_elements", PATHS)
def test_integer_bool_and_mixed_dtypes(chunk_elements: int) -> None:
    a = {"i": torch.tensor([1, 2, 3]), "m": torch.tensor([True, False]), "h": torch.randn(4)}
    b = {"i": torch.tensor([1, 5, 3]), "m": torch.tensor([True, True]), "h": a["h"].bfloat16()}
    stats = diff_values(a, b, chunk_elements=chunk_elements)
    assert stats["i"].max_abs == 3.0 and stats["i"].mean_abs == pytest.approx(1.0)
    assert stats["m"].max_abs == 1.0
    expected = _direct(a["h"], b["h"].float())
    assert stats["h"].max_abs == pytest.approx(expected["max_abs"])
    assert 0 < stats["h"].max_abs < 0.05


def test_batches_and_chunks_mix_in_key_order() -> None:
    torch.manual_seed(7)
    a = {f"k{i}": torch.randn(n) for i, n in enumerate([3, 70_000, 5, 1, 70_001, 0, 8])}
    b = {k: v + torch.randn_like(v) for k, v in a.items()}
    stats = diff_values(a, b, chunk_elements=10)  # batches of small keys flush at 10 elements
    assert list(stats) == list(a)
    for key in a:
        if a[key].numel():
            assert stats[key].max_abs == pytest.approx(_direct(a[key], b[key])["max_abs"], rel=1e-12)
            assert stats[key].cosine == pytest.approx(_direct(a[key], b[key])["cosine"], rel=1e-9)


def test_absent_and_shape_mismatched_keys_are_skipped() -> None:
    a = {"x": torch.zeros(2), "y": torch.zeros(2, 2), "z": torch.zeros(1)}
    b = {"x": torch.ones(2), "y": torch.zeros(4)}
    assert list(diff_values(a, b)) == ["x"]
    assert list(diff_values(a, b, keys=["z", "y", "x", "nope"])) == ["x"]
