from __future__ import annotations

import argparse
import datetime
import fractions
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch

from service.core.formats import detect_format
from service.core.load import CONTAINER_KEYS, load_checkpoint, resolve_globals
from service.core.loading._allowlist import GATE
from service.errors import ContainerKeyError, InvalidCheckpoint, InvalidRequest, UnsafeCheckpoint
from service.registry.builtins import TinyConvNet
from tests.factories import make_original, make_trained, save_pth


@pytest.fixture(scope="module")
def original_sd() -> OrderedDict[str, torch.Tensor]:
    return make_original().state_dict()  # type: ignore[return-value]


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


# --- formats and round trips -------------------------------------------------------------------------


def test_zip_checkpoint_loads_memory_mapped(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    path = save_pth(original_sd, tmp_path / "model.pth")

    loaded = load_checkpoint(path)

    assert loaded.format == "pth-zip"
    assert loaded.mmapped is True
    assert loaded.container_key is None
    assert loaded.extras == {}
    assert_same_tensors(loaded.state_dict, original_sd)
    assert all(type(v) is torch.Tensor for v in loaded.state_dict.values())
    model = TinyConvNet()
    model.load_state_dict(loaded.state_dict, strict=True)


def test_zip_checkpoint_without_mmap(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    loaded = load_checkpoint(save_pth(original_sd, tmp_path / "model.pth"), mmap=False)

    assert loaded.mmapped is False
    assert_same_tensors(loaded.state_dict, original_sd)


def test_legacy_checkpoint_loads_without_mmap(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    path = save_pth(original_sd, tmp_path / "model.pth", legacy=True)

    loaded = load_checkpoint(path, mmap=True)

    assert loaded.format == "pth-legacy"
    assert loaded.mmapped is False
    assert loaded.has_metadata is True
    assert_same_tensors(loaded.state_dict, original_sd)


def test_safetensors_loads_with_header_metadata(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(dict(original_sd), str(path), metadata={"epoch": "7", "format": "pt"})

    loaded = load_checkpoint(path)

    assert loaded.format == "safetensors"
    assert loaded.metadata == {"epoch": "7", "format": "pt"}
    assert loaded.has_metadata is False
    assert sorted(loaded.state_dict) == sorted(original_sd)
    for key, value in original_sd.items():
        assert torch.equal(loaded.state_dict[key], value), key


def test_format_is_detected_by_content_not_by_name(
    tmp_path: Path, original_sd: dict[str, torch.Tensor]
) -> None:
    # torch.load itself dispatches on a ".safetensors" suffix; the content must win.
    zip_named_safetensors = save_pth(original_sd, tmp_path / "really-a-zip.safetensors")
    safetensors_named_pth = tmp_path / "really-safetensors.pth"
    safetensors.torch.save_file(dict(original_sd), str(safetensors_named_pth))

    assert detect_format(zip_named_safetensors).name == "pth-zip"
    assert detect_format(safetensors_named_pth).name == "safetensors"
    assert_same_tensors(load_checkpoint(zip_named_safetensors).state_dict, original_sd)
    assert sorted(load_checkpoint(safetensors_named_pth).state_dict) == sorted(original_sd)


def test_dataparallel_checkpoint_keeps_its_keys(tmp_path: Path) -> None:
    trained = make_trained(make_original())
    path = save_pth(trained.state_dict(), tmp_path / "trained.pth")

    loaded = load_checkpoint(path)

    assert list(loaded.state_dict) == list(trained.state_dict())
    assert all(k.startswith("module.") for k in loaded.state_dict)
    assert not any("running_mean" in k for k in loaded.state_dict)  # BN stats mode dropped them


# --- containers --------------------------------------------------------------------------------------


def test_container_state_dict_is_found_and_extras_reported(
    tmp_path: Path, original_sd: dict[str, torch.Tensor]
) -> None:
    model = make_original()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    path = save_pth({"state_dict": original_sd, "epoch": 3, "optimizer": optimizer.state_dict()},
                    tmp_path / "ckpt.pth")

    loaded = load_checkpoint(path)

    assert loaded.container_key == "state_dict"
    assert loaded.extras == {"epoch": "int", "optimizer": "dict"}
    assert loaded.has_metadata is True
    assert_same_tensors(loaded.state_dict, original_sd)


def test_nested_container_is_found(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    path = save_pth({"model": {"state_dict": original_sd, "step": 7}, "epoch": 1}, tmp_path / "ckpt.pth")

    loaded = load_checkpoint(path)

    assert loaded.container_key == "model.state_dict"
    assert loaded.extras == {"epoch": "int", "model.step": "int"}
    assert_same_tensors(loaded.state_dict, original_sd)


def test_container_keys_are_searched_in_order(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    other = {k: v + 1 for k, v in original_sd.items() if v.is_floating_point()}
    # Insertion order puts "model_ema" first; CONTAINER_KEYS order must decide.
    path = save_pth({"model_ema": other, "model": original_sd}, tmp_path / "ckpt.pth")

    loaded = load_checkpoint(path)

    assert CONTAINER_KEYS.index("model") < CONTAINER_KEYS.index("model_ema")
    assert loaded.container_key == "model"
    assert loaded.extras == {"model_ema": "dict"}
    assert_same_tensors(loaded.state_dict, original_sd)


def test_explicit_container_key(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    ema = OrderedDict((k, v * 2) for k, v in original_sd.items())
    path = save_pth({"state_dict": original_sd, "ema": ema}, tmp_path / "ckpt.pth")

    loaded = load_checkpoint(path, container_key="ema")

    assert loaded.container_key == "ema"
    assert loaded.extras == {"state_dict": "OrderedDict"}
    assert_same_tensors(loaded.state_dict, ema)


def test_explicit_dotted_container_key_and_keys_with_dots(
    tmp_path: Path, original_sd: dict[str, torch.Tensor]
) -> None:
    path = save_pth({"ckpt": {"model.ema": original_sd}}, tmp_path / "ckpt.pth")

    loaded = load_checkpoint(path, container_key="ckpt.model.ema")

    assert loaded.container_key == "ckpt.model.ema"
    assert_same_tensors(loaded.state_dict, original_sd)


def test_missing_container_key_names_available_keys(
    tmp_path: Path, original_sd: dict[str, torch.Tensor]
) -> None:
    path = save_pth({"state_dict": original_sd, "epoch": 3}, tmp_path / "ckpt.pth")

    with pytest.raises(ContainerKeyError) as info:
        load_checkpoint(path, container_key="nope")

    assert "'epoch', 'state_dict'" in info.value.detail
    assert info.value.extensions["available_keys"] == ["epoch", "state_dict"]


def test_container_key_pointing_at_a_non_state_dict(
    tmp_path: Path, original_sd: dict[str, torch.Tensor]
) -> None:
    path = save_pth({"state_dict": original_sd, "epoch": 3}, tmp_path / "ckpt.pth")

    with pytest.raises(ContainerKeyError, match="int"):
        load_checkpoint(path, container_key="epoch")
    with pytest.raises(ContainerKeyError, match="not a dict"):
        load_checkpoint(path, container_key="epoch.inner")


def test_no_state_dict_lists_top_level_keys(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    path = save_pth({"encoder": original_sd, "epoch": 3}, tmp_path / "ckpt.pth")

    with pytest.raises(ContainerKeyError) as info:
        load_checkpoint(path)

    assert "'encoder', 'epoch'" in info.value.detail
    assert load_checkpoint(path, container_key="encoder").container_key == "encoder"


def test_top_level_that_is_not_a_dict(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    path = save_pth(list(original_sd.values()), tmp_path / "ckpt.pth")

    with pytest.raises(ContainerKeyError, match="list"):
        load_checkpoint(path)


def test_non_tensor_values_inside_state_dict_are_reported(
    tmp_path: Path, original_sd: dict[str, torch.Tensor]
) -> None:
    inner = OrderedDict(original_sd)
    inner["note"] = "trained on cats"  # type: ignore[assignment]
    top = OrderedDict(original_sd)
    top["step"] = 12  # type: ignore[assignment]
    nested_path = save_pth({"state_dict": inner}, tmp_path / "nested.pth")
    top_path = save_pth(top, tmp_path / "top.pth")

    nested = load_checkpoint(nested_path)
    flat = load_checkpoint(top_path)

    assert nested.extras == {"state_dict.note": "str"}
    assert flat.extras == {"step": "int"}
    assert_same_tensors(nested.state_dict, original_sd)
    assert_same_tensors(flat.state_dict, original_sd)


def test_parameters_come_back_as_plain_tensors(tmp_path: Path) -> None:
    model = make_original()
    path = save_pth(dict(model.named_parameters()), tmp_path / "params.pth")

    loaded = load_checkpoint(path)

    assert all(type(v) is torch.Tensor and not v.requires_grad for v in loaded.state_dict.values())
    assert list(loaded.state_dict) == [name for name, _ in model.named_parameters()]


# --- _metadata ---------------------------------------------------------------------------------------


def test_metadata_is_kept(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    loaded = load_checkpoint(save_pth(original_sd, tmp_path / "model.pth"))

    assert loaded.has_metadata is True
    assert loaded.state_dict._metadata == original_sd._metadata  # type: ignore[attr-defined]
    assert isinstance(loaded.state_dict, OrderedDict)


def test_metadata_absent(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    loaded = load_checkpoint(save_pth(dict(original_sd), tmp_path / "model.pth"))

    assert loaded.has_metadata is False
    assert not hasattr(loaded.state_dict, "_metadata")
    assert loaded.to_dict()["has_metadata"] is False


# --- allowlist ---------------------------------------------------------------------------------------


@pytest.fixture()
def namespace_ckpt(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> Path:
    args = argparse.Namespace(lr=0.1, arch="tiny")
    return save_pth({"state_dict": original_sd, "args": args, "epoch": 2}, tmp_path / "with-args.pth")


def test_namespace_needs_the_allowlist_on_the_allowlist_path(namespace_ckpt: Path) -> None:
    with pytest.raises(UnsafeCheckpoint) as info:
        load_checkpoint(namespace_ckpt, placeholders=False)

    assert info.value.unsafe_globals == ["argparse.Namespace"]
    assert "'argparse.Namespace'" in info.value.detail


def test_namespace_loads_with_the_allowlist_and_it_does_not_leak(
    namespace_ckpt: Path, original_sd: dict[str, torch.Tensor]
) -> None:
    before = set(torch.serialization.get_safe_globals())  # torch registers a few of its own

    loaded = load_checkpoint(namespace_ckpt, safe_globals=["argparse.Namespace"], placeholders=False)

    assert loaded.container_key == "state_dict"
    assert loaded.extras == {"args": "Namespace", "epoch": "int"}
    assert_same_tensors(loaded.state_dict, original_sd)
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(UnsafeCheckpoint):
        load_checkpoint(namespace_ckpt, placeholders=False)


def test_namespace_is_a_placeholder_by_default(namespace_ckpt: Path, original_sd: dict[str, torch.Tensor]) -> None:
    loaded = load_checkpoint(namespace_ckpt)

    assert loaded.container_key == "state_dict"
    assert loaded.extras == {"args": "argparse.Namespace", "epoch": "int"}
    assert_same_tensors(loaded.state_dict, original_sd)


def test_allowlist_of_one_thread_is_not_seen_by_another(namespace_ckpt: Path) -> None:
    # torch's allowlist is process-wide. While one load holds ["argparse.Namespace"], a load without an
    # allowlist started in another thread must still refuse the Namespace (it waits rather than leaks).
    outcome: list[BaseException | None] = []

    def load_without_allowlist() -> None:
        try:
            load_checkpoint(namespace_ckpt, placeholders=False)
            outcome.append(None)
        except BaseException as exc:  # noqa: B036 - recorded for the main thread
            outcome.append(exc)

    before = set(torch.serialization.get_safe_globals())
    with GATE.hold(resolve_globals(["argparse.Namespace"])):
        assert argparse.Namespace in torch.serialization.get_safe_globals()
        worker = threading.Thread(target=load_without_allowlist)
        worker.start()
        worker.join(timeout=0.5)  # give it every chance to run inside the allowlist window
    worker.join(timeout=60)

    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], UnsafeCheckpoint)
    assert set(torch.serialization.get_safe_globals()) == before


def test_unsafe_error_lists_every_global_not_just_the_first(
    tmp_path: Path, original_sd: dict[str, torch.Tensor]
) -> None:
    # torch stops at the first refused global; the opcode scan must name all of them.
    ckpt = {"state_dict": original_sd, "args": argparse.Namespace(lr=0.1),
            "when": datetime.date(2024, 1, 1), "ratio": fractions.Fraction(1, 3)}
    path = save_pth(ckpt, tmp_path / "many-globals.pth")

    with pytest.raises(UnsafeCheckpoint) as everything:
        load_checkpoint(path, placeholders=False)
    with pytest.raises(UnsafeCheckpoint) as rest:
        load_checkpoint(path, safe_globals=["argparse.Namespace"], placeholders=False)

    assert everything.value.unsafe_globals == ["argparse.Namespace", "datetime.date", "fractions.Fraction"]
    assert rest.value.unsafe_globals == ["datetime.date", "fractions.Fraction"]
    assert "'datetime.date', 'fractions.Fraction'" in rest.value.detail


def test_resolve_globals_returns_the_objects() -> None:
    assert resolve_globals(["argparse.Namespace", "collections.OrderedDict"]) == [
        argparse.Namespace, OrderedDict,
    ]


@pytest.mark.parametrize("name", [
    "nope_module.Thing",  # not importable
    "argparse.NoSuchThing",  # no such attribute
    "Namespace",  # not dotted
    "argparse.Namespace; rm",  # not a name
    "os.system",  # blocked: executes commands
    "builtins.eval",
    "subprocess.Popen",
    "torch.load",  # would unpickle again, unsafely
    "argparse.ONE_OR_MORE",  # a constant, not a class or function
])
def test_resolve_globals_refuses(name: str) -> None:
    with pytest.raises(InvalidRequest):
        resolve_globals([name])


def test_bad_allowlist_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        load_checkpoint(tmp_path / "does-not-matter.pth", safe_globals=["os.system"])


def test_pickle_protocol_3_loads_and_4_is_a_clear_domain_error(tmp_path: Path) -> None:
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    p3, p4 = tmp_path / "p3.pth", tmp_path / "p4.pth"
    torch.save(sd, p3, pickle_protocol=3)  # torch warns about protocol > 2 and still loads it
    assert torch.equal(load_checkpoint(p3).state_dict["w"], sd["w"])
    torch.save(sd, p4, pickle_protocol=4)  # FRAME opcodes: torch's weights-only unpickler refuses them
    with pytest.raises(InvalidCheckpoint):
        load_checkpoint(p4, placeholders=False)
    # The placeholder unpickler reads every protocol torch.save can write.
    assert torch.equal(load_checkpoint(p4).state_dict["w"], sd["w"])
