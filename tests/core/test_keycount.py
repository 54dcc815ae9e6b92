"""One key-count limit (CKPT_MAX_KEYS), counted before torch's unpickler does any per-key work."""

from __future__ import annotations

import fractions
import json
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from service.config import Settings
from service.core.keycount import count_keys
from service.core.load import load_checkpoint
from service.core.types import ArchiveLimits
from service.errors import ArchiveLimitExceeded
from tests.factories import make_original


def _views(path: Path, count: int, *, legacy: bool = False, extra: object = None) -> Path:
    base = torch.zeros(count)
    sd: dict[str, object] = {f"v{i}": base[i : i + 1] for i in range(count)}  # one storage, many views
    if extra is not None:
        sd["extra"] = extra
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    return path


def test_counts_the_keys_of_a_real_state_dict(tmp_path: Path) -> None:
    sd = make_original().state_dict()
    path = tmp_path / "m.pth"
    torch.save(sd, path)
    assert count_keys(path, legacy=False, limit=10_000) == len(sd)
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert count_keys(path, legacy=True, limit=10_000) == len(sd)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_views_of_one_storage_past_the_limit_are_refused(tmp_path: Path, legacy: bool) -> None:
    path = _views(tmp_path / "views.pth", 300, legacy=legacy)
    with pytest.raises(ArchiveLimitExceeded, match="more than 200 keys") as info:
        load_checkpoint(path, limits=ArchiveLimits(max_keys=200))
    assert info.value.extensions["limit"] == 200
    assert len(load_checkpoint(path, limits=ArchiveLimits(max_keys=300)).state_dict) == 300


def test_the_count_comes_before_the_unpickler(tmp_path: Path) -> None:
    # A global torch's weights-only unpickler refuses: the key limit answers first, so torch never ran.
    path = _views(tmp_path / "views.pth", 300, extra=fractions.Fraction(1, 3))
    with pytest.raises(ArchiveLimitExceeded):
        load_checkpoint(path, limits=ArchiveLimits(max_keys=200))


def test_mapping_entries_count_too(tmp_path: Path) -> None:
    path = tmp_path / "entries.pth"
    sd: OrderedDict[str, object] = OrderedDict((f"k{i}", i) for i in range(300))
    sd["w"] = torch.ones(2)
    torch.save(sd, path)
    assert count_keys(path, legacy=False, limit=200) is None


def test_a_safetensors_header_past_the_limit_is_refused(tmp_path: Path) -> None:
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(300)}
    raw = json.dumps(header).encode()
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * 300))
    with pytest.raises(ArchiveLimitExceeded, match="300 tensors"):
        load_checkpoint(path, limits=ArchiveLimits(max_keys=200))


def test_settings_fold_the_old_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().max_keys == 500_000
    assert Settings(max_keys=7).max_keys == 7
    assert Settings(archive_max_entries=8).max_keys == 8  # deprecated alias
    monkeypatch.setenv("CKPT_ARCHIVE_MAX_ENTRIES", "9")
    assert Settings().max_keys == 9
    monkeypatch.setenv("CKPT_MAX_KEYS", "11")
    assert Settings().max_keys == 11
