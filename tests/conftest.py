"""Fixtures shared by every layer: settings(tmp_path) -> app -> client, and real tiny checkpoint files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.factories import make_original, make_trained

# Real backing services (Ceph RGW for the S3 blob store), started only by the tests that use them.
pytest_plugins = ["tests._services"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def recipe_files(tmp_path: Path) -> dict[str, Path]:
    """The recipe's two files: the pretrained original, and the trained DataParallel file without BN stats."""
    original = make_original()
    trained = make_trained(original)
    paths = {"original": tmp_path / "original.pth", "trained": tmp_path / "trained.pth"}
    torch.save(original.state_dict(), paths["original"])
    torch.save(trained.state_dict(), paths["trained"])
    return paths
