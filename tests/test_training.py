"""The recipe's training side on tiny real models: freeze by state_dict, optimizer, BN freezing, undo."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from service.errors import InvalidRequest, PrefixCollision
from service.training import (
    FreezeReport,
    freeze_batchnorm,
    freeze_from_state_dict,
    frozen_batchnorm_modules,
    trainable_parameters,
    unfreeze_batchnorm,
)
from tests.factories import MLPBN, TinyConvNet, make_original

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("features.")}


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train_steps(model: nn.Module, *, steps: int = 5, seed: int = 3) -> None:
    """SGD with momentum and weight decay on shifted inputs, so BN statistics would move if they could."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1, momentum=0.9, weight_decay=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 3, 8, 8) * 3 + 2
        loss = (model(x) - 1).pow(2).mean()
        loss.backward()
        opt.step()


def fill_missing(
    trained: dict[str, torch.Tensor], original: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The recipe's step 5.2, for the test: the trained dict, with keys it lacks taken from the original."""
    merged = dict(trained)
    for k, v in original.items():
        merged.setdefault(k, v)
    return merged


# --- freeze_from_state_dict ------------------------------------------------------------------------------


def expected_split(model: nn.Module, prefix: str = "") -> tuple[list[str], list[str]]:
    names = [n for n, _ in model.named_parameters()]
    frozen = sorted(n for n in names if n.startswith(prefix + "features."))
    trainable = sorted(n for n in names if not n.startswith(prefix + "features."))
    return frozen, trainable


@pytest.mark.parametrize("key_prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_freeze_from_state_dict_plain_model(key_prefix: str) -> None:
    original = make_original()
    pretrained = {key_prefix + k: v for k, v in backbone_state(original).items()}
    model = TinyConvNet()

    report = freeze_from_state_dict(model, pretrained)

    frozen, trainable = expected_split(model)
    assert report.frozen == tuple(frozen)
    assert report.trainable == tuple(trainable) == ("head.bias", "head.weight")
    assert report.unmatched == ()
    assert report.total == len(list(model.parameters())) == len(frozen) + len(trainable)
    assert report.summary() == f"Total {report.total} params, miss 2"
    for name, p in model.named_parameters():
        assert p.requires_grad == (name in trainable), name


@pytest.mark.parametrize("key_prefix", ["", "module."])
def test_freeze_from_state_dict_dataparallel_model(key_prefix: str) -> None:
    pretrained = {key_prefix + k: v for k, v in backbone_state(make_original()).items()}
    wrapped = nn.DataParallel(TinyConvNet())

    report = freeze_from_state_dict(wrapped, pretrained)

    frozen, trainable = expected_split(wrapped, "module.")
    assert report.frozen == tuple(frozen)
    assert all(name.startswith("module.features.") for name in report.frozen)
    assert report.trainable == ("module.head.bias", "module.head.weight")
    assert report.unmatched == ()


def test_freeze_report_unmatched_and_to_dict() -> None:
    pretrained = backbone_state(make_original())
    pretrained["features.9.weight"] = torch.zeros(1)  # names nothing in the model
    pretrained["module.extra.bias"] = torch.zeros(1)
    model = TinyConvNet()

    report = freeze_from_state_dict(model, pretrained)

    # BN buffers are matched (they are model state), the two stray keys are not; names are prefix-stripped.
    assert report.unmatched == ("extra.bias", "features.9.weight")
    assert "(2 state_dict keys matched nothing)" in report.summary()
    data = report.to_dict()
    assert data == {"frozen": list(report.frozen), "trainable": list(report.trainable),
                    "unmatched": ["extra.bias", "features.9.weight"], "total": report.total}
    assert isinstance(report, FreezeReport)


def test_freeze_matches_bn_buffers_of_a_model_already_in_stats_mode() -> None:
    model = TinyConvNet()
    freeze_batchnorm(model, mode="stats", modules=bn_names(model))
    report = freeze_from_state_dict(model, backbone_state(make_original()))
    assert report.unmatched == ()


def test_freeze_keeps_previously_frozen_parameters_frozen() -> None:
    model = MLPBN()
    model.head.bias.requires_grad_(False)
    pretrained = {k: v for k, v in MLPBN().state_dict().items() if k.startswith("blocks.0.")}
    report = freeze_from_state_dict(model, pretrained)
    assert "head.bias" in report.frozen
    assert set(report.trainable) == {n for n, _ in model.named_parameters()
                                     if not n.startswith("blocks.0.") and n != "head.bias"}


def test_freeze_rejects_colliding_keys() -> None:
    state = backbone_state(make_original())
    state["module.features.0.weight"] = state["features.0.weight"]
    with pytest.raises(PrefixCollision):
        freeze_from_state_dict(TinyConvNet(), state)


def test_trainable_parameters_feed_an_optimizer_that_holds_only_the_head() -> None:
    model = TinyConvNet()
    freeze_from_state_dict(model, backbone_state(make_original()))
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(model.head.weight), id(model.head.bias)}


# --- frozen_batchnorm_modules ----------------------------------------------------------------------------


def test_frozen_batchnorm_modules_follow_the_frozen_parameters() -> None:
    model = MLPBN(depth=3)
    freeze_from_state_dict(model, {k: v for k, v in model.state_dict().items() if k.startswith("blocks.0.")})
    assert frozen_batchnorm_modules(model) == ["blocks.0.1"]


def test_frozen_batchnorm_modules_without_affine_parameters_follow_their_block() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False)),  # backbone
        nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2, affine=False)),  # head
    )
    freeze_from_state_dict(model, {k: v for k, v in model.state_dict().items() if k.startswith("0.")})
    assert frozen_batchnorm_modules(model) == ["0.1"]


# --- freeze_batchnorm: the frozen part stays constant ----------------------------------------------------


def test_without_bn_freezing_the_running_stats_drift() -> None:
    original = make_original()
    model = copy.deepcopy(original)
    freeze_from_state_dict(model, backbone_state(original))

    train_steps(model)

    after = model.state_dict()
    for name in bn_names(model):
        assert torch.equal(after[f"{name}.weight"], original.state_dict()[f"{name}.weight"])
        assert not torch.equal(after[f"{name}.running_mean"], original.state_dict()[f"{name}.running_mean"])
        assert not torch.equal(after[f"{name}.running_var"], original.state_dict()[f"{name}.running_var"])


@pytest.mark.parametrize("mode", ["eval", "stats"])
def test_frozen_part_stays_constant_while_the_head_trains(mode: str) -> None:
    original = make_original()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    model = copy.deepcopy(original)
    freeze_from_state_dict(model, backbone_state(original))
    changed = freeze_batchnorm(model, mode=mode)  # type: ignore[arg-type]
    assert changed == bn_names(model) == ["features.1", "features.4"]

    train_steps(model)

    trained = model.state_dict()
    if mode == "stats":
        # Post-processing: the trained checkpoint lacks the BN statistics; undo the BN freezing, fill the
        # missing keys from the original checkpoint and load strictly.
        assert {f"{n}.running_mean" for n in changed}.isdisjoint(trained)
        assert unfreeze_batchnorm(model) == changed
        model.load_state_dict(fill_missing(trained, before), strict=True)
    final = model.state_dict()
    assert final.keys() == before.keys()
    for key in before:
        if key.startswith("features."):
            assert torch.equal(final[key], before[key]), key
    assert not torch.equal(final["head.weight"], before["head.weight"])
    assert not torch.equal(final["head.bias"], before["head.bias"])


def test_stats_mode_removes_three_buffers_per_layer_and_unfreeze_restores_the_keys() -> None:
    original = make_original()
    model = copy.deepcopy(original)
    full_keys = list(original.state_dict())
    freeze_from_state_dict(model, backbone_state(original))

    layers = freeze_batchnorm(model, mode="stats")

    removed = {f"{layer}.{b}" for layer in layers for b in BN_BUFFERS}
    assert len(removed) == 3 * len(layers) == 6
    assert list(model.state_dict()) == [k for k in full_keys if k not in removed]
    for layer in layers:
        bn = model.get_submodule(layer)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        assert bn.momentum == 0.0 and not bn.track_running_stats

    restored = unfreeze_batchnorm(model)

    assert restored == layers
    state = model.state_dict()
    assert list(state) == full_keys
    for layer in layers:
        bn = model.get_submodule(layer)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        assert bn.track_running_stats and bn.momentum == original.get_submodule(layer).momentum
        # Placeholders, "to be filled" by the merge.
        assert torch.equal(state[f"{layer}.running_mean"], torch.zeros_like(state[f"{layer}.running_mean"]))
        assert torch.equal(state[f"{layer}.running_var"], torch.ones_like(state[f"{layer}.running_var"]))
        assert int(state[f"{layer}.num_batches_tracked"]) == 0
    # strict loading of the merged dict works, and the merge restored the original statistics.
    model.load_state_dict(fill_missing({k: v for k, v in state.items() if k not in removed},
                                       original.state_dict()), strict=True)
    for key in removed:
        assert torch.equal(model.state_dict()[key], original.state_dict()[key])


def test_stats_mode_on_a_dataparallel_model_gives_the_recipe_checkpoint() -> None:
    original = make_original()
    wrapped = nn.DataParallel(copy.deepcopy(original))
    freeze_from_state_dict(wrapped, backbone_state(original))
    layers = freeze_batchnorm(wrapped, mode="stats")
    assert layers == ["module.features.1", "module.features.4"]
    train_steps(wrapped, steps=2)
    trained = wrapped.state_dict()
    assert "module.features.1.running_mean" not in trained
    unfreeze_batchnorm(wrapped)
    assert "module.features.1.running_mean" in wrapped.state_dict()


def test_eval_mode_survives_model_train() -> None:
    original = make_original()
    model = copy.deepcopy(original)
    freeze_from_state_dict(model, backbone_state(original))
    freeze_batchnorm(model, mode="eval")
    bn = model.features[1]
    x = torch.randn(8, 3, 8, 8) * 3 + 2

    model.train()
    with torch.no_grad():
        model(x)

    assert model.training and model.head.training
    assert not bn.training  # pinned again by the forward
    assert torch.equal(bn.running_mean, original.features[1].running_mean)
    assert int(bn.num_batches_tracked) == int(original.features[1].num_batches_tracked)
    # The layer normalised with its running statistics, as the original does in eval mode.
    inner = model.features[0](x)
    with torch.no_grad():
        assert torch.allclose(bn(inner), original.features[1].eval()(inner))
    # The state_dict is untouched in this mode.
    assert list(model.state_dict()) == list(original.state_dict())


def test_eval_pin_survives_deepcopy_and_pickle_and_is_not_duplicated() -> None:
    original = make_original()
    model = copy.deepcopy(original)
    freeze_from_state_dict(model, backbone_state(original))
    freeze_batchnorm(model, mode="eval")
    freeze_batchnorm(model, mode="eval")
    assert len(model.features[1]._forward_pre_hooks) == 1

    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        with torch.no_grad():
            clone(torch.randn(8, 3, 8, 8) * 3 + 2)
        assert torch.equal(clone.features[1].running_mean, original.features[1].running_mean)


def test_unfreeze_removes_the_eval_pin() -> None:
    original = make_original()
    model = copy.deepcopy(original)
    freeze_from_state_dict(model, backbone_state(original))
    freeze_batchnorm(model, mode="eval")
    assert unfreeze_batchnorm(model) == ["features.1", "features.4"]
    assert len(model.features[1]._forward_pre_hooks) == 0
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 8, 8) * 3 + 2)
    assert not torch.equal(model.features[1].running_mean, original.features[1].running_mean)
    assert unfreeze_batchnorm(model) == []  # nothing left to undo


def test_unfreeze_a_layer_built_in_stats_mode_by_name() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=0.0, track_running_stats=False))
    assert "1.running_mean" not in model.state_dict()
    assert unfreeze_batchnorm(model, modules=["1"]) == ["1"]
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(model.state_dict())
    assert model[1].momentum == pytest.approx(0.1)


def test_bad_modules_and_mode_are_rejected() -> None:
    model = TinyConvNet()
    with pytest.raises(InvalidRequest, match="'head'"):
        freeze_batchnorm(model, modules=["head"])
    with pytest.raises(InvalidRequest, match="'nope'"):
        unfreeze_batchnorm(model, modules=["nope"])
    with pytest.raises(InvalidRequest):
        freeze_batchnorm(model, mode="frozen")  # type: ignore[arg-type]
