"""`S3BlobStore`: blobs in an S3-compatible object store (AWS S3, Ceph RGW, MinIO), one object per digest.

Objects are `<prefix>/blobs/<digest[:2]>/<digest>` in one bucket. The endpoint, credentials and region come from
the standard AWS settings (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` or
`AWS_DEFAULT_REGION`, profiles and instance roles) through boto3's usual chain, unless given to the constructor.

Correctness never relies on conditional writes (Ceph RGW 16 ignores `If-None-Match` on CompleteMultipartUpload):
keys are digests, so two writers of one digest write the same bytes and either may win; a put first asks (HEAD)
whether the object is there and then does nothing. Large files go up as multipart uploads in parallel parts, with
memory bounded by `part_size × concurrency` per process however many puts run at once; a failed or refused upload
is aborted, so no part is left behind. Reads are ranged GETs streamed to the caller; `local_path()` pins a
verified copy in a bounded local cache (`BlobCache`) for mmap.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import quote, urlsplit

import boto3
import botocore.config
import botocore.exceptions

from service.errors import ArtifactNotFound, DigestMismatch, InvalidSettings, StoreError
from service.store._fs import CHUNK
from service.store.blobs.base import BlobInfo
from service.store.blobs.cache import BlobCache
from service.store.ids import is_id, validate_id

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

__all__ = ["S3BlobStore", "make_s3_client", "parse_s3_url"]

MIB = 1 << 20
# S3's limits: parts of at least 5 MiB (but the last), at most 10,000 of them.
_MIN_PART = 5 * MIB
_MAX_PARTS = 10_000
_MISSING = {"404", "NoSuchKey", "NotFound"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split `s3://bucket/prefix` into the bucket and the prefix (without slashes at its ends; may be empty).

    Raises:
        ValueError: Not an `s3://` URL with a bucket.
    """
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"not an s3://bucket/prefix URL: {url[:200]!r}")
    return parts.netloc, parts.path.strip("/")


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
    region_name: str | None = None,
    max_pool_connections: int = 10,
) -> S3Client:
    """A boto3 S3 client for AWS S3, Ceph RGW or MinIO; None arguments come from boto3's usual chain.

    Args:
        endpoint_url: The endpoint; None: `AWS_ENDPOINT_URL`, else AWS itself.
        aws_access_key_id: With `aws_secret_access_key`; None: `AWS_ACCESS_KEY_ID`, profiles, instance roles.
        aws_secret_access_key: See `aws_access_key_id`.
        region_name: None: `AWS_REGION` or `AWS_DEFAULT_REGION`, then us-east-1.
        max_pool_connections: Connections kept per client (one per thread that uses it at once).

    Returns:
        A thread-safe client (not fork-safe: make one per process). Endpoints other than AWS's are addressed by
        path (`host/bucket/key`).
    """
    args: dict[str, Any] = {
        "endpoint_url": endpoint_url,
        "aws_access_key_id": aws_access_key_id,
        "aws_secret_access_key": aws_secret_access_key,
        "region_name": region_name,
    }
    options: dict[str, Any] = {
        "signature_version": "s3v4",
        # Several S3-compatible stores (Ceph RGW before Squid, older MinIO) refuse the CRC trailers that botocore
        # adds by default since 1.36; the sha256 of the content is checked by us anyway.
        "request_checksum_calculation": "when_required",
        "response_checksum_validation": "when_required",
        "max_pool_connections": max_pool_connections,
        "retries": {"mode": "standard", "max_attempts": 5},
    }
    client: S3Client = boto3.session.Session().client("s3", config=botocore.config.Config(**options), **args)
    if not (urlsplit(client.meta.endpoint_url).hostname or "").endswith(".amazonaws.com"):
        # Own endpoints (Ceph, MinIO, "localhost") rarely resolve bucket.host names: address by path.
        options["s3"] = {"addressing_style": "path"}
        client = boto3.session.Session().client("s3", config=botocore.config.Config(**options), **args)
    return client


def _is_missing(exc: botocore.exceptions.ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code", "")) in _MISSING


def _not_found(digest: str) -> ArtifactNotFound:
    return ArtifactNotFound(f"no blob {digest} in the object store", ref=digest)


class _BodyReader(io.RawIOBase):
    """A botocore streaming body as a raw stream, so that `io.BufferedReader` can wrap it."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._body.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3BlobStore:
    """Content-addressed bytes in one bucket under one prefix. Safe to share between threads; fork-safe."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        cache_dir: Path,
        cache_bytes: int,
        endpoint_url: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str | None = None,
        public_endpoint: str | None = None,
        part_size: int = 16 * MIB,
        concurrency: int = 4,
    ) -> None:
        """Describe the store; no request is sent until the first operation.

        Args:
            bucket: The bucket (it must exist).
            prefix: Key prefix under which `blobs/` lives; "" for the bucket's root.
            cache_dir: Root of the local read-through cache behind `local_path()` (shared by a replica's workers).
            cache_bytes: The cache's size bound.
            endpoint_url: The S3 endpoint; None for boto3's chain (`AWS_ENDPOINT_URL`, then AWS itself).
            access_key_id: With `secret_access_key`; None for boto3's chain (`AWS_ACCESS_KEY_ID`, ...).
            secret_access_key: See `access_key_id`.
            region: None for boto3's chain (`AWS_REGION`, `AWS_DEFAULT_REGION`), then us-east-1.
            public_endpoint: Endpoint that clients can reach, used only in presigned URLs; None for the same one.
            part_size: Multipart part size (at least 5 MiB); larger for files over 10,000 parts.
            concurrency: Parts in flight at once in this process, across all puts: the memory puts take is
                about `part_size × concurrency`.

        Raises:
            InvalidSettings: A part size under 5 MiB or a concurrency under 1.
        """
        if part_size < _MIN_PART or concurrency < 1:
            raise InvalidSettings(
                f"S3 part size must be at least {_MIN_PART} bytes and concurrency at least 1 "
                f"(got {part_size} and {concurrency})",
                setting="part_size" if part_size < _MIN_PART else "concurrency",
            )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = int(part_size)
        self.concurrency = int(concurrency)
        self._client_args: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
            "region_name": region,
        }
        self.public_endpoint = public_endpoint
        self._cache = BlobCache(cache_dir, max_bytes=cache_bytes)
        self._clients: dict[tuple[int, bool], S3Client] = {}
        self._clients_lock = threading.Lock()
        self._buffers: tuple[int, _PartBuffers] | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3BlobStore:
        """A store for `s3://bucket/prefix`; keyword arguments as for the constructor.

        Raises:
            InvalidSettings: Not an `s3://bucket/prefix` URL.
        """
        try:
            bucket, prefix = parse_s3_url(url)
        except ValueError as exc:
            raise InvalidSettings(str(exc), setting="CKPT_STORAGE_URL") from exc
        return cls(bucket, prefix, **kwargs)

    @property
    def cache(self) -> BlobCache:
        """The local read-through cache behind `local_path()`."""
        return self._cache

    def key(self, digest: str) -> str:
        """The object key of a blob."""
        validate_id(digest)
        return f"{self.prefix}/blobs/{digest[:2]}/{digest}" if self.prefix else f"blobs/{digest[:2]}/{digest}"

    # -- the BlobStore contract -------------------------------------------------------------------------------

    def put_file(self, digest: str, path: Path) -> None:
        """Upload a staged local file (its sha256 computed by the caller); nothing is sent if the blob exists."""
        key = self.key(digest)
        if self.exists(digest):
            return
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            if size <= self.part_size:
                self._client().put_object(Bucket=self.bucket, Key=key, Body=f.read(), ContentLength=size)
                return
            fd = f.fileno()
            part = self._part_size_for(size)
            reads = ((offset, min(part, size - offset)) for offset in range(0, size, part))
            self._multipart(key, (functools.partial(_read_part, fd, n, o) for o, n in reads))

    def put_stream(self, digest: str, stream: BinaryIO) -> None:
        """Upload bytes read from `stream` to its end, checking their sha256 against `digest`.

        Raises:
            DigestMismatch: They hash to something else; nothing is stored and the multipart upload is aborted.
        """
        key = self.key(digest)
        hasher = hashlib.sha256()

        def verify() -> None:
            actual = hasher.hexdigest()
            if actual != digest:
                raise DigestMismatch(f"the bytes hash to {actual}, not to {digest}", expected=digest, actual=actual)

        if self.exists(digest):
            while chunk := stream.read(CHUNK):
                hasher.update(chunk)
            verify()
            return
        first = _read_up_to(stream, self.part_size)
        hasher.update(first)
        if len(first) < self.part_size:
            verify()
            self._client().put_object(Bucket=self.bucket, Key=key, Body=first, ContentLength=len(first))
            return

        def parts(data: bytes) -> Iterator[_PartReader]:
            # No read-ahead: a part is read (and hashed) only once a slot is free for it.
            while data:
                yield functools.partial(_given, data)
                data = _read_up_to(stream, self.part_size)
                hasher.update(data)

        pending = parts(first)
        del first
        # The last part is sent before the digest is known: completion waits for `verify`, and a refused
        # stream aborts the upload, so its parts are never published.
        self._multipart(key, pending, before_complete=verify)

    def open(self, digest: str, *, start: int = 0, end: int | None = None) -> BinaryIO:
        """Stream bytes `[start, end)` of a blob with one ranged GET (empty past its end)."""
        return self._get(digest, start, end)[1]

    def local_path(self, digest: str) -> AbstractContextManager[Path]:
        """Pin a verified copy in the local cache (downloaded on a miss) while the context is held."""
        validate_id(digest)
        return self._cache.pin(digest, lambda: self._fetch(digest))

    def exists(self, digest: str) -> bool:
        """Whether the object is there (a HEAD request)."""
        try:
            self._client().head_object(Bucket=self.bucket, Key=self.key(digest))
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                return False
            raise
        return True

    def size(self, digest: str) -> int:
        """The object's size (a HEAD request)."""
        try:
            head = self._client().head_object(Bucket=self.bucket, Key=self.key(digest))
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                raise _not_found(digest) from exc
            raise
        return int(head["ContentLength"])

    def delete(self, digest: str) -> None:
        """Delete the object, and its cache entry unless pinned (a pinned copy stays until released)."""
        self._client().delete_object(Bucket=self.bucket, Key=self.key(digest))
        self._cache.discard(digest)

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob under the prefix (ListObjectsV2, page by page); keys that are not blobs are skipped."""
        base = f"{self.prefix}/blobs/" if self.prefix else "blobs/"
        paginator = self._client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                shard, _, digest = obj["Key"][len(base) :].partition("/")
                if is_id(digest) and shard == digest[:2]:
                    yield BlobInfo(digest=digest, size=int(obj["Size"]), modified=obj["LastModified"].timestamp())

    # -- beyond the contract ----------------------------------------------------------------------------------

    def ping(self) -> str:
        """HEAD the bucket (readiness): it exists and these keys may use it; see `BlobStore.ping`."""
        self._client().head_bucket(Bucket=self.bucket)
        return f"the bucket {self.bucket!r}"

    def presigned_url(self, digest: str, *, expires: int, filename: str | None = None) -> str:
        """A URL that GETs the blob without credentials until it expires, on the public endpoint when set.

        Args:
            digest: The blob.
            expires: Seconds the URL stays valid.
            filename: Offered to the browser as the download's name (Content-Disposition: attachment).

        Returns:
            The URL. Signing is local: nothing is sent and existence is not checked.
        """
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(digest)}
        if filename:
            params["ResponseContentDisposition"] = f"attachment; filename*=UTF-8''{quote(filename, safe='')}"
        return self._client(public=True).generate_presigned_url("get_object", Params=params, ExpiresIn=int(expires))

    def abort_stale_uploads(self, *, older_than_seconds: float) -> int:
        """Abort multipart uploads under the prefix begun longer ago than that (left by crashed writers).

        Returns:
            How many were aborted.
        """
        client = self._client()
        cutoff = time.time() - older_than_seconds
        aborted = 0
        paginator = client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else ""):
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() < cutoff:
                    client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    aborted += 1
        return aborted

    # -- helpers ----------------------------------------------------------------------------------------------

    def _client(self, *, public: bool = False) -> S3Client:
        # boto3 clients are thread-safe but not fork-safe: one per process (and one for presigning on the
        # public endpoint, as the signature covers the host).
        slot = (os.getpid(), public and self.public_endpoint is not None)
        client = self._clients.get(slot)
        if client is None:
            with self._clients_lock:
                client = self._clients.get(slot)
                if client is None:
                    client = self._make_client(public=slot[1])
                    self._clients[slot] = client
        return client

    def _make_client(self, *, public: bool) -> S3Client:
        args = dict(self._client_args)
        if public:
            args["endpoint_url"] = self.public_endpoint
        return make_s3_client(**args, max_pool_connections=max(10, 4 * self.concurrency))

    def _fetch(self, digest: str) -> tuple[int, BinaryIO]:
        return self._get(digest, 0, None)

    def _get(self, digest: str, start: int, end: int | None) -> tuple[int, BinaryIO]:
        # (bytes in the answer, a stream of them)
        key = self.key(digest)
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"bad byte range [{start}, {end})")
        if end is not None and end == start:
            if not self.exists(digest):
                raise _not_found(digest)
            return 0, io.BytesIO(b"")
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            response = self._client().get_object(**args)
        except botocore.exceptions.ClientError as exc:
            if _is_missing(exc):
                raise _not_found(digest) from exc
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return 0, io.BytesIO(b"")  # `start` at or past the end, as a file read there
            raise
        return int(response["ContentLength"]), io.BufferedReader(_BodyReader(response["Body"]), buffer_size=CHUNK)

    def _part_size_for(self, size: int) -> int:
        part = self.part_size
        if -(-size // part) > _MAX_PARTS:
            part = -(-size // _MAX_PARTS)
            part = -(-part // MIB) * MIB
        return part

    def _multipart(
        self, key: str, parts: Iterator[_PartReader], *, before_complete: Callable[[], None] | None = None
    ) -> None:
        # Parts in flight are bounded per process, across every put (`concurrency` of them, each `part_size`
        # at most): a put takes a buffer before it reads a part, and gives it back when the part is sent.
        client = self._client()
        buffers = self._part_buffers()
        upload_id = client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        futures: list[Future[CompletedPartTypeDef]] = []

        def send(number: int, read: _PartReader, buffer: bytearray) -> CompletedPartTypeDef:
            try:
                # botocore takes a bytearray as a blob (bytes, bytearray, str or a file); the stubs say bytes.
                body: Any = read(buffer)
                etag = client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
                )["ETag"]
                return {"PartNumber": number, "ETag": etag}
            finally:
                buffers.give(buffer)

        try:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-put") as pool:
                try:
                    for number in itertools.count(1):
                        buffer = buffers.take()
                        try:
                            if any(f.done() and f.exception() for f in futures):
                                raise _PartFailed
                            read = next(parts)
                        except BaseException:
                            buffers.give(buffer)
                            raise
                        futures.append(pool.submit(send, number, read, buffer))
                        del read, buffer
                except (StopIteration, _PartFailed):
                    pass
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
            completed = [f.result() for f in futures]  # raises a part's error
            if before_complete is not None:
                before_complete()
            client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": completed}
            )
        except BaseException:
            try:
                client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                pass  # a crashed writer's leftover: abort_stale_uploads() collects it
            raise

    def _part_buffers(self) -> _PartBuffers:
        # Like the clients, one per process: buffers copied by fork may be held by threads that are gone.
        pid = os.getpid()
        with self._clients_lock:
            if self._buffers is None or self._buffers[0] != pid:
                self._buffers = (pid, _PartBuffers(self.concurrency, self.part_size))
            return self._buffers[1]


class _PartBuffers:
    """A process's part buffers: at most `count` of `size` bytes, made on first use and then reused, never freed.

    A put takes one before it reads a part and gives it back once the part is sent, so this also bounds the parts
    in flight. Reusing them is what keeps memory at `count × size`: parts allocated per read and freed after
    sending make glibc raise its mmap threshold and keep the freed parts in its per-thread heaps (four concurrent
    1 GB puts added 171 MB that way, and kept it).
    """

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self._count = count
        self._free: list[bytearray] = []
        self._made = 0
        self._ready = threading.Condition()

    def take(self) -> bytearray:
        with self._ready:
            while not self._free and self._made >= self._count:
                self._ready.wait()
            if self._free:
                return self._free.pop()
            self._made += 1
        return bytearray(self.size)

    def give(self, buffer: bytearray) -> None:
        with self._ready:
            self._free.append(buffer)
            self._ready.notify()


# Reads one part, into the buffer it is given when the part fills it; returns the part's bytes.
_PartReader = Callable[[bytearray], bytes | bytearray]


def _read_part(fd: int, size: int, offset: int, buffer: bytearray) -> bytes | bytearray:
    if size != len(buffer):
        return os.pread(fd, size, offset)  # the last part, or a part of a file too large for 10,000 of them
    if os.preadv(fd, [buffer], offset) != size:
        raise StoreError("the file being uploaded got shorter")
    return buffer


def _given(data: bytes, buffer: bytearray) -> bytes:
    return data


class _PartFailed(Exception):
    """A part upload failed: stop reading parts; the failure itself is raised from its future."""


def _read_up_to(stream: BinaryIO, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = stream.read(min(CHUNK, size - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)
