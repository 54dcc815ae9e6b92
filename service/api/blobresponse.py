"""`BlobResponse`: a blob of a remote store (S3) sent like a file — Range, If-Range, HEAD — streamed from `open()`.

Starlette's `FileResponse` does the HTTP part (one range: 206; several: multipart/byteranges; a bad one: 416);
this class gives it the blob's size in place of a `stat` and reads through the blob store's ranged `open()`
instead of a local file, so a ranged download of a large blob fetches only the bytes it sends.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, BinaryIO

import anyio.to_thread
from fastapi.responses import FileResponse
from starlette.types import Receive, Scope, Send

__all__ = ["BlobResponse"]

# (start) -> a stream of the blob's bytes from `start` to its end; the caller closes it.
Opener = Callable[[int], BinaryIO]


class _RemoteFile:
    """The part of `anyio.AsyncFile` that FileResponse uses (`read`, `seek`), over a ranged opener."""

    def __init__(self, opener: Opener) -> None:
        self._opener = opener
        self._stream: BinaryIO | None = None
        self._position = 0

    async def seek(self, position: int) -> None:
        if position != self._position or self._stream is None:
            await self.aclose()
            self._position = position

    async def read(self, size: int) -> bytes:
        if self._stream is None:
            self._stream = await anyio.to_thread.run_sync(self._opener, self._position)
        chunk: bytes = await anyio.to_thread.run_sync(_read_full, self._stream, size)
        self._position += len(chunk)
        return chunk

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await anyio.to_thread.run_sync(stream.close)


def _read_full(stream: BinaryIO, size: int) -> bytes:
    # FileResponse ends the body at the first short read: read `size` bytes unless the blob ends first.
    parts = []
    while size > 0:
        chunk = stream.read(size)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


class BlobResponse(FileResponse):
    """Send a blob of `size` bytes read through `opener`, with FileResponse's Range handling.

    `modified` (seconds since the epoch) becomes Last-Modified; pass an `ETag` header, as If-Range compares it.
    """

    def __init__(self, opener: Opener, size: int, *, modified: float, **kwargs: Any) -> None:
        mtime = int(modified)
        fake_stat = os.stat_result((stat.S_IFREG | 0o444, 0, 0, 1, 0, 0, size, mtime, mtime, mtime))
        # The path is never opened (`_open_file` is ours); it only names the response in Starlette's errors.
        super().__init__("blob", stat_result=fake_stat, **kwargs)
        self._opener = opener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # "pathsend" would hand the server a path to send: there is no such file.
        extensions = {k: v for k, v in scope.get("extensions", {}).items() if k != "http.response.pathsend"}
        await super().__call__({**scope, "extensions": extensions}, receive, send)

    @asynccontextmanager
    async def _open_file(self) -> AsyncIterator[Any]:
        file = _RemoteFile(self._opener)
        try:
            yield file
        finally:
            with anyio.CancelScope(shield=True):
                await file.aclose()
