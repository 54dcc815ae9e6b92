from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from service.store import ArtifactStore
from service.store.blobs import open_blob_store
from tests.factories import make_original, save_pth, state_dict_of


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root -> (inode, mtime_ns), to prove that nothing was rewritten."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_ino, st.st_mtime_ns)
    return out


def tmp_entries(store: ArtifactStore) -> list[str]:
    return sorted(os.listdir(store.root / "tmp"))


@pytest.fixture(autouse=True)
def _per_index_backend(index_backend: str | None) -> None:
    """Every store test runs against each metadata index backend (see tests/conftest.py)."""


@pytest.fixture
def store(tmp_path: Path, database_url: str | None, storage_url: str | None) -> ArtifactStore:
    root = tmp_path / "store"
    return ArtifactStore(root, database_url=database_url, blobs=open_blob_store(storage_url, root))


@pytest.fixture
def ckpt(tmp_path: Path) -> Callable[..., Path]:
    """Write a tiny real checkpoint of TinyConvNet(seed) and return its path."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)

    def make(seed: int = 0, *, legacy: bool = False, container: bool = False) -> Path:
        sd = state_dict_of(make_original(seed))
        obj: object = {"state_dict": sd, "epoch": 3} if container else sd
        name = f"ckpt-{seed}-{int(legacy)}-{int(container)}.pth"
        return save_pth(obj, src / name, legacy=legacy)

    return make


def blob_digests(store: ArtifactStore) -> set[str]:
    """The digests the store's blob store holds (local files or S3 objects)."""
    return {info.digest for info in store.blobs.iter_blobs()}


def put_raw_blob(store: ArtifactStore, digest: str, data: bytes) -> None:
    """Write bytes under a digest behind the store's back (a crash leftover, damage): no hash check."""
    from service.store.blobs.local import LocalBlobStore
    from service.store.blobs.s3 import S3BlobStore

    if isinstance(store.blobs, LocalBlobStore):
        path = store.blobs.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            os.chmod(path, 0o644)
        path.write_bytes(data)
    else:
        assert isinstance(store.blobs, S3BlobStore)
        store.blobs._client().put_object(Bucket=store.blobs.bucket, Key=store.blobs.key(digest), Body=data)
        store.blobs.cache.discard(digest)


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}
