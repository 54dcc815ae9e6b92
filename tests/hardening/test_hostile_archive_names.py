"""Zip entries named `..` or absolute, duplicate `data.pkl` entries, and a legacy pickle with a zip appended."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from tests.core import hostile
from tests.hardening import builders, hostile_support
from tests.hardening.hostile_support import RealServer, refuse_everywhere

# Fixtures shared with the other test_hostile_* modules (the directory's conftest belongs to the fault tests).
data_dir, real_server, real_http = hostile_support.data_dir, hostile_support.real_server, hostile_support.real_http

pytestmark = pytest.mark.timeout(120)

CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "dotdot entry": (hostile.make_dotdot_entry, "not allowed"),
    "absolute entry": (hostile.make_absolute_entry, "not allowed"),
    "duplicate data.pkl": (hostile.make_duplicate_entries, "duplicate"),
    "legacy with a zip appended": (builders.make_legacy_with_zip, "follow the end"),
}


def test_legacy_with_zip_is_a_polyglot(tmp_path: Path) -> None:
    # The control: zip readers see the appended archive, torch sees the legacy checkpoint.
    path = builders.make_legacy_with_zip(tmp_path / "polyglot.pth")
    with zipfile.ZipFile(path) as zf:
        assert "archive/data.pkl" in zf.namelist()
    assert set(torch.load(path, weights_only=True)) == {"weight", "bias"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_archive_name_is_refused_everywhere(
    client: TestClient, data_dir: Path, recipe_files: dict[str, Path], tmp_path: Path, case: str
) -> None:
    builder, fragment = CASES[case]
    path = builder(tmp_path / "names.pth")

    refuse_everywhere(client, data_dir, path, recipe_files["original"], fragment=fragment)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


def test_dotdot_entry_is_refused_by_a_real_server(
    real_http: httpx.Client, real_server: RealServer, recipe_files: dict[str, Path], tmp_path: Path
) -> None:
    path = hostile.make_dotdot_entry(tmp_path / "dotdot.pth")

    refuse_everywhere(real_http, real_server.data_dir, path, recipe_files["original"], fragment="not allowed")
