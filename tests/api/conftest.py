"""Every API test runs against each metadata index backend (see tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _per_index_backend(index_backend: str | None) -> None:
    """Parametrizes the test by backend; CKPT_DATABASE_URL names the PostgreSQL one."""
