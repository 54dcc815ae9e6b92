from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from service.core.prefixes import (
    KNOWN_WRAPPERS,
    KeyTransform,
    align_keys,
    align_prefixes,
    apply_transform,
    common_leading_component,
    is_lightning,
    match_prefixes,
    strip_key,
    strip_prefixes,
)
from service.errors import PrefixCollision
from tests.factories import CompiledLike, LightningLike, TinyConvNet, make_original, make_trained


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((prefix + k, v) for k, v in sd.items())


@pytest.mark.parametrize("wrapper", KNOWN_WRAPPERS)
def test_each_known_wrapper_is_stripped(wrapper: str) -> None:
    base = TinyConvNet().state_dict()
    result = strip_prefixes(_prefixed(base, wrapper))
    assert list(result.state_dict) == list(base)
    assert result.applied == {wrapper: len(base)}
    assert result.renamed == len(base)
    for key, tensor in base.items():
        assert result.state_dict[key] is tensor


def test_real_data_parallel_keys_load_strictly_after_stripping() -> None:
    original = make_original()
    trained = make_trained(original, steps=1).state_dict()
    assert all(k.startswith("module.") for k in trained)
    result = strip_prefixes(trained)
    model = TinyConvNet()
    # track_running_stats=False dropped the BN stats: strict load misses exactly those
    missing = model.load_state_dict(result.state_dict, strict=False).missing_keys
    assert missing and all(
        k.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked") for k in missing
    )
    assert not model.load_state_dict(result.state_dict, strict=False).unexpected_keys


def test_stacked_wrappers_data_parallel_over_torch_compile() -> None:
    model = TinyConvNet()
    wrapped = nn.DataParallel(CompiledLike(model))
    sd = wrapped.state_dict()
    assert next(iter(sd)).startswith("module._orig_mod.")
    result = strip_prefixes(sd)
    assert list(result.state_dict) == list(model.state_dict())
    assert result.applied == {"module.": len(sd), "_orig_mod.": len(sd)}
    assert result.renamed == len(sd)
    model.load_state_dict(result.state_dict, strict=True)


def test_nested_wrapper_on_a_submodule() -> None:
    model = TinyConvNet()
    plain_keys = list(model.state_dict())
    model.features = nn.DataParallel(model.features)  # type: ignore[assignment]
    sd = model.state_dict()
    assert "features.module.0.weight" in sd
    result = strip_prefixes(sd)
    assert list(result.state_dict) == plain_keys
    assert result.applied == {"module.": sum(k.startswith("features.") for k in sd)}


def test_only_whole_components_are_removed_and_never_the_leaf() -> None:
    t = torch.zeros(1)
    sd = {"modules.0.weight": t, "my_module.bias": t, "x_orig_mod.w": t, "block.module": t, "module": t}
    result = strip_prefixes(sd)
    assert list(result.state_dict) == list(sd)
    assert result.renamed == 0
    assert result.applied == {}


def test_model_prefix_is_stripped_only_when_asked() -> None:
    base = TinyConvNet().state_dict()
    lightning = _prefixed(base, "model.")
    assert list(strip_prefixes(lightning).state_dict) == list(lightning)
    result = strip_prefixes(lightning, ["model."])
    assert list(result.state_dict) == list(base)
    assert result.applied == {"model.": len(base)}


def test_explicit_prefixes_only_at_the_start_and_repeatedly() -> None:
    t = torch.zeros(1)
    sd = {"model.module.a.weight": t, "head.model.b": t, "model.c": t}
    result = strip_prefixes(sd, ["model.", "module."])
    assert list(result.state_dict) == ["a.weight", "head.model.b", "c"]
    assert result.applied == {"model.": 2, "module.": 1}
    assert strip_key("head.model.b", ["model."]) == "head.model.b"
    # a prefix names whole components: "model" means "model.", and never matches "model_ema."
    assert strip_key("model.x", ["model"]) == "x"
    assert strip_key("model_ema.x", ["model"]) == "model_ema.x"
    with pytest.raises(TypeError):
        strip_prefixes(sd, "model.")
    assert strip_key("features.module.0.weight") == "features.0.weight"


def test_collision_names_both_source_keys_and_the_target() -> None:
    sd = {"module.head.weight": torch.zeros(1), "head.weight": torch.ones(1), "other": torch.zeros(1)}
    with pytest.raises(PrefixCollision) as info:
        strip_prefixes(sd)
    assert info.value.keys == ["head.weight", "module.head.weight"]
    assert "'head.weight'" in info.value.detail and "'module.head.weight'" in info.value.detail
    explicit = {"model.x": torch.zeros(1), "x": torch.zeros(1)}
    with pytest.raises(PrefixCollision):
        strip_prefixes(explicit, ["model."])


def test_metadata_is_renamed_consistently() -> None:
    model = TinyConvNet()
    plain = model.state_dict()
    wrapped = nn.DataParallel(CompiledLike(model)).state_dict()
    result = strip_prefixes(wrapped)
    assert result.has_metadata
    stripped_meta = result.state_dict._metadata  # type: ignore[attr-defined]
    assert dict(stripped_meta) == dict(plain._metadata)  # type: ignore[attr-defined]
    # the input is left alone
    assert "module._orig_mod.features" in wrapped._metadata  # type: ignore[attr-defined]


def test_metadata_with_explicit_prefix_maps_the_wrapped_root_to_root() -> None:
    sd: OrderedDict[str, torch.Tensor] = OrderedDict(
        [("model.features.0.weight", torch.zeros(1)), ("model.head.bias", torch.zeros(1))]
    )
    sd._metadata = OrderedDict(  # type: ignore[attr-defined]
        [("", {"version": 1}), ("model", {"version": 7}), ("model.features", {"version": 3})]
    )
    result = strip_prefixes(sd, ["model."])
    assert dict(result.state_dict._metadata) == {  # type: ignore[attr-defined]
        "": {"version": 7},
        "features": {"version": 3},
    }


def test_no_metadata_stays_absent() -> None:
    result = strip_prefixes({"module.a": torch.zeros(1)})
    assert not result.has_metadata
    assert not hasattr(result.state_dict, "_metadata")
    assert result.to_dict() == {
        "applied": {"module.": 1},
        "renamed": 1,
        "has_metadata": False,
        "key_count": 1,
    }


def test_match_prefixes_picks_known_wrappers_for_data_parallel_over_compile() -> None:
    model = TinyConvNet()
    keys = list(nn.DataParallel(CompiledLike(model)).state_dict())
    expected = list(model.state_dict())
    match = match_prefixes(keys, expected)
    assert match.prefixes is None
    assert (match.matched, match.total, match.expected) == (len(expected), len(keys), len(expected))
    assert match.score == 1.0
    assert list(strip_prefixes(dict.fromkeys(keys, torch.zeros(1)), match.prefixes).state_dict) == expected


def test_match_prefixes_scores_a_partial_overlap() -> None:
    original = make_original()
    trained_keys = list(make_trained(original, steps=1).state_dict())
    expected = list(TinyConvNet().state_dict())
    match = match_prefixes(trained_keys, expected)
    assert match.prefixes is None
    assert match.matched == len(trained_keys)
    assert match.score == pytest.approx(len(trained_keys) / len(expected))
    assert match.to_dict()["prefixes"] is None


def test_match_prefixes_other_transforms() -> None:
    expected = list(TinyConvNet().state_dict())
    assert match_prefixes(expected, expected).prefixes == ()
    lightning = list(LightningLike(TinyConvNet()).state_dict())
    found = match_prefixes(lightning, expected)
    assert found.prefixes is not None and "model." in found.prefixes and found.score == 1.0
    strategy = nn.Module()
    strategy._forward_module = LightningLike(TinyConvNet())  # Lightning's strategy wrapper
    wrapped = strategy.state_dict()
    assert next(iter(wrapped)).startswith("_forward_module.model.")
    found = match_prefixes(wrapped, expected)
    assert list(strip_prefixes(wrapped, found.prefixes).state_dict) == expected
    container = ["net." + k for k in expected]
    assert match_prefixes(container, expected).prefixes == ("net.",)


# -- transforms, Lightning's module attribute, alignment ------------------------------------------------------


def test_key_transform_steps_run_in_order_and_the_lead_goes_once() -> None:
    t = KeyTransform(wrappers=True, lead="model.", strip=("x.",), add="net.")
    assert t.apply("module.model.x.x.a.weight") == "net.a.weight"
    assert KeyTransform(lead="model.").apply("model.model.layers.0.weight") == "model.layers.0.weight"
    assert KeyTransform(lead="model.").apply("model") == "model"  # never stripped down to nothing
    assert KeyTransform().identity and not KeyTransform(add="a.").identity
    assert KeyTransform(add="a.").cost > KeyTransform(wrappers=True).cost  # removing beats adding on a tie
    assert t.to_dict() == {"strip_wrappers": True, "strip_lead": "model.", "strip": ["x."], "add": "net."}


def test_a_lightning_module_over_a_model_with_its_own_model_attribute() -> None:
    # LightningModule.model = a transformers-style *ForCausalLM whose body is `.model`: keys "model.model.*" and
    # "model.lm_head.*". Removing "model." repeatedly would eat the inner "model." too.
    inner = nn.Module()
    inner.model = TinyConvNet()
    inner.lm_head = nn.Linear(2, 2)
    expected = list(inner.state_dict())
    lightning = LightningLike(inner).state_dict()
    match = match_prefixes(lightning.keys(), expected)
    assert match.transform == KeyTransform(lead="model.") and match.score == 1.0
    assert list(apply_transform(lightning, match.transform).state_dict) == expected
    assert list(strip_prefixes(lightning, lightning=True).state_dict) == expected


def test_common_leading_component() -> None:
    assert common_leading_component(["net.a", "net.b.c"]) == "net."
    assert common_leading_component(["net.a", "head.b"]) is None
    assert common_leading_component(["net.a", "net"]) is None
    assert common_leading_component([]) is None


def test_lightning_strip_removes_the_module_attribute_and_renames_metadata() -> None:
    model = TinyConvNet()
    plain = model.state_dict()
    held = LightningLike(model).state_dict()  # "model.*", as a LightningModule's state_dict() has it
    assert list(strip_prefixes(held).state_dict) == list(held)  # not a Lightning file: "model." is a real name
    result = strip_prefixes(held, lightning=True)
    assert list(result.state_dict) == list(plain)
    assert result.applied == {"model.": len(plain)}
    assert result.transform == KeyTransform(wrappers=True, lead="model.")
    assert dict(result.state_dict._metadata) == dict(plain._metadata)  # type: ignore[attr-defined]
    TinyConvNet().load_state_dict(result.state_dict, strict=True)
    # any attribute name, under Lightning's strategy wrapper too
    strategy = nn.Module()
    strategy._forward_module = nn.Module()
    strategy._forward_module.backbone = model
    assert list(strip_prefixes(strategy.state_dict(), lightning=True).state_dict) == list(plain)


def test_lightning_module_with_two_attributes_keeps_them() -> None:
    module = nn.Module()
    module.net = TinyConvNet()
    module.ema = TinyConvNet()
    sd = module.state_dict()
    assert list(strip_prefixes(sd, lightning=True).state_dict) == list(sd)
    assert is_lightning({"pytorch-lightning_version": "str", "epoch": "int"})
    assert not is_lightning({"epoch": "int"})


def test_align_prefixes_strips_the_side_that_has_the_wrapper_in_either_order() -> None:
    original = make_original().state_dict()
    trained = make_trained(make_original(), steps=1).state_dict()  # "module.*", no BN stats
    forward = align_prefixes(original, trained)
    assert (forward.a, forward.b) == (KeyTransform(), KeyTransform(wrappers=True))
    assert forward.matched == len(trained)
    backward = align_prefixes(trained, original)
    assert (backward.a, backward.b) == (KeyTransform(wrappers=True), KeyTransform())
    assert align_prefixes(original, original).a.identity  # already aligned: nothing is changed


def test_align_prefixes_with_a_container_attribute_and_when_stripping_would_collide() -> None:
    plain = TinyConvNet().state_dict()
    net = _prefixed(plain, "net.")
    found = align_prefixes(plain, net)
    assert found.matched == len(plain) and found.b == KeyTransform(lead="net.") and found.a.identity
    # "model.x" and "x" on one side: stripping "model." collides, so the other side gets "model." added
    t = torch.zeros(1)
    crowded = {"model.head.weight": t, "model.head.bias": t, "model.features.0.weight": t, "head.weight": t}
    bare = {"head.weight": t, "head.bias": t, "features.0.weight": t}
    aligned = align_prefixes(bare, crowded)
    assert (aligned.a, aligned.b, aligned.matched) == (KeyTransform(add="model."), KeyTransform(), 3)


def test_align_keys_adds_the_targets_prefix_and_renames_the_metadata_root() -> None:
    model = TinyConvNet()
    plain = model.state_dict()
    target = list(LightningLike(model).state_dict())
    found = align_keys(plain.keys(), target)
    assert found.a == KeyTransform(add="model.") and found.b.identity and found.matched == len(target)
    renamed = apply_transform(plain, found.a).state_dict
    assert list(renamed) == target
    assert dict(renamed._metadata)["model"] == plain._metadata[""]  # type: ignore[attr-defined]
    assert dict(renamed._metadata)["model.features"] == plain._metadata["features"]  # type: ignore[attr-defined]
    LightningLike(TinyConvNet()).load_state_dict(renamed, strict=True)
    wrapped = nn.DataParallel(model).state_dict()
    found = align_keys(wrapped.keys(), target)  # "module.*" -> "model.*"
    assert found.a == KeyTransform(wrappers=True, add="model.") and found.matched == len(target)


def test_a_prefix_doubled_by_two_wrapping_containers_is_removed_twice_when_that_fits() -> None:
    expected = list(TinyConvNet().state_dict())
    doubled = ["model.model." + k for k in expected]
    match = match_prefixes(doubled, expected)
    assert match.transform == KeyTransform(strip=("model.",)) and match.score == 1.0
    assert match.to_dict()["transform"]["strip"] == ["model."]
