"""The `BlobStore` contract (after Docker Distribution's `StorageDriver`): bytes by digest, nothing else.

A blob store knows nothing of artifacts, names or metadata (that is the `MetadataIndex`); publication of an
artifact happens in the index, after `put_*` returned. Implementations must be safe to share between threads,
and between processes or machines where the backend allows it (a shared directory, a bucket).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable


@dataclass(frozen=True)
class BlobInfo:
    """One blob, as enumeration sees it (for GC and fsck)."""

    digest: str
    size: int
    # seconds since the epoch when the blob was written (the grace period of orphan GC is measured from it)
    modified: float


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed bytes. Every method takes a validated 64-hex digest."""

    def put_file(self, digest: str, path: Path) -> None:
        """Store a staged local file whose sha256 the caller computed while receiving it.

        The file is only read (the store may hard-link, copy or upload it); the caller removes it afterwards.
        Putting a digest that exists is a no-op. Durable when this returns.
        """
        ...

    def put_stream(self, digest: str, stream: BinaryIO) -> None:
        """Store bytes read from `stream` to its end; `digest` is their sha256, checked while reading.

        Raises:
            service.errors.StoreError: The bytes do not hash to `digest` (nothing is stored).
        """
        ...

    def open(self, digest: str, *, start: int = 0, end: int | None = None) -> BinaryIO:
        """Open bytes `[start, end)` of a blob for reading (to its end when `end` is None). Caller closes it.

        Raises:
            service.errors.ArtifactNotFound: No such blob (`ref` is the digest).
        """
        ...

    def local_path(self, digest: str) -> AbstractContextManager[Path]:
        """Pin a local, read-only copy of the blob (the file itself, or a cache entry) while the context is held.

        For mmap loading: the path stays valid and unchanged until the context exits, even if the blob is
        deleted or the cache is under pressure meanwhile.

        Raises:
            service.errors.ArtifactNotFound: No such blob (`ref` is the digest).
        """
        ...

    def exists(self, digest: str) -> bool:
        """Whether the blob is stored (complete)."""
        ...

    def size(self, digest: str) -> int:
        """The blob's size in bytes.

        Raises:
            service.errors.ArtifactNotFound: No such blob (`ref` is the digest).
        """
        ...

    def delete(self, digest: str) -> None:
        """Remove a blob; removing a missing one is a no-op. Pinned local copies stay readable until released."""
        ...

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every stored blob, in no particular order (GC's orphan listing, fsck)."""
        ...

    def ping(self) -> str:
        """One cheap round trip to the backend (readiness); what answered, for the probe's detail.

        Raises:
            Whatever the backend raises when it does not answer (a missing directory or bucket, refused keys).
        """
        ...
