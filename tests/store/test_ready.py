"""The store's readiness probe (`GET /readyz`'s `store` check): the staging area, the index and the blob store.

Behind a load balancer a replica whose database or bucket does not answer must leave the rotation: each part is
broken for real here (a dropped PostgreSQL database, a deleted Ceph bucket, refused keys) and the probe must say
which part failed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.store import ArtifactStore
from service.store.blobs.s3 import S3BlobStore
from tests._services import S3Service
from tests.conftest import drop_database


def test_a_working_store_is_ready_and_names_what_answered(store: ArtifactStore, storage_url: str | None) -> None:
    health = store.ready()
    assert health.ok, health.detail
    blobs = f"the bucket {storage_url.removeprefix('s3://').split('/')[0]!r}" if storage_url else "the blob directory"
    assert health.detail == f"the store is writable; the index ({store.index.dialect}) and {blobs} answer"


@pytest.mark.blobs("local")
def test_a_missing_blob_directory_is_not_ready(store: ArtifactStore) -> None:
    shutil.rmtree(store.root / "blobs")
    health = store.ready()
    assert not health.ok and "the blob store (LocalBlobStore) does not answer" in health.detail


@pytest.mark.index("postgresql")
@pytest.mark.blobs("local")
def test_a_database_that_is_gone_is_not_ready(store: ArtifactStore, database_url: str) -> None:
    assert store.ready().ok
    drop_database(database_url)  # WITH (FORCE): the store's pooled connections are cut too
    health = store.ready()
    assert not health.ok and health.detail.startswith("the index (postgresql) does not answer")


@pytest.mark.index("postgresql")
@pytest.mark.blobs("local")  # its own stores on the session's Ceph, whatever the parameter
def test_a_bucket_that_is_gone_or_refused_is_not_ready(
    tmp_path: Path, database_url: str, ceph_s3: S3Service, s3_bucket: str
) -> None:
    def on_s3(bucket: str, secret: str = ceph_s3.secret_key) -> ArtifactStore:
        blobs = S3BlobStore(bucket, "ckpt", cache_dir=tmp_path / f"cache-{bucket}", cache_bytes=1 << 20,
                            endpoint_url=ceph_s3.endpoint, access_key_id=ceph_s3.access_key,
                            secret_access_key=secret, region=ceph_s3.region)
        return ArtifactStore(tmp_path / f"store-{bucket}-{secret[:4]}", database_url=database_url, blobs=blobs)

    health = on_s3(s3_bucket).ready()
    assert health.ok, health.detail
    assert health.detail == f"the store is writable; the index (postgresql) and the bucket {s3_bucket!r} answer"

    refused = on_s3(s3_bucket, secret="not-the-secret").ready()
    assert not refused.ok and refused.detail == "the blob store (S3BlobStore) does not answer: ClientError 403"
    assert "not-the-secret" not in refused.detail

    ceph_s3.client().delete_bucket(Bucket=s3_bucket)  # empty: nothing was stored
    try:
        gone = on_s3(s3_bucket).ready()
    finally:
        ceph_s3.client().create_bucket(Bucket=s3_bucket)  # for the fixture's own clean-up
    assert not gone.ok and gone.detail == "the blob store (S3BlobStore) does not answer: ClientError 404"
