"""Operations: strip, diff and merge."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic_core import PydanticSerializationError

from service.api.deps import ReadAuth, ServicesDep, WriteAuth
from service.api.problems import json_safe, problem_responses
from service.api.routes.checkpoints import artifact_out, parse_labels, point_name
from service.api.schemas import CATEGORIES, DiffCategoryKeys, DiffOut, OperationOut, StripIn
from service.api.uploads import ParsedForm, is_sharded, parse_multipart, uploaded_files
from service.api.work import Admission
from service.core.changes import ChangeSummary
from service.errors import InvalidRequest, VerificationFailed
from service.format_names import OUTPUT_FORMATS, is_output_format
from service.importer import is_import_url
from service.operations import DiffResult, MergeOptions, NormalizeMode, OperationResult, Source
from service.store import NAME_RE

router = APIRouter()


def _operation_out(request: Request, result: OperationResult) -> OperationOut:
    art = artifact_out(request, result.artifact, result.labels_changed)
    return OperationOut(
        id=art.id, created=result.created, download_url=art.download_url, artifact=art, report=result.report
    )


@router.post(
    "/strip",
    status_code=201,
    response_model=OperationOut,
    operation_id="strip_checkpoint",
    summary="Strip wrapper prefixes from a checkpoint",
    tags=["operations"],
    dependencies=[WriteAuth],
    responses=problem_responses(400, 401, 403, 404, 422, 503, 507),
)
async def strip(request: Request, body: StripIn, services: ServicesDep) -> OperationOut:
    """Remove wrapper prefixes (detected, or the given ones) and store the result."""
    store = services.store
    if body.name is not None:
        store.check_settable_name(body.name)
    artifact_id = await anyio.to_thread.run_sync(store.resolve, body.checkpoint)
    like = None
    if body.like is not None or body.like_architecture is not None:
        if body.prefixes is not None:
            raise InvalidRequest("give 'prefixes' or one of 'like' and 'like_architecture', not both")
        like = await anyio.to_thread.run_sync(
            lambda: services.operations.strip_target(like=body.like, like_architecture=body.like_architecture)
        )
    result = await services.pool.run(
        lambda: services.operations.strip(
            artifact_id, prefixes=body.prefixes, output_format=body.output_format, container_key=body.container_key,
            like=like,
        )
    )
    if body.name is not None:
        result = OperationResult(await point_name(store, body.name, result.artifact.id), result.created, result.report)
    return _operation_out(request, result)


def _diff_out(a: str, b: str, result: DiffResult, params: DiffParams) -> DiffOut:
    diff = result.diff
    key_prefix, limit = params.key_prefix, params.limit
    keys: dict[str, DiffCategoryKeys] = {}
    for cat in params.category or list(CATEGORIES):
        all_keys = [k for k in getattr(diff, cat) if key_prefix is None or k.startswith(key_prefix)]
        keys[cat] = DiffCategoryKeys(keys=all_keys[:limit], total=len(all_keys), truncated=len(all_keys) > limit)
    data = diff.to_dict()
    details = {
        "shape_mismatch": data.get("shape_details", {}),
        "dtype_mismatch": data.get("dtype_details", {}),
    }
    modules = {
        m: dict(c)
        for m, c in data.get("modules", {}).items()
        if key_prefix is None or m.startswith(key_prefix.rstrip("."))
    }
    return DiffOut(
        a=a,
        b=b,
        normalized=diff.normalized,
        summary=dict(diff.summary),
        keys=keys,
        details=details,
        modules=modules,
        values=result.values,
        frozen=result.frozen,
        changes=_changes_out(result.changes, key_prefix),
        alignment=diff.alignment,
    )


def _changes_out(changes: ChangeSummary | None, key_prefix: str | None) -> dict[str, Any] | None:
    if changes is None:
        return None
    data = changes.to_dict()
    if key_prefix is not None:
        base = key_prefix.rstrip(".")
        data["modules"] = {m: c for m, c in data["modules"].items() if m == "" or m.startswith(base)}
    return data


def _frozen_arg(frozen: str | None) -> list[str] | None:
    if frozen is None or frozen.strip().lower() in ("", "false", "no", "0", "off"):
        return None
    if frozen.strip().lower() in ("true", "yes", "1", "on", "params", "auto"):
        return []
    return [p.strip() for p in frozen.split(",") if p.strip()]


DIFF_QUERY_DOC = (
    "`normalize_prefixes`: 'true' strips known wrapper prefixes (and a Lightning file's LightningModule attribute) "
    "from both sides, 'align' renames each side with the transform that gives the most keys in common (the answer's "
    "`alignment` says which); "
    "`frozen`: 'true' checks the original's (a's) parameters in b, or comma-separated key prefixes; "
    "`category`, `key_prefix` and `limit` keep a large diff small; `a_container_key` / `b_container_key` pick "
    "another state_dict inside a file (dotted, e.g. 'model.ema')."
)

CategoryQuery = Annotated[
    list[Literal["only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch", "changed", "unchanged"]] | None,
    Query(),
]


_NORMALIZE_VALUES: dict[str, NormalizeMode] = {"true": True, "1": True, "yes": True, "on": True,
                     "false": False, "0": False, "no": False, "off": False, "align": "align"}


@dataclass
class DiffParams:
    """The query options GET /diff and POST /diff share."""

    normalize_prefixes: Annotated[
        str, Query(pattern=r"^(?i:true|false|1|0|yes|no|on|off|align)$", description="true, false or align")
    ] = "false"
    values: bool = False
    frozen: Annotated[str | None, Query(max_length=2048)] = None
    category: CategoryQuery = None
    key_prefix: Annotated[str | None, Query(max_length=512)] = None
    limit: Annotated[int, Query(ge=0, le=100_000)] = 1000
    a_container_key: Annotated[str | None, Query(min_length=1, max_length=1024)] = None
    b_container_key: Annotated[str | None, Query(min_length=1, max_length=1024)] = None


DiffParamsDep = Annotated[DiffParams, Depends()]


def _normalize_mode(params: DiffParams) -> NormalizeMode:
    return _NORMALIZE_VALUES[params.normalize_prefixes.lower()]


@router.get(
    "/diff",
    response_model=DiffOut,
    operation_id="diff_checkpoints",
    summary="Diff two stored checkpoints",
    tags=["operations"],
    dependencies=[ReadAuth],
    description=DIFF_QUERY_DOC,
    responses=problem_responses(400, 401, 404, 422, 503),
)
async def diff_get(
    services: ServicesDep,
    a: Annotated[str, Query(max_length=200)],
    b: Annotated[str, Query(max_length=200)],
    params: DiffParamsDep,
) -> Response:
    """Diff two stored artifacts from their manifests."""
    store = services.store
    ida = await anyio.to_thread.run_sync(store.resolve, a)
    idb = await anyio.to_thread.run_sync(store.resolve, b)
    # Artifacts never change, so a manifest-only diff of two ids is rendered once (dashboards poll the same pair).
    key: tuple[Any, ...] | None = None
    if not params.values and _frozen_arg(params.frozen) is None:
        key = (ida, idb, _normalize_mode(params), tuple(params.category or ()), params.key_prefix, params.limit)
        if params.a_container_key is not None or params.b_container_key is not None:
            key += (params.a_container_key, params.b_container_key)
        body = services.rendered_diffs.get(key)
        if body is not None:
            return _json(body)

    def run() -> bytes:
        result = services.operations.diff(
            Source(artifact_id=ida, container_key=params.a_container_key),
            Source(artifact_id=idb, container_key=params.b_container_key),
            normalize_prefixes=_normalize_mode(params),
            values=params.values,
            frozen=_frozen_arg(params.frozen),
        )
        return _rendered(ida, idb, result, params)

    # Manifest-only diffs are cheap JSON work: a thread, not the bounded heavy pool; values open the blobs.
    body = await (services.read_pool.run(run) if params.values else anyio.to_thread.run_sync(run))
    if key is not None:
        services.rendered_diffs.put(key, body)
    return _json(body)


def _rendered(a: str, b: str, result: DiffResult, params: DiffParams) -> bytes:
    # A DiffOut is validated when it is built; FastAPI would dump, validate and dump it again (10 ms for a
    # 20k-key diff) on the event loop, so the routes render it once, in their worker thread, and declare DiffOut
    # as their response_model for OpenAPI.
    out = _diff_out(a, b, result, params)
    try:
        return out.model_dump_json().encode()
    except PydanticSerializationError:
        # Keys of artifacts stored before keys had to be UTF-8 (lone surrogates) are escaped, not a 500.
        return json.dumps(json_safe(out.model_dump()), ensure_ascii=False).encode()


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


DIFF_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["a", "b"],
                    "properties": {
                        "a": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "A file, the shards of one checkpoint (repeated, with its '*.index.json' "
                            "when there is one), or a ref as a text field.",
                        },
                        "b": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "The same as `a`, for the other side.",
                        },
                        "a_sha256": {"type": "array", "items": {"type": "string"},
                                     "description": "One per file part of `a`, in order."},
                        "b_sha256": {"type": "array", "items": {"type": "string"},
                                     "description": "One per file part of `b`, in order."},
                    },
                }
            }
        },
    }
}


async def uploaded_source(
    services: Any, slot: Admission, form: ParsedForm, field: str, sha_field: str, container_key: str | None,
    combined: list[Source],
) -> Source | None:
    """The source a form's file parts of `field` make: one upload, or the shards of one checkpoint combined.

    A combined source is appended to `combined`, whose uploads the caller aborts when it is done.
    """
    files = uploaded_files(form, field, sha_field)
    if not files:
        return None
    if not is_sharded(files):
        f = files[0]
        if f.expected_sha256:
            await anyio.to_thread.run_sync(lambda: services.store.check_digest(f.upload, f.expected_sha256))
        return Source(upload=f.upload, filename=f.filename, container_key=container_key)
    if container_key is not None:
        raise InvalidRequest(f"'{field}' holds shards: a container key picks a state_dict inside one file only")
    source: Source = await slot.run(lambda: services.operations.combine(files))
    combined.append(source)
    return source


async def abort_sources(sources: list[Source]) -> None:
    """Abort the uploads of sources that were not committed (a no-op for committed ones)."""
    for source in sources:
        if source.upload is not None:
            await anyio.to_thread.run_sync(source.upload.abort)


async def _diff_side(
    services: Any, slot: Admission, form: ParsedForm, role: str, container_key: str | None, combined: list[Source]
) -> Source:
    uploaded = await uploaded_source(services, slot, form, role, f"{role}_sha256", container_key, combined)
    if uploaded is not None:
        return uploaded
    ref = form.fields.get(role)
    if ref is None:
        raise InvalidRequest(f"POST /diff needs '{role}' as a file part or as a ref")
    return Source(artifact_id=await anyio.to_thread.run_sync(services.store.resolve, ref), container_key=container_key)


def container_key_field(form: ParsedForm, field: str) -> str | None:
    """A ``*container_key`` form field: None when absent or empty, else a dotted key of at most 1024 chars."""
    value = form.fields.get(field)
    if value is None or not value.strip():
        return None
    if len(value) > 1024:
        raise InvalidRequest(f"{field} is longer than 1024 characters")
    return value.strip()


@router.post(
    "/diff",
    response_model=DiffOut,
    operation_id="diff_uploaded",
    summary="Diff two uploaded checkpoints",
    tags=["operations"],
    dependencies=[ReadAuth],
    openapi_extra=DIFF_BODY,
    description=DIFF_QUERY_DOC,
    responses=problem_responses(400, 401, 404, 408, 413, 422, 503),
)
async def diff_post(
    request: Request,
    services: ServicesDep,
    params: DiffParamsDep,
) -> Response:
    """Diff two checkpoints given as uploaded files (parts `a`, `b`) or refs; nothing is stored."""
    # A read: admitted to the read pool before the body is read, so a full pool answers 503 at once and
    # read-scope uploads never take a write's slot.
    async with services.read_pool.admit() as slot:
        return await _diff_uploaded(request, services, params, slot)


async def _diff_uploaded(request: Request, services: Any, params: DiffParams, slot: Admission) -> Response:
    form = await parse_multipart(
        request,
        services.store,
        file_fields=frozenset({"a", "b"}),
        text_fields=frozenset({"a", "b", "a_container_key", "b_container_key", "a_sha256", "b_sha256"}),
        max_file_bytes=services.operations.max_upload_bytes,
        repeatable=frozenset({"a", "b", "a_sha256", "b_sha256"}),
        max_request_bytes=services.operations.max_request_bytes,
    )
    combined: list[Source] = []
    try:
        sa = await _diff_side(services, slot, form, "a",
                              container_key_field(form, "a_container_key") or params.a_container_key, combined)
        sb = await _diff_side(services, slot, form, "b",
                              container_key_field(form, "b_container_key") or params.b_container_key, combined)

        def run() -> bytes:
            result = services.operations.diff(
                sa,
                sb,
                normalize_prefixes=_normalize_mode(params),
                values=params.values,
                frozen=_frozen_arg(params.frozen),
            )
            ida = sa.artifact_id or (sa.upload.sha256 if sa.upload else "")
            idb = sb.artifact_id or (sb.upload.sha256 if sb.upload else "")
            return _rendered(ida, idb, result, params)

        body = await slot.run(run)
    finally:
        await abort_sources(combined)  # a diff stores nothing
        await form.abort()
    return _json(body)


MERGE_FIELDS = frozenset(
    {
        "original",
        "trained",
        "architecture",
        "strip_prefixes",
        "drop_unexpected",
        "output_format",
        "name",
        "labels",
        "frozen_prefixes",
        "require_frozen",
        "frozen_atol",
        "original_sha256",
        "trained_sha256",
        "original_container_key",
        "trained_container_key",
        "require_complete",
        "allow_swapped",
    }
)

MERGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["architecture"],
                    "properties": {
                        "original": {
                            "type": "string",
                            "description": "The original's id or name, or an s3://bucket/key object under "
                            "CKPT_IMPORT_ALLOWED that the service reads itself (stored as an imported artifact).",
                        },
                        "original_file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "The original as a file, or as the shards of one checkpoint (repeated, "
                            "with its '*.index.json' when there is one).",
                        },
                        "trained": {
                            "type": "string",
                            "description": "The trained checkpoint's id or name, or an s3://bucket/key object.",
                        },
                        "trained_file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "The trained checkpoint as a file or as shards, like `original_file`.",
                        },
                        "architecture": {"type": "string", "description": "A registered architecture name."},
                        "strip_prefixes": {
                            "type": "string",
                            "default": "auto",
                            "description": "'auto' (match the architecture), 'known', 'none', or a "
                            "comma-separated list of prefixes.",
                        },
                        "drop_unexpected": {"type": "boolean", "default": False},
                        "output_format": {"type": "string", "enum": list(OUTPUT_FORMATS), "default": "pth"},
                        "name": {"type": "string", "pattern": NAME_RE, "description": "Point this name at the result."},
                        "labels": {"type": "string"},
                        "frozen_prefixes": {
                            "type": "string",
                            "description": "Comma-separated key prefixes of the frozen part. Without it there "
                            "is no frozen check, only the per-module rollup of what changed (`report.changes`); "
                            "with it, changed frozen tensors are a warning with their max abs and relative change.",
                        },
                        "require_frozen": {
                            "type": "boolean",
                            "default": False,
                            "description": "With frozen_prefixes: a changed frozen tensor is a 422 and nothing is "
                            "stored (for CI pipelines).",
                        },
                        "frozen_atol": {
                            "type": "number",
                            "minimum": 0,
                            "default": 0,
                            "description": "Largest absolute difference of a frozen tensor still counted as "
                            "unchanged (e.g. a bfloat16 round trip).",
                        },
                        "original_sha256": {"type": "array", "items": {"type": "string"},
                                            "description": "One per `original_file` part, in order."},
                        "trained_sha256": {"type": "array", "items": {"type": "string"},
                                           "description": "One per `trained_file` part, in order."},
                        "original_container_key": {
                            "type": "string",
                            "description": "The state_dict to use inside the original (dotted, e.g. 'model.ema').",
                        },
                        "trained_container_key": {
                            "type": "string",
                            "description": "The state_dict to use inside the trained checkpoint.",
                        },
                        "require_complete": {
                            "type": "boolean",
                            "default": False,
                            "description": "A parameter taken from the original (anything but BatchNorm running "
                            "stats) is a 422 naming the keys, and nothing is stored (e.g. one shard sent alone).",
                        },
                        "allow_swapped": {
                            "type": "boolean",
                            "default": False,
                            "description": "Merge even when original and trained look swapped (wrapper prefixes on "
                            "the original only, and BatchNorm running stats on the trained only), which is a 422 "
                            "otherwise.",
                        },
                    },
                }
            }
        },
    }
}

_FORM_SCHEMA: dict[str, Any] = MERGE_BODY["requestBody"]["content"]["multipart/form-data"]["schema"]
# A merge by reference (ids, names, s3:// objects) may also be sent as a JSON object of the same fields.
MERGE_BODY["requestBody"]["content"]["application/json"] = {
    "schema": {
        **_FORM_SCHEMA,
        "properties": {
            **{k: v for k, v in _FORM_SCHEMA["properties"].items() if not k.endswith("_file")},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
}


def _bool(value: str | None, field: str) -> bool:
    if value is None:
        return False
    low = value.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off", ""):
        return False
    raise InvalidRequest(f"{field} must be true or false, not {value[:32]!r}")


def _atol(value: str | None) -> float:
    if value is None or not value.strip():
        return 0.0
    try:
        atol = float(value)
    except ValueError:
        atol = math.nan
    if not (math.isfinite(atol) and atol >= 0):
        raise InvalidRequest(f"frozen_atol must be a number >= 0, not {value[:32]!r}")
    return atol


async def _source(services: Any, slot: Admission, form: ParsedForm, role: str, combined: list[Source]) -> Source:
    ref = form.fields.get(role)
    if (ref is None) == (form.files.get(f"{role}_file") is None):
        raise InvalidRequest(f"give exactly one of '{role}' (a ref) and '{role}_file' (an upload)")
    container_key = container_key_field(form, f"{role}_container_key")
    if ref is not None and is_import_url(ref):
        # Read by the service itself inside the merge's slot; refused here (400/403) before any work.
        services.operations.check_import(ref, field=role)
        return Source(url=ref, container_key=container_key)
    if ref is not None:
        return Source(artifact_id=await anyio.to_thread.run_sync(services.store.resolve, ref),
                      container_key=container_key)
    uploaded = await uploaded_source(services, slot, form, f"{role}_file", f"{role}_sha256", container_key, combined)
    assert uploaded is not None
    return uploaded


@router.post(
    "/merge",
    status_code=201,
    response_model=OperationOut,
    operation_id="merge_checkpoints",
    summary="Merge a trained checkpoint into its original",
    tags=["operations"],
    dependencies=[WriteAuth],
    openapi_extra=MERGE_BODY,
    responses={
        200: {"model": OperationOut, "description": "The same result existed already."},
        **problem_responses(400, 401, 403, 404, 408, 413, 422, 502, 503, 507),
    },
)
async def merge(request: Request, response: Response, services: ServicesDep) -> OperationOut:
    """Strip, merge, verify strictly against the architecture, and only then store (422 stores nothing)."""
    async with services.pool.admit() as slot:  # before the body: a full pool answers 503 at once
        return await _merge(request, response, services, slot)


async def _merge(request: Request, response: Response, services: Any, slot: Admission) -> OperationOut:
    form = await parse_multipart(
        request,
        services.store,
        file_fields=frozenset({"original_file", "trained_file"}),
        text_fields=MERGE_FIELDS,
        max_file_bytes=services.operations.max_upload_bytes,
        repeatable=frozenset({"original_file", "trained_file", "original_sha256", "trained_sha256"}),
        max_request_bytes=services.operations.max_request_bytes,
    )
    combined: list[Source] = []
    try:
        architecture = form.fields.get("architecture")
        if not architecture:
            raise InvalidRequest("the form field 'architecture' is required")
        await anyio.to_thread.run_sync(services.registry.get, architecture)  # 404 before any heavy work
        name = form.fields.get("name")
        if name is not None:
            services.store.check_settable_name(name)
        strip_raw = form.fields.get("strip_prefixes", "auto").strip() or "auto"
        strip_mode: str | list[str] = strip_raw
        if strip_raw not in ("auto", "known", "none"):
            strip_mode = [p.strip() for p in strip_raw.split(",") if p.strip()]
        output_format = form.fields.get("output_format", "pth")
        if not is_output_format(output_format):
            names = " or ".join(repr(n) for n in OUTPUT_FORMATS)
            raise InvalidRequest(f"output_format must be {names}, not {output_format[:32]!r}")
        frozen_raw = form.fields.get("frozen_prefixes")
        require_frozen = _bool(form.fields.get("require_frozen"), "require_frozen")
        if require_frozen and not frozen_raw:
            raise InvalidRequest("require_frozen needs frozen_prefixes: the key prefixes of the part you froze")
        options = MergeOptions(
            architecture=architecture,
            strip=strip_mode,
            drop_unexpected=_bool(form.fields.get("drop_unexpected"), "drop_unexpected"),
            output_format=output_format,
            frozen_prefixes=tuple(p.strip() for p in frozen_raw.split(",") if p.strip()) if frozen_raw else None,
            require_frozen=require_frozen,
            frozen_atol=_atol(form.fields.get("frozen_atol")),
            labels=parse_labels(form.fields.get("labels")),
            require_complete=_bool(form.fields.get("require_complete"), "require_complete"),
            allow_swapped=_bool(form.fields.get("allow_swapped"), "allow_swapped"),
        )
        original = await _source(services, slot, form, "original", combined)
        trained = await _source(services, slot, form, "trained", combined)
        try:
            result = await slot.run(
                lambda: services.operations.merge(original=original, trained=trained, options=options)
            )
        except VerificationFailed:
            services.metrics.verification_failures.inc()
            services.metrics.merges.labels("verification_failed").inc()
            raise
        services.metrics.merges.labels("ok").inc()
        if name is not None:
            meta = await point_name(services.store, name, result.artifact.id)
            result = OperationResult(meta, result.created, result.report)
    finally:
        await abort_sources(combined)  # committed uploads are unaffected; the rest leaves no temp file
        await form.abort()
    response.status_code = 201 if result.created else 200
    return _operation_out(request, result)
