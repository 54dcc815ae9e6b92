"""Objects that are not a state_dict of tensors: a whole nn.Module, numpy arrays, a custom class, TorchScript."""

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
    "nn.Module": (builders.make_module, "torch.nn.modules.linear.Linear"),
    "numpy": (builders.make_numpy, "numpy.ndarray"),
    "custom class": (builders.make_custom_class, "tests.hardening.builders.Custom"),
    "TorchScript": (hostile.make_torchscript, "TorchScript"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_foreign_object_is_refused_everywhere(
    client: TestClient, data_dir: Path, recipe_files: dict[str, Path], tmp_path: Path, case: str
) -> None:
    builder, fragment = CASES[case]
    path = builder(tmp_path / "foreign.pth")

    refuse_everywhere(client, data_dir, path, recipe_files["original"], fragment=fragment)


def test_pickled_module_is_refused_by_a_real_server(
    real_http: httpx.Client, real_server: RealServer, recipe_files: dict[str, Path], tmp_path: Path
) -> None:
    path = builders.make_module(tmp_path / "module.pth")

    refuse_everywhere(real_http, real_server.data_dir, path, recipe_files["original"],
                      fragment="torch.nn.modules.container.Sequential")
