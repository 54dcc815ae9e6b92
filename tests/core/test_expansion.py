"""The expansion bound (views of one storage count once per key) and what safetensors output can hold."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from service.core.expansion import check_expansion, expanded_bytes, expansion_budget
from service.core.load import load_checkpoint
from service.core.save import SAFETENSORS_DTYPES, check_safetensors_output, save_checkpoint
from service.core.types import ArchiveLimits
from service.errors import ExpansionLimitExceeded, InvalidCheckpoint, UnconvertibleCheckpoint
from service.store.inspection import inspect_checkpoint

MIB = 1 << 20


def alias_state_dict(keys: int, storage_bytes: int = MIB) -> dict[str, torch.Tensor]:
    """`keys` keys that all view one storage: a small file that claims keys x storage_bytes."""
    base = torch.zeros(storage_bytes // 4)
    return {f"alias.{i}": base[:] for i in range(keys)}


class TiedLM(nn.Module):
    """An embedding shared with the output head, as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(512, 64)
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 512, bias=False)
        self.head.weight = self.embed.weight


def test_expanded_bytes_counts_every_view_in_full() -> None:
    sd = alias_state_dict(10)
    assert expanded_bytes(sd) == 10 * MIB
    assert expanded_bytes({"a": torch.zeros(3, dtype=torch.int16), "b": torch.zeros(0)}) == 6


def test_budget_is_ratio_times_size_plus_slack_capped() -> None:
    limits = ArchiveLimits(max_expansion_ratio=4.0, expansion_slack_bytes=64 * MIB, max_expanded_bytes=1 << 40)
    assert expansion_budget([1000], limits) == 4000 + 64 * MIB
    assert expansion_budget([1000, 10], limits) == 4040 + 128 * MIB
    capped = ArchiveLimits(max_expanded_bytes=100 * MIB)
    assert expansion_budget([1 << 30], capped) == 100 * MIB


def test_check_expansion_names_size_and_limit() -> None:
    with pytest.raises(ExpansionLimitExceeded) as info:
        check_expansion(alias_state_dict(3), budget=2 * MIB)
    assert info.value.extensions == {"expanded_bytes": 3 * MIB, "limit": 2 * MIB}
    assert "3 keys" in info.value.detail


def test_inspection_refuses_an_alias_blow_up(tmp_path: Path) -> None:
    path = tmp_path / "alias.pth"
    torch.save(alias_state_dict(200), path)  # the 1 MiB storage once, ~1.1 MB on disk; 200 MiB expanded
    assert path.stat().st_size < 2 * MIB
    with pytest.raises(ExpansionLimitExceeded) as info:
        inspect_checkpoint(path)
    assert info.value.extensions["expanded_bytes"] == 200 * MIB
    assert info.value.extensions["limit"] == 4 * path.stat().st_size + 64 * MIB


def test_inspection_honours_the_configured_ratio_and_cap(tmp_path: Path) -> None:
    path = tmp_path / "alias.pth"
    torch.save(alias_state_dict(200), path)
    generous = ArchiveLimits(max_expansion_ratio=10_000.0)
    assert inspect_checkpoint(path, limits=generous).manifest.tensor_bytes == 200 * MIB
    with pytest.raises(ExpansionLimitExceeded):
        inspect_checkpoint(path, limits=ArchiveLimits(max_expansion_ratio=10_000.0, max_expanded_bytes=100 * MIB))


def test_tied_weights_stay_well_inside(tmp_path: Path) -> None:
    model = TiedLM()
    path = tmp_path / "tied.pth"
    torch.save(model.state_dict(), path)
    size = path.stat().st_size
    inspection = inspect_checkpoint(path, limits=ArchiveLimits(expansion_slack_bytes=0))
    # The shared matrix counts twice, and that is still under 2x the file, half of the ratio of 4.
    assert inspection.manifest.tensor_bytes < 2 * size
    assert set(inspection.manifest.entries) == {"embed.weight", "body.weight", "body.bias", "head.weight"}


def test_safetensors_save_refuses_past_the_bound_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(ExpansionLimitExceeded):
        save_checkpoint(alias_state_dict(50), out, format="safetensors", max_expanded_bytes=10 * MIB)
    assert list(tmp_path.iterdir()) == []
    # Within the bound the aliases are written apart, as before.
    save_checkpoint(alias_state_dict(5), out, format="safetensors", max_expanded_bytes=10 * MIB)
    assert len(safetensors.torch.load_file(out)) == 5


def _unsupported() -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # complex32 is "experimental"; quantize_* is deprecated
        return {
            "c128": torch.ones(2, dtype=torch.complex128),
            "c32": torch.ones(2, dtype=torch.complex32),
            "bits": torch.zeros(2, dtype=torch.int16).view(torch.bits16),
            "q": torch.quantize_per_tensor(torch.ones(4), 0.1, 3, torch.qint8),
            "fine": torch.ones(2),
        }


def test_dtypes_safetensors_cannot_hold_are_named(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    with pytest.raises(UnconvertibleCheckpoint) as info:
        save_checkpoint(_unsupported(), out, format="safetensors")
    assert isinstance(info.value, InvalidCheckpoint)  # a 422 at the API
    assert info.value.extensions == {
        "keys": ["bits", "c128", "c32", "q"],
        "dtypes": ["bits16", "complex128", "complex32", "qint8"],
    }
    assert "complex128: 'c128'" in info.value.detail
    assert not out.exists()


def test_metadata_key_is_refused_for_safetensors(tmp_path: Path) -> None:
    with pytest.raises(UnconvertibleCheckpoint) as info:
        check_safetensors_output({"__metadata__": torch.ones(2), "b": torch.ones(1)})
    assert info.value.extensions == {"keys": ["__metadata__"]}
    # pth can hold it
    save_checkpoint({"__metadata__": torch.ones(2)}, tmp_path / "ok.pth")


@pytest.mark.parametrize("dtype", sorted(SAFETENSORS_DTYPES, key=str), ids=str)
def test_every_allowed_dtype_round_trips(tmp_path: Path, dtype: torch.dtype) -> None:
    out = tmp_path / "out.safetensors"
    tensor = torch.ones(3, dtype=torch.float32).to(dtype)
    save_checkpoint({"t": tensor}, out, format="safetensors")
    assert safetensors.torch.load_file(out)["t"].dtype == dtype
    assert load_checkpoint(out).state_dict["t"].dtype == dtype


def test_a_sparse_tensor_counts_its_dense_size(tmp_path: Path) -> None:
    # One stored value, 4 TiB when densified (which hashing it for the manifest would do): refused first.
    path = tmp_path / "sparse.pth"
    with torch.sparse.check_sparse_tensor_invariants():
        sparse = torch.sparse_coo_tensor(torch.tensor([[0], [0]]), torch.tensor([1.0]), (1 << 20, 1 << 20))
    torch.save({"w": sparse, "b": torch.ones(2)}, path)
    with pytest.raises(ExpansionLimitExceeded) as info:
        inspect_checkpoint(path)
    assert info.value.extensions["expanded_bytes"] == (1 << 42) + 8
