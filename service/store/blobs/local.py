"""`LocalBlobStore`: blobs as read-only files under `<dir>/<id[:2]>/<id>` on a local (or shared POSIX) filesystem.

The layout is the one the store has always had, so a data directory of an older version keeps its blobs where
they are. Every write goes to a flock'ed temp file in the staging directory (same filesystem) → fsync → link,
which never clobbers; a stored blob is read-only and never rewritten or truncated (another process may have it
mmapped), and deleting one only unlinks it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, cast

from service.errors import ArtifactNotFound, DigestMismatch, StoreError
from service.store._fs import (
    CHUNK,
    create_locked_temp,
    fsync_dir,
    is_no_space,
    storage_full,
    unlink_quietly,
    write_all,
)
from service.store.blobs.base import BlobInfo
from service.store.ids import validate_id

__all__ = ["LocalBlobStore"]

_SHARD = re.compile(r"^[0-9a-f]{2}$")
# A pinned blob is handed out as its open descriptor's /proc path: it keeps naming the same bytes even if the
# blob is deleted meanwhile (Linux). Elsewhere the blob's own path is handed out.
_PROC_FD = Path("/proc/self/fd")


@contextmanager
def _full_disk() -> Iterator[None]:
    # ENOSPC or EDQUOT at any step is the store's StorageFull (507 at the API).
    try:
        yield
    except OSError as exc:
        if is_no_space(exc):
            raise storage_full(exc) from exc
        raise


def _not_found(digest: str) -> ArtifactNotFound:
    return ArtifactNotFound(f"no artifact {digest}", ref=digest)


class _Range(io.RawIOBase):
    # Bytes [start, end) of an open file, read with pread: the descriptor's offset is never shared state.
    def __init__(self, fd: int, start: int, end: int) -> None:
        self._fd = fd
        self._pos = start
        self._end = end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._end - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class LocalBlobStore:
    """Content-addressed files in one directory tree (see the module docstring).

    Several processes may share the directory: every publication step is a link or a rename, and temp files
    are flock'ed by their writer so that garbage collection can tell a live one from a crash leftover.
    """

    def __init__(self, directory: Path, *, tmp_dir: Path) -> None:
        """Open (and create) the blob directory.

        Args:
            directory: Where the blobs live (`<data_dir>/blobs`).
            tmp_dir: The staging directory for temp files; on the same filesystem, so publication is a link.
        """
        self.directory = Path(directory)
        self._tmp = Path(tmp_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where a blob is (or would be) stored; only a validated id ever becomes part of it."""
        return self.directory / digest[:2] / validate_id(digest)

    # ---- writing -----------------------------------------------------------------------------------------

    def put_file(self, digest: str, path: Path) -> None:
        """Store a staged file: fsync, make it read-only and link it under its digest (see `BlobStore`)."""
        dest = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise StoreError(f"the staged file of {digest} is gone") from exc
        try:
            with _full_disk():
                size = os.fstat(fd).st_size
                if self._has(dest, size):
                    return
                dest.parent.mkdir(exist_ok=True)
                os.fchmod(fd, 0o444)  # read-only before it gets its public name
                os.fsync(fd)
                try:
                    self._link(Path(path), dest, size)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    # Another filesystem: a copy into our own staging directory first, then the same link.
                    self._put_copy(digest, fd)
                    return
                fsync_dir(dest.parent)
        finally:
            os.close(fd)

    def put_stream(self, digest: str, stream: BinaryIO) -> None:
        """Store bytes read from a stream, hashed while written; a wrong digest stores nothing."""
        self._put_chunks(digest, iter(lambda: stream.read(CHUNK), b""), verify=True)

    def _put_copy(self, digest: str, src_fd: int) -> None:
        def chunks() -> Iterator[bytes]:
            offset = 0
            while chunk := os.pread(src_fd, CHUNK, offset):
                offset += len(chunk)
                yield chunk

        self._put_chunks(digest, chunks(), verify=False)

    def _put_chunks(self, digest: str, chunks: Iterator[bytes], *, verify: bool) -> None:
        # Into a flock'ed temp in the staging directory, then published like a staged file.
        dest = self.path(digest)
        fd, tmp = create_locked_temp(self._tmp, "blob-")
        try:
            with _full_disk():
                hasher = hashlib.sha256()
                size = 0
                for chunk in chunks:
                    if verify:
                        hasher.update(chunk)
                    write_all(fd, chunk)
                    size += len(chunk)
                if verify and hasher.hexdigest() != digest:
                    raise DigestMismatch(f"the bytes hash to {hasher.hexdigest()}, not to {digest}", expected=digest,
                                         actual=hasher.hexdigest())
                if not self._has(dest, size):
                    os.fchmod(fd, 0o444)
                    os.fsync(fd)
                    dest.parent.mkdir(exist_ok=True)
                    self._link(tmp, dest, size)
                    fsync_dir(dest.parent)
        finally:
            unlink_quietly(tmp)
            os.close(fd)

    def _link(self, src: Path, dest: Path, size: int) -> None:
        try:
            os.link(src, dest)  # never clobbers
        except FileExistsError:
            if self._has(dest, size):
                return
            # A damaged leftover (e.g. an old crash): our durable bytes take its place. A rename leaves readers
            # of the old file intact; the link keeps the caller's staged file where it was.
            tmp = self._tmp / f"blob-{secrets.token_hex(12)}"
            try:
                os.link(src, tmp)
                os.replace(tmp, dest)
            finally:
                unlink_quietly(tmp)

    @staticmethod
    def _has(dest: Path, size: int) -> bool:
        try:
            return os.stat(dest).st_size == size
        except FileNotFoundError:
            return False

    # ---- reading -----------------------------------------------------------------------------------------

    def open(self, digest: str, *, start: int = 0, end: int | None = None) -> BinaryIO:
        """Open bytes `[start, end)` of a blob (see `BlobStore`)."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise _not_found(digest) from exc
        if start == 0 and end is None:
            return os.fdopen(fd, "rb")
        size = os.fstat(fd).st_size
        stop = size if end is None else min(end, size)
        return cast(BinaryIO, io.BufferedReader(_Range(fd, min(max(start, 0), stop), stop), CHUNK))

    @contextmanager
    def local_path(self, digest: str) -> Iterator[Path]:
        """Pin the blob while the context is held: its bytes stay readable under the path, even if deleted."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise _not_found(digest) from exc
        try:
            pinned = _PROC_FD / str(fd)
            yield pinned if pinned.exists() else self.path(digest)
        finally:
            os.close(fd)

    def exists(self, digest: str) -> bool:
        """Whether the blob file exists."""
        return self.path(digest).exists()

    def size(self, digest: str) -> int:
        """The blob's size in bytes."""
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError as exc:
            raise _not_found(digest) from exc

    def delete(self, digest: str) -> None:
        """Unlink a blob (never truncated: a reader that has it open or mapped keeps its bytes)."""
        path = self.path(digest)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def ping(self) -> str:
        """The blob directory is there and writable (readiness); see `BlobStore.ping`."""
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "the blob directory is not writable", str(self.directory))
        return "the blob directory"

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob file whose name is a valid id in its right shard."""
        try:
            shards = sorted(e.path for e in os.scandir(self.directory) if _SHARD.fullmatch(e.name) and e.is_dir())
        except FileNotFoundError:
            return
        for shard in shards:
            try:
                entries = list(os.scandir(shard))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = entry.name
                if len(name) != 64 or name[:2] != os.path.basename(shard):
                    continue
                try:
                    validate_id(name)
                    st = entry.stat(follow_symlinks=False)
                except (FileNotFoundError, StoreError):
                    continue
                yield BlobInfo(digest=name, size=st.st_size, modified=st.st_mtime)
