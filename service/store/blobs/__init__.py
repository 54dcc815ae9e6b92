"""Blob stores: content-addressed bytes, one module per backend (local directory, S3).

The contract is `BlobStore` in `base.py`. A blob's key is the sha256 (64 lowercase hex) of its bytes; bytes never
change once put, so putting the same digest twice is harmless and caches of a blob never go stale.
"""

from __future__ import annotations

from pathlib import Path

from service.errors import InvalidSettings
from service.store.blobs.base import BlobInfo, BlobStore

__all__ = ["BlobInfo", "BlobStore", "open_blob_store"]


def open_blob_store(
    storage_url: str | None,
    data_dir: Path,
    *,
    cache_dir: Path | None = None,
    cache_bytes: int = 16 << 30,
    public_endpoint: str | None = None,
) -> BlobStore | None:
    """The blob store that `CKPT_STORAGE_URL` names; None for the default (files in `<data_dir>/blobs`).

    Args:
        storage_url: None or "" for the local default; `s3://bucket/prefix` for `S3BlobStore` (endpoint and keys
            from the standard AWS settings).
        data_dir: The data directory (the S3 cache defaults to `<data_dir>/cache/blobs`).
        cache_dir: The S3 read-through cache's directory.
        cache_bytes: Its size bound.
        public_endpoint: The S3 endpoint in presigned URLs.

    Raises:
        InvalidSettings: The URL is neither unset nor `s3://bucket[/prefix]` (setting `CKPT_STORAGE_URL`).
    """
    if not storage_url:
        return None
    if not storage_url.startswith("s3://"):
        raise InvalidSettings(
            f"CKPT_STORAGE_URL must be s3://BUCKET/PREFIX or unset (the data directory), not {storage_url[:200]!r}",
            setting="CKPT_STORAGE_URL",
        )
    from service.store.blobs.s3 import S3BlobStore  # boto3 is imported only when S3 is used

    return S3BlobStore.from_url(
        storage_url,
        cache_dir=cache_dir if cache_dir is not None else Path(data_dir) / "cache" / "blobs",
        cache_bytes=cache_bytes,
        public_endpoint=public_endpoint,
    )
