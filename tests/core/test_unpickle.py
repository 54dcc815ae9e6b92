"""The placeholder unpickler: tensors as torch builds them, every other global an inert record, never imported."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.core.load import load_checkpoint
from service.core.manifest import build_manifest
from service.errors import ContainerKeyError, CorruptCheckpoint, UnsupportedFormat
from tests.factories import make_original, save_pth

pytestmark = pytest.mark.timeout(120)


def reference_load(path: Path) -> object:
    # The comparison the issue asks for: plain torch.load, on files this test wrote itself.
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


# --- unknown globals are records, never imported or called ---------------------------------------------------

MODULE_SOURCE = '''
from pathlib import Path
Path({imported!r}).touch()  # importing this module leaves a marker


def boom(path):
    Path(path).touch()


class Config:
    def __init__(self, called):
        self.called = called
        self.nested = {{"lr": 0.1}}

    def __reduce__(self):
        return boom, ({called!r},)


class State:
    def __init__(self):
        self.depth = 3
'''


@pytest.mark.parametrize("legacy", [False, True])
def test_unknown_globals_are_never_imported_nor_called(tmp_path: Path, legacy: bool) -> None:
    imported, called = tmp_path / "IMPORTED", tmp_path / "CALLED"
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "ra_never_imported.py").write_text(MODULE_SOURCE.format(imported=str(imported), called=str(called)))
    path = tmp_path / "ckpt.pth"
    # Another process writes the file (importing the module there), so this process never has it imported.
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(package)!r})
        import ra_never_imported as m
        torch.manual_seed(0)
        sd = torch.nn.Linear(3, 2).state_dict()
        torch.save({{"state_dict": sd, "config": m.Config(1), "state": m.State(), "more": [m.State()]}},
                   {str(path)!r}, _use_new_zipfile_serialization={not legacy})
    """)], check=True)
    imported.unlink()
    sys.path.insert(0, str(package))  # an import would now succeed: it must still not happen
    try:
        loaded = load_checkpoint(path)
    finally:
        sys.path.remove(str(package))

    assert not imported.exists() and not called.exists()
    assert "ra_never_imported" not in sys.modules
    assert loaded.container_key == "state_dict"
    assert list(loaded.state_dict) == ["weight", "bias"]
    assert loaded.extras == {
        "config": "ra_never_imported.boom", "state": "ra_never_imported.State", "more": "list",
        "more.0": "ra_never_imported.State",
    }


def test_framework_objects_become_placeholders_and_tensors_match_torch(tmp_path: Path) -> None:
    sd = make_original().state_dict()
    ckpt = {
        "state_dict": sd,
        "args": argparse.Namespace(lr=0.1, out=Path("runs/1")),
        "mean": np.arange(6, dtype=np.float32),
        "np_scalar": np.float64(1.5),
        "dtype": np.dtype("uint32"),
        "counter": Counter(a=2),
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]},
    }
    path = save_pth(ckpt, tmp_path / "ckpt.pth")

    loaded = load_checkpoint(path)

    reference = reference_load(path)
    assert isinstance(reference, dict)
    assert_same_tensors(loaded.state_dict, reference["state_dict"])
    assert loaded.state_dict._metadata == reference["state_dict"]._metadata  # type: ignore[attr-defined]
    assert loaded.extras["args"] == "argparse.Namespace"
    assert loaded.extras["mean"] == "numpy.ndarray"
    assert loaded.extras["counter"] == "Counter"
    assert loaded.extras["optimizer"] == "dict"
    assert loaded.mmapped and loaded.records is not None  # zero-copy saves still possible


# --- whole pickled modules ---------------------------------------------------------------------------------------


class Block(nn.Module):
    """A custom class with a non-persistent buffer and a None parameter slot."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.full((4,), 0.5))
        self.register_parameter("unused", None)
        self.register_buffer("cache", torch.zeros(4), persistent=False)
        self.register_buffer("steps", torch.tensor(7))


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "sequential": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        "nested": nn.Sequential(
            nn.ModuleList([nn.Linear(4, 4), Block()]),
            nn.ModuleDict({"head": nn.Linear(4, 2), "norm": nn.BatchNorm1d(2)}),
        ),
        "custom": Block(),
    }


@pytest.mark.parametrize("name", sorted(_models()))
@pytest.mark.parametrize("legacy", [False, True])
def test_whole_module_gives_what_state_dict_returns(tmp_path: Path, name: str, legacy: bool) -> None:
    model = _models()[name]
    model.train()
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        model(torch.randn(2, 3, 8, 8))  # running stats and num_batches_tracked move
    path = save_pth(model, tmp_path / "model.pth", legacy=legacy)

    loaded = load_checkpoint(path)

    assert_same_tensors(loaded.state_dict, model.state_dict())
    assert loaded.container_key is None
    custom = {p: c for p, c in loaded.extras.items() if c.endswith(".Block")}
    expected = {"custom": {"(module)": f"{__name__}.Block"}, "nested": {"0.1": f"{__name__}.Block"}}
    assert custom == expected.get(name, {})


def test_whole_module_inside_a_container(tmp_path: Path) -> None:
    model = _models()["nested"]
    path = save_pth({"model": model, "epoch": 4}, tmp_path / "yolo-style.pth")

    loaded = load_checkpoint(path)

    assert loaded.container_key == "model"
    assert_same_tensors(loaded.state_dict, model.state_dict())
    assert loaded.extras["epoch"] == "int"
    assert loaded.extras["model.0.1"] == f"{__name__}.Block"


# --- files with tensors but no model -----------------------------------------------------------------------------


def _optimizer_state() -> dict[str, object]:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return opt.state_dict()


def _scheduler_state() -> dict[str, object]:
    opt = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1)
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2).state_dict()


@pytest.mark.parametrize(("what", "fragment"), [
    ("optimizer", "an optimizer state, not a model"),
    ("rng", "an RNG state, not a model"),
    ("scheduler", "a learning-rate scheduler state, not a model"),
    ("args", "training arguments (argparse.Namespace), not a model"),
])
def test_files_without_model_weights_say_what_they_are(tmp_path: Path, what: str, fragment: str) -> None:
    obj = {
        "optimizer": _optimizer_state,
        "rng": lambda: {"python": (3, (1, 2), None), "numpy": ("MT19937", np.zeros(4, dtype=np.uint32)),
                        "cpu": torch.get_rng_state()},
        "scheduler": _scheduler_state,
        "args": lambda: argparse.Namespace(lr=0.1),
    }[what]()
    path = save_pth(obj, tmp_path / f"{what}.pth")

    with pytest.raises(ContainerKeyError) as info:
        load_checkpoint(path)

    assert fragment in info.value.detail


# --- issue 13 item 5: what is read equals what torch.load returns ------------------------------------------------


def _linear_sd(seed: int) -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Linear(3, 2).state_dict()  # type: ignore[return-value]


def test_instance_attributes_cannot_pick_a_decoy_container(tmp_path: Path) -> None:
    # `get` set on the top-level OrderedDict: obj.get("state_dict") would return a Counter of characters and the
    # search would move on to the decoy "model"; torch.load(f)["state_dict"] holds the real weights.
    top: OrderedDict[str, object] = OrderedDict(state_dict=_linear_sd(1), model=_linear_sd(2))
    top.get = Counter  # type: ignore[method-assign]
    path = save_pth(top, tmp_path / "decoy.pth")

    for placeholders in (True, False):
        loaded = load_checkpoint(path, placeholders=placeholders)
        reference = torch.load(path, weights_only=True)
        assert loaded.container_key == "state_dict"
        assert_same_tensors(loaded.state_dict, reference["state_dict"])
        assert dict(build_manifest(loaded.state_dict).entries) == dict(
            build_manifest(reference["state_dict"]).entries)


class _WithAttributes(OrderedDict[str, torch.Tensor]):
    """Pickles as a plain OrderedDict whose BUILD state sets the given instance attributes."""

    attributes: dict[str, object] = {}

    def __reduce__(self) -> tuple[object, ...]:
        return OrderedDict, (), dict(self.attributes), None, iter(dict.items(self))


@pytest.mark.parametrize("attr", ["items", "values", "keys", "__iter__"])
def test_instance_attributes_hiding_entries_are_refused(tmp_path: Path, attr: str) -> None:
    sd = _WithAttributes(hidden=torch.ones(2), w=torch.zeros(3))
    sd.attributes = {attr: OrderedDict}  # sd.items() would return an empty OrderedDict: "0 keys"
    path = save_pth({"state_dict": sd}, tmp_path / "hidden.pth")
    assert list(dict.keys(torch.load(path, weights_only=True)["state_dict"])) == ["hidden", "w"]

    for placeholders in (True, False):
        with pytest.raises(CorruptCheckpoint) as info:
            load_checkpoint(path, placeholders=placeholders)
        assert f"'{attr}'" in info.value.detail


def test_only_metadata_of_dicts_is_kept(tmp_path: Path) -> None:
    sd = _linear_sd(0)
    sd._metadata = OrderedDict({"": "not a dict"})  # type: ignore[attr-defined]
    path = save_pth(sd, tmp_path / "bad-metadata.pth")

    with pytest.raises(CorruptCheckpoint, match="_metadata"):
        load_checkpoint(path)


# --- formats we cannot read name the way out ---------------------------------------------------------------------


def test_torch_distributed_checkpoint_files_name_dcp_to_torch_save(tmp_path: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that no process group is initialised
        dcp.save({"model": _linear_sd(0)}, checkpoint_id=str(folder))

    for name in ("__0_0.distcp", ".metadata"):
        with pytest.raises(UnsupportedFormat) as info:
            load_checkpoint(folder / name)
        assert "dcp_to_torch_save" in info.value.detail


def _deepspeed_like(stage: int) -> dict[str, object]:
    # The layout DeepSpeed's engine writes (deepspeed is not a dependency): the keys are what matter.
    common = {"ds_version": "0.16.0", "ds_config": {"zero_optimization": {"stage": stage}}}
    if stage == 3:
        return {"module": OrderedDict(w=torch.empty(0), b=torch.empty(0)), "param_shapes": [{"w": (2, 3)}], **common}
    return {"optimizer_state_dict": {"zero_stage": stage, "single_partition_of_fp32_groups": [torch.ones(8)]},
            **common}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_shards_name_zero_to_fp32(tmp_path: Path, stage: int) -> None:
    path = save_pth(_deepspeed_like(stage), tmp_path / "shard.pt")

    with pytest.raises(UnsupportedFormat) as info:
        load_checkpoint(path)

    assert "zero_to_fp32.py" in info.value.detail


def test_deepspeed_model_states_with_full_weights_load(tmp_path: Path) -> None:
    sd = _linear_sd(0)
    path = save_pth({"module": sd, "ds_version": "0.16.0", "ds_config": {}}, tmp_path / "mp_rank_00_model_states.pt")

    loaded = load_checkpoint(path)

    assert loaded.container_key == "module"
    assert_same_tensors(loaded.state_dict, sd)


class _TouchThroughAllowedModules:
    """Unpickling this with pickle runs methodcaller("touch")(PosixPath(marker)): no denied module involved."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object]]:
        import operator

        return operator.methodcaller("touch"), (self.marker,)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_callable_built_from_allowed_modules_is_never_called(tmp_path: Path, legacy: bool) -> None:
    import pickle

    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(_TouchThroughAllowedModules(marker)))
    assert marker.exists()  # the control: a plain unpickler runs it
    marker.unlink()
    path = save_pth({"state_dict": _linear_sd(0), "hook": _TouchThroughAllowedModules(marker)}, tmp_path / "m.pth",
                    legacy=legacy)

    loaded = load_checkpoint(path)

    assert not marker.exists()
    assert loaded.extras["hook"] == "operator.methodcaller()"
    assert list(loaded.state_dict) == ["weight", "bias"]
