"""A full disk gives StorageFull, removes the temp, and leaves earlier artifacts intact."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import service.store._fs as fs
import service.store.blobs.local as local_blobs
import service.store.upload as upload_module
from service.errors import StorageFull
from service.store import ArtifactStore
from tests.store.conftest import tmp_entries


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs (needs root; skipped elsewhere, the injection tests below still run)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount")
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _assert_intact(store: ArtifactStore, artifact_id: str) -> None:
    assert store.verify(artifact_id).ok
    assert store.load(artifact_id).state_dict
    assert tmp_entries(store) == []
    assert [p.name for p in (store.root / "blobs").glob("*/*")] == [artifact_id]


def test_real_full_disk(tiny_fs: Path, ckpt: Callable[..., Path], database_url: str | None) -> None:
    store = ArtifactStore(tiny_fs / "store", database_url=database_url)
    kept = store.ingest_file(ckpt(0)).artifact.id
    with pytest.raises(StorageFull):
        store.ingest(iter([b"\0" * (64 << 10)] * 16))  # 1 MiB into a 512 KiB filesystem
    _assert_intact(store, kept)
    # the space came back: the store works again
    assert store.ingest_file(ckpt(1)).created


def _fail_after(limit: int, real: Callable[[int, bytes], None]) -> Callable[[int, bytes], None]:
    written = [0]

    def write_all(fd: int, data: bytes) -> None:
        if written[0] + len(data) > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += len(data)
        real(fd, data)

    return write_all


@pytest.mark.blobs("local")  # a full local disk under the blobs
def test_enospc_while_streaming(store: ArtifactStore, ckpt: Callable[..., Path],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    kept = store.ingest_file(ckpt(0)).artifact.id
    monkeypatch.setattr(upload_module, "write_all", _fail_after(3000, fs.write_all))
    with pytest.raises(StorageFull):
        store.ingest(iter([b"x" * 1000] * 10))
    _assert_intact(store, kept)


@pytest.mark.blobs("local")  # a full local disk under the blobs
def test_enospc_while_putting_the_blob(store: ArtifactStore, ckpt: Callable[..., Path],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    kept = store.ingest_file(ckpt(0)).artifact.id
    path = ckpt(1)
    # The copy into the blob directory fails as a full disk fails it (a staged file on another filesystem).
    monkeypatch.setattr(local_blobs, "write_all", _fail_after(0, fs.write_all))
    monkeypatch.setattr(local_blobs.os, "link", _cross_device)
    with pytest.raises(StorageFull):
        store.ingest_file(path)
    monkeypatch.undo()
    _assert_intact(store, kept)
    assert store.ingest_file(path).created


def _cross_device(src: object, dst: object, **_: object) -> None:
    raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))


@pytest.mark.index("sqlite")  # SQLite's own limit on the database's pages
def test_a_full_index_stores_nothing(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    kept = store.ingest_file(ckpt(0)).artifact.id
    path = ckpt(1)
    # SQLite's own "database or disk is full": the database may not grow by a page.
    engine = store.index.engine

    def cap(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        pages = cursor.execute("PRAGMA page_count").fetchone()[0]
        cursor.execute(f"PRAGMA max_page_count = {pages}")
        cursor.close()

    sa.event.listen(engine, "connect", cap)
    engine.dispose()
    labels = {f"k{i}": "v" * 256 for i in range(64)}  # 16 KiB: more than the free room of the last pages
    with pytest.raises(StorageFull):
        store.ingest_file(path, labels=labels)
    sa.event.remove(engine, "connect", cap)
    engine.dispose()
    _assert_intact(store, kept)
    assert store.ingest_file(path).created
