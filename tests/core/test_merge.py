from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from service.core.merge import REASON_BN, merge_state_dicts
from service.core.prefixes import strip_prefixes
from service.core.types import StateDict
from tests.factories import TinyConvNet, make_original, make_trained, save_pth

BN_STATS = [
    f"features.{i}.{n}" for i in (1, 4) for n in ("running_mean", "running_var", "num_batches_tracked")
]


@pytest.fixture(scope="module")
def recipe() -> tuple[StateDict, StateDict]:
    original = make_original()
    trained = strip_prefixes(make_trained(original, steps=2).state_dict()).state_dict
    return original.state_dict(), trained


def test_fill_and_provenance(recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    result = merge_state_dicts(original, trained)
    report = result.report
    assert list(result.state_dict) == list(original)  # original's order, no trained-only keys here
    assert report.filled == tuple(sorted(BN_STATS))
    assert report.filled_modules == ("features.1", "features.4")
    assert report.partial_bn_modules == {}
    assert report.counts == {"trained": len(trained), "original": len(BN_STATS)}
    for key in BN_STATS:
        assert report.provenance[key].source == "original"
        assert report.provenance[key].reason == REASON_BN
    for key in trained:
        assert report.provenance[key].source == "trained"
    json.dumps(report.to_dict())
    TinyConvNet().load_state_dict(result.state_dict, strict=True)


def test_no_tensor_is_copied(recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    merged = merge_state_dicts(original, trained).state_dict
    for key, tensor in merged.items():
        source = trained if key in trained else original
        assert tensor is source[key]
        assert tensor.data_ptr() == source[key].data_ptr()


def test_mmapped_inputs_stay_mmapped(tmp_path: Path, recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    path = save_pth(original, tmp_path / "original.pth")
    mapped = torch.load(path, mmap=True, weights_only=True)
    merged = merge_state_dicts(mapped, trained).state_dict
    for key in BN_STATS:
        assert merged[key] is mapped[key]
        assert merged[key].untyped_storage().data_ptr() == mapped[key].untyped_storage().data_ptr()
        assert torch.equal(merged[key], original[key])


def test_trained_wins_and_non_bn_fill_reason() -> None:
    original = {"a": torch.zeros(2), "b": torch.zeros(2)}
    trained = {"a": torch.ones(2), "extra": torch.ones(1)}
    result = merge_state_dicts(original, trained)
    assert list(result.state_dict) == ["a", "b", "extra"]
    assert result.state_dict["a"] is trained["a"]
    assert result.report.provenance["b"].reason == "missing from trained"
    assert result.report.filled_modules == ()


def test_partial_bn_stats_are_replaced_as_a_unit(recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    partial = OrderedDict(trained)
    partial["features.1.running_mean"] = torch.full((8,), 7.0)
    result = merge_state_dicts(original, partial)
    report = result.report
    assert report.partial_bn_modules == {"features.1": ["features.1.running_mean"]}
    assert report.filled_modules == ("features.1", "features.4")
    assert result.state_dict["features.1.running_mean"] is original["features.1.running_mean"]
    assert report.provenance["features.1.running_mean"].source == "original"
    assert "as a unit" in report.provenance["features.1.running_var"].reason
    assert "running_mean" in report.provenance["features.1.running_var"].reason


def test_metadata_taken_from_trained_then_original_else_warning(recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    result = merge_state_dicts(original, trained)
    assert result.report.metadata == "trained"
    assert result.report.metadata_warning is None
    merged_meta = result.state_dict._metadata  # type: ignore[attr-defined]
    assert merged_meta == trained._metadata  # type: ignore[attr-defined]
    merged_meta["features.1"]["version"] = 99  # a copy: the input is untouched
    assert trained._metadata["features.1"]["version"] == 2  # type: ignore[attr-defined]

    bare_trained = dict(trained)
    from_original = merge_state_dicts(original, bare_trained)
    assert from_original.report.metadata == "original"
    assert from_original.state_dict._metadata == original._metadata  # type: ignore[attr-defined]

    absent = merge_state_dicts(dict(original), bare_trained)
    assert absent.report.metadata == "absent"
    assert not hasattr(absent.state_dict, "_metadata")
    assert absent.report.metadata_warning is not None
    assert "num_batches_tracked" in absent.report.metadata_warning


def test_unexpected_reported_then_dropped(recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    extra = OrderedDict(trained)
    extra["aux.weight"] = torch.zeros(3)
    expected = list(TinyConvNet().state_dict())
    kept = merge_state_dicts(original, extra, expected_keys=expected)
    assert kept.report.unexpected == ("aux.weight",)
    assert kept.report.dropped == ()
    assert list(kept.state_dict) == [*expected, "aux.weight"]
    dropped = merge_state_dicts(original, extra, expected_keys=expected, drop_unexpected=True)
    assert dropped.report.dropped == ("aux.weight",)
    assert list(dropped.state_dict) == expected
    assert "aux.weight" not in dropped.report.provenance
    TinyConvNet().load_state_dict(dropped.state_dict, strict=True)


def test_order_follows_expected_keys_and_missing_is_reported(recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    expected = list(reversed(TinyConvNet().state_dict())) + ["new.weight"]
    result = merge_state_dicts(original, trained, expected_keys=expected)
    assert list(result.state_dict) == expected[:-1]
    assert result.report.missing == ("new.weight",)
    assert list(result.report.provenance) == expected[:-1]
