"""The conversion cache: keyed by (artifact, format), crash-safe, bounded, collected by the store's GC."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from service.store import ArtifactStore
from tests.factories import make_original


def _store_with_artifact(tmp_path: Path, **kwargs: float) -> tuple[ArtifactStore, str]:
    store = ArtifactStore(tmp_path / "store", database_url=os.environ.get("CKPT_DATABASE_URL"),
                          **kwargs)  # type: ignore[arg-type]
    path = tmp_path / "m.pth"
    torch.save(make_original().state_dict(), path)
    return store, store.ingest_file(path).artifact.id


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_convert_caches_bytes_outside_the_artifacts(tmp_path: Path) -> None:
    store, artifact = _store_with_artifact(tmp_path)
    blob = store.convert(artifact, "safetensors")
    data = blob.path.read_bytes()
    assert blob.sha256 == hashlib.sha256(data).hexdigest() and blob.size == len(data)
    assert blob.path.is_relative_to(tmp_path / "store" / "cache" / "conversions")
    assert set(load_file(blob.path)) == set(store.load(artifact).state_dict)
    assert store.list().total == 1 and not store.exists(blob.sha256)
    assert store.convert(artifact, "safetensors") == blob
    assert store.conversions.conversions == 1
    assert list((tmp_path / "store" / "tmp").iterdir()) == []  # no temp left behind


def test_gc_evicts_least_recently_used_past_the_bound(tmp_path: Path) -> None:
    store, artifact = _store_with_artifact(tmp_path)
    other_path = tmp_path / "o.pth"
    torch.save({"w": torch.ones(64)}, other_path)
    other = store.ingest_file(other_path).artifact.id
    old = store.convert(artifact, "safetensors")
    new = store.convert(other, "safetensors")
    store.conversions.max_bytes = new.size  # room for one
    _age(old.path.with_name(old.path.name + ".json"), 3600)
    _age(new.path.with_name(new.path.name + ".json"), 600)
    assert store.collect_garbage() == 1
    assert store.conversions.get(artifact, "safetensors") is None
    assert store.conversions.get(other, "safetensors") == new
    assert store.conversions.total_bytes == new.size


def test_gc_drops_conversions_of_deleted_and_unused_artifacts(tmp_path: Path) -> None:
    store, artifact = _store_with_artifact(tmp_path, conversion_cache_max_age_seconds=100)
    blob = store.convert(artifact, "safetensors")
    _age(blob.path.with_name(blob.path.name + ".json"), 200)
    assert store.collect_garbage() == 1
    assert not blob.path.exists()
    again = store.convert(artifact, "safetensors")
    assert again.sha256 == blob.sha256 and store.conversions.conversions == 2
    store.delete(artifact)
    assert not again.path.exists()


def test_a_crash_between_blob_and_record_leaves_nothing_served(tmp_path: Path) -> None:
    store, artifact = _store_with_artifact(tmp_path)
    blob = store.convert(artifact, "safetensors")
    record = blob.path.with_name(blob.path.name + ".json")
    record.unlink()  # as if the process died before publishing the record
    assert store.conversions.get(artifact, "safetensors") is None
    _age(blob.path, 3600)
    store.collect_garbage()
    assert not blob.path.exists()
    assert store.convert(artifact, "safetensors").sha256 == blob.sha256
