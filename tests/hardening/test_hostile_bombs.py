"""Bombs: deflate bombs (a storage and data.pkl), a shared-reference pickle bomb, 200k-deep nesting (zip, legacy,
safetensors header), and a tiny legacy file declaring an 8 GiB storage (the sandbox's memory limit stops it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.hardening import builders, hostile_support
from tests.hardening.hostile_support import RealServer, refuse_everywhere

# Fixtures shared with the other test_hostile_* modules (the directory's conftest belongs to the fault tests).
data_dir, real_server, real_http = hostile_support.data_dir, hostile_support.real_server, hostile_support.real_http

pytestmark = pytest.mark.timeout(180)

CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "deflate bomb in a storage": (builders.make_storage_bomb, "compressed"),
    "deflate bomb in data.pkl": (builders.make_data_pkl_bomb, "compressed"),
    "billion laughs": (builders.make_billion_laughs, "no state_dict"),
    "200k-deep zip": (builders.make_deep_zip, "list"),
    "200k-deep legacy": (builders.make_deep_legacy, "list"),
    "200k-deep safetensors header": (builders.make_deep_safetensors, "nested too deeply"),
    "8 GiB legacy storage": (builders.make_legacy_huge_storage, "out of memory"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bomb_is_refused_everywhere(
    client: TestClient, data_dir: Path, recipe_files: dict[str, Path], tmp_path: Path, case: str
) -> None:
    builder, fragment = CASES[case]
    path = builder(tmp_path / "bomb.pth")
    assert path.stat().st_size < 2 << 20  # small files, large effects

    refuse_everywhere(client, data_dir, path, recipe_files["original"], fragment=fragment)


@pytest.mark.parametrize("case", ["200k-deep zip", "8 GiB legacy storage"])
def test_bomb_is_refused_by_a_real_server(
    real_http: httpx.Client, real_server: RealServer, recipe_files: dict[str, Path], tmp_path: Path, case: str
) -> None:
    builder, fragment = CASES[case]
    path = builder(tmp_path / "bomb.pth")

    refuse_everywhere(real_http, real_server.data_dir, path, recipe_files["original"], fragment=fragment)
