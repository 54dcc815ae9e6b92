"""Archives whose parts disagree: a storage record shorter than its tensor, a missing data.pkl or storage, a view
larger than its storage, and an expanded (stride-0) view that would materialise terabytes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from tests.hardening import builders, hostile_support
from tests.hardening.hostile_support import RealServer, refuse_everywhere

# Fixtures shared with the other test_hostile_* modules (the directory's conftest belongs to the fault tests).
data_dir, real_server, real_http = hostile_support.data_dir, hostile_support.real_server, hostile_support.real_http

pytestmark = pytest.mark.timeout(120)

CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "short storage record": (builders.make_short_storage, "storage"),
    "no data.pkl": (builders.make_missing_data_pkl, "data.pkl"),
    "missing storage": (builders.make_missing_storage, "data/0"),
    "view past its storage": (builders.make_view_past_storage, "storage"),
    "expanded view": (builders.make_expanded_view, "expanded"),
}


def test_short_storage_record_is_what_a_plain_torch_load_refuses(tmp_path: Path) -> None:
    # The control: torch's non-mmap reader checks record sizes; its mmap reader alone would read past the record.
    path = builders.make_short_storage(tmp_path / "short.pth")
    with pytest.raises(RuntimeError, match="record size"):
        torch.load(path, weights_only=True)
    assert torch.load(path, weights_only=True, mmap=True)["weight"].shape == (2, 3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_inconsistent_archive_is_refused_everywhere(
    client: TestClient, data_dir: Path, recipe_files: dict[str, Path], tmp_path: Path, case: str
) -> None:
    builder, fragment = CASES[case]
    path = builder(tmp_path / "inconsistent.pth")

    refuse_everywhere(client, data_dir, path, recipe_files["original"], fragment=fragment)


def test_short_storage_record_is_refused_by_a_real_server(
    real_http: httpx.Client, real_server: RealServer, recipe_files: dict[str, Path], tmp_path: Path
) -> None:
    path = builders.make_short_storage(tmp_path / "short.pth")

    refuse_everywhere(real_http, real_server.data_dir, path, recipe_files["original"], fragment="storage")
