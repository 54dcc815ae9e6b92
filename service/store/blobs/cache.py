"""A bounded local read-through cache of blobs, for stores whose bytes live elsewhere (S3): `local_path()` for mmap.

Layout under the cache root (one replica's worker processes share it; every guard works across processes):

    entries/<digest>   complete, verified copies (read-only); the atime is the last use (LRU)
    tmp/               downloads in progress: flock'ed temps (a crash leftover is unlocked, so it is swept)
    locks/<xx>.lock    one downloader per digest shard; the others wait and then find the entry
    evict.lock         held while space is reserved: sizes summed, LRU entries evicted, a temp preallocated

A pinned entry is held open with a shared flock. Eviction takes a non-blocking exclusive flock and skips an entry
it cannot lock, so a file mapped by a merge is never removed. The bound is `max_bytes` counting live downloads at
their full size (preallocated); it is exceeded only while pinned entries alone exceed it, because a pin must be
served whatever the bound. Downloads go to a temp → sha256 checked → fsync → rename, so an entry is never partial.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from service.errors import StoreError
from service.store._fs import (
    CHUNK,
    create_locked_temp,
    file_lock,
    fsync_dir,
    is_no_space,
    remove_if_unlocked,
    same_file,
    storage_full,
    unlink_quietly,
    write_all,
)
from service.store.ids import is_id, validate_id

__all__ = ["BlobCache", "Fetch"]

# Opens the blob at its source: (size in bytes, a stream of its bytes that the cache reads to the end and closes).
Fetch = Callable[[], tuple[int, BinaryIO]]


class BlobCache:
    """Verified local copies of blobs by digest, least recently used evicted past `max_bytes`, pins respected."""

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        """Open (and create) the cache directory and sweep the temps that crashed downloads left.

        Args:
            root: The cache directory, on a local filesystem (flock must work across the replica's processes).
            max_bytes: Size bound of entries plus downloads in progress.
        """
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._entries = self.root / "entries"
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        for d in (self._entries, self._tmp, self._locks):
            d.mkdir(parents=True, exist_ok=True)
        self.sweep_temps()

    def entry_path(self, digest: str) -> Path:
        """Where the entry of `digest` lives (whether or not it is cached)."""
        return self._entries / validate_id(digest)

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and is_id(digest) and (self._entries / digest).exists()

    @contextmanager
    def pin(self, digest: str, fetch: Fetch) -> Iterator[Path]:
        """Pin the entry of `digest` while the context is held, downloading it through `fetch` when missing.

        Args:
            digest: The blob's sha256; the download is checked against it.
            fetch: Called (at most once per missing entry, across processes) to read the blob from its source.

        Yields:
            The entry's path: read-only, unchanged and never evicted until the context exits.

        Raises:
            StoreError: The downloaded bytes do not hash to `digest`, or are not as long as announced.
            StorageFull: No space left in the cache's filesystem.
        """
        validate_id(digest)
        while True:
            fd = self._open_pinned(digest)
            if fd is None:
                fd = self._fill(digest, fetch)
            if fd is not None:
                break
        try:
            yield self._entries / digest
        finally:
            os.close(fd)  # releases the shared flock

    def discard(self, digest: str) -> bool:
        """Remove the entry of `digest` unless it is pinned. True if it was removed."""
        return self._evict(self.entry_path(digest))

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every entry."""
        out: list[tuple[float, int, Path]] = []
        for entry in list(os.scandir(self._entries)):
            if not is_id(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            out.append((st.st_atime, st.st_size, Path(entry.path)))
        return out

    @property
    def total_bytes(self) -> int:
        """Bytes held by entries (downloads in progress not counted)."""
        return sum(size for _, size, _ in self.entries())

    def sweep_temps(self) -> int:
        """Remove downloads that no live process holds (crash leftovers). Returns how many were removed."""
        return sum(remove_if_unlocked(Path(e.path)) for e in list(os.scandir(self._tmp)))

    def _open_pinned(self, digest: str) -> int | None:
        path = self._entries / digest
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            # Blocks only while an evictor holds its exclusive lock, that is between its check and its unlink.
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not same_file(path, fd):
                os.close(fd)
                return None
            os.utime(path)  # the last use, for LRU (atime is not reliably updated by reads: relatime, noatime)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _fill(self, digest: str, fetch: Fetch) -> int | None:
        # One downloader per shard of digests, across processes: the others wait, then find the entry.
        with file_lock(self._locks / f"{digest[:2]}.lock"):
            fd = self._open_pinned(digest)
            if fd is not None:
                return fd
            size, stream = fetch()
            try:
                fd, tmp = self._reserve(size)
            except BaseException:
                stream.close()
                raise
            try:
                self._download(fd, stream, digest, size)
                os.fchmod(fd, 0o444)
                os.fsync(fd)
                dest = self._entries / digest
                os.rename(tmp, dest)  # still under our exclusive flock: no evictor can take it yet
                fsync_dir(self._entries)
                os.utime(dest)
                # Downgrade to the pin's shared lock. flock's conversion is not atomic: if an evictor slipped in
                # between, the path no longer names our file and the caller starts again.
                fcntl.flock(fd, fcntl.LOCK_SH)
                if same_file(dest, fd):
                    return fd
                os.close(fd)
                return None
            except OSError as exc:
                os.close(fd)
                unlink_quietly(tmp)
                if is_no_space(exc):
                    raise storage_full(exc) from exc
                raise
            except BaseException:
                os.close(fd)
                unlink_quietly(tmp)
                raise

    def _reserve(self, size: int) -> tuple[int, Path]:
        # Under one lock: sum entries and live downloads (at their preallocated size), evict LRU entries that
        # nobody pins until `size` fits, and preallocate our temp so that the next reservation counts it.
        with file_lock(self.root / "evict.lock"):
            self.sweep_temps()
            total = self.total_bytes + sum(self._temp_sizes())
            for _, entry_size, path in sorted(self.entries()):  # least recently used first
                if total + size <= self.max_bytes:
                    break
                if self._evict(path):
                    total -= entry_size
            fd, tmp = create_locked_temp(self._tmp, "blob-")
            try:
                _preallocate(fd, size)
            except BaseException:
                os.close(fd)
                unlink_quietly(tmp)
                raise
            return fd, tmp

    def _temp_sizes(self) -> Iterator[int]:
        for entry in list(os.scandir(self._tmp)):
            try:
                yield entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue

    def _evict(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # pinned
            if not same_file(path, fd):
                return False
            unlink_quietly(path)
            return True
        finally:
            os.close(fd)

    @staticmethod
    def _download(fd: int, stream: BinaryIO, digest: str, size: int) -> None:
        hasher = hashlib.sha256()
        received = 0
        try:
            while chunk := stream.read(CHUNK):
                received += len(chunk)
                if received > size:
                    break
                hasher.update(chunk)
                write_all(fd, chunk)
        finally:
            stream.close()
        actual = hasher.hexdigest()
        if received != size or actual != digest:
            raise StoreError(
                f"the copy of blob {digest} read from the store is corrupt ({received} bytes hashing to {actual}, "
                f"expected {size} bytes)",
                expected=digest,
                actual=actual,
            )


def _preallocate(fd: int, size: int) -> None:
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if is_no_space(exc):
            raise storage_full(exc) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # a filesystem without fallocate: reserved in the accounting only
