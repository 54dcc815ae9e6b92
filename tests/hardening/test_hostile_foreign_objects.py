"""Objects that are not a state_dict of tensors: a whole nn.Module, numpy arrays and a custom class are read as inert
placeholders (the weights are used, nothing is imported or run); TorchScript is still refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.core import hostile
from tests.hardening import builders, hostile_support
from tests.hardening.hostile_support import diff_with, refuse_everywhere, upload

# Fixtures shared with the other test_hostile_* modules (the directory's conftest belongs to the fault tests).
data_dir, real_server, real_http = hostile_support.data_dir, hostile_support.real_server, hostile_support.real_http

pytestmark = pytest.mark.timeout(120)

# builder, key count, what the extras say about the foreign object
ACCEPTED: dict[str, tuple[Callable[[Path], Path], int, dict[str, str]]] = {
    "nn.Module": (builders.make_module, 2, {}),
    "numpy": (builders.make_numpy, 2, {"mean": "numpy.ndarray"}),
    "custom class": (builders.make_custom_class, 2, {"config": "tests.hardening.builders.Custom"}),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_foreign_object_is_an_inert_placeholder(client: TestClient, tmp_path: Path, case: str) -> None:
    builder, keys, extras = ACCEPTED[case]
    path = builder(tmp_path / "foreign.pth")

    r = upload(client, path)

    assert r.status_code == 201, r.text
    body = r.json()
    assert body["key_count"] == keys
    assert {k: v for k, v in body["extras"].items() if k in extras} == extras
    assert diff_with(client, path, path).status_code == 200


def test_torchscript_is_refused_everywhere(
    client: TestClient, data_dir: Path, recipe_files: dict[str, Path], tmp_path: Path
) -> None:
    path = hostile.make_torchscript(tmp_path / "foreign.pth")

    refuse_everywhere(client, data_dir, path, recipe_files["original"], fragment="TorchScript")


def test_pickled_module_is_read_by_a_real_server(real_http: httpx.Client, tmp_path: Path) -> None:
    path = builders.make_module(tmp_path / "module.pth")

    r = upload(real_http, path)

    assert r.status_code == 201, r.text
    assert r.json()["key_count"] == 2
    assert r.json()["extras"] == {}  # Sequential, Linear and ReLU are torch.nn classes: no custom class to list
