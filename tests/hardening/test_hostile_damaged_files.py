"""Empty, 10-byte, truncated, random and text files, and a zip with junk before it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.core import hostile
from tests.hardening import builders, hostile_support
from tests.hardening.hostile_support import RealServer, refuse_everywhere

# Fixtures shared with the other test_hostile_* modules (the directory's conftest belongs to the fault tests).
data_dir, real_server, real_http = hostile_support.data_dir, hostile_support.real_server, hostile_support.real_http

pytestmark = pytest.mark.timeout(120)

CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty": (hostile.make_empty, "empty"),
    "10 bytes": (builders.make_ten_bytes, "pickle"),
    "truncated": (hostile.make_truncated, "truncated"),
    "random": (builders.make_random, "not a checkpoint"),
    "text": (hostile.make_text, "text"),
    "junk before the zip": (hostile.make_junk_prefix, "precedes"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_file_is_refused_everywhere(
    client: TestClient, data_dir: Path, recipe_files: dict[str, Path], tmp_path: Path, case: str
) -> None:
    builder, fragment = CASES[case]
    path = builder(tmp_path / "damaged.pth")

    refuse_everywhere(client, data_dir, path, recipe_files["original"], fragment=fragment)


@pytest.mark.parametrize("case", ["truncated", "random"])
def test_damaged_file_is_refused_by_a_real_server(
    real_http: httpx.Client, real_server: RealServer, recipe_files: dict[str, Path], tmp_path: Path, case: str
) -> None:
    builder, fragment = CASES[case]
    path = builder(tmp_path / "damaged.pth")

    refuse_everywhere(real_http, real_server.data_dir, path, recipe_files["original"], fragment=fragment)
