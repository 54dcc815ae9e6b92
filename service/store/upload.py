"""A streaming upload into the store's tmp/ directory: hashed and size-checked as it is written."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from service.core.hashing import PARALLEL_MIN_BYTES, hashing_pool
from service.core.writeback import Writeback
from service.errors import PayloadTooLarge, StoreError
from service.store._fs import create_locked_temp, is_no_space, same_file, storage_full, write_all

Chunk = bytes | bytearray | memoryview



# Below this, publication's fsync is quick anyway.
FINISH_FLUSH_BYTES = 16 << 20


def _update_all(digest: hashlib._Hash, chunks: Sequence[Chunk]) -> None:
    for chunk in chunks:
        digest.update(chunk)


class PendingUpload:
    """Bytes on their way into the store. Obtain one from `ArtifactStore.open_upload`.

    The temp file lives inside the store root (same filesystem, so publication is a link) and is flock'ed
    for its whole life, so garbage collection never removes it. Used as a context manager it is aborted
    unless committed.
    """

    def __init__(self, tmp_dir: Path, *, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise StoreError("max_bytes must not be negative")
        self.max_bytes = max_bytes
        self._fd, self.path = create_locked_temp(tmp_dir, "upload-")
        self._hash = hashlib.sha256()
        self._size = 0
        self._finished = False
        self._closed = False
        self._pid = os.getpid()
        self._writeback = Writeback(self._fd)

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    @property
    def sha256(self) -> str:
        """Hex sha256 of the bytes written so far (the artifact id once finished)."""
        return self._hash.hexdigest()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def fd(self) -> int:
        return self._fd

    def write(self, chunk: Chunk) -> None:
        """Append a chunk, hashing it on the way.

        Args:
            chunk: The next bytes of the upload.

        Raises:
            PayloadTooLarge: The running size would pass `max_bytes`; the upload is aborted and nothing of
                this chunk is written.
            StorageFull: The disk is full; the upload is aborted.
            StoreError: The upload is already finished or closed.
        """
        self.write_chunks((chunk,))

    def write_chunks(self, chunks: Sequence[Chunk]) -> None:
        """Append several chunks in order, hashing them in a helper thread while they are written.

        The chunks are only read until this returns, so the caller may reuse their memory afterwards.

        Args:
            chunks: The next bytes of the upload, in pieces (memoryviews are not copied).

        Raises:
            PayloadTooLarge: The running size would pass `max_bytes`; the upload is aborted and nothing of
                these chunks is written.
            StorageFull: The disk is full; the upload is aborted.
            StoreError: The upload is already finished or closed.
        """
        if self._closed or self._finished:
            raise StoreError("the upload is already finished")
        n = sum(memoryview(c).nbytes for c in chunks)
        if self.max_bytes is not None and self._size + n > self.max_bytes:
            self.abort()
            raise PayloadTooLarge(f"upload exceeds the limit of {self.max_bytes} bytes", limit=self.max_bytes)
        hashing = hashing_pool().submit(_update_all, self._hash, chunks) if n >= PARALLEL_MIN_BYTES else None
        try:
            for chunk in chunks:
                write_all(self._fd, chunk)
        except OSError as exc:
            if hashing is not None:
                hashing.result()  # never abort (close the fd) under a running hash of our chunks
            self.abort()
            if is_no_space(exc):
                raise storage_full(exc) from exc
            raise
        except BaseException:
            if hashing is not None:
                hashing.result()
            raise
        if hashing is not None:
            hashing.result()
        else:
            _update_all(self._hash, chunks)
        self._size += n
        self._writeback.wrote(n)

    def finish(self) -> str:
        """Accept no more writes, start putting the bytes on disk, and return their sha256.

        The bytes are flushed to disk in the background as they arrive (`service.core.writeback`), and once
        more here while the caller inspects the upload; publication fsyncs the file (`ArtifactStore` does),
        which then waits only for what is left and reports any write error.

        Returns:
            The hex sha256 of everything written.

        Raises:
            StoreError: The upload was aborted.
        """
        if self._closed:
            raise StoreError("the upload was aborted")
        if not self._finished:
            self._finished = True
            if self._size >= FINISH_FLUSH_BYTES:
                self._writeback.flush(force=True)
        return self.sha256

    def abort(self) -> None:
        """Remove the temp file and release it. Safe to call more than once, and after a commit."""
        if self._closed:
            return
        self._closed = True
        try:
            if same_file(self.path, self._fd):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)

    def __enter__(self) -> PendingUpload:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()

    def __del__(self) -> None:
        # Last resort for a caller that forgot both commit and abort; the collector would get it later anyway.
        # A forked child holds a copy of this object but must not remove its parent's upload.
        if not getattr(self, "_closed", True) and self._pid == os.getpid():
            self.abort()
