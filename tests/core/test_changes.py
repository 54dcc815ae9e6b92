"""Per-key and per-module change figures: defined once, additive, exact."""

from __future__ import annotations

import math

import pytest
import torch

from service.core.changes import KeyChange, measure_changes, rollup_modules, summarize_changes


def _pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    a = {
        "features.0.weight": torch.randn(8, 3, 3, 3),
        "features.0.bias": torch.randn(8),
        "features.1.weight": torch.randn(8),
        "head.weight": torch.randn(10, 300),  # large enough for the chunked path with small chunks
        "head.bias": torch.randn(10),
    }
    b = {k: v.clone() for k, v in a.items()}
    b["features.0.bias"][:3] += 0.5
    b["head.weight"] += 0.01 * torch.randn(10, 300)
    b["head.weight"][0, :7] = a["head.weight"][0, :7]  # 7 elements keep their value
    b["head.bias"][4] -= 2.0
    return a, b


@pytest.mark.parametrize("chunk", [1 << 22, 64])
def test_key_figures_match_torch_on_the_whole_tensor(chunk: int) -> None:
    a, b = _pair()
    changed = ["features.0.bias", "head.weight", "head.bias"]
    out = measure_changes(a, b, keys=changed, same=["features.0.weight", "features.1.weight"], chunk_elements=chunk)
    for key in changed:
        ta, tb = a[key].double(), b[key].double()
        got = out[key]
        assert got.numel == ta.numel()
        assert got.changed == int((ta != tb).sum())
        assert got.sq_a == pytest.approx(float((ta * ta).sum()), rel=1e-12)
        assert got.sq_diff == pytest.approx(float(((tb - ta) ** 2).sum()), rel=1e-12)
        assert got.max_abs == pytest.approx(float((tb - ta).abs().max()), rel=1e-12)
        assert got.rel_change == pytest.approx(float((tb - ta).norm() / ta.norm()), rel=1e-12)
    assert out["head.weight"].changed == 3000 - 7
    assert out["features.0.bias"].changed == 3
    same = out["features.0.weight"]
    assert (same.changed, same.sq_diff, same.max_abs) == (0, 0.0, 0.0)
    assert same.sq_a == pytest.approx(float(a["features.0.weight"].double().pow(2).sum()), rel=1e-12)


def test_modules_roll_up_the_tree_exactly() -> None:
    a, b = _pair()
    summary = summarize_changes(
        a, b, keys=["features.0.bias", "head.weight", "head.bias"], same=["features.0.weight", "features.1.weight"]
    )
    assert list(summary.modules) == ["", "features", "features.0", "features.1", "head"]

    def expected(prefix: str) -> float:
        keys = [k for k in a if k.startswith(prefix)]
        diff = torch.cat([(b[k].double() - a[k].double()).reshape(-1) for k in keys])
        base = torch.cat([a[k].double().reshape(-1) for k in keys])
        return float(diff.norm() / base.norm())

    for module, prefix in [("", ""), ("features", "features."), ("features.0", "features.0."), ("head", "head.")]:
        assert summary.modules[module].rel_change == pytest.approx(expected(prefix), rel=1e-12)
    head = summary.modules["head"]
    assert (head.keys, head.changed_keys, head.changed) == (2, 2, 3000 - 7 + 1)
    assert head.max_abs == pytest.approx(2.0, rel=1e-6)
    assert summary.modules["features.1"].rel_change == 0.0
    assert summary.modules["features"].changed_keys == 1
    assert summary.total.keys == 5
    data = summary.to_dict(keys=True)
    assert data["modules"]["head"]["changed"] == 3000 - 7 + 1
    assert data["keys"]["head.bias"]["changed"] == 1


def test_nonfinite_disagreement_is_an_infinite_max_abs_and_counts_as_changed() -> None:
    a = {"m.w": torch.tensor([1.0, float("nan"), 3.0, float("inf")])}
    b = {"m.w": torch.tensor([1.0, float("nan"), 4.0, 5.0])}
    got = measure_changes(a, b, keys=["m.w"])["m.w"]
    assert got.changed == 2  # NaN == NaN; 3 -> 4 and inf -> 5 changed
    assert got.max_abs == math.inf
    assert got.sq_diff == pytest.approx(1.0)
    assert rollup_modules({"m.w": got})["m"].to_dict()["max_abs"] is None


def test_relative_change_of_a_zero_tensor() -> None:
    assert KeyChange(2, 0, 0.0, 0.0, 0.0).rel_change == 0.0
    assert KeyChange(2, 1, 0.0, 1.0, 1.0).rel_change == math.inf


# quantize_per_tensor is deprecated in torch 2.13 (it still works, and checkpoints hold quantized tensors).
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_tensors_are_measured_by_their_dequantized_values() -> None:
    torch.manual_seed(0)
    q = torch.quantize_per_tensor(torch.randn(16), 0.1, 0, torch.qint8)
    q2 = torch.quantize_per_tensor(q.dequantize() + 0.5, 0.1, 0, torch.qint8)
    out = measure_changes({"m.q": q, "m.s": q}, {"m.q": q2, "m.s": q}, keys=["m.q"], same=["m.s"])
    da, db = q.dequantize().double(), q2.dequantize().double()
    assert out["m.q"].sq_diff == pytest.approx(float((db - da).pow(2).sum()), rel=1e-9)
    assert out["m.q"].changed == int((da != db).sum())
    assert out["m.s"].sq_a == pytest.approx(float(da.pow(2).sum()), rel=1e-9)


def test_raw_bit_dtypes_have_no_figures_and_do_not_fail() -> None:
    bits = torch.zeros(4, dtype=torch.int16).view(torch.bits16)
    out = measure_changes({"m.b": bits, "m.w": torch.ones(2)}, {"m.b": bits, "m.w": torch.ones(2) * 2},
                          keys=["m.b", "m.w"], same=["m.b"])
    assert set(out) == {"m.w"}
