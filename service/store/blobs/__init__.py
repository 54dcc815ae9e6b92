"""Blob stores: content-addressed bytes, one module per backend (local directory, S3).

The contract is `BlobStore` in `base.py`. A blob's key is the sha256 (64 lowercase hex) of its bytes; bytes never
change once put, so putting the same digest twice is harmless and caches of a blob never go stale.
"""

from service.store.blobs.base import BlobInfo, BlobStore

__all__ = ["BlobInfo", "BlobStore"]
