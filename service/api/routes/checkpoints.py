"""Checkpoints and names: upload, read, download, list, delete."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from datetime import datetime
from pathlib import Path as LocalPath
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from service.api.blobresponse import BlobResponse
from service.api.deps import (
    ArtifactDep,
    ReadAuth,
    ReadOrSignedAuth,
    RefPath,
    Services,
    ServicesDep,
    StoreDep,
    WriteAuth,
)
from service.api.problems import problem_responses
from service.api.schemas import (
    ArtifactOut,
    ArtifactPage,
    DeletedOut,
    DownloadUrlOut,
    ImportIn,
    LabelsPatchIn,
    ManifestOut,
    NameIn,
    NameOut,
    ShardIndexMetadata,
    ShardIndexOut,
    ShardOut,
    TensorEntryOut,
)
from service.api.uploads import is_sharded, parse_multipart, read_raw_body, uploaded_files
from service.api.work import Admission
from service.core.formats import Format, find_format, writer_for
from service.core.formats.pth_zip import FORMAT as PTH_ZIP
from service.core.sharding import parse_size
from service.errors import InvalidRequest
from service.format_names import OutputFormat
from service.operations import UploadedFile
from service.store import (
    NAME_RE,
    ArtifactMeta,
    ArtifactStore,
    IngestResult,
    PendingUpload,
    is_id,
)
from service.store.types import LabelChanges

router = APIRouter()

SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
NAME_PATTERN = NAME_RE

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "The checkpoint file; or the shards of one checkpoint (repeat the "
                            "part), with their index (a file named '*.index.json') when there is one: they are "
                            "checked against it and stored as one artifact.",
                        },
                        "name": {
                            "type": "string",
                            "pattern": NAME_PATTERN,
                            "description": "Point this name at the artifact.",
                        },
                        "labels": {"type": "string", "description": 'JSON object or "k=v,k2=v2".'},
                        "sha256": {
                            "type": "array",
                            "items": {"type": "string", "pattern": SHA256_PATTERN},
                            "description": "The digest the client expects, one per file part in the order of the "
                            "parts; a mismatch stores nothing.",
                        },
                        "container_key": {
                            "type": "string",
                            "description": "The state_dict to use inside the file (dotted, e.g. 'model.ema'). "
                            "When it is not the default one, the upload is stored as sent and the answer is a "
                            "derived artifact holding that state_dict alone (lineage 'extract').",
                        },
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def parse_labels(raw: str | None) -> dict[str, str]:
    """Labels from a JSON object or `k=v,k2=v2`."""
    if not raw:
        return {}
    if raw.lstrip().startswith("{"):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"labels is not valid JSON: {exc.msg}") from exc
        except RecursionError as exc:  # a deeply nested document is not a flat object of labels anyway
            raise InvalidRequest("labels is nested too deeply; expected a flat JSON object of strings") from exc
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise InvalidRequest("labels must be a JSON object of strings")
        return {str(k): v for k, v in data.items()}
    out: dict[str, str] = {}
    for item in raw.split(","):
        key, sep, value = item.strip().partition("=")
        if not key or not sep:
            raise InvalidRequest(f"label {item.strip()!r} is not of the form key=value")
        out[key] = value
    return out


def artifact_out(request: Request, meta: ArtifactMeta, changes: LabelChanges | None = None) -> ArtifactOut:
    data = meta.to_dict()
    data["names"] = list(meta.names)
    data["labels_changed"] = changes.to_dict() if changes is not None else None
    data["download_url"] = str(request.url_for("download_checkpoint", ref=meta.id))
    return ArtifactOut.model_validate(data)


async def point_name(store: ArtifactStore, name: str, artifact_id: str) -> ArtifactMeta:
    """Point `name` at the artifact and return its metadata, read again so that `names` includes it."""
    await anyio.to_thread.run_sync(store.set_name, name, artifact_id)
    meta: ArtifactMeta = await anyio.to_thread.run_sync(store.metadata, artifact_id)
    return meta


async def commit_upload(
    services: Any,
    slot: Admission,
    upload: PendingUpload,
    *,
    expected: str | None,
    filename: str | None,
    labels: dict[str, str],
    name: str | None,
    container_key: str | None = None,
) -> IngestResult:
    return await ingest(
        services, slot,
        lambda: services.operations.commit_upload(
            upload, expected_sha256=expected.lower() if expected else None, filename=filename, labels=labels,
            container_key=container_key,
        ),
        name=name,
    )


async def ingest(
    services: Any, slot: Admission, commit: Callable[[], IngestResult], *, name: str | None
) -> IngestResult:
    """Run `commit` (which publishes an artifact) in the slot, count its bytes, and point `name` at it."""
    store = services.store
    if name is not None:
        store.check_settable_name(name)  # refuse a bad name before the heavy work
    result: IngestResult = await slot.run(commit)
    if result.created:
        services.metrics.bytes_ingested.inc(result.artifact.size)
    if name is not None:
        result = replace(result, artifact=await point_name(store, name, result.artifact.id))
    return result


def _ingested(request: Request, response: Response, result: IngestResult) -> ArtifactOut:
    response.status_code = 201 if result.created else 200
    response.headers["Location"] = str(request.url_for("get_checkpoint", ref=result.artifact.id))
    return artifact_out(request, result.artifact, result.labels_changed)


@router.post(
    "/checkpoints",
    status_code=201,
    response_model=ArtifactOut,
    operation_id="upload_checkpoint",
    summary="Upload a checkpoint",
    tags=["checkpoints"],
    dependencies=[WriteAuth],
    openapi_extra=UPLOAD_BODY,
    responses={
        200: {"model": ArtifactOut, "description": "Already stored: the existing artifact."},
        **problem_responses(400, 401, 403, 404, 408, 413, 422, 503, 507),
    },
)
async def upload_checkpoint(
    request: Request,
    response: Response,
    services: ServicesDep,
    name: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
    labels: Annotated[str | None, Query(max_length=4096)] = None,
    sha256: Annotated[str | None, Query(pattern=SHA256_PATTERN)] = None,
    filename: Annotated[str | None, Query(max_length=1024)] = None,
    container_key: Annotated[str | None, Query(min_length=1, max_length=1024)] = None,
) -> ArtifactOut:
    """Upload one checkpoint (multipart `file`, repeated for shards; or a raw application/octet-stream body)."""
    # Admitted before a byte of the body is read: a full pool answers 503 at once.
    async with services.pool.admit() as slot:
        return await _upload(request, response, services, slot, name, labels, sha256, filename, container_key)


async def _upload(
    request: Request,
    response: Response,
    services: Any,
    slot: Admission,
    name: str | None,
    labels: str | None,
    sha256: str | None,
    filename: str | None,
    container_key: str | None,
) -> ArtifactOut:
    limit = services.operations.max_upload_bytes
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await parse_multipart(
            request,
            services.store,
            file_fields=frozenset({"file"}),
            text_fields=frozenset({"name", "labels", "sha256", "container_key"}),
            max_file_bytes=limit,
            repeatable=frozenset({"file", "sha256"}),
            max_request_bytes=services.operations.max_request_bytes,
        )
        try:
            files = uploaded_files(form, "file", "sha256")
            if not files:
                raise InvalidRequest("the multipart form has no file part 'file'")
        except BaseException:
            await form.abort()
            raise
        name = form.fields.get("name", name)
        labels = form.fields.get("labels", labels)
        container_key = form.fields.get("container_key", container_key) or None
        if is_sharded(files):
            return await _upload_shards(request, response, services, slot, files, name, labels, container_key)
        upload, filename = files[0].upload, files[0].filename
        sha256 = files[0].expected_sha256 or sha256
    elif content_type.startswith("application/octet-stream") or not content_type:
        upload = await read_raw_body(request, services.store, max_bytes=limit)
    else:
        raise InvalidRequest(
            f"unsupported Content-Type {content_type[:64]!r}; use multipart/form-data or application/octet-stream"
        )
    try:
        result = await commit_upload(
            services, slot, upload, expected=sha256, filename=filename, labels=parse_labels(labels), name=name,
            container_key=container_key,
        )
    finally:
        await anyio.to_thread.run_sync(upload.abort)  # a no-op once committed
    return _ingested(request, response, result)


async def _upload_shards(
    request: Request,
    response: Response,
    services: Any,
    slot: Admission,
    files: list[UploadedFile],
    name: str | None,
    labels: str | None,
    container_key: str | None,
) -> ArtifactOut:
    operations = services.operations

    def combine_and_commit() -> IngestResult:
        source = operations.combine(files)
        try:
            result: IngestResult = operations.commit_combined(source, labels=parsed_labels)
            return result
        finally:
            source.upload.abort()  # a no-op once committed

    try:
        if container_key is not None:
            raise InvalidRequest("container_key picks a state_dict inside one file; shards are state_dicts already")
        parsed_labels = parse_labels(labels)
        result = await ingest(services, slot, combine_and_commit, name=name)
    finally:
        for f in files:
            await anyio.to_thread.run_sync(f.upload.abort)
    return _ingested(request, response, result)


@router.post(
    "/checkpoints/import",
    status_code=201,
    response_model=ArtifactOut,
    operation_id="import_checkpoint",
    summary="Import a checkpoint from the object store by reference",
    tags=["checkpoints"],
    dependencies=[WriteAuth],
    responses={
        200: {"model": ArtifactOut, "description": "Already stored: the existing artifact."},
        **problem_responses(400, 401, 403, 404, 413, 422, 502, 503, 507),
    },
)
async def import_checkpoint(
    request: Request, response: Response, body: ImportIn, services: ServicesDep
) -> ArtifactOut:
    """Read an allowed s3:// object (or the shards of one checkpoint) into the store as an upload would be."""
    operations = services.operations
    url, urls = body.url, body.urls
    if (url is None) == (urls is None):
        raise InvalidRequest("give exactly one of 'url' (an object) and 'urls' (the shards of one checkpoint)")
    if urls is not None and body.container_key is not None:
        raise InvalidRequest("container_key picks a state_dict inside one file; shards are state_dicts already")
    refs = {f"urls[{i}]": each for i, each in enumerate(urls)} if urls is not None else {"url": str(url)}
    for field, ref in refs.items():
        operations.check_import(ref, field=field)  # 400/403 before a slot is taken

    def commit() -> IngestResult:
        if urls is not None:
            return operations.import_shards(urls, labels=body.labels)
        assert url is not None
        return operations.import_object(url, labels=body.labels, container_key=body.container_key)

    async with services.pool.admit() as slot:
        result = await ingest(services, slot, commit, name=body.name)
    return _ingested(request, response, result)


@router.head(
    "/checkpoints/{ref}",
    operation_id="checkpoint_exists",
    summary="Check whether a checkpoint is stored",
    tags=["checkpoints"],
    dependencies=[ReadAuth],
    responses=problem_responses(400, 401, 404),
)
def checkpoint_exists(artifact: ArtifactDep) -> Response:
    """200 when the artifact exists (clients skip uploading bytes the service has), else 404."""
    return Response(
        headers={
            "ETag": f'"{artifact.id}"',
            "X-Checkpoint-Id": artifact.id,
            "X-Checkpoint-Size": str(artifact.size),
        }
    )


@router.get(
    "/checkpoints/{ref}",
    response_model=ArtifactOut,
    operation_id="get_checkpoint",
    summary="Get a checkpoint's metadata and lineage",
    tags=["checkpoints"],
    dependencies=[ReadAuth],
    responses=problem_responses(400, 401, 404),
)
def get_checkpoint(request: Request, artifact: ArtifactDep) -> ArtifactOut:
    """The artifact's metadata, with lineage."""
    return artifact_out(request, artifact)


@router.get(
    "/checkpoints/{ref}/manifest",
    response_model=ManifestOut,
    operation_id="get_manifest",
    summary="Get a checkpoint's manifest: keys, shapes, dtypes",
    tags=["checkpoints"],
    dependencies=[ReadAuth],
    responses=problem_responses(400, 401, 404),
)
def get_manifest(artifact: ArtifactDep, store: StoreDep) -> ManifestOut:
    """Key -> shape, dtype, size and fingerprint."""
    manifest = store.manifest(artifact.id)
    return ManifestOut(
        id=artifact.id,
        schema_fingerprint=manifest.schema_fingerprint,
        key_count=len(manifest.entries),
        tensor_bytes=manifest.tensor_bytes,
        entries={
            k: TensorEntryOut(shape=list(e.shape), dtype=e.dtype, nbytes=e.nbytes, fingerprint=e.fingerprint)
            for k, e in manifest.entries.items()
        },
    )


class PinnedFileResponse(FileResponse):
    """A FileResponse that releases the pin on its file when the response is done, however it ends."""

    def __init__(self, pin: ExitStack, path: LocalPath, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._pin = pin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await anyio.to_thread.run_sync(self._pin.close)


def _stored_format(artifact: ArtifactMeta) -> Format:
    # Every stored artifact was read by a format of the table; the zip .pth stands in for one from elsewhere.
    return find_format(artifact.format) or PTH_ZIP


@router.get(
    "/checkpoints/{ref}/file",
    operation_id="download_checkpoint",
    summary="Download a checkpoint file",
    tags=["checkpoints"],
    dependencies=[ReadOrSignedAuth],
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The blob (Range supported).",
        },
        206: {
            "description": "Partial content",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        304: {"description": "Not modified"},
        307: {"description": "With CKPT_S3_PRESIGNED_DOWNLOADS: the bytes are at the presigned URL in Location "
              "(another host: send no Authorization there); X-Checkpoint-Id names them."},
        **problem_responses(400, 401, 404, 416, 422, 503),
    },
)
async def download_checkpoint(
    request: Request,
    ref: RefPath,
    artifact: ArtifactDep,
    services: ServicesDep,
    format: OutputFormat | None = None,
) -> Response:
    """Download the blob (Range, ETag; `format=safetensors` converts); a Bearer token or `expires`+`sig`."""
    store = services.store
    path, digest = None, artifact.id
    stored = _stored_format(artifact)
    suffix, media_type = stored.suffix, stored.media_type
    if format is not None and format != stored.output:
        # A read stores nothing: the converted bytes come from the conversion cache, converted once.
        converted = await anyio.to_thread.run_sync(store.cached_conversion, artifact.id, format)
        if converted is None:
            converted = await services.read_pool.run(
                lambda: services.operations.convert(artifact.id, output_format=format)
            )
        written = writer_for(format)
        path, digest, suffix, media_type = converted.path, converted.sha256, written.suffix, written.media_type
    etag = f'"{digest}"'
    # The bytes of an id never change; a name may move, so a cache must revalidate it (the ETag makes that a 304).
    cache_control = "public, max-age=31536000, immutable" if is_id(ref) else "no-cache"
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": cache_control})
    headers = {
        "ETag": etag,
        # The sha256 of the bytes sent, so that `ckpt pull` verifies a converted download too.
        "X-Checkpoint-Id": digest,
        "Cache-Control": cache_control,
    }
    if path is None and not store.blobs_are_local:
        return await _remote_blob_response(services, artifact, headers, suffix, media_type)
    pin = ExitStack()
    if path is None:
        # The blob store's local copy, pinned until the response is sent (the file itself, or a cache entry).
        path = await anyio.to_thread.run_sync(pin.enter_context, store.local_path(artifact.id))
    return PinnedFileResponse(
        pin,
        path,
        media_type=media_type,
        filename=f"{digest[:16]}{suffix}",
        headers=headers,
    )


async def _remote_blob_response(
    services: Services, artifact: ArtifactMeta, headers: dict[str, str], suffix: str, media_type: str
) -> Response:
    # An object store's blob: a 307 to a presigned URL on the store (CKPT_S3_PRESIGNED_DOWNLOADS), or the bytes
    # streamed from ranged GETs (no local copy of a whole blob for one range).
    store, filename = services.store, f"{artifact.id[:16]}{suffix}"
    if services.settings.s3_presigned_downloads:
        url = await anyio.to_thread.run_sync(
            functools.partial(store.presigned_url, artifact.id, expires=services.settings.download_url_ttl_seconds,
                              filename=filename)
        )
        if url is not None:
            # No caching of the redirect: the URL expires.
            redirect_headers = {"ETag": headers["ETag"], "X-Checkpoint-Id": artifact.id, "Cache-Control": "no-store"}
            return RedirectResponse(url, status_code=307, headers=redirect_headers)
    created = datetime.fromisoformat(artifact.created.replace("Z", "+00:00")).timestamp()
    return BlobResponse(
        lambda start: store.open_blob(artifact.id, start=start),
        artifact.size,
        modified=created,
        media_type=media_type,
        filename=filename,
        headers=headers,
    )


MaxShardSize = Annotated[
    str,
    Query(max_length=32, description="The most tensor bytes in one shard: bytes, or with a unit (500MB, 5GB, 2GiB); "
          "KB/MB/GB are powers of 1000, as in transformers."),
]
ShardNumber = Annotated[int, Path(ge=1, le=1_000_000, description="The shard's number, from 1.")]


@router.get(
    "/checkpoints/{ref}/shards",
    response_model=ShardIndexOut,
    operation_id="get_shard_index",
    summary="Split a checkpoint into safetensors shards: the index",
    tags=["checkpoints"],
    dependencies=[ReadAuth],
    responses=problem_responses(400, 401, 404, 422),
)
async def get_shard_index(
    request: Request, artifact: ArtifactDep, services: ServicesDep, max_shard_size: MaxShardSize = "5GB"
) -> ShardIndexOut:
    """transformers' shard index of the checkpoint (the same split every time), with each shard's URL."""
    limit = parse_size(max_shard_size)

    def index() -> ShardIndexOut:
        plan = services.operations.plan_shards(artifact.id, max_shard_size=limit)
        shards = [
            ShardOut(
                name=plan.filename(n),
                url=str(request.url_for("download_shard", ref=artifact.id, number=n).include_query_params(
                    max_shard_size=max_shard_size)),
                size=plan.size(n),
                key_count=len(keys),
            )
            for n, keys in enumerate(plan.shards, start=1)
        ]
        return ShardIndexOut(metadata=ShardIndexMetadata(total_size=plan.total_size), weight_map=plan.weight_map(),
                             id=artifact.id, max_shard_size=limit, shards=shards)

    return await anyio.to_thread.run_sync(index)


@router.get(
    "/checkpoints/{ref}/shards/{number}",
    operation_id="download_shard",
    summary="Download one safetensors shard of a checkpoint",
    tags=["checkpoints"],
    dependencies=[ReadAuth],
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The shard's safetensors bytes, streamed (Content-Length known); nothing is stored.",
        },
        **problem_responses(400, 401, 404, 422, 503),
    },
)
async def download_shard(
    artifact: ArtifactDep, services: ServicesDep, number: ShardNumber, max_shard_size: MaxShardSize = "5GB"
) -> Response:
    """Shard `number` of the split `GET /checkpoints/{ref}/shards` describes, computed on the fly."""
    limit = parse_size(max_shard_size)

    def prepare() -> tuple[str, int, Any]:
        plan = services.operations.plan_shards(artifact.id, max_shard_size=limit)
        length, chunks = services.operations.stream_shard(plan, number)
        return plan.filename(number), length, chunks

    filename, length, chunks = await services.read_pool.run(prepare)
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={"Content-Length": str(length), "Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.post(
    "/checkpoints/{ref}/download-url",
    response_model=DownloadUrlOut,
    operation_id="sign_download_url",
    summary="Get a signed download URL (no token needed to follow it)",
    tags=["checkpoints"],
    dependencies=[ReadAuth],
    responses=problem_responses(400, 401, 404),
)
def sign_download_url(
    request: Request,
    artifact: ArtifactDep,
    services: ServicesDep,
    format: OutputFormat | None = None,
) -> DownloadUrlOut:
    """A download URL that needs no token, for this artifact and format, valid for a few minutes."""
    fmt = format or _stored_format(artifact).output or "pth"
    expires, sig = services.signer.sign(artifact.id, fmt)
    url = request.url_for("download_checkpoint", ref=artifact.id).include_query_params(
        format=fmt, expires=expires, sig=sig
    )
    return DownloadUrlOut(url=str(url), id=artifact.id, format=fmt, expires=expires)


@router.get(
    "/checkpoints",
    response_model=ArtifactPage,
    operation_id="list_checkpoints",
    summary="List checkpoints",
    tags=["checkpoints"],
    dependencies=[ReadAuth],
    responses=problem_responses(400, 401),
)
def list_checkpoints(
    request: Request,
    store: StoreDep,
    name: Annotated[str | None, Query(max_length=128)] = None,
    label: Annotated[str | None, Query(max_length=512, description='"key" or "key=value"')] = None,
    operation: Literal["strip", "merge", "convert", "upload", "extract", "combine", "import"] | None = None,
    format: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=256)] = None,
) -> ArtifactPage:
    """A paged list of artifacts, newest first, filtered by name, label, operation or format."""
    page = store.list(name=name, label=label, operation=operation, format=format, limit=limit, cursor=cursor)
    return ArtifactPage(
        items=[artifact_out(request, m) for m in page.items], next_cursor=page.next_cursor, total=page.total
    )


@router.delete(
    "/checkpoints/{ref}",
    response_model=DeletedOut,
    operation_id="delete_checkpoint",
    summary="Delete a checkpoint",
    tags=["checkpoints"],
    dependencies=[WriteAuth],
    responses=problem_responses(400, 401, 403, 404, 409),
)
def delete_checkpoint(artifact: ArtifactDep, store: StoreDep, force: bool = False) -> DeletedOut:
    """Delete an artifact; refused with 409 while names point to it, unless `force`."""
    removed = store.delete(artifact.id, force=force)
    return DeletedOut(deleted=artifact.id, names_removed=removed)


@router.patch(
    "/checkpoints/{ref}",
    response_model=ArtifactOut,
    operation_id="update_labels",
    summary="Set or delete labels of a checkpoint",
    tags=["checkpoints"],
    dependencies=[WriteAuth],
    responses=problem_responses(400, 401, 403, 404, 422),
)
def update_labels(request: Request, artifact: ArtifactDep, body: LabelsPatchIn, store: StoreDep) -> ArtifactOut:
    """Set labels (`{"labels": {"k": "v"}}`) and delete them (`{"labels": {"old": null}}`) in one transaction.

    The response is the artifact as it is now, with `labels_changed` saying which keys were added, changed and
    removed (deleting an absent key is not an error, and changes nothing).
    """
    set_ = {k: v for k, v in body.labels.items() if v is not None}
    remove = [k for k, v in body.labels.items() if v is None]
    meta, changes = store.update_labels(artifact.id, set_=set_, remove=remove)
    return artifact_out(request, meta, changes)


@router.put(
    "/names/{name}",
    response_model=NameOut,
    operation_id="set_name",
    summary="Point a name at a checkpoint",
    tags=["names"],
    dependencies=[WriteAuth],
    responses=problem_responses(400, 401, 403, 404, 422),
)
def set_name(name: Annotated[str, RefPath], body: NameIn, store: StoreDep) -> NameOut:
    """Point a name at an artifact (create or move)."""
    artifact_id = store.resolve(body.id)
    store.set_name(name, artifact_id)
    return NameOut(name=name, id=artifact_id)


@router.get(
    "/names",
    response_model=list[NameOut],
    operation_id="list_names",
    summary="List names",
    tags=["names"],
    dependencies=[ReadAuth],
    responses=problem_responses(401),
)
def list_names(store: StoreDep) -> list[NameOut]:
    """All names and the ids they point to."""
    return [NameOut(name=n, id=i) for n, i in sorted(store.names().items())]


@router.delete(
    "/names/{name}",
    response_model=DeletedOut,
    operation_id="delete_name",
    summary="Remove a name",
    tags=["names"],
    dependencies=[WriteAuth],
    responses=problem_responses(400, 401, 403, 404),
)
def delete_name(name: Annotated[str, RefPath], store: StoreDep) -> DeletedOut:
    """Remove a name (the artifact stays)."""
    store.delete_name(name)
    return DeletedOut(deleted=name)
