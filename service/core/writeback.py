"""Keep a file's dirty pages moving to disk while it is being written, so the final fsync has little left to do.

Page-cache writes are fast and disk writes here run at 0.5-2 GB/s; left alone, the kernel starts writeback late
and the closing fsync of a 1 GB file waits for all of it. A background ``fdatasync`` every ``step`` bytes lets the
disk work while the writer receives or copies the next bytes. Each runs on its own open file description of the
same file, so a write error it meets is still reported to the writer's own fsync (Linux reports a writeback error
once to each description); errors here are ignored for that reason.
"""

from __future__ import annotations

import os
from concurrent.futures import Future

from service.core.hashing import process_pool

__all__ = ["Writeback"]

def _sync_and_close(fd: int) -> None:
    try:
        os.fdatasync(fd)
    except OSError:
        pass  # reported again by the writer's own fsync
    finally:
        os.close(fd)


class Writeback:
    """Background flushes of one file descriptor's file; at most one in flight."""

    def __init__(self, fd: int, *, step: int = 64 << 20) -> None:
        self._fd = fd
        self._step = step
        self._pending = 0
        self._running: Future[None] | None = None

    def wrote(self, nbytes: int) -> None:
        """Count bytes written; start a flush when ``step`` bytes accumulated and none is running."""
        self._pending += nbytes
        if self._pending >= self._step:
            self.flush()

    def flush(self, *, force: bool = False) -> None:
        """Start a flush of everything written so far, unless one is still running (``force``: even then)."""
        if not force and self._running is not None and not self._running.done():
            return
        try:
            own = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)  # same file, new description
        except OSError:
            return  # no /proc: the writer's fsync does all of it
        self._pending = 0
        self._running = process_pool("writeback").submit(_sync_and_close, own)

    def wait(self) -> None:
        """Wait for the flush in flight, if any (its errors are left to the writer's fsync)."""
        if self._running is not None:
            self._running.result()
