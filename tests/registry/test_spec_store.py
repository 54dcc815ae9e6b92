"""Specs persisted in the store's metadata index: what one replica registers, every replica sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.verify import spec_from_module
from service.errors import ArchitectureConflict, ArchitectureNotFound
from service.registry import ArchitectureRegistry
from service.store import ArtifactStore
from tests.factories import MLPBN, TinyConvNet

NO_PLUGINS = "ckpt_service_tests.no_such_group"


def _replica(root: Path, database_url: str | None) -> ArchitectureRegistry:
    # A replica: its own store object (own connections) over the shared index.
    store = ArtifactStore(root, database_url=database_url)
    registry = ArchitectureRegistry(spec_store=store.index, entry_point_group=NO_PLUGINS, include_builtins=False)
    registry.load()
    return registry


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_index(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str | None]:
    if request.param == "sqlite":
        return tmp_path / "data", None
    server: str = request.getfixturevalue("postgres_server")
    import secrets

    import psycopg

    name = f"r_{secrets.token_hex(6)}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    return tmp_path / "data", f"{server}/{name}"


def test_a_spec_registered_by_one_replica_is_seen_by_another(shared_index: tuple[Path, str | None]) -> None:
    a, b = _replica(*shared_index), _replica(*shared_index)
    spec = spec_from_module(TinyConvNet())
    a.register_spec("shared", spec, description="from a")
    seen = b.get("shared")
    assert seen.source == "spec" and seen.description == "from a" and seen.spec.keys == spec.keys
    assert [x.name for x in b.list()] == ["shared"]
    with pytest.raises(ArchitectureConflict):
        b.register_spec("shared", spec_from_module(MLPBN()))
    b.delete("shared")
    with pytest.raises(ArchitectureNotFound):
        a.get("shared")
    assert a.list() == []
    # the name is free again, and a re-registration with other keys is what both see
    b.register_spec("shared", spec_from_module(MLPBN()))
    assert a.get("shared").spec.keys == spec_from_module(MLPBN()).keys


def test_a_bad_stored_spec_is_reported_not_raised(shared_index: tuple[Path, str | None]) -> None:
    registry = _replica(*shared_index)
    index = ArtifactStore(shared_index[0], database_url=shared_index[1]).index
    assert index.insert_spec("broken", {"format": 99, "name": "broken", "keys": {}})
    registry.register_spec("fine", spec_from_module(TinyConvNet()))
    assert [a.name for a in registry.list()] == ["fine"]
    [issue] = registry.issues
    assert issue.name == "broken" and issue.source == "spec" and "unsupported spec file format" in issue.error
    with pytest.raises(ArchitectureNotFound):
        registry.get("broken")
    assert index.delete_spec("broken")
    registry.list()
    assert registry.issues == []
