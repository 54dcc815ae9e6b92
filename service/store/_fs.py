"""Filesystem primitives of the store: flock'ed temps, atomic publication, directory fsync.

Every guard here works across processes (flock, O_EXCL, link, rename); nothing relies on in-process locks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.errors import StorageFull

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
CHUNK = 1 << 20


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


def storage_full(exc: OSError) -> StorageFull:
    return StorageFull(f"no space left in the artifact store ({os.strerror(exc.errno or errno.ENOSPC)})")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def same_file(path: Path, fd: int) -> bool:
    # The path may have been unlinked (and even reused) by someone else since we opened it.
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def create_locked_temp(tmp_dir: Path, prefix: str) -> tuple[int, Path]:
    # The creator holds LOCK_EX for the temp's whole life, so garbage collection (which needs the lock) can
    # tell a live temp from a crash leftover. Between O_EXCL and flock a collector running with grace 0 could
    # take the lock and unlink the file: then the path no longer names our inode and we start again.
    while True:
        path = tmp_dir / f"{prefix}{secrets.token_hex(12)}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            if is_no_space(exc):
                raise storage_full(exc) from exc
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if same_file(path, fd):
            return fd, path
        os.close(fd)


@contextmanager
def locked_work_dir(tmp_dir: Path, prefix: str) -> Iterator[Path]:
    # A private directory under tmp/ for code that picks its own temp names (save_checkpoint).
    # flock works on a directory fd too, so the collector treats it like a live upload.
    while True:
        path = tmp_dir / f"{prefix}{secrets.token_hex(12)}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            if is_no_space(exc):
                raise storage_full(exc) from exc
            raise
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            # Between mkdir and open a collector running with grace 0 may have removed the (then unlocked)
            # directory: take a new name, as create_locked_temp does when it loses the same race.
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if same_file(path, fd):
            break
        os.close(fd)
    try:
        yield path
    finally:
        try:
            if same_file(path, fd):
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def publish_bytes(tmp_dir: Path, dest: Path, data: bytes, *, mode: int, replace: bool) -> bool:
    """Write `data` to `dest` atomically: temp -> fsync -> rename (or link, which never clobbers).

    Returns False when `replace` is False and `dest` already existed (nothing was written).
    """
    fd, tmp = create_locked_temp(tmp_dir, "file-")
    try:
        write_all(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
        if replace:
            os.replace(tmp, dest)
            created = True
        else:
            try:
                os.link(tmp, dest)
                created = True
            except FileExistsError:
                created = False
            os.unlink(tmp)
        fsync_dir(dest.parent)
        return created
    except OSError as exc:
        unlink_quietly(tmp)
        if is_no_space(exc):
            raise storage_full(exc) from exc
        raise
    except BaseException:
        unlink_quietly(tmp)
        raise
    finally:
        os.close(fd)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if is_no_space(exc):
            raise storage_full(exc) from exc
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def remove_if_unlocked(path: Path) -> bool:
    """Remove a temp file or work directory unless its owner still holds the flock. True if removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        unlink_quietly(path)  # the store never makes symlinks; never follow one
        return True
    is_dir = stat.S_ISDIR(st.st_mode)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if is_dir else 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer
        if not same_file(path, fd):
            return False
        if is_dir:
            shutil.rmtree(path, ignore_errors=True)
        else:
            unlink_quietly(path)
        return True
    finally:
        os.close(fd)
