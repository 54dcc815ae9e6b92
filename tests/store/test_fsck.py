"""fsck: rows without blobs, blobs without rows, wrong sizes and bytes; `repair` fixes what is safe."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from service.store import ArtifactStore


def test_fsck_reports_then_repairs(tmp_path: Path, ckpt: Callable[..., Path], database_url: str | None) -> None:
    store = ArtifactStore(tmp_path / "store", database_url=database_url, tmp_grace_seconds=0)
    gone, damaged, fine = (store.ingest_file(ckpt(i)).artifact.id for i in range(3))
    store.set_name("points-at-gone", gone)
    assert store.fsck(deep=True).ok
    # A lost blob, a blob whose bytes changed on disk (same size), and a blob that no row knows.
    os.unlink(store.blob_path(gone))
    blob = store.blob_path(damaged)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    orphan = ckpt(5)
    orphan_id = ArtifactStore(tmp_path / "other").ingest_file(orphan).artifact.id
    store.blobs.put_file(orphan_id, orphan)

    shallow = store.fsck()
    assert not shallow.ok
    assert shallow.checked == 3 and shallow.missing_blobs == [gone] and shallow.digest_mismatches == []
    assert shallow.orphan_blobs == [orphan_id] and shallow.repaired == []
    deep = store.fsck(deep=True)
    assert deep.digest_mismatches == [damaged] and deep.missing_blobs == [gone]

    repaired = store.fsck(deep=True, repair=True)
    assert sorted(repaired.repaired) == sorted([f"unpublished {gone}", f"unpublished {damaged}",
                                                f"removed orphan {orphan_id}"])
    assert repaired.names_removed == ["points-at-gone"]
    after = store.fsck(deep=True)
    assert after.ok and after.checked == 1 and after.orphan_blobs == []
    assert [m.id for m in store.list().items] == [fine] and store.names() == {}
    assert store.ingest_file(ckpt(0)).created  # the lost artifact can be uploaded again
