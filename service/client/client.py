"""`CheckpointClient`: a typed httpx client for the checkpoint service. Imports no torch.

Transfers stream from and to disk: an upload is read in chunks while it is sent, a download is written to a
temp file next to its destination, verified against the artifact id (the sha256 of the bytes) and only then
renamed into place.

Retries. Connection errors and 502/503/504 answers are retried with exponential backoff, honouring
Retry-After, for idempotent calls only: GET, HEAD, PUT and DELETE, `POST /diff` (it stores nothing), and
`push`, because the client always sends the sha256 of the bytes: the service stores content by digest, so
repeating a push can only store the same artifact again (an existing one is returned unchanged); `import_url`
for the same reason. A `merge` is retried only when both inputs go as artifact ids (a 64-hex id, or a local file
the service already has): the same inputs give the same result, and a name cannot move between the attempts (an
`s3://` input is not an id: the object may change). A merge that uploads a file or
names an input by name, `strip` and `register_architecture` are never retried: a 503 there (`OverloadedError`)
is the caller's decision, since the work is heavy and the service asked to back off. Behind a load balancer a
request that a replica began to read cannot be replayed elsewhere; these client retries are what recovers it.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from service import __version__
from service.api.schemas import (
    ArchitectureList,
    ArchitectureOut,
    ArtifactOut,
    ArtifactPage,
    DiffOut,
    FsckOut,
    GcOut,
    Health,
    ManifestOut,
    NameOut,
    OperationOut,
    Readiness,
    ShardIndexOut,
)
from service.client.errors import (
    ClientError,
    IntegrityError,
    ServiceError,
    TransportError,
    error_from_problem,
)
from service.format_names import OutputFormat

__all__ = [
    "DEFAULT_URL",
    "CheckpointClient",
    "DeleteResult",
    "ImportResult",
    "Progress",
    "PullResult",
    "PushResult",
    "RetryPolicy",
    "ShardsResult",
    "Source",
    "checkpoint_files",
    "sha256_file",
]

DEFAULT_URL = "http://127.0.0.1:8000"
CHUNK_BYTES = 1 << 20
# Reads wait for a whole merge or a large hash on the service; connecting should fail fast.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)

Progress = Callable[[int, int | None], None]
"""`progress(done_bytes, total_bytes)`; total is None when the service does not announce a length."""

Source = str | os.PathLike[str]
"""A stored artifact (an id or a name, given as `str`), a local file, or a local directory of shards (a `Path`)."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_REDIRECTS = 5
# What a service name may be ([A-Za-z0-9][A-Za-z0-9._-]*): safe as a file name as it is.
_SAFE_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    # os.umask can only be read by setting it; the lock keeps this process's own threads from seeing the 0.
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask
_M = TypeVar("_M", bound=BaseModel)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hash a file in chunks, without reading it into memory.

    Args:
        path: The file.

    Returns:
        The lowercase hex sha256 of its bytes: the artifact id the service would give it.

    Raises:
        OSError: The file cannot be read.
    """
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class RetryPolicy:
    """How idempotent calls are retried.

    Attributes:
        attempts: Tries in all, the first included (1 disables retries).
        backoff: Delay before the first retry, in seconds; doubled on each further retry (with jitter).
        max_delay: Upper bound of one delay, Retry-After included.
        statuses: Answers that are retried.
    """

    attempts: int = 4
    backoff: float = 0.5
    max_delay: float = 30.0
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({502, 503, 504}))

    def delay(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `retry` (0-based); the service's Retry-After wins."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_delay))
        # Jitter keeps many clients that failed together from coming back together.
        return min(self.backoff * (2.0**retry) * random.uniform(0.5, 1.0), self.max_delay)

    def to_dict(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "backoff": self.backoff, "max_delay": self.max_delay,
                "statuses": sorted(self.statuses)}


@dataclass(frozen=True)
class PushResult:
    """What `push` did.

    Attributes:
        artifact: The stored artifact.
        uploaded: False when the service already had the bytes and none were sent.
        created: True when this push stored a new artifact.
    """

    artifact: ArtifactOut
    uploaded: bool
    created: bool

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact.model_dump(mode="json"), "uploaded": self.uploaded,
                "created": self.created}


@dataclass(frozen=True)
class ImportResult:
    """What `import_url` did: the stored artifact, and whether this import stored it (False: it was there)."""

    artifact: ArtifactOut
    created: bool

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact.model_dump(mode="json"), "created": self.created}


@dataclass(frozen=True)
class PullResult:
    """A verified download: the file written, the artifact id its bytes hash to, and its size."""

    path: Path
    id: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "id": self.id, "size": self.size}


@dataclass(frozen=True)
class ShardsResult:
    """A sharded download: the directory, the files written there (the index first), the artifact and its size."""

    directory: Path
    id: str
    files: tuple[Path, ...]
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "id": self.id, "files": [str(f) for f in self.files],
                "size": self.size}


@dataclass(frozen=True)
class DeleteResult:
    """What `delete` removed: the artifact id and the names that pointed to it (with `force`)."""

    id: str
    names_removed: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "names_removed": list(self.names_removed)}


class _Counter:
    def __init__(self, total: int | None, callback: Progress | None) -> None:
        self.total = total
        self.done = 0
        self.callback = callback

    def add(self, n: int) -> None:
        self.done += n
        if self.callback is not None and n:
            self.callback(self.done, self.total)


def _iter_file(fh: IO[bytes], counter: _Counter) -> Iterator[bytes]:
    while chunk := fh.read(CHUNK_BYTES):
        counter.add(len(chunk))
        yield chunk


# A file part of a `_StreamedForm`: (file field, the field its sha256 goes in, the file).
FilePart = tuple[str, str, Path]


def _role_parts(role: str, paths: Sequence[Path]) -> list[FilePart]:
    # POST /merge's and POST /diff's naming: `original_file` + `original_sha256`, `a` + `a_sha256`.
    field = f"{role}_file" if role in ("original", "trained") else role
    return [(field, f"{role}_sha256", p) for p in paths]


class _StreamedForm:
    """A multipart/form-data body that sends files as it reads them and each file's sha256 after it.

    The digest of a file is computed from the very chunks sent (in a helper thread, overlapping the send), and
    goes as a text part (``<role>_sha256``) right after the file part (``<role>_file``); the service compares it
    with what it received before storing anything. So the file is read once, not once to hash and once to send.
    The shards of one checkpoint are several parts of the same field, each followed by its digest.
    """

    def __init__(self, fields: Sequence[tuple[str, str]], files: Sequence[FilePart], counter: _Counter,
                 stack: contextlib.ExitStack) -> None:
        self.boundary = os.urandom(16).hex()
        self._fields = list(fields)
        self._files = []
        for field_name, sha_field, path in files:
            fh = stack.enter_context(path.open("rb", buffering=0))
            self._files.append((field_name, sha_field, path, fh, os.fstat(fh.fileno()).st_size))
        self._counter = counter
        self._pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload-sha256"))
        self.length = sum(len(self._text(k, v)) for k, v in self._fields) + len(self._end())
        for field_name, sha_field, path, _, size in self._files:
            self.length += len(self._file_head(field_name, path)) + size + 2 + len(self._text(sha_field, "0" * 64))

    def headers(self) -> dict[str, str]:
        return {"Content-Type": f"multipart/form-data; boundary={self.boundary}", "Content-Length": str(self.length)}

    def __iter__(self) -> Iterator[bytes]:
        for key, value in self._fields:
            yield self._text(key, value)
        for field_name, sha_field, path, fh, size in self._files:
            yield self._file_head(field_name, path)
            digest = hashlib.sha256()
            left = size  # the length was announced: exactly these bytes, even if the file grows meanwhile
            while left:
                chunk = fh.read(min(CHUNK_BYTES, left))
                if not chunk:
                    raise ClientError(f"{path} shrank while it was being uploaded")
                hashing = self._pool.submit(digest.update, chunk)  # hashlib releases the GIL
                yield chunk
                left -= len(chunk)
                self._counter.add(len(chunk))
                hashing.result()
            yield b"\r\n" + self._text(sha_field, digest.hexdigest())
        yield self._end()

    def _text(self, name: str, value: str) -> bytes:
        return (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n".encode()
                + value.encode() + b"\r\n")

    def _file_head(self, field_name: str, path: Path) -> bytes:
        filename = "".join(c if c.isprintable() and c not in '"\\' else "_" for c in path.name)
        return (f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; "
                f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()

    def _end(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()


INDEX_SUFFIX = ".index.json"


def checkpoint_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The files of a checkpoint directory to send as one checkpoint: its index and shards, or its weight files.

    A transformers directory (`save_pretrained`, a Trainer's `checkpoint-500/`) holds config, tokenizer and
    trainer state next to the weights; only the weights go. With an index (`*.index.json`; the safetensors one
    when there are two), the index and the shard files its `weight_map` names; without one, every `*.safetensors`
    file, or when there is none every `*.bin` file but `training_args.bin`.

    Args:
        directory: The directory.

    Returns:
        The files, the index first, then by name.

    Raises:
        ClientError: No weight files, an unreadable index, or shards it names that are not in the directory.
    """
    directory = Path(directory)
    indexes = sorted(directory.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        indexes = [p for p in indexes if p.name.endswith(f".safetensors{INDEX_SUFFIX}")] or indexes
    if len(indexes) > 1:
        raise ClientError(f"{directory} holds several shard indexes ({', '.join(p.name for p in indexes)}); "
                          "send the files of one")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            names = sorted({str(n) for n in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ClientError(f"cannot read the shard index {indexes[0]}: {exc}") from exc
        missing = [n for n in names if Path(n).name != n or not (directory / n).is_file()]
        if missing:
            raise ClientError(f"{indexes[0].name} names shards that are not in {directory}: {', '.join(missing[:8])}")
        return [indexes[0], *(directory / n for n in names)]
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if not files:
        files = sorted(p for p in directory.glob("*.bin") if p.is_file() and p.name != "training_args.bin")
    if not files:
        raise ClientError(f"no checkpoint in {directory}: no *.index.json, *.safetensors or *.bin files")
    return files


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error(response: httpx.Response) -> ServiceError:
    problem: Any = None
    if response.content:
        try:
            problem = response.json()
        except ValueError:
            problem = None
    if not isinstance(problem, dict):
        problem = {"title": response.reason_phrase or "Error", "status": response.status_code}
        text = response.text.strip() if response.content else ""
        if text:
            problem["detail"] = text[:300]
    return error_from_problem(response.status_code, problem, retry_after=_retry_after(response))


def _parse(model: type[_M], response: httpx.Response) -> _M:
    try:
        return model.model_validate(response.json())
    except (ValueError, ValidationError) as exc:
        raise ClientError(f"unexpected {model.__name__} response from {response.request.url.path}: "
                          f"{str(exc)[:200]}") from exc


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            os.fchmod(out.fileno(), 0o666 & ~_umask())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _bool_field(value: bool) -> str:
    return "true" if value else "false"


def _labels_field(labels: Mapping[str, str] | None) -> str | None:
    return json.dumps(dict(labels), sort_keys=True) if labels else None


def _quote(segment: str) -> str:
    return quote(segment, safe="")


BodyFactory = Callable[[contextlib.ExitStack], dict[str, Any]]


class CheckpointClient:
    """A client for one checkpoint service.

    Example:
        >>> with CheckpointClient("http://ckpt:8000", token="...") as ckpt:
        ...     ckpt.push(Path("original.pth"), name="resnet-pretrained")
        ...     ckpt.merge("resnet-pretrained", Path("trained.pth"), architecture="resnet18",
        ...                output=Path("final.pth"))
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        token: str | None = None,
        http: httpx.Client | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Create a client.

        Args:
            base_url: The service's URL. Default: the injected client's `base_url`, else `DEFAULT_URL`.
            token: A bearer token (`read:` or `write:` scope on the service).
            http: An `httpx.Client` to use (a Starlette `TestClient` in tests); the caller closes it.
            timeout: The timeout of the client built when `http` is not given.
            retry: The retry policy for idempotent calls; default `RetryPolicy()`.
            sleep: What waits between retries (injected by tests and by callers with their own scheduler).
        """
        self._owns_http = http is None
        if http is None:
            http = httpx.Client(base_url=(base_url or DEFAULT_URL).rstrip("/"), timeout=timeout)
            base_url = None  # the client's base_url is used for relative paths
        self._http = http
        self._base = base_url.rstrip("/") if base_url else None
        self._headers = {"User-Agent": f"ckpt-client/{__version__}"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._foreign: httpx.Client | None = None  # for redirects to other hosts (presigned downloads)

    @property
    def base_url(self) -> str:
        """The URL requests go to."""
        return self._base or str(self._http.base_url).rstrip("/")

    def close(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http:
            self._http.close()
        if self._foreign is not None:
            self._foreign.close()

    def __enter__(self) -> CheckpointClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self._base}{path}" if self._base else path

    def _send(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        body: BodyFactory | None = None,
        stream: bool = False,
        ok_statuses: Sequence[int] = (),
        follow_redirects: bool = False,
    ) -> httpx.Response:
        # Each attempt rebuilds its body (files reopened), so a retried upload sends the bytes from the start.
        attempts = max(1, self.retry.attempts) if idempotent else 1
        clean_params = {k: v for k, v in (params or {}).items() if v is not None}
        for attempt in range(attempts):
            last = attempt == attempts - 1
            with contextlib.ExitStack() as stack:
                extra = body(stack) if body is not None else {}
                headers = {**self._headers, **extra.pop("headers", {})}
                request = self._http.build_request(method, self._url(path), params=clean_params,
                                                   json=json_body, headers=headers, **extra)
                try:
                    response = self._http.send(request, stream=stream, follow_redirects=False)
                    if follow_redirects and response.has_redirect_location:
                        response = self._follow(request, response, stream=stream)
                except httpx.TransportError as exc:
                    if last:
                        raise TransportError(f"{method} {path} failed: {type(exc).__name__}: {exc}") from exc
                    self._sleep(self.retry.delay(attempt, None))
                    continue
            if response.status_code in ok_statuses or response.status_code < 400:
                return response
            if not last and response.status_code in self.retry.statuses:
                delay = self.retry.delay(attempt, _retry_after(response))
                response.close()
                self._sleep(delay)
                continue
            if stream:
                response.read()
                response.close()
            raise _error(response)
        raise AssertionError("unreachable")  # pragma: no cover

    def _follow(self, request: httpx.Request, response: httpx.Response, *, stream: bool) -> httpx.Response:
        # Follow GET redirects (a download answered with a presigned object-store URL). The bearer token goes only
        # to the origin it was given for: a hop to another scheme, host or port drops `Authorization` (and is sent
        # by a plain HTTP client, not the injected one, which may be bound to the service). The artifact id the
        # service announced stays on the final response, so that the bytes are verified against it.
        announced = response.headers.get("x-checkpoint-id")
        origin = (request.url.scheme, request.url.host, request.url.port)
        for _ in range(_MAX_REDIRECTS):
            url = request.url.join(response.headers["location"])
            response.close()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
            same_origin = (url.scheme, url.host, url.port) == origin
            if not same_origin:
                headers.pop("authorization", None)
                headers.pop("Authorization", None)
            http = self._http if same_origin else self._foreign_http()
            request = http.build_request("GET", url, headers=headers)
            response = http.send(request, stream=stream, follow_redirects=False)
            if not response.has_redirect_location:
                if announced and "x-checkpoint-id" not in response.headers:
                    response.headers["X-Checkpoint-Id"] = announced
                return response
        response.close()
        raise ClientError(f"more than {_MAX_REDIRECTS} redirects from {origin[1]}")

    def _foreign_http(self) -> httpx.Client:
        if self._foreign is None:
            self._foreign = httpx.Client(timeout=self._http.timeout)
        return self._foreign

    # -- checkpoints ----------------------------------------------------------------------------------------

    def exists(self, ref: str) -> bool:
        """Tell whether the service has an artifact (`HEAD /checkpoints/{ref}`).

        Args:
            ref: An artifact id or a name.

        Returns:
            True when it exists.

        Raises:
            ServiceError: Any answer but 200 and 404 (e.g. `BadRequestError` for an invalid reference).
        """
        response = self._send("HEAD", f"/checkpoints/{_quote(ref)}", idempotent=True, ok_statuses=(404,))
        return response.status_code != 404

    def get(self, ref: str) -> ArtifactOut:
        """Read an artifact's metadata, with lineage (`GET /checkpoints/{ref}`).

        Args:
            ref: An artifact id or a name.

        Returns:
            The metadata.

        Raises:
            NotFoundError: No such artifact or name.
        """
        return _parse(ArtifactOut, self._send("GET", f"/checkpoints/{_quote(ref)}", idempotent=True))

    def manifest(self, ref: str) -> ManifestOut:
        """Read an artifact's manifest: key -> shape, dtype, byte size, fingerprint.

        Args:
            ref: An artifact id or a name.

        Returns:
            The manifest.

        Raises:
            NotFoundError: No such artifact or name.
        """
        return _parse(ManifestOut, self._send("GET", f"/checkpoints/{_quote(ref)}/manifest", idempotent=True))

    def push(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        filename: str | None = None,
        progress: Progress | None = None,
        container_key: str | None = None,
    ) -> PushResult:
        """Upload a checkpoint file, streamed from disk, unless the service already has its bytes.

        The file is hashed locally first; `HEAD /checkpoints/{sha256}` tells whether to send it. When it is
        sent, the digest goes along, and the service stores nothing if the bytes it received differ. For an
        artifact that exists, `name` is still pointed at it, while `labels` and `filename` are kept as they
        were (the service does the same for a repeated upload).

        A directory is a sharded checkpoint (`checkpoint_files` says which of its files are sent): its files go
        in one request, each followed by its sha256, and the service stores them as one artifact. There is no
        HEAD check first for a directory (the service's artifact is the combined file, whose digest only the
        service knows).

        A `container_key` other than the one the service's default rule picks stores the file as sent and
        answers with a derived artifact holding only that state_dict (lineage `extract`). The service derives
        it from the bytes of an upload, so with `container_key` the file is always sent (nothing is stored
        twice: the upload and the derived artifact are found by their ids). Shards take none.

        Args:
            path: The local file, or a directory of shards.
            name: Point this name at the artifact (the derived one, with `container_key`).
            labels: Key/value labels for a new artifact.
            filename: The filename to record; default the file's name.
            progress: Called with (bytes sent, total size of the files) while uploading.
            container_key: The state_dict to keep inside the file, a dotted path (`"state_dict_ema"`,
                `"model.ema"`); default: the service's rule (docs/files.md).

        Returns:
            The artifact, and whether bytes were sent and a new artifact stored.

        Raises:
            OSError: The file cannot be read.
            BadRequestError: The bytes changed while uploading (digest mismatch) or the name is invalid.
            UnprocessableError: The service refuses the file (corrupt, unsafe, unsupported), or `container_key`
                holds no state_dict (the problem names the keys that are there).
            PayloadTooLargeError: The file is over the service's limit.
        """
        path = Path(path)
        if path.is_dir():
            files = checkpoint_files(path)
            if len(files) > 1 or files[0].name.endswith(INDEX_SUFFIX):
                return self._push_files(files, name=name, labels=labels, progress=progress,
                                        container_key=container_key)
            path = files[0]
        size = path.stat().st_size
        digest = sha256_file(path)
        # With a container_key the service derives the artifact from the upload's bytes, so they are always sent.
        if container_key is None and self.exists(digest):
            if name is not None:
                self.set_name(name, digest)
            return PushResult(self.get(digest), uploaded=False, created=False)

        def body(stack: contextlib.ExitStack) -> dict[str, Any]:
            fh = stack.enter_context(path.open("rb"))
            return {"content": _iter_file(fh, _Counter(size, progress)),
                    "headers": {"Content-Type": "application/octet-stream", "Content-Length": str(size)}}

        params = {"sha256": digest, "filename": filename or path.name, "name": name,
                  "labels": _labels_field(labels), "container_key": container_key}
        response = self._send("POST", "/checkpoints", idempotent=True, params=params, body=body)
        return PushResult(_parse(ArtifactOut, response), uploaded=True, created=response.status_code == 201)

    def _push_files(self, files: Sequence[Path], *, name: str | None, labels: Mapping[str, str] | None,
                    progress: Progress | None, container_key: str | None) -> PushResult:
        # A container_key goes along so that the service says why shards take none, rather than dropping it.
        fields = [(k, v) for k, v in (("name", name), ("labels", _labels_field(labels)),
                                      ("container_key", container_key)) if v is not None]
        counter = _Counter(sum(p.stat().st_size for p in files), progress)

        def body(stack: contextlib.ExitStack) -> dict[str, Any]:
            counter.done = 0  # a retry sends everything again
            form = _StreamedForm(fields, [("file", "sha256", p) for p in files], counter, stack)
            return {"content": iter(form), "headers": form.headers()}

        response = self._send("POST", "/checkpoints", idempotent=True, body=body)
        return PushResult(_parse(ArtifactOut, response), uploaded=True, created=response.status_code == 201)

    def import_url(
        self,
        url: str | Sequence[str],
        *,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        container_key: str | None = None,
    ) -> ImportResult:
        """Have the service read a checkpoint from its object store (`POST /checkpoints/import`): no bytes pass here.

        The service reads `s3://bucket/key` itself, with its own credentials, if the object lies under a prefix it
        allows (`CKPT_IMPORT_ALLOWED`), and stores it as an upload would be (the same checks), with lineage
        `import` recording the URL. Retried like `push`: the bytes are stored by digest, so a repeat can only
        return the same artifact.

        Args:
            url: `s3://bucket/key`; or a list of them, the shards of one checkpoint and its `*.index.json`, which
                the service combines into one artifact as it does uploaded shards.
            name: Point this name at the artifact.
            labels: Key/value labels for a new artifact.
            container_key: The state_dict to use inside the file (dotted); a non-default one answers with a
                derived artifact holding that state_dict alone.

        Returns:
            The artifact, and whether this import stored it.

        Raises:
            BadRequestError: Not an s3:// object URL.
            AuthError: 403 when the object is outside the service's allowed prefixes, or import is off.
            NotFoundError: No such object.
            PayloadTooLargeError: The object is over the service's upload limit.
            UnprocessableError: The service refuses the file (corrupt, unsafe, unsupported).
            ServiceError: 502 when the object store failed.
        """
        payload: dict[str, Any] = {"url": url} if isinstance(url, str) else {"urls": list(url)}
        if name is not None:
            payload["name"] = name
        if labels:
            payload["labels"] = dict(labels)
        if container_key is not None:
            payload["container_key"] = container_key
        response = self._send("POST", "/checkpoints/import", idempotent=True, json_body=payload)
        return ImportResult(_parse(ArtifactOut, response), created=response.status_code == 201)

    def pull(
        self,
        ref: str,
        dest: str | os.PathLike[str],
        *,
        format: OutputFormat | None = None,
        progress: Progress | None = None,
    ) -> PullResult:
        """Download an artifact, verified, to a file.

        The bytes stream into a temp file in the destination's directory while they are hashed; the file is
        renamed into place only when its sha256 equals the artifact id (the `X-Checkpoint-Id` header, and
        `ref` itself when it is an id). On any failure no file is left at the destination or beside it.

        Args:
            ref: An artifact id, an id prefix or a name.
            dest: The file to write, or a directory: an existing one, or any path ending in "/" (created). In a
                directory the file is named after the name (`NAME.pth`) when `ref` is a name, else after the
                service's filename (the id's first 16 digits). The file gets the process umask's permissions
                (0644 under the usual 022), like any file the user creates.
            format: Convert on the way out (`"safetensors"` or `"pth"`); default the stored format.
            progress: Called with (bytes received, total or None) while downloading.

        Returns:
            The path written, with the artifact id and size.

        Raises:
            NotFoundError: No such artifact or name.
            IntegrityError: The bytes do not hash to the artifact id.
            TransportError: The connection failed on every attempt.
            OSError: The destination cannot be written.
        """
        # A trailing slash means a directory, existing or not (`-o out/`), never a file named "out".
        as_dir = os.fspath(dest).endswith(("/", os.sep))
        dest = Path(dest)
        if as_dir:
            dest.mkdir(parents=True, exist_ok=True)
        expected = ref.lower() if format is None and _HEX64.match(ref.lower()) else None
        attempts = max(1, self.retry.attempts)
        for attempt in range(attempts):
            try:
                return self._download_once(ref, dest, format=format, expected=expected, progress=progress)
            except (httpx.TransportError, httpx.StreamError) as exc:
                # Broke mid-body: the partial file is gone already; start over (downloads are idempotent).
                if attempt == attempts - 1:
                    raise TransportError(f"download of {ref!r} failed: {type(exc).__name__}: {exc}") from exc
                self._sleep(self.retry.delay(attempt, None))
        raise AssertionError("unreachable")  # pragma: no cover

    def _download_once(self, ref: str, dest: Path, *, format: OutputFormat | None, expected: str | None,
                       progress: Progress | None) -> PullResult:
        response = self._send("GET", f"/checkpoints/{_quote(ref)}/file", idempotent=True,
                              params={"format": format}, stream=True, follow_redirects=True)
        try:
            announced = response.headers.get("x-checkpoint-id") or response.headers.get("etag", "").strip('"')
            announced = announced.lower()
            if not _HEX64.match(announced):
                raise ClientError(f"the service sent no artifact id for {ref!r}; cannot verify the download")
            if expected is not None and announced != expected:
                raise IntegrityError(f"asked for {expected}, the service sent {announced}",
                                     expected=expected, actual=announced)
            target = dest / self._download_name(response, announced, ref) if dest.is_dir() else dest
            length = response.headers.get("content-length")
            counter = _Counter(int(length) if length and length.isdigit() else None, progress)
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            tmp = Path(tmp_name)
            size = 0
            try:
                digest = hashlib.sha256()
                with os.fdopen(fd, "wb") as out:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                        counter.add(len(chunk))
                    out.flush()
                    os.fchmod(out.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 is for the partial file only
                    os.fsync(out.fileno())
                actual = digest.hexdigest()
                if actual != announced:
                    raise IntegrityError(
                        f"the download of {ref!r} hashes to {actual}, not to its id {announced}",
                        expected=announced, actual=actual)
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return PullResult(path=target, id=announced, size=size)
        finally:
            response.close()

    @staticmethod
    def _download_name(response: httpx.Response, artifact_id: str, ref: str = "") -> str:
        disposition = response.headers.get("content-disposition", "")
        match = re.search(r'filename="?([^";]+)"?', disposition)
        # Only a base name from the server: a hostile "../x" must not escape the destination directory.
        name = Path(match.group(1)).name if match else ""
        if name in ("", ".", ".."):
            name = f"{artifact_id[:16]}.pth"
        if ref and not artifact_id.startswith(ref.lower()) and _SAFE_FILE_NAME.fullmatch(ref):
            # Pulled by name: name the file after it, with the extension of what the service sent.
            name = ref + (Path(name).suffix or ".pth")
        return name

    def pull_shards(
        self,
        ref: str,
        directory: str | os.PathLike[str],
        *,
        max_shard_size: str | int = "5GB",
        progress: Progress | None = None,
    ) -> ShardsResult:
        """Download an artifact as transformers' sharded safetensors: the index and every shard, into a directory.

        The service splits the checkpoint on the fly (`GET /checkpoints/{ref}/shards`); the directory then holds
        ``model.safetensors.index.json`` and ``model-0000x-of-0000y.safetensors``, which, next to the model's
        config.json, `from_pretrained` loads. Each shard goes to a temp file first and is renamed into place
        when its size is the one the index announced.

        Args:
            ref: An artifact id, an id prefix or a name.
            directory: Where to write (created if missing).
            max_shard_size: The most tensor bytes in a shard: bytes, or "500MB", "5GB", "2GiB".
            progress: Called with (bytes received, total of all shards).

        Returns:
            The directory, the files written and the artifact id.

        Raises:
            NotFoundError: No such artifact or name.
            UnprocessableError: A dtype safetensors cannot hold.
            IntegrityError: A shard's size is not the announced one.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        params = {"max_shard_size": str(max_shard_size)}
        index = _parse(ShardIndexOut, self._send("GET", f"/checkpoints/{_quote(ref)}/shards", idempotent=True,
                                                 params=params))
        counter = _Counter(sum(s.size for s in index.shards), progress)
        written = [directory / "model.safetensors.index.json"]
        for number, shard in enumerate(index.shards, start=1):
            name = Path(shard.name).name  # a base name only, whatever the service says
            attempts = max(1, self.retry.attempts)
            for attempt in range(attempts):
                done = counter.done
                try:
                    self._download_shard(index.id, number, params, directory / name, shard.size, counter)
                    break
                except (httpx.TransportError, httpx.StreamError) as exc:
                    counter.done = done
                    if attempt == attempts - 1:
                        raise TransportError(f"download of shard {number} of {ref!r} failed: {exc}") from exc
                    self._sleep(self.retry.delay(attempt, None))
            written.append(directory / name)
        # transformers' own layout, without the service's extra fields
        text = json.dumps({"metadata": index.metadata.model_dump(), "weight_map": index.weight_map}, indent=2)
        _write_atomically(written[0], text.encode())
        return ShardsResult(directory, index.id, tuple(written), sum(s.size for s in index.shards))

    def _download_shard(self, artifact_id: str, number: int, params: Mapping[str, str], target: Path, size: int,
                        counter: _Counter) -> None:
        response = self._send("GET", f"/checkpoints/{artifact_id}/shards/{number}", idempotent=True,
                              params=params, stream=True)
        try:
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            tmp = Path(tmp_name)
            received = 0
            try:
                with os.fdopen(fd, "wb") as out:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        out.write(chunk)
                        received += len(chunk)
                        counter.add(len(chunk))
                    os.fchmod(out.fileno(), 0o666 & ~_umask())
                    out.flush()
                    os.fsync(out.fileno())
                if received != size:
                    raise IntegrityError(f"shard {number} has {received} bytes, not the announced {size}",
                                         expected=str(size), actual=str(received))
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        finally:
            response.close()

    def list_checkpoints(
        self,
        *,
        name: str | None = None,
        label: str | None = None,
        operation: Literal["strip", "merge", "convert", "upload"] | None = None,
        format: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> ArtifactPage:
        """List artifacts, newest first, one page at a time.

        Args:
            name: Only the artifact this name points to.
            label: `"key"` or `"key=value"`.
            operation: Only artifacts made by this operation.
            format: Only artifacts in this format (e.g. `"pth-zip"`, `"safetensors"`).
            limit: Page size (1-500).
            cursor: `next_cursor` of the previous page.

        Returns:
            One page, with `next_cursor` (None on the last page) and `total`.
        """
        params = {"name": name, "label": label, "operation": operation, "format": format, "limit": limit,
                  "cursor": cursor}
        return _parse(ArtifactPage, self._send("GET", "/checkpoints", idempotent=True, params=params))

    def iter_checkpoints(
        self,
        *,
        name: str | None = None,
        label: str | None = None,
        operation: Literal["strip", "merge", "convert", "upload"] | None = None,
        format: str | None = None,
        page_size: int = 200,
    ) -> Iterator[ArtifactOut]:
        """Iterate over every artifact that matches, following the cursor across pages.

        Args:
            name: As for `list_checkpoints`.
            label: As for `list_checkpoints`.
            operation: As for `list_checkpoints`.
            format: As for `list_checkpoints`.
            page_size: Artifacts per request.

        Returns:
            An iterator of artifacts, newest first.
        """
        cursor: str | None = None
        while True:
            page = self.list_checkpoints(name=name, label=label, operation=operation, format=format,
                                         limit=page_size, cursor=cursor)
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def delete(self, ref: str, *, force: bool = False) -> DeleteResult:
        """Delete an artifact.

        Args:
            ref: An artifact id or a name.
            force: Also remove the names that point to it (otherwise 409).

        Returns:
            The id deleted and the names removed.

        Raises:
            NotFoundError: No such artifact or name.
            ConflictError: Names point to it and `force` is False.
        """
        response = self._send("DELETE", f"/checkpoints/{_quote(ref)}", idempotent=True,
                              params={"force": force})
        try:
            data = response.json()
            return DeleteResult(id=str(data["deleted"]), names_removed=tuple(data.get("names_removed") or ()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ClientError(f"unexpected delete response: {response.text[:200]!r}") from exc

    def label(
        self, ref: str, *, set: Mapping[str, str] | None = None, remove: Sequence[str] = ()  # noqa: A002
    ) -> ArtifactOut:
        """Set and delete labels of an artifact in one transaction (`PATCH /checkpoints/{ref}`).

        Args:
            ref: An artifact id or a name.
            set: Keys to add or overwrite.
            remove: Keys to delete (absent ones are ignored).

        Returns:
            The artifact as it is now; `labels_changed` says which keys were added, changed and removed.

        Raises:
            NotFoundError: No such artifact or name.
            BadRequestError: A bad key or value.
        """
        body: dict[str, str | None] = {k: None for k in remove}
        body.update(set or {})
        return _parse(ArtifactOut, self._send("PATCH", f"/checkpoints/{_quote(ref)}", idempotent=True,
                                              json_body={"labels": body}))

    # -- names ----------------------------------------------------------------------------------------------

    def set_name(self, name: str, ref: str) -> NameOut:
        """Point a name at an artifact (create or move it).

        Args:
            name: The name.
            ref: An artifact id or another name.

        Returns:
            The name and the id it now points to.

        Raises:
            NotFoundError: `ref` does not resolve.
            BadRequestError: The name is not valid.
        """
        return _parse(NameOut, self._send("PUT", f"/names/{_quote(name)}", idempotent=True,
                                          json_body={"id": ref}))

    def list_names(self) -> list[NameOut]:
        """List every name and the id it points to, sorted by name.

        Returns:
            The names.
        """
        response = self._send("GET", "/names", idempotent=True)
        try:
            return [NameOut.model_validate(item) for item in response.json()]
        except (ValueError, ValidationError) as exc:
            raise ClientError(f"unexpected /names response: {str(exc)[:200]}") from exc

    def delete_name(self, name: str) -> None:
        """Remove a name; the artifact stays.

        Args:
            name: The name.

        Raises:
            NotFoundError: No such name.
        """
        self._send("DELETE", f"/names/{_quote(name)}", idempotent=True)

    # -- operations -----------------------------------------------------------------------------------------

    def strip(
        self,
        ref: str,
        *,
        prefixes: Sequence[str] | None = None,
        output_format: OutputFormat = "pth",
        name: str | None = None,
        like: str | None = None,
        like_architecture: str | None = None,
        container_key: str | None = None,
    ) -> OperationOut:
        """Remove wrapper prefixes (`module.` and friends) and store the result. Not retried.

        Args:
            ref: An artifact id or a name.
            prefixes: The prefixes to remove; default: detect the known wrappers (and a Lightning checkpoint's
                LightningModule attribute).
            output_format: `"pth"` or `"safetensors"`.
            name: Point this name at the result.
            like: Instead of `prefixes`: rename (strip or add prefixes) so that the keys line up with this stored
                checkpoint's (an id or name).
            like_architecture: Instead of `prefixes`: line the keys up with a registered architecture's.
            container_key: The state_dict to use inside the file (dotted, e.g. `"state_dict_ema"`); default: the
                one chosen at upload.

        Returns:
            The stored result and the strip report (`report["transform"]`, `report["matched"]` with `like*`).

        Raises:
            NotFoundError: No such artifact, name or architecture.
            BadRequestError: `prefixes` together with `like` or `like_architecture`.
            UnprocessableError: Two keys would collide after stripping, or `container_key` holds no state_dict.
            OverloadedError: The service is busy (`retry_after`).
        """
        payload: dict[str, Any] = {"checkpoint": ref, "prefixes": list(prefixes) if prefixes is not None else None,
                                   "output_format": output_format, "name": name, "container_key": container_key}
        if like is not None:
            payload["like"] = like
        if like_architecture is not None:
            payload["like_architecture"] = like_architecture
        return _parse(OperationOut, self._send("POST", "/strip", idempotent=False, json_body=payload))

    def _local_or_ref(self, source: Source) -> tuple[str | None, Path | None, str | None]:
        # (ref, path, digest): a stored file becomes its id, so its bytes are not sent again.
        if isinstance(source, os.PathLike):
            path = Path(source)
            digest = sha256_file(path)
            if self.exists(digest):
                return digest, None, digest
            return None, path, digest
        return str(source), None, None

    def diff(
        self,
        a: Source,
        b: Source,
        *,
        normalize_prefixes: bool | Literal["align"] = False,
        values: bool = False,
        frozen: bool | Sequence[str] = False,
        categories: Sequence[str] | None = None,
        key_prefix: str | None = None,
        limit: int = 1000,
        a_container_key: str | None = None,
        b_container_key: str | None = None,
    ) -> DiffOut:
        """Diff two checkpoints by key, shape, dtype and content fingerprint.

        Stored artifacts (ids or names, as `str`) are diffed with `GET /diff`. Local files (`Path`s) are
        hashed first: when the service has them, they are diffed by id; otherwise both sides go to
        `POST /diff` as files, which stores nothing. `POST /diff` takes two files, so a stored artifact
        diffed against a new local file is downloaded (verified) to a temp directory first. A directory of
        shards (`checkpoint_files`) goes to `POST /diff` as it is, with the other side as a file or a ref.

        Args:
            a: The first checkpoint (the original, for the frozen check).
            b: The second checkpoint.
            normalize_prefixes: Strip wrapper prefixes on both sides before comparing; `"align"` renames each
                side with the transform that gives the most keys in common (`DiffOut.alignment` says which).
            values: Also compute value statistics of changed tensors (heavier: opens the files).
            frozen: True checks that a's parameters are unchanged in b; a list of key prefixes checks those.
            categories: Only these key categories (`only_in_a`, `only_in_b`, `shape_mismatch`,
                `dtype_mismatch`, `changed`, `unchanged`).
            key_prefix: Only keys under this prefix.
            limit: At most this many keys per category.
            a_container_key: The state_dict to use inside `a` (dotted, e.g. `"state_dict_ema"`); default: the one
                chosen at upload, or the service's rule for a file.
            b_container_key: The same for `b`.

        Returns:
            The diff.

        Raises:
            NotFoundError: A reference does not resolve.
        """
        frozen_param: str | None
        if isinstance(frozen, bool):
            frozen_param = "true" if frozen else None
        else:
            frozen_param = ",".join(frozen) if frozen else None
        params: dict[str, Any] = {"normalize_prefixes": normalize_prefixes, "values": values,
                                  "frozen": frozen_param, "key_prefix": key_prefix, "limit": limit,
                                  "category": list(categories) if categories else None,
                                  "a_container_key": a_container_key, "b_container_key": b_container_key}
        if any(isinstance(s, os.PathLike) and Path(s).is_dir() for s in (a, b)):
            return self._diff_posted(a, b, params)
        ref_a, path_a, _ = self._local_or_ref(a)
        ref_b, path_b, _ = self._local_or_ref(b)
        if ref_a is not None and ref_b is not None:
            response = self._send("GET", "/diff", idempotent=True, params={"a": ref_a, "b": ref_b, **params})
            return _parse(DiffOut, response)
        with tempfile.TemporaryDirectory(prefix="ckpt-diff-") as tmp:
            # Read-only semantics: fetch the stored side rather than push the local file (which would store it).
            pa = path_a or self.pull(str(ref_a), Path(tmp) / "a").path
            pb = path_b or self.pull(str(ref_b), Path(tmp) / "b").path

            def body(stack: contextlib.ExitStack) -> dict[str, Any]:
                files = [(part, (p.name, stack.enter_context(p.open("rb")), "application/octet-stream"))
                         for part, p in (("a", pa), ("b", pb))]
                return {"files": files}

            return _parse(DiffOut, self._send("POST", "/diff", idempotent=True, params=params, body=body))

    def _diff_posted(self, a: Source, b: Source, params: Mapping[str, Any]) -> DiffOut:
        # A directory of shards goes as repeated parts; a file as one part; a stored side as its ref.
        fields: list[tuple[str, str]] = []
        uploads: list[FilePart] = []
        for role, source in (("a", a), ("b", b)):
            if not isinstance(source, os.PathLike):
                fields.append((role, str(source)))
            else:
                uploads += _role_parts(role, checkpoint_files(source) if Path(source).is_dir() else [Path(source)])

        def body(stack: contextlib.ExitStack) -> dict[str, Any]:
            form = _StreamedForm(fields, uploads, _Counter(None, None), stack)
            return {"content": iter(form), "headers": form.headers()}

        return _parse(DiffOut, self._send("POST", "/diff", idempotent=True, params=params, body=body))

    def merge(
        self,
        original: Source,
        trained: Source,
        *,
        architecture: str,
        strip_prefixes: Literal["auto", "known", "none"] | Sequence[str] = "auto",
        drop_unexpected: bool = False,
        output_format: OutputFormat = "pth",
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        frozen_prefixes: Sequence[str] | None = None,
        require_frozen: bool = False,
        frozen_atol: float | None = None,
        output: str | os.PathLike[str] | None = None,
        progress: Progress | None = None,
        require_complete: bool = False,
        allow_swapped: bool = False,
        original_container_key: str | None = None,
        trained_container_key: str | None = None,
    ) -> OperationOut:
        """Merge a trained checkpoint with its original and verify it strictly against an architecture.

        The recipe's post-processing: keys the trained state_dict lacks (BatchNorm running stats dropped by
        `track_running_stats=False`) are filled from the original, and the result must pass
        `load_state_dict(strict=True)`; otherwise nothing is stored. A local original (`Path`) is hashed first and
        sent as its id when the service has it. Uploads are streamed, each followed by the sha256 of the bytes
        sent (hashed while sending); a trained file is always uploaded, without hashing it first. Retried (like a
        push) only when both inputs go as artifact ids: see the module's note on retries.

        Args:
            original: The pretrained checkpoint: an id or name (`str`), a local file or a directory of shards
                (`Path`, see `checkpoint_files`), or an `s3://bucket/key` (`str`) that the service reads itself and
                stores as an imported artifact (under its `CKPT_IMPORT_ALLOWED` prefixes).
            trained: The fine-tuned checkpoint, the same way; its values win.
            architecture: A registered architecture name.
            strip_prefixes: `"auto"` (match the architecture), `"known"`, `"none"`, or explicit prefixes.
            drop_unexpected: Drop keys the architecture does not have instead of failing.
            output_format: `"pth"` or `"safetensors"`.
            name: Point this name at the result.
            labels: Key/value labels for the result.
            frozen_prefixes: Key prefixes of the frozen part. Without them there is no frozen check, only the
                per-module rollup of what changed (`report["changes"]`); with them, changed frozen tensors are a
                warning naming each with its max abs and relative change.
            require_frozen: With `frozen_prefixes`: a changed frozen tensor fails the merge
                (`VerificationError`, title "Frozen part changed") and nothing is stored.
            frozen_atol: Largest absolute difference of a frozen tensor still counted as unchanged.
            output: Also download the verified result to this file (or directory).
            progress: Called with (bytes done, total) during the uploads and the download.
            require_complete: A parameter taken from the original (anything but BatchNorm running stats) fails
                the merge (`VerificationError`, title "Trained checkpoint incomplete", `problem["filled_keys"]`).
            allow_swapped: Merge even when original and trained look swapped (refused otherwise).
            original_container_key: The state_dict to use inside the original (dotted); default: the one chosen
                at upload, or the service's rule for a file.
            trained_container_key: The same for the trained checkpoint, e.g. `"state_dict_ema"` to merge the EMA
                weights a training framework saved next to the others.

        Returns:
            The stored result and the merge report (`report["verification"]`, `report["filled"]`,
            `report["filled_parameters"]`, `report["warnings"]`, ...).

        Raises:
            VerificationError: The merged state_dict does not load strictly (`missing_keys`,
                `unexpected_keys`, `report`); or require_complete, require_frozen or the swap check refused it.
            NotFoundError: A reference or the architecture does not exist.
            OverloadedError: The service is busy (`retry_after`).
            IntegrityError: The downloaded result does not hash to its id.
        """
        fields: list[tuple[str, str]] = [
            ("architecture", architecture),
            ("strip_prefixes",
             strip_prefixes if isinstance(strip_prefixes, str) else ",".join(strip_prefixes)),
            ("drop_unexpected", _bool_field(drop_unexpected)),
            ("output_format", output_format),
        ]
        if name is not None:
            fields.append(("name", name))
        if labels:
            fields.append(("labels", _labels_field(labels) or ""))
        if frozen_prefixes is not None:
            fields.append(("frozen_prefixes", ",".join(frozen_prefixes)))
        if require_frozen:
            fields.append(("require_frozen", "true"))
        if frozen_atol is not None:
            fields.append(("frozen_atol", repr(float(frozen_atol))))
        if require_complete:
            fields.append(("require_complete", "true"))
        if allow_swapped:
            fields.append(("allow_swapped", "true"))
        for field_name, key in (("original_container_key", original_container_key),
                                ("trained_container_key", trained_container_key)):
            if key is not None:
                fields.append((field_name, key))
        uploads: list[FilePart] = []
        for role, source in (("original", original), ("trained", trained)):
            path: Path | None
            if isinstance(source, os.PathLike) and Path(source).is_dir():
                uploads += _role_parts(role, checkpoint_files(source))  # shards: always sent, no HEAD first
                continue
            if role == "trained" and isinstance(source, os.PathLike):
                # A freshly trained file is new to the service: asking first would cost a full read to hash it.
                ref, path = None, Path(source)
            else:
                ref, path, _ = self._local_or_ref(source)
            if ref is not None:
                fields.append((role, ref))
            else:
                assert path is not None
                uploads += _role_parts(role, [path])
        counter = _Counter(sum(p.stat().st_size for _, _, p in uploads), progress)

        def body(stack: contextlib.ExitStack) -> dict[str, Any]:
            # Always multipart, files or not (the service reads only multipart); each file's sha256 follows it.
            form = _StreamedForm(fields, uploads, counter, stack)
            return {"content": iter(form), "headers": form.headers()}

        # Inputs by id only: the same request gives the same artifact, so a retry is safe (a name could move).
        by_id = not uploads and all(_HEX64.match(v) for k, v in fields if k in ("original", "trained"))
        result = _parse(OperationOut, self._send("POST", "/merge", idempotent=by_id, body=body))
        if output is not None:
            self.pull(result.id, output, progress=progress)
        return result

    # -- architectures --------------------------------------------------------------------------------------

    def list_architectures(self, *, matches: str | None = None) -> ArchitectureList:
        """List the registered architectures, and the ones that failed to load (`issues`).

        Args:
            matches: A stored checkpoint (id or name): also rank the architectures by how well it fits them
                (`matches.ranking`, best first), after the prefix transform that fits each best.

        Returns:
            The list.

        Raises:
            NotFoundError: `matches` does not resolve.
        """
        params = {"matches": matches} if matches is not None else None
        return _parse(ArchitectureList, self._send("GET", "/architectures", idempotent=True, params=params))

    def get_architecture(self, name: str) -> ArchitectureOut:
        """Read one architecture with its expected keys, shapes and dtypes.

        Args:
            name: The architecture name.

        Returns:
            The architecture.

        Raises:
            NotFoundError: No such architecture.
        """
        return _parse(ArchitectureOut, self._send("GET", f"/architectures/{_quote(name)}", idempotent=True))

    def register_architecture(
        self,
        name: str,
        *,
        from_checkpoint: str | None = None,
        keys: Mapping[str, Mapping[str, Any]] | None = None,
        description: str | None = None,
    ) -> ArchitectureOut:
        """Register a code-free architecture spec. Not retried.

        Args:
            name: The new architecture's name.
            from_checkpoint: Take keys, shapes and dtypes from this stored artifact (id or name).
            keys: Or give them: key -> {"shape": [...], "dtype": "float32"}.
            description: A short description.

        Returns:
            The registered architecture.

        Raises:
            ValueError: Neither or both of `from_checkpoint` and `keys`.
            ConflictError: The name exists.
        """
        if (from_checkpoint is None) == (keys is None):
            raise ValueError("give exactly one of from_checkpoint and keys")
        payload: dict[str, Any] = {"name": name, "description": description}
        if from_checkpoint is not None:
            payload["from_checkpoint"] = from_checkpoint
        if keys is not None:
            payload["keys"] = {k: dict(v) for k, v in keys.items()}
        response = self._send("POST", "/architectures", idempotent=False, json_body=payload)
        return _parse(ArchitectureOut, response)

    def delete_architecture(self, name: str) -> None:
        """Remove a spec-registered architecture.

        Args:
            name: The architecture name.

        Raises:
            NotFoundError: No such architecture.
            ConflictError: Built-in, config and plugin architectures cannot be removed.
        """
        self._send("DELETE", f"/architectures/{_quote(name)}", idempotent=True)

    # -- health ---------------------------------------------------------------------------------------------

    def health(self) -> Health:
        """Liveness (`GET /healthz`).

        Returns:
            `status == "ok"` when the process answers.
        """
        return _parse(Health, self._send("GET", "/healthz", idempotent=True))

    def fsck(self, *, repair: bool = False, deep: bool = False) -> FsckOut:
        """Check that the store's index and blobs agree (`POST /admin/fsck`, admin scope).

        Args:
            repair: Unpublish broken artifacts and remove old orphan blobs (what is safe to repair).
            deep: Re-hash every blob (reads everything).

        Returns:
            The report; `ok` is False when an artifact is broken.
        """
        params = {"repair": "true" if repair else None, "deep": "true" if deep else None}
        return _parse(FsckOut, self._send("POST", "/admin/fsck", idempotent=not repair, params=params))

    def gc(self, *, apply: bool = False) -> GcOut:
        """Run the retention policy (`POST /admin/gc`, admin scope): a dry run unless `apply`.

        Returns:
            What was removed (or would be) and how many bytes.
        """
        return _parse(GcOut, self._send("POST", "/admin/gc", idempotent=not apply, json_body={"dry_run": not apply}))

    def ready(self) -> Readiness:
        """Readiness (`GET /readyz`), asked once: a not-ready service is an answer, not an error.

        Returns:
            `status` is `"ok"`, `"degraded"` or `"unavailable"` (the worst of the `checks`), with each check's
            status and detail.
        """
        response = self._send("GET", "/readyz", idempotent=False, ok_statuses=(503,))
        return _parse(Readiness, response)
