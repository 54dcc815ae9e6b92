"""LocalBlobStore against the BlobStore contract: bytes by digest, ranges, pinned local paths, enumeration."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import pytest

from service.errors import ArtifactNotFound, DigestMismatch
from service.store.blobs import BlobStore
from service.store.blobs.local import LocalBlobStore

pytestmark = pytest.mark.index("sqlite")  # no index involved


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs", tmp_dir=tmp_path / "tmp")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_open_ranges_and_enumeration(blobs: LocalBlobStore, tmp_path: Path) -> None:
    assert isinstance(blobs, BlobStore)
    data = os.urandom(3 << 20)
    digest = _digest(data)
    blobs.put_stream(digest, io.BytesIO(data))
    blobs.put_stream(digest, io.BytesIO(data))  # the same digest twice is harmless
    staged = tmp_path / "staged"
    staged.write_bytes(b"small")
    blobs.put_file(_digest(b"small"), staged)
    assert staged.read_bytes() == b"small"  # only read: the caller still has it
    assert blobs.exists(digest) and blobs.size(digest) == len(data)
    assert stat.S_IMODE(blobs.path(digest).stat().st_mode) == 0o444
    with blobs.open(digest) as f:
        assert f.read() == data
    with blobs.open(digest, start=1000, end=1000 + (2 << 20)) as f:
        assert f.read() == data[1000:1000 + (2 << 20)]
    with blobs.open(digest, start=len(data) - 3) as f:
        assert f.read() == data[-3:]
    assert {b.digest: b.size for b in blobs.iter_blobs()} == {digest: len(data), _digest(b"small"): 5}
    assert os.listdir(tmp_path / "tmp") == []


def test_a_wrong_digest_stores_nothing(blobs: LocalBlobStore, tmp_path: Path) -> None:
    wrong = _digest(b"other")
    with pytest.raises(DigestMismatch):
        blobs.put_stream(wrong, io.BytesIO(b"data"))
    assert not blobs.exists(wrong) and list(blobs.iter_blobs()) == []
    assert os.listdir(tmp_path / "tmp") == []


def test_a_pinned_path_outlives_a_delete(blobs: LocalBlobStore) -> None:
    data = b"pinned bytes" * 1000
    digest = _digest(data)
    blobs.put_stream(digest, io.BytesIO(data))
    with blobs.local_path(digest) as path:
        blobs.delete(digest)
        assert not blobs.exists(digest)
        assert path.read_bytes() == data  # still the same bytes while pinned
    blobs.delete(digest)  # deleting a missing blob is a no-op
    for call in (blobs.open, blobs.size):
        with pytest.raises(ArtifactNotFound):
            call(digest)
    with pytest.raises(ArtifactNotFound), blobs.local_path(digest):
        pass
