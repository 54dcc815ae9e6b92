"""A mapped load described as JSON in one process and mapped again, without unpickling, in another."""

from __future__ import annotations

import copy
import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

from service.core.layout import describe_layout, map_layout
from service.core.load import load_checkpoint
from service.errors import CorruptCheckpoint
from tests.factories import save_pth


def _varied() -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 30, generator=g)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict(
        whole=base, row=base[3], transposed=base.t(), strided=base[::4, 2:], scalar=torch.tensor(7),
        empty=torch.empty(0, 3), half=torch.randn(5, generator=g).half(), bf=torch.ones(2, dtype=torch.bfloat16),
        flags=torch.tensor([True, False]), counts=torch.tensor(12, dtype=torch.int64),
        f8=torch.zeros(4, dtype=torch.float8_e5m2), u32=torch.zeros(3, dtype=torch.uint32))
    sd._metadata = OrderedDict({"": {"version": 1}, "bn": {"version": 2}})  # type: ignore[attr-defined]
    return sd


def _described(path: Path) -> dict[str, Any]:
    loaded = load_checkpoint(path, mmap=True)
    layout = describe_layout(loaded)
    assert layout is not None
    return json.loads(json.dumps(layout))  # as it crosses the process boundary


def test_a_mapped_layout_is_what_torch_load_gives(tmp_path: Path) -> None:
    path = save_pth(_varied(), tmp_path / "sd.pth")
    mapped, records = map_layout(path, _described(path))
    reference = torch.load(path, weights_only=True)
    assert list(mapped) == list(reference)
    for key, tensor in reference.items():
        got = mapped[key]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
        assert got.stride() == tensor.stride() and got.storage_offset() == tensor.storage_offset(), key
        assert torch.equal(got.float(), tensor.float()), key
    ptr = {k: t.untyped_storage().data_ptr() for k, t in mapped.items()}
    assert ptr["whole"] == ptr["row"] == ptr["transposed"] == ptr["strided"]
    assert mapped._metadata == reference._metadata  # type: ignore[attr-defined]
    assert len(records.by_address) == len({p for k, p in ptr.items() if mapped[k].untyped_storage().nbytes()})


def test_a_container_checkpoints_state_dict_is_described(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    path = save_pth({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "c.pth")
    mapped, _ = map_layout(path, _described(path))
    model.load_state_dict(mapped, strict=True)
    assert list(mapped) == list(model.state_dict())


@pytest.mark.parametrize("case", ["requires_grad", "int_keyed_metadata"])
def test_what_cannot_be_described_exactly_is_not(tmp_path: Path, case: str) -> None:
    sd: OrderedDict[str, Any] = OrderedDict(w=torch.ones(3))
    if case == "requires_grad":
        sd["g"] = torch.ones(2, requires_grad=True)
    else:
        sd._metadata = OrderedDict({"": {1: 2}})  # type: ignore[attr-defined]  # JSON would make the key "1"
    path = save_pth(sd, tmp_path / "sd.pth")
    assert describe_layout(load_checkpoint(path, mmap=True)) is None


def test_files_that_are_not_mapped_have_no_layout(tmp_path: Path) -> None:
    legacy = save_pth(OrderedDict(w=torch.ones(3)), tmp_path / "legacy.pth", legacy=True)
    assert describe_layout(load_checkpoint(legacy, mmap=True)) is None
    st = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"w": torch.ones(3)}, str(st))
    assert describe_layout(load_checkpoint(st, mmap=True)) is None


def _hostile(layout: dict[str, Any], case: str) -> dict[str, Any]:
    bad = copy.deepcopy(layout)
    entry = next(t for t in bad["tensors"] if t[0] == "whole")
    if case == "record_past_the_end":
        bad["records"][0][1] += 10 ** 9
    elif case == "empty_record":
        bad["records"][0][1] = 0
    elif case == "view_past_its_record":
        entry[2] = [400, 30]
    elif case == "stride_past_its_record":
        entry[3] = [30, 10 ** 6]
    elif case == "offset_past_its_record":
        entry[4] = 10 ** 7
    elif case == "negative_stride":
        entry[3] = [-30, 1]
    elif case == "bool_for_int":
        entry[4] = True
    elif case == "unknown_dtype":
        entry[1] = "object"
    elif case == "record_index_out_of_range":
        entry[5] = 99
    elif case == "elements_without_storage":
        entry[5] = -1
    elif case == "too_many_dims":
        entry[2], entry[3] = [1] * 65, [1] * 65
    elif case == "wrong_arity":
        entry.pop()
    elif case == "duplicate_key":
        bad["tensors"].append(list(entry))
    elif case == "metadata_not_a_dict":
        bad["metadata"] = [1, 2]
    elif case == "records_not_a_list":
        bad["records"] = {"0": [0, 1, 2]}
    return bad


@pytest.mark.parametrize("case", [
    "record_past_the_end", "empty_record", "view_past_its_record", "stride_past_its_record",
    "offset_past_its_record", "negative_stride", "bool_for_int", "unknown_dtype", "record_index_out_of_range",
    "elements_without_storage", "too_many_dims", "wrong_arity", "duplicate_key", "metadata_not_a_dict",
    "records_not_a_list",
])
def test_a_layout_that_does_not_fit_the_file_is_refused(tmp_path: Path, case: str) -> None:
    path = save_pth(_varied(), tmp_path / "sd.pth")
    layout = _described(path)
    map_layout(path, layout)  # the genuine one maps
    with pytest.raises(CorruptCheckpoint):
        map_layout(path, _hostile(layout, case))


def test_a_merge_does_not_unpickle_the_upload_in_the_api_process(
    client: TestClient, recipe_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.operations

    with recipe_files["original"].open("rb") as fh:
        assert client.post("/checkpoints", files={"file": ("o.pth", fh)}, data={"name": "orig"}).status_code == 201

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the upload was unpickled again in the API process")

    monkeypatch.setattr(service.operations, "load_checkpoint", refuse)
    with recipe_files["trained"].open("rb") as fh:
        r = client.post("/merge", data={"architecture": "tiny-convnet", "original": "orig"},
                        files={"trained_file": ("t.pth", fh)})
    assert r.status_code == 201, r.text
    merged = torch.load(io.BytesIO(client.get(r.json()["download_url"]).content),
                        weights_only=True)
    trained = torch.load(recipe_files["trained"], weights_only=True)
    assert torch.equal(merged["head.weight"], trained["module.head.weight"])
