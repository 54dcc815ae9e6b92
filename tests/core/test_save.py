from __future__ import annotations

import errno
import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from service.core.load import load_checkpoint
from service.core.save import save_checkpoint
from service.errors import InvalidRequest, StorageFull
from service.registry.builtins import TinyConvNet
from tests.factories import make_original


@pytest.fixture(scope="module")
def original_sd() -> OrderedDict[str, torch.Tensor]:
    return make_original().state_dict()  # type: ignore[return-value]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp-"))


def exploding(error: BaseException) -> torch.Tensor:
    """A tensor that fails when torch.save pickles it: a write that dies half way."""

    # The error lives on the class: detach() (which save_checkpoint applies) returns a new instance.
    class Exploding(torch.Tensor):
        def __reduce_ex__(self, protocol: Any) -> Any:
            raise error

    return torch.Tensor._make_subclass(Exploding, torch.zeros(4))


def copy_of(state_dict: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    copied = OrderedDict(state_dict)
    copied._metadata = state_dict._metadata  # type: ignore[attr-defined]
    return copied


class TiedLM(nn.Module):
    """An embedding whose weight is also the output head's: a tied state_dict with two keys, one storage."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight


# --- pth ---------------------------------------------------------------------------------------------


def test_pth_loads_with_plain_torch_load_into_the_model(
    tmp_path: Path, original_sd: OrderedDict[str, torch.Tensor]
) -> None:
    path = tmp_path / "out.pth"

    save_checkpoint(original_sd, path)

    loaded = torch.load(path)  # the defaults a user would type
    assert list(loaded) == list(original_sd)
    assert loaded._metadata == original_sd._metadata  # type: ignore[attr-defined]
    model = TinyConvNet()
    model.load_state_dict(loaded, strict=True)
    for key, value in original_sd.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_pth_without_metadata_stays_without(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "out.pth"

    save_checkpoint(dict(original_sd), path)

    assert load_checkpoint(path).has_metadata is False


def test_pth_bytes_are_deterministic(tmp_path: Path, original_sd: OrderedDict[str, torch.Tensor]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second, other = tmp_path / "a" / "x.pth", tmp_path / "b" / "y.pth", tmp_path / "z.pth"
    changed = copy_of(original_sd)
    changed["head.bias"] = changed["head.bias"] + 1

    save_checkpoint(original_sd, first)
    save_checkpoint(copy_of(original_sd), second)  # a different dict object, same content
    save_checkpoint(changed, other)

    assert sha256(first) == sha256(second)
    assert sha256(first) != sha256(other)


def test_mmapped_round_trip_gives_the_same_bytes(
    tmp_path: Path, original_sd: dict[str, torch.Tensor]
) -> None:
    first, second = tmp_path / "first.pth", tmp_path / "second.pth"
    save_checkpoint(original_sd, first)

    loaded = load_checkpoint(first, mmap=True)
    assert loaded.mmapped
    save_checkpoint(loaded.state_dict, second)

    assert sha256(first) == sha256(second)


def test_pth_keeps_shared_storage_once(tmp_path: Path) -> None:
    model = TiedLM()
    path = tmp_path / "tied.pth"

    save_checkpoint(model.state_dict(), path)

    loaded = load_checkpoint(path).state_dict
    storages = {loaded[k].untyped_storage().data_ptr() for k in ("embed.weight", "head.weight")}
    assert len(storages) == 1
    fresh = TiedLM()
    fresh.load_state_dict(loaded, strict=True)
    assert torch.equal(fresh.head.weight, model.head.weight)


def test_pth_refuses_metadata(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    with pytest.raises(InvalidRequest):
        save_checkpoint(original_sd, tmp_path / "out.pth", metadata={"a": "b"})
    assert list(tmp_path.iterdir()) == []


# --- safetensors -------------------------------------------------------------------------------------


def test_safetensors_round_trip_with_metadata(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "out.safetensors"

    save_checkpoint(original_sd, path, format="safetensors", metadata={"source": "merge", "epoch": "3"})

    loaded = load_checkpoint(path)
    assert loaded.format == "safetensors"
    assert loaded.metadata == {"source": "merge", "epoch": "3"}
    assert loaded.has_metadata is False  # safetensors has no place for _metadata
    model = TinyConvNet()
    model.load_state_dict(loaded.state_dict, strict=True)
    for key, value in original_sd.items():
        assert torch.equal(loaded.state_dict[key], value), key


def test_safetensors_bytes_are_deterministic(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"

    save_checkpoint(original_sd, first, format="safetensors", metadata={"k": "v"})
    save_checkpoint(OrderedDict(original_sd), second, format="safetensors", metadata={"k": "v"})

    assert sha256(first) == sha256(second)


def test_safetensors_with_the_same_tensor_twice(tmp_path: Path) -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    path = tmp_path / "shared.safetensors"
    with pytest.raises(RuntimeError, match="share memory"):  # what plain safetensors does
        safetensors.torch.save_file({"a": t, "b": t}, str(tmp_path / "plain.safetensors"))

    save_checkpoint({"a": t, "b": t}, path, format="safetensors")

    loaded = load_checkpoint(path).state_dict
    assert torch.equal(loaded["a"], t) and torch.equal(loaded["b"], t)
    assert leftovers(tmp_path) == []


def test_safetensors_with_tied_weights_loads_strictly(tmp_path: Path) -> None:
    model = TiedLM()
    path = tmp_path / "tied.safetensors"

    save_checkpoint(model.state_dict(), path, format="safetensors")

    fresh = TiedLM()
    fresh.load_state_dict(load_checkpoint(path).state_dict, strict=True)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert torch.equal(fresh.head.weight, model.embed.weight)


def test_safetensors_with_overlapping_and_non_contiguous_views(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32)
    tensors = {
        "low": base[:8],  # overlaps "high"
        "high": base[4:],
        "transposed": torch.arange(6.0).reshape(2, 3).t(),  # non-contiguous
    }
    path = tmp_path / "views.safetensors"

    save_checkpoint(tensors, path, format="safetensors")

    loaded = load_checkpoint(path).state_dict
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value), key


def test_safetensors_refuses_non_string_metadata(
    tmp_path: Path, original_sd: dict[str, torch.Tensor]
) -> None:
    with pytest.raises(InvalidRequest):
        save_checkpoint(original_sd, tmp_path / "x.safetensors", format="safetensors",
                        metadata={"epoch": 3})  # type: ignore[dict-item]


# --- input validation and atomicity ------------------------------------------------------------------


@pytest.mark.parametrize("state_dict", [
    {"w": [1.0, 2.0]},
    {1: torch.zeros(1)},
])
def test_refuses_non_tensor_state_dicts(tmp_path: Path, state_dict: dict[Any, Any]) -> None:
    with pytest.raises(InvalidRequest):
        save_checkpoint(state_dict, tmp_path / "x.pth")
    assert list(tmp_path.iterdir()) == []


def test_refuses_unknown_format(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    with pytest.raises(InvalidRequest):
        save_checkpoint(original_sd, tmp_path / "x.bin", format="npz")  # type: ignore[arg-type]


def test_failed_write_leaves_no_temp_file_and_keeps_the_old_file(
    tmp_path: Path, original_sd: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "model.pth"
    save_checkpoint(original_sd, path)
    before = sha256(path)
    broken = OrderedDict(original_sd)
    broken["zz.boom"] = exploding(RuntimeError("disk went away"))

    with pytest.raises(RuntimeError, match="disk went away"):
        save_checkpoint(broken, path)

    assert leftovers(tmp_path) == []
    assert sha256(path) == before


def test_disk_full_becomes_storage_full(tmp_path: Path, original_sd: dict[str, torch.Tensor]) -> None:
    broken = OrderedDict(original_sd)
    broken["zz.boom"] = exploding(OSError(errno.ENOSPC, "No space left on device"))

    with pytest.raises(StorageFull):
        save_checkpoint(broken, tmp_path / "model.pth")

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_failed_rename_leaves_no_temp_file(
    tmp_path: Path, original_sd: dict[str, torch.Tensor], fmt: Any
) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep").write_text("x")  # a non-empty directory cannot be replaced by a file

    with pytest.raises(OSError):
        save_checkpoint(original_sd, target, format=fmt)

    assert leftovers(tmp_path) == []
    assert (target / "keep").read_text() == "x"


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_hashed_save_reports_the_digest_of_the_bytes_written(tmp_path: Path, fmt: str) -> None:
    from service.core.save import save_checkpoint_hashed

    # Big tensors (hashed in a helper thread) and small ones (hashed inline) in one file.
    sd = OrderedDict(big=torch.randn(512, 1024), small=torch.arange(10), head=torch.ones(3, 3))
    hashed, plain = tmp_path / f"h.{fmt}", tmp_path / f"p.{fmt}"
    digest, size = save_checkpoint_hashed(sd, hashed, format=fmt)  # type: ignore[arg-type]
    save_checkpoint(sd, plain, format=fmt)  # type: ignore[arg-type]
    data = hashed.read_bytes()
    assert digest == hashlib.sha256(data).hexdigest() and size == len(data)
    assert data == plain.read_bytes()  # the hashing writer changes nothing in the file
    loaded = load_checkpoint(hashed).state_dict
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
