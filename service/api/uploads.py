"""Stream request bodies straight into the store's temp files while hashing: no spooling, no second copy.

python-multipart does the parsing (push parser, fed chunk by chunk); file parts go into `PendingUpload`s of the
store, whose write (sha256 + file write) runs in a worker thread, one block in flight, so receiving the next block
overlaps hashing and writing the previous one.

A file field may repeat where a route allows it (the shards of one checkpoint): each part is held to the per-file
limit, and all file bytes of the request together to the request limit (`CKPT_MAX_REQUEST_BYTES`), both while
the bytes arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import anyio
import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.core.sharding import MAX_INDEX_BYTES, MAX_SHARDS, is_index_filename
from service.errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from service.operations import UploadedFile
from service.store import ArtifactStore, PendingUpload

BLOCK_BYTES = 8 << 20
MAX_PARTS = 16
# With repeatable file fields: the shards and the index of two checkpoints (a merge's original and trained).
MAX_FILE_PARTS = 2 * (MAX_SHARDS + 1)
MAX_FIELD_BYTES = 64 << 10
MAX_HEADER_BYTES = 16 << 10
MULTIPART_OVERHEAD = 1 << 20  # boundaries, headers and text fields on top of the file parts
MAX_BOUNDARY_BYTES = 256


class _AsyncSink:
    # Received pieces are kept as they came (memoryviews of the request's chunks, never copied) and handed to
    # the upload a block at a time; its worker thread writes and hashes block k while the loop receives k+1.
    def __init__(self, upload: PendingUpload) -> None:
        self.upload = upload
        self._pieces: list[memoryview] = []
        self._size = 0
        self._task: asyncio.Task[None] | None = None

    async def write(self, data: bytes | memoryview) -> None:
        self._pieces.append(memoryview(data))
        self._size += len(data)
        if self._size >= BLOCK_BYTES:
            await self._flush()

    async def _write_block(self, pieces: list[memoryview]) -> None:
        await anyio.to_thread.run_sync(self.upload.write_chunks, pieces)

    async def _flush(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            await task
        if self._pieces:
            pieces, self._pieces, self._size = self._pieces, [], 0
            self._task = asyncio.create_task(self._write_block(pieces))

    async def close(self) -> None:
        await self._flush()
        if self._task is not None:
            task, self._task = self._task, None
            await task

    async def abort(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            with contextlib.suppress(BaseException):
                await task
        self._pieces, self._size = [], 0
        await anyio.to_thread.run_sync(self.upload.abort)


@dataclass
class FilePart:
    field: str
    filename: str | None
    upload: PendingUpload


@dataclass
class ParsedForm:
    fields: dict[str, str] = field(default_factory=dict)  # the first value of each text field
    files: dict[str, FilePart] = field(default_factory=dict)  # the first file part of each field
    parts: list[FilePart] = field(default_factory=list)  # every file part, in order
    lists: dict[str, list[str]] = field(default_factory=dict)  # every value of each repeatable text field

    def files_of(self, name: str) -> list[FilePart]:
        """The file parts of a field, in the order they came."""
        return [p for p in self.parts if p.field == name]

    async def abort(self) -> None:
        for part in self.parts:
            await anyio.to_thread.run_sync(part.upload.abort)


def uploaded_files(form: ParsedForm, field_name: str, sha_field: str) -> list[UploadedFile]:
    """The file parts of a field with the sha256 declared for each: `sha_field` repeats once per part, in order.

    Raises:
        InvalidRequest: Some parts have a declared sha256 and others not.
    """
    parts = form.files_of(field_name)
    digests = form.lists.get(sha_field, [])
    if digests and len(digests) != len(parts):
        raise InvalidRequest(
            f"{len(digests)} {sha_field!r} values for {len(parts)} {field_name!r} file parts: give one per file "
            "part, in the order of the parts"
        )
    expected = [d.strip().lower() or None for d in digests] or [None] * len(parts)
    return [UploadedFile(p.filename, p.upload, e) for p, e in zip(parts, expected, strict=True)]


def is_sharded(files: list[UploadedFile]) -> bool:
    """Whether file parts are the shards of one checkpoint: several files, or an index."""
    return len(files) > 1 or any(is_index_filename(f.filename) for f in files)


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The request body's chunks; a client that sends nothing for the configured idle time gets a 408.

    A slow client never stalls anyone else (the loop is async), but without a limit a stalled one would hold
    its connection and its temp file forever.
    """
    idle: float = request.app.state.services.settings.body_idle_timeout_seconds
    chunks = request.stream().__aiter__()
    while True:
        try:
            with anyio.fail_after(idle):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise RequestTimeout(f"no request body bytes arrived for {idle:g} s") from exc
        yield chunk


def check_content_length(request: Request, limit: int) -> None:
    """Refuse with 413 before reading the body when Content-Length already says it is too large."""
    check_declared_length(request.headers.get("content-length"), limit)


def check_declared_length(raw: str | None, limit: int, *, what: str = "request body") -> None:
    """Refuse a Content-Length header value (None: absent) that is not a number (400) or above `limit` (413)."""
    if raw is None:
        return
    try:
        length = int(raw)
    except ValueError as exc:
        raise InvalidRequest(f"invalid Content-Length {raw[:32]!r}") from exc
    if length > limit:
        raise PayloadTooLarge(f"{what} of {length} bytes exceeds the limit of {limit} bytes", limit=limit)


class _FormState:
    """The parser's synchronous callbacks record events here; the async loop acts on them after each chunk."""

    def __init__(self, file_fields: frozenset[str], text_fields: frozenset[str],
                 repeatable: frozenset[str] = frozenset()) -> None:
        self.file_fields = file_fields
        self.text_fields = text_fields
        self.repeatable = repeatable
        self.max_parts = MAX_PARTS + (2 * MAX_FILE_PARTS if repeatable else 0)  # a sha256 field after each file
        self.parts = 0
        self.file_parts = 0
        self.header_bytes = 0
        self.header_name = b""
        self.header_value = b""
        self.disposition: bytes | None = None
        self.current_name = ""
        self.current_filename: str | None = None
        self.current_is_file = False
        self.text = bytearray()
        self.fields: dict[str, str] = {}
        self.lists: dict[str, list[str]] = {}
        self.seen: set[str] = set()
        self.events: list[tuple[str, Any]] = []  # ("begin_file", (name, filename)), ("data", bytes), ("end_file", None)

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise InvalidRequest(f"too many multipart parts (more than {self.max_parts})")
        self.header_bytes = 0
        self.disposition = None
        self.text = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.header_value += data[start:end]

    def _count_header(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_HEADER_BYTES:
            raise InvalidRequest(f"multipart part headers exceed {MAX_HEADER_BYTES} bytes")

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = self.header_value
        self.header_name = b""
        self.header_value = b""

    def on_headers_finished(self) -> None:
        if self.disposition is None:
            raise InvalidRequest("a multipart part has no Content-Disposition header")
        _, options = parse_options_header(self.disposition)
        raw_name = options.get(b"name")
        if raw_name is None:
            raise InvalidRequest("a multipart part has no name")
        name = raw_name.decode("utf-8", "replace")
        if name in self.seen and name not in self.repeatable:
            raise InvalidRequest(f"multipart field {name!r} is given twice")
        self.seen.add(name)
        self.current_name = name
        raw_filename = options.get(b"filename")
        # A name that may be either (POST /diff's `a`, `b`) is a file part only when it carries a filename.
        is_file = name in self.file_fields and (raw_filename is not None or name not in self.text_fields)
        if not is_file and name not in self.text_fields:
            allowed = sorted(self.file_fields | self.text_fields)
            raise InvalidRequest(f"unknown multipart field {name!r}; expected one of {allowed}")
        if not is_file and raw_filename is not None:
            raise InvalidRequest(self._file_in_text_field(name))
        self.current_is_file = is_file
        if is_file:
            self.file_parts += 1
            if self.file_parts > MAX_FILE_PARTS:
                raise InvalidRequest(f"too many file parts (more than {MAX_FILE_PARTS})")
            filename = raw_filename.decode("utf-8", "replace") if raw_filename is not None else None
            self.events.append(("begin_file", (name, filename)))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.current_is_file:
            # A view of the immutable chunk fed to the parser costs no copy; the parser's own lookbehind
            # buffer (a bytearray it reuses) must be copied.
            piece = memoryview(data)[start:end] if isinstance(data, bytes) else bytes(data[start:end])
            self.events.append(("data", piece))
        else:
            if len(self.text) + (end - start) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"multipart field {self.current_name!r} exceeds {MAX_FIELD_BYTES} bytes")
            self.text += data[start:end]

    def on_part_end(self) -> None:
        if self.current_is_file:
            self.events.append(("end_file", None))
        else:
            try:
                value = self.text.decode("utf-8")
                self.fields.setdefault(self.current_name, value)
                if self.current_name in self.repeatable:
                    self.lists.setdefault(self.current_name, []).append(value)
            except UnicodeDecodeError as exc:
                name = self.current_name
                if f"{name}_file" in self.file_fields:
                    raise InvalidRequest(self._file_in_text_field(name)) from exc
                raise InvalidRequest(f"multipart field {name!r} is not UTF-8 text") from exc

    def _file_in_text_field(self, name: str) -> str:
        # curl's -F trained=@file sends a file where a ref belongs: name the field the file goes in.
        if f"{name}_file" in self.file_fields:
            return (f"multipart field {name!r} takes a ref (an artifact id or a name); a file goes in "
                    f"'{name}_file' (curl: -F {name}_file=@PATH)")
        return f"multipart field {name!r} takes text, not a file (curl: -F {name}=VALUE, without '@')"


async def parse_multipart(
    request: Request,
    store: ArtifactStore,
    *,
    file_fields: frozenset[str],
    text_fields: frozenset[str],
    max_file_bytes: int,
    repeatable: frozenset[str] = frozenset(),
    max_request_bytes: int | None = None,
) -> ParsedForm:
    """Parse a multipart body, streaming each file part into a store upload. Aborts every upload on failure.

    A body without file parts may also be `application/x-www-form-urlencoded` or a JSON object of the text fields.

    Args:
        request: The request.
        store: Where file parts are staged.
        file_fields: Fields that take files.
        text_fields: Fields that take text (a name may be in both: a file part when it has a filename).
        max_file_bytes: The most bytes of one file part (413).
        repeatable: Fields that may come more than once (the shards of a checkpoint, a sha256 for each).
        max_request_bytes: The most bytes of all file parts together (413); None: `max_file_bytes` per file field.

    Returns:
        The text fields and the staged file parts; the caller aborts the uploads it does not commit.

    Raises:
        InvalidRequest: A malformed body, an unknown or repeated field, too many parts.
        PayloadTooLarge: A file part, the file parts together, or the body over its limit.
        RequestTimeout: The client stopped sending.
    """
    content_type = request.headers.get("content-type", "")
    ctype, params = parse_options_header(content_type)
    if ctype == b"application/x-www-form-urlencoded":
        return await _parse_urlencoded(request, file_fields | text_fields)
    if ctype == b"application/json":
        return await _parse_json_fields(request, text_fields)
    if ctype != b"multipart/form-data":
        raise InvalidRequest(f"expected multipart/form-data, got {content_type[:64]!r}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidRequest("multipart/form-data without a boundary")
    if len(boundary) > MAX_BOUNDARY_BYTES:
        # RFC 2046 allows 70 characters; python-multipart refuses more than 256 with an exception of its own.
        raise InvalidRequest(f"the multipart boundary has {len(boundary)} characters, more than {MAX_BOUNDARY_BYTES}")
    files_limit = max_request_bytes if max_request_bytes is not None else max_file_bytes * max(1, len(file_fields))
    body_limit = files_limit + MULTIPART_OVERHEAD
    check_content_length(request, body_limit)

    state = _FormState(file_fields, text_fields, repeatable)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": state.on_part_begin,
            "on_part_data": state.on_part_data,
            "on_part_end": state.on_part_end,
            "on_header_field": state.on_header_field,
            "on_header_value": state.on_header_value,
            "on_header_end": state.on_header_end,
            "on_headers_finished": state.on_headers_finished,
        },
    )
    form = ParsedForm()
    sink: _AsyncSink | None = None
    received = 0
    file_bytes = 0
    try:
        async for chunk in body_chunks(request):
            received += len(chunk)
            if received > body_limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {body_limit} bytes", limit=body_limit)
            parser.write(chunk)
            for kind, payload in state.events:
                if kind == "begin_file":
                    name, filename = payload
                    # A shard index is JSON, never gigabytes: refused as soon as it grows past its own bound.
                    part_limit = min(max_file_bytes, MAX_INDEX_BYTES) if is_index_filename(filename) else max_file_bytes
                    upload = await anyio.to_thread.run_sync(functools.partial(store.open_upload, max_bytes=part_limit))
                    part = FilePart(name, filename, upload)
                    form.parts.append(part)
                    form.files.setdefault(name, part)
                    sink = _AsyncSink(upload)
                elif kind == "data":
                    assert sink is not None
                    file_bytes += len(payload)
                    if file_bytes > files_limit:
                        raise PayloadTooLarge(
                            f"the files of this request exceed the limit of {files_limit} bytes in all",
                            limit=files_limit,
                        )
                    await sink.write(payload)
                else:
                    assert sink is not None
                    await sink.close()
                    sink = None
            state.events.clear()
        parser.finalize()
        if sink is not None:
            raise InvalidRequest("the multipart body ended inside a file part")
    except ClientDisconnect as exc:
        await _abort(sink, form)
        raise InvalidRequest("the client disconnected before the upload finished") from exc
    except FormParserError as exc:
        await _abort(sink, form)
        raise InvalidRequest(f"malformed multipart body: {str(exc)[:200]}") from exc
    except BaseException:
        await _abort(sink, form)
        raise
    form.fields.update(state.fields)
    form.lists.update(state.lists)
    return form


async def _read_small_body(request: Request, limit: int, what: str) -> bytearray:
    # A body of fields only, held in memory: 413 past `limit` (before reading when Content-Length says so).
    check_content_length(request, limit)
    body = bytearray()
    async for chunk in body_chunks(request):
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"{what} exceeds the limit of {limit} bytes", limit=limit)
    return body


async def _parse_urlencoded(request: Request, allowed: frozenset[str]) -> ParsedForm:
    # Ref-only requests (no file parts) may come as a plain form, as `curl -d` and httpx send them.
    body = await _read_small_body(request, MULTIPART_OVERHEAD, "form body")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_PARTS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"malformed form body: {exc}") from exc
    form = ParsedForm()
    for name, value in pairs:
        if name not in allowed:
            raise InvalidRequest(f"unknown form field {name!r}; expected one of {sorted(allowed)}")
        if name in form.fields:
            raise InvalidRequest(f"form field {name!r} is given twice")
        form.fields[name] = value
    return form


async def _parse_json_fields(request: Request, allowed: frozenset[str]) -> ParsedForm:
    # Ref-only requests may also come as a JSON object of the same fields (a merge by reference from a script):
    # booleans and numbers become their form spelling, a list a comma-separated one, an object (labels) JSON text.
    body = await _read_small_body(request, request.app.state.services.settings.max_json_bytes, "JSON body")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidRequest("the JSON body is not valid JSON") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("the JSON body must be an object of fields")
    unknown = sorted(k for k in data if k not in allowed)
    if unknown:
        raise InvalidRequest(f"unknown JSON fields {unknown[:8]}; expected some of {sorted(allowed)}")
    form = ParsedForm()
    for name, value in data.items():
        if value is None:
            continue
        if isinstance(value, bool):
            form.fields[name] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            form.fields[name] = str(value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            form.fields[name] = ",".join(value)
        elif isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
            form.fields[name] = json.dumps(value)
        else:
            raise InvalidRequest(f"JSON field {name!r} must be a string, number, boolean, list of strings or "
                                 "object of strings")
    return form


async def _abort(sink: _AsyncSink | None, form: ParsedForm) -> None:
    if sink is not None:
        await sink.abort()
    await form.abort()


async def read_raw_body(request: Request, store: ArtifactStore, *, max_bytes: int) -> PendingUpload:
    """Stream an application/octet-stream body into a store upload."""
    check_content_length(request, max_bytes)
    upload = await anyio.to_thread.run_sync(lambda: store.open_upload(max_bytes=max_bytes))
    sink = _AsyncSink(upload)
    try:
        async for chunk in body_chunks(request):
            await sink.write(chunk)
        await sink.close()
    except ClientDisconnect as exc:
        await sink.abort()
        raise InvalidRequest("the client disconnected before the upload finished") from exc
    except BaseException:
        await sink.abort()
        raise
    return upload
