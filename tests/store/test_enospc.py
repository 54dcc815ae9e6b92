"""A full disk gives StorageFull, removes the temp, and leaves earlier artifacts intact."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import service.store._fs as fs
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


def test_real_full_disk(tiny_fs: Path, ckpt: Callable[..., Path]) -> None:
    store = ArtifactStore(tiny_fs / "store")
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


def test_enospc_while_streaming(store: ArtifactStore, ckpt: Callable[..., Path],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    kept = store.ingest_file(ckpt(0)).artifact.id
    monkeypatch.setattr(upload_module, "write_all", _fail_after(3000, fs.write_all))
    with pytest.raises(StorageFull):
        store.ingest(iter([b"x" * 1000] * 10))
    _assert_intact(store, kept)


@pytest.mark.parametrize("budget", [0, 10])  # the manifest write fails / the metadata write fails
def test_enospc_while_publishing(store: ArtifactStore, ckpt: Callable[..., Path],
                                 monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    kept = store.ingest_file(ckpt(0)).artifact.id
    path = ckpt(1)
    manifest_size = len((store.root / "manifests" / kept[:2] / f"{kept}.json").read_bytes())
    monkeypatch.setattr(fs, "write_all", _fail_after(budget and manifest_size + budget, fs.write_all))
    with pytest.raises(StorageFull):
        store.ingest_file(path)
    monkeypatch.undo()
    _assert_intact(store, kept)
    assert list((store.root / "manifests").glob("*/*.json")) == [
        store.root / "manifests" / kept[:2] / f"{kept}.json"
    ]
    assert store.ingest_file(path).created
