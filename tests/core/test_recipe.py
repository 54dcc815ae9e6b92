"""The seed-freeze recipe end to end in core: save, strip, check frozen, merge, verify, save, strict load."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import pytest
import torch

from service.core.frozen import check_frozen
from service.core.load import load_checkpoint
from service.core.merge import merge_state_dicts
from service.core.prefixes import match_prefixes, strip_prefixes
from service.core.save import save_checkpoint
from service.core.verify import build_meta_module, spec_from_module, verify_state_dict
from tests.factories import TinyConvNet, make_original, make_trained

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.mark.parametrize("final_format", ["pth", "safetensors"])
def test_recipe_end_to_end(tmp_path: Path, final_format: Literal["pth", "safetensors"]) -> None:
    # 1. the "pretrained" original
    original_model = make_original()
    save_checkpoint(original_model.state_dict(), tmp_path / "original.pth")

    # 2. DataParallel, frozen backbone by state_dict, BN in stats mode (track_running_stats=False), trained
    trained_model = make_trained(original_model, steps=3)
    save_checkpoint(trained_model.state_dict(), tmp_path / "trained.pth")

    # 3. load both (mmapped), strip, check the frozen part, merge, verify
    original = load_checkpoint(tmp_path / "original.pth").state_dict
    trained_raw = load_checkpoint(tmp_path / "trained.pth").state_dict
    spec = spec_from_module(build_meta_module(TinyConvNet))
    match = match_prefixes(trained_raw.keys(), spec.keys)
    assert match.prefixes is None  # the known wrappers: DataParallel's "module."
    trained = strip_prefixes(trained_raw, match.prefixes).state_dict

    before = verify_state_dict(trained, TinyConvNet)
    assert not before.ok
    assert {k.rpartition(".")[2] for k in before.missing} == set(BN_STATS)

    frozen = check_frozen(original, trained, prefixes=["features"])
    assert frozen.ok and frozen.checked > 0

    merged = merge_state_dicts(original, trained, expected_keys=spec.keys)
    assert merged.report.filled_modules == ("features.1", "features.4")
    assert merged.report.unexpected == merged.report.missing == ()
    report = verify_state_dict(merged.state_dict, TinyConvNet)
    assert report.ok, report.to_dict()

    save_checkpoint(merged.state_dict, tmp_path / f"final.{final_format}", format=final_format)
    final_sd = load_checkpoint(tmp_path / f"final.{final_format}").state_dict

    # 4. a fresh model loads it strictly; frozen weights and BN stats are the original's, the head is trained
    final = TinyConvNet()
    final.load_state_dict(final_sd, strict=True)
    final.eval()
    original_sd = original_model.state_dict()
    trained_sd = strip_prefixes(trained_model.state_dict()).state_dict
    for key, value in final.state_dict().items():
        if key.startswith("features."):
            assert torch.equal(value, original_sd[key]), key
        else:
            assert torch.equal(value, trained_sd[key]), key
            assert not torch.equal(value, original_sd[key]), key
    for key in (k for k in original_sd if k.rpartition(".")[2] in BN_STATS):
        assert torch.equal(final.state_dict()[key], original_sd[key]), key

    # The final model computes what the original backbone plus the trained head computes.
    reference = copy.deepcopy(original_model)
    reference.head.load_state_dict({"weight": trained_sd["head.weight"], "bias": trained_sd["head.bias"]})
    reference.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(final(x), reference(x))
