from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from service.core.merge import REASON_BN, detect_swap, merge_state_dicts, shard_evidence
from service.core.prefixes import apply_transform, match_prefixes, strip_prefixes
from service.core.types import StateDict
from tests.factories import TinyConvNet, make_original, make_trained, save_pth, set_bn_stats_mode

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


# -- merges that protect the user: filled parameters, shard evidence, swapped inputs --------------------------


def test_recipe_fills_only_bn_stats_so_no_parameter_counts_as_filled(recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    report = merge_state_dicts(original, trained).report
    assert report.filled == tuple(sorted(BN_STATS))
    assert report.filled_parameters == ()
    assert report.filled_parameter_modules == {}


def test_head_only_trained_reports_the_backbone_as_filled(recipe: tuple[StateDict, StateDict]) -> None:
    original, trained = recipe
    head = OrderedDict((k, v) for k, v in trained.items() if k.startswith("head."))
    report = merge_state_dicts(original, head).report
    backbone = sorted(k for k in original if k.startswith("features.") and k not in BN_STATS)
    assert report.filled_parameters == tuple(backbone) and len(backbone) == 6
    assert report.filled_parameter_modules == {"features": 6}  # rolled up: nothing under features was trained
    assert report.to_dict()["filled_parameter_modules"] == {"features": 6}


def test_filled_parameters_roll_up_to_the_largest_module_without_trained_keys(
    recipe: tuple[StateDict, StateDict],
) -> None:
    original, trained = recipe
    # trained keeps features.0 and head.weight: features.1/.3/.4 and head.bias are filled, each where it sits
    kept = OrderedDict((k, v) for k, v in trained.items() if k in ("features.0.weight", "head.weight"))
    report = merge_state_dicts(original, kept).report
    assert report.filled_parameter_modules == {"features.1": 2, "features.3": 1, "features.4": 2, "head": 1}
    assert merge_state_dicts(original, {}).report.filled_parameter_modules == {"": 8}  # nothing trained at all


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("model-00001-of-00002.safetensors", (1, 2)),
        ("pytorch_model-00002-of-00003.bin", (2, 3)),
        ("checkpoint-500/model-00003-of-00003.safetensors", (3, 3)),
        ("C:\\runs\\model-00001-of-00004.safetensors", (1, 4)),
        ("consolidated.00-of-02.pth", None),  # 0-based: not transformers' rule
        ("model-00001-of-00001.safetensors", None),  # one shard is the whole model
        ("model-00003-of-00002.safetensors", None),
        ("model.safetensors", None),
        ("run-1-of-2-final.pth", None),  # the numbers must end the name before the extension
        (None, None),
    ],
)
def test_shard_evidence_by_filename(filename: str | None, expected: tuple[int, int] | None) -> None:
    found = shard_evidence(filename)
    assert (None if found is None else (found.shard, found.of)) == expected
    if found is not None:
        assert found.source == "filename" and "/" not in str(found.filename) and "\\" not in str(found.filename)
        assert f"shard {expected[0]} of {expected[1]}" in found.describe("trained")  # type: ignore[index]


def test_shard_evidence_by_keys_of_a_known_index() -> None:
    weight_map = {"features.0.weight": "model-00001-of-00002.safetensors",
                  "features.1.weight": "model-00001-of-00002.safetensors",
                  "head.weight": "model-00002-of-00002.safetensors",
                  "head.bias": "model-00002-of-00002.safetensors"}
    found = shard_evidence("trained.safetensors", ["head.bias", "head.weight"], indexes=[weight_map])
    assert found is not None and (found.shard, found.of, found.source) == (2, 2, "index")
    assert shard_evidence("trained.safetensors", list(weight_map), indexes=[weight_map]) is None  # all of it
    assert shard_evidence("trained.safetensors", ["head.bias"], indexes=[weight_map]) is None  # not one shard
    assert shard_evidence("trained.safetensors", [], indexes=[weight_map]) is None


def _strip_for_merge(sd: StateDict) -> tuple[StateDict, list[str]]:
    # As the merge's auto mode does: the transform that fits the architecture.
    match = match_prefixes(sd.keys(), TinyConvNet().state_dict().keys())
    result = apply_transform(sd, match.transform)
    return result.state_dict, list(result.applied)


def test_swap_signals_on_the_recipe_in_both_orders() -> None:
    original = make_original().state_dict()  # clean, with BN running stats
    trained = make_trained(make_original(), steps=1).state_dict()  # DataParallel, track_running_stats=False
    o_sd, o_applied = _strip_for_merge(original)
    t_sd, t_applied = _strip_for_merge(trained)
    right = detect_swap(o_sd.keys(), t_sd.keys(), original_prefixes=o_applied, trained_prefixes=t_applied)
    assert not right.any and not right.swapped
    wrong = detect_swap(t_sd.keys(), o_sd.keys(), original_prefixes=t_applied, trained_prefixes=o_applied)
    assert wrong.swapped
    assert wrong.original_prefixes == ("module.",)
    assert wrong.bn_stats == tuple(sorted(BN_STATS))
    assert "'module.'" in wrong.describe() and "'features.1', 'features.4'" in wrong.describe()
    assert wrong.to_dict()["swapped"] is True


def test_one_swap_signal_alone_is_not_a_swap() -> None:
    model = make_original()
    wrapped_with_stats = nn.DataParallel(model).state_dict()  # pretrained under DataParallel: a wrapper, stats kept
    clean = model.state_dict()
    w_sd, w_applied = _strip_for_merge(wrapped_with_stats)
    only_wrapper = detect_swap(w_sd.keys(), clean.keys(), original_prefixes=w_applied, trained_prefixes=[])
    assert only_wrapper.original_prefixes == ("module.",) and only_wrapper.bn_stats == ()
    assert only_wrapper.any and not only_wrapper.swapped

    no_stats = copy.deepcopy(model)
    set_bn_stats_mode(no_stats)  # an original saved from a stats-mode model: no running stats, no wrapper
    only_bn = detect_swap(no_stats.state_dict().keys(), clean.keys())
    assert only_bn.bn_stats == tuple(sorted(BN_STATS)) and only_bn.original_prefixes == ()
    assert only_bn.any and not only_bn.swapped
    # BatchNorm stats of a module the original does not have at all are not a sign
    extra = {**clean, "new_bn.running_mean": torch.zeros(2)}
    assert detect_swap(clean.keys(), extra.keys()).bn_stats == ()
