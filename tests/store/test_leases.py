"""Orphan GC with leases: a blob being written is never collected, whatever the blob store (local or S3)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.errors import StoreError
from service.store import ArtifactStore
from service.store.index.schema import blob_leases
from tests.store.conftest import blob_digests, put_raw_blob


def _lease_rows(store: ArtifactStore) -> int:
    with store.index._read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(blob_leases)).scalar() or 0)


def test_a_leased_orphan_survives_gc_until_the_lease_ends(store: ArtifactStore) -> None:
    data = b"bytes of an upload in flight"
    digest = hashlib.sha256(data).hexdigest()
    put_raw_blob(store, digest, data)
    token = store.index.add_blob_lease(digest, seconds=600)
    assert store.index.blob_leased([digest, "0" * 64]) == {digest}
    store.collect_garbage(grace_seconds=0)
    assert digest in blob_digests(store)  # no row, older than the grace period: kept for its lease
    assert digest not in store.fsck(repair=True).orphan_blobs  # in flight, not an orphan: fsck leaves it too
    assert digest in blob_digests(store)
    store.index.drop_blob_lease(digest, token)
    store.collect_garbage(grace_seconds=0)
    assert digest not in blob_digests(store)


def test_an_expired_lease_protects_nothing_and_is_removed(store: ArtifactStore) -> None:
    data = b"a writer that died"
    digest = hashlib.sha256(data).hexdigest()
    put_raw_blob(store, digest, data)
    store.index.add_blob_lease(digest, seconds=-1)
    assert store.index.blob_leased([digest]) == set()
    store.collect_garbage(grace_seconds=0)
    assert digest not in blob_digests(store)
    assert _lease_rows(store) == 0


def test_a_young_orphan_is_kept_for_the_grace_period(store: ArtifactStore) -> None:
    # The blob's own modification time (S3: LastModified) is the clock, so a put whose row is not written yet
    # survives even without a lease.
    data = b"just written"
    digest = hashlib.sha256(data).hexdigest()
    put_raw_blob(store, digest, data)
    store.collect_garbage()  # the default grace: an hour
    assert digest in blob_digests(store)


def test_a_publication_holds_a_lease_while_it_puts_the_blob(
    store: ArtifactStore, ckpt: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = ckpt(0)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    seen: list[set[str]] = []
    put_file = store.blobs.put_file

    def observed_put(d: str, p: Path) -> None:
        seen.append(store.index.blob_leased([d]))  # before the bytes go
        put_file(d, p)
        seen.append(store.index.blob_leased([d]))  # after: until the row is written

    monkeypatch.setattr(store.blobs, "put_file", observed_put)
    assert store.ingest_file(path).created
    assert seen == [{digest}, {digest}]
    assert _lease_rows(store) == 0  # ended at publication
    # a failed publication ends its lease too
    monkeypatch.setattr(store.blobs, "put_file", lambda d, p: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises((OSError, StoreError)):
        store.ingest_file(ckpt(1))
    assert _lease_rows(store) == 0


@pytest.mark.blobs("s3")
def test_gc_aborts_stale_multipart_uploads(store: ArtifactStore) -> None:
    from service.store.blobs.s3 import S3BlobStore

    blobs = store.blobs
    assert isinstance(blobs, S3BlobStore)
    client = blobs._client()
    key = blobs.key("ab" * 32)
    client.create_multipart_upload(Bucket=blobs.bucket, Key=key)
    store.collect_garbage()  # younger than the grace period: a put in progress
    assert len(client.list_multipart_uploads(Bucket=blobs.bucket).get("Uploads", [])) == 1
    assert store.collect_garbage(grace_seconds=0) >= 1
    assert client.list_multipart_uploads(Bucket=blobs.bucket).get("Uploads", []) == []
