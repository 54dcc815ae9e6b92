"""`_metadata` handling in one place: read, carry, copy, rename, and what a pickle may set."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from service.core.load import load_checkpoint
from service.core.prefixes import strip_prefixes
from service.core.save import save_checkpoint
from service.core.statedict import (
    copy_metadata,
    has_metadata,
    metadata_of,
    read_pickled_metadata,
    rename_metadata,
    with_metadata,
)
from service.errors import CorruptCheckpoint
from tests.factories import make_original


def test_metadata_of_a_module_state_dict_and_of_a_plain_dict() -> None:
    sd = make_original().state_dict()

    assert metadata_of(sd) is sd._metadata  # type: ignore[attr-defined]
    assert has_metadata(sd)
    assert metadata_of(dict(sd)) is None
    assert not has_metadata(dict(sd))


def test_with_metadata_carries_the_same_object_or_a_copy_of_its_per_module_dicts() -> None:
    sd = make_original().state_dict()
    metadata = metadata_of(sd)
    assert metadata is not None

    shared = with_metadata(sd, metadata)
    copied = with_metadata(sd, metadata, copy=True)
    plain = with_metadata(sd, None)

    assert metadata_of(shared) is metadata
    assert metadata_of(copied) == metadata and metadata_of(copied) is not metadata
    assert all(metadata_of(copied)[k] is not v for k, v in metadata.items())  # type: ignore[index]
    assert not has_metadata(plain)
    assert list(shared) == list(copied) == list(plain) == list(sd)


def test_copy_metadata_keeps_the_kinds_of_mappings() -> None:
    ordered = OrderedDict([("", {"version": 1}), ("bn", OrderedDict(version=2))])
    plain = {"": {"version": 1}}

    assert type(copy_metadata(ordered)) is OrderedDict
    assert type(copy_metadata(ordered)["bn"]) is OrderedDict
    assert type(copy_metadata(ordered)[""]) is dict
    assert type(copy_metadata(plain)) is dict


def test_rename_metadata_keeps_the_innermost_module_of_a_collision() -> None:
    # DataParallel: the wrapper's root "" and the wrapped model's "module" both become "".
    metadata = OrderedDict([("", {"version": 1}), ("module", {"version": 7}), ("module.bn", {"version": 2})])

    renamed = rename_metadata(metadata, lambda path: path.removeprefix("module").lstrip("."))

    assert renamed == OrderedDict([("", {"version": 7}), ("bn", {"version": 2})])


def test_strip_renames_metadata_by_the_same_transform() -> None:
    sd = make_original().state_dict()
    wrapped = with_metadata(((f"module.{k}", v) for k, v in sd.items()),
                            OrderedDict((f"module.{p}" if p else "module", m) for p, m in sd._metadata.items()))

    stripped = strip_prefixes(wrapped, ["module."]).state_dict

    assert list(stripped) == list(sd)
    assert metadata_of(stripped) == sd._metadata  # type: ignore[attr-defined]


def test_save_then_load_keeps_metadata_in_pth_and_drops_it_in_safetensors(tmp_path: Path) -> None:
    sd = make_original().state_dict()
    save_checkpoint(sd, tmp_path / "m.pth")
    save_checkpoint(sd, tmp_path / "m.safetensors", format="safetensors")

    assert metadata_of(load_checkpoint(tmp_path / "m.pth").state_dict) == sd._metadata  # type: ignore[attr-defined]
    assert not load_checkpoint(tmp_path / "m.safetensors").has_metadata


def test_read_pickled_metadata_refuses_other_attributes_and_other_shapes() -> None:
    good: OrderedDict[str, torch.Tensor] = OrderedDict(w=torch.zeros(1))
    vars(good)["_metadata"] = OrderedDict([("", {"version": 1})])
    hiding: OrderedDict[str, torch.Tensor] = OrderedDict(w=torch.zeros(1))
    vars(hiding)["items"] = "shadow"
    flat: OrderedDict[str, torch.Tensor] = OrderedDict(w=torch.zeros(1))
    vars(flat)["_metadata"] = {"": 1}

    assert read_pickled_metadata(good) is vars(good)["_metadata"]
    assert read_pickled_metadata(OrderedDict(w=torch.zeros(1))) is None
    assert read_pickled_metadata({"w": torch.zeros(1)}) is None
    with pytest.raises(CorruptCheckpoint, match="'items'"):
        read_pickled_metadata(hiding)
    with pytest.raises(CorruptCheckpoint, match="per-module dicts"):
        read_pickled_metadata(flat)
