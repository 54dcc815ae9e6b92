"""Backup and restore: a consistent copy of the index and the blobs; restored into an empty store, everything is
there (also across index backends), and an incomplete or damaged backup is refused."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from service.client.cli import main
from service.core.verify import ArchitectureSpec
from service.errors import StoreError
from service.registry import ArchitectureRegistry
from service.store import ArtifactStore, Lineage
from service.store.backup import MANIFEST_FILE, backup_store, restore_store
from service.store.blobs import open_blob_store


def _populate(store: ArtifactStore, ckpt: Callable[..., Path]) -> dict[str, object]:
    a = store.ingest_file(ckpt(0), labels={"team": "vision"}, filename="a.pth").artifact
    b = store.ingest_file(ckpt(1)).artifact
    derived = store.store_state_dict(
        {"w": torch.ones(3)}, format="safetensors", labels={"stage": "final"},
        lineage=Lineage(operation="strip", inputs={"checkpoint": a.id}, params={"prefixes": None}),
    ).artifact
    store.set_name("prod", derived.id)
    store.set_name("base", a.id)
    registry = ArchitectureRegistry(spec_store=store.index, include_builtins=False)
    registry.register_spec("two-keys", ArchitectureSpec.from_dict(
        {"keys": {"w": {"shape": [3], "dtype": "float32"}, "b": {"shape": [1], "dtype": "float32"}}}))
    return {"ids": sorted([a.id, b.id, derived.id]), "metas": {m.id: store.metadata(m.id) for m in (a, b, derived)}}


def _check_restored(store: ArtifactStore, expected: dict[str, object]) -> None:
    metas = expected["metas"]
    assert isinstance(metas, dict)
    assert sorted(m.id for m in store.list().items) == expected["ids"]
    for artifact_id, meta in metas.items():
        assert store.metadata(artifact_id) == meta
        assert store.verify(artifact_id).ok
        assert store.manifest(artifact_id).entries
    assert sorted(store.names()) == ["base", "prod"]
    assert store.list(label="stage=final").total == 1
    assert store.list(operation="strip").items[0].lineage is not None
    assert ArchitectureRegistry(spec_store=store.index, include_builtins=False).get("two-keys").source == "spec"
    assert store.fsck(deep=True).ok


def test_backup_then_restore_into_an_empty_directory(tmp_path: Path, ckpt: Callable[..., Path],
                                                    store: ArtifactStore, database_url: str | None) -> None:
    expected = _populate(store, ckpt)
    report = backup_store(store, tmp_path / "backup")
    assert report.artifacts == 3 and report.names == 2 and report.specs == 1 and report.skipped == []
    assert json.loads((tmp_path / "backup" / MANIFEST_FILE).read_text())["artifacts"] == 3

    # Into a fresh SQLite store, whatever the source's backend (how a team moves between backends)...
    restored = ArtifactStore(tmp_path / "restored")
    assert restore_store(restored, tmp_path / "backup").artifacts == 3
    _check_restored(restored, expected)
    names = restored.names()
    assert names == store.names()

    # ...and a non-empty store refuses it.
    with pytest.raises(StoreError, match="not empty"):
        restore_store(restored, tmp_path / "backup")
    # A backup never overwrites one.
    with pytest.raises(StoreError, match="not empty"):
        backup_store(store, tmp_path / "backup")


@pytest.mark.index("postgresql")
def test_a_sqlite_backup_restores_into_postgresql(tmp_path: Path, ckpt: Callable[..., Path],
                                                  database_url: str | None) -> None:
    source = ArtifactStore(tmp_path / "sqlite")
    expected = _populate(source, ckpt)
    backup_store(source, tmp_path / "backup")
    target = ArtifactStore(tmp_path / "pg", database_url=database_url)
    restore_store(target, tmp_path / "backup")
    _check_restored(target, expected)
    assert target.names() == source.names()


def test_an_incomplete_or_damaged_backup_is_refused(tmp_path: Path, ckpt: Callable[..., Path],
                                                   store: ArtifactStore) -> None:
    _populate(store, ckpt)
    backup_store(store, tmp_path / "backup")
    (tmp_path / "backup" / MANIFEST_FILE).rename(tmp_path / "kept")
    with pytest.raises(StoreError, match="no complete backup"):
        restore_store(ArtifactStore(tmp_path / "r1"), tmp_path / "backup")
    (tmp_path / "kept").rename(tmp_path / "backup" / MANIFEST_FILE)
    blob = next((tmp_path / "backup" / "blobs").glob("*/*"))
    os.chmod(blob, 0o644)
    blob.write_bytes(b"damaged")
    empty = ArtifactStore(tmp_path / "r2")
    with pytest.raises(StoreError, match="hash"):
        restore_store(empty, tmp_path / "backup")
    assert empty.list().total == 0  # nothing published from a damaged backup


def test_ckpt_backup_and_restore_commands(tmp_path: Path, ckpt: Callable[..., Path], store: ArtifactStore,
                                          database_url: str | None, storage_url: str | None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    expected = _populate(store, ckpt)
    url = ["--database-url", database_url] if database_url else []
    assert main(["backup", str(tmp_path / "b"), "--data-dir", str(store.root), *url]) == 0
    assert "backed up 3 artifacts, 2 names, 1 architecture specs" in capsys.readouterr().out
    # into SQLite in the new data directory (CKPT_DATABASE_URL names this test's PostgreSQL database)
    into = ["--data-dir", str(tmp_path / "new"), "--database-url", f"sqlite:///{tmp_path / 'new' / 'index.sqlite3'}"]
    assert main(["restore", str(tmp_path / "b"), *into, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["artifacts"] == 3
    # (the blobs go to CKPT_STORAGE_URL's store: the same bucket with S3, the new directory otherwise)
    _check_restored(ArtifactStore(tmp_path / "new", blobs=open_blob_store(storage_url, tmp_path / "new")), expected)
    assert main(["restore", str(tmp_path / "b"), *into]) == 1
    assert "not empty" in capsys.readouterr().err
