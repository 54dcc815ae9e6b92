"""`create_app(settings)`: builds the store, the registry, the work pool and the routes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio.to_thread
import fastapi_offline
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service import __version__
from service.api.deps import AUTH_SCOPES, Services
from service.api.guard import RequestGuard
from service.api.metrics import Metrics, MetricsMiddleware
from service.api.problems import PROBLEM_MEDIA_TYPE, install_problem_handlers
from service.api.routes import admin, architectures, checkpoints, health, operations, ui
from service.api.schemas import Problem
from service.api.signing import DownloadSigner, load_signing_secret
from service.api.work import WorkPool
from service.config import Settings, is_loopback
from service.core.budget import JobKind
from service.core.load import resolve_globals
from service.core.types import ArchiveLimits
from service.errors import InvalidRequest, InvalidSettings, quote_keys
from service.importer import ObjectImporter
from service.operations import Operations
from service.registry import ArchitectureRegistry
from service.runtime import tune_gc
from service.sandbox import ParserSandbox
from service.store import ArtifactStore, Inspector, inspect_checkpoint
from service.store.blobs import open_blob_store

log = logging.getLogger("ckpt.service")

DESCRIPTION = """Post-process PyTorch checkpoints of frozen-backbone fine-tunes: strip wrapper prefixes, diff,
merge the trained state_dict with the original (BatchNorm running stats dropped by `track_running_stats=False`),
verify with `load_state_dict(strict=True)` against the real architecture, and keep every result in a
content-addressed artifact directory. Errors are RFC 9457 `application/problem+json`."""

# The groups of /docs, in this order.
OPENAPI_TAGS = [
    {"name": "checkpoints", "description": "Upload, inspect, download, list and delete stored checkpoints."},
    {"name": "names", "description": "Mutable human names for checkpoints, like registry tags."},
    {"name": "operations", "description": "Strip wrapper prefixes, diff, and merge with strict verification."},
    {"name": "architectures", "description": "The model architectures merges are verified against."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
    {"name": "admin", "description": "Operator tasks (admin scope): the store's consistency check."},
]

# Swagger UI and ReDoc assets ship inside the fastapi-offline wheel: no CDN, for air-gapped clusters.
_STATIC = Path(fastapi_offline.__file__).parent / "static"


def build_services(settings: Settings) -> Services:
    """Build the long-lived objects of one app from its settings.

    Raises:
        InvalidSettings: A setting is unusable (an allowlist entry that does not resolve); start-up stops.
    """
    limits = ArchiveLimits(
        max_keys=settings.max_keys,
        max_total_bytes=settings.archive_max_total_bytes,
        max_name_length=settings.archive_max_name_length,
        max_expansion_ratio=settings.max_expansion_ratio,
        max_expanded_bytes=settings.expanded_bytes_cap(),
    )
    safe_globals = check_safe_globals(settings.safe_globals)
    inspector: Inspector
    sandbox: ParserSandbox | None = None
    if settings.sandbox:
        # Workers start with the first upload, not here: most apps (and tests) never parse anything.
        sandbox = ParserSandbox(
            workers=settings.sandbox_workers,
            read_workers=settings.sandbox_read_workers,
            memory_headroom=settings.sandbox_memory_headroom,
            time_limit=settings.sandbox_time_limit_seconds,
            seconds_per_gb=settings.sandbox_seconds_per_gb,
            wait_seconds=settings.sandbox_wait_seconds,
            retry_after=settings.retry_after_seconds,
            safe_globals=safe_globals,
            limits=limits,
        )
        inspector = sandbox.inspect
    else:
        inspector = functools.partial(inspect_checkpoint, safe_globals=safe_globals, limits=limits)
    blobs = open_blob_store(
        settings.storage_url,
        settings.data_dir,
        cache_dir=settings.s3_cache_dir,
        cache_bytes=settings.s3_cache_bytes,
        public_endpoint=settings.s3_public_endpoint,
    )
    store = ArtifactStore(
        settings.data_dir,
        blobs=blobs,
        inspector=inspector,
        tmp_grace_seconds=settings.tmp_grace_seconds,
        conversion_cache_bytes=settings.conversion_cache_bytes,
        conversion_cache_max_age_seconds=settings.conversion_cache_max_age_seconds,
        limits=limits,
        database_url=settings.database_url,
        retention_seconds=settings.retention_age_seconds(),
        retention_keep_last=settings.retention_keep_last,
        retention_label_keys=settings.retention_keys(),
        lease_seconds=settings.gc_lease_seconds,
    )
    hex_names = store.hex_names()
    if hex_names:
        log.warning(
            "names made only of hex digits win over the id prefixes they look like (new ones are refused): %s",
            quote_keys(hex_names),
        )
    # Specs registered over the API live in the index, so every replica sharing it sees them.
    registry = ArchitectureRegistry(spec_store=store.index, config_path=settings.config)
    for issue in registry.load():
        log.error("architecture %r (%s) is unavailable: %s", issue.name, issue.source, issue.error)
    operations = Operations(
        store, registry, safe_globals=safe_globals, max_upload_bytes=settings.max_upload_bytes,
        importer=ObjectImporter(settings.import_prefixes()),
        max_request_bytes=settings.request_bytes_cap(),
    )
    pool = _work_pool(settings, "write", settings.heavy_concurrency, settings.heavy_queue)
    signer = DownloadSigner(
        load_signing_secret(settings.url_signing_secret, settings.data_dir), settings.download_url_ttl_seconds
    )
    read_pool = _work_pool(settings, "read", settings.read_concurrency, settings.read_queue)
    metrics = Metrics()
    for work_pool in (pool, read_pool):
        metrics.heavy_admitted.labels(work_pool.kind).set_function(functools.partial(_admitted, work_pool))
    tokens = settings.tokens()
    if not tokens and not is_loopback(settings.host):
        log.warning(
            "SECURITY: the service listens on %s, which is not a loopback address, and CKPT_API_TOKENS is not "
            "set: ANYONE WHO CAN REACH THIS PORT CAN UPLOAD, OVERWRITE NAMES AND DELETE ARTIFACTS. Set "
            "CKPT_API_TOKENS, or bind to 127.0.0.1 behind a proxy that authenticates.",
            settings.host,
        )
    return Services(
        settings=settings,
        operations=operations,
        pool=pool,
        metrics=metrics,
        tokens=tokens,
        sandbox=sandbox,
        read_pool=read_pool,
        signer=signer,
    )


def _admitted(pool: WorkPool) -> float:
    return float(pool.inflight)


def check_safe_globals(names: Sequence[str]) -> tuple[str, ...]:
    """Resolve `CKPT_SAFE_GLOBALS` once, at start-up, so that a bad entry stops the service.

    Raises:
        InvalidSettings: An entry is malformed, cannot be imported, or is never allowed.
    """
    try:
        resolve_globals(names)
    except InvalidRequest as exc:
        raise InvalidSettings(f"CKPT_SAFE_GLOBALS: {exc.detail}", setting="CKPT_SAFE_GLOBALS") from exc
    return tuple(names)


def _work_pool(settings: Settings, kind: JobKind, concurrency: int, queue: int) -> WorkPool:
    return WorkPool(
        concurrency=concurrency,
        queue=queue,
        retry_after=settings.retry_after_seconds,
        kind=kind,
        time_budget=settings.heavy_time_budget_seconds,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the FastAPI application.

    Args:
        settings: The service settings; None reads `CKPT_*` environment variables.

    Returns:
        The app, with its services on `app.state.services`.
    """
    settings = settings or Settings()
    services = build_services(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tune_gc()
        await anyio.to_thread.run_sync(services.store.collect_garbage)
        await anyio.to_thread.run_sync(_log_startup, services)
        task = asyncio.create_task(_collect_periodically(services))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if services.sandbox is not None:
                await anyio.to_thread.run_sync(services.sandbox.stop_workers)
            await anyio.to_thread.run_sync(services.store.close)  # the index's pooled connections

    app = FastAPI(
        title="ckpt-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=OPENAPI_TAGS,
        docs_url=None,
        redoc_url=None,
        root_path=settings.root_path.rstrip("/"),
    )
    app.state.services = services
    install_problem_handlers(app)
    routers = [module.router for module in (checkpoints, operations, architectures, health, admin, ui)]
    # Outermost first: metrics see every answer, then auth and the JSON limit run before any route reads a body.
    app.add_middleware(
        RequestGuard,
        routes=[route for router in routers for route in router.routes],
        scopes=AUTH_SCOPES,
        tokens=services.tokens,
        max_json_bytes=settings.max_json_bytes,
        idle_timeout=settings.body_idle_timeout_seconds,
    )
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)
    for router in routers:
        app.include_router(router)
    app.mount("/ui/static", ui.static_files, name="ui-static")
    _install_docs(app)
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    # Keep this the LAST add_middleware: the last added is the outermost, so a preflight OPTIONS is answered
    # here and never reaches authentication (browsers send preflights without the Authorization header).
    _install_cors(app, settings)
    return app


def _install_cors(app: FastAPI, settings: Settings) -> None:
    origins = settings.cors_origin_list()
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "If-None-Match", "Range"],
        expose_headers=["ETag", "X-Checkpoint-Id", "Retry-After", "Content-Disposition"],
        max_age=600,
    )


def _log_startup(services: Services) -> None:
    # What someone starting the service wants to see first: where the data is, what is there, what can merge,
    # whether it is open to anyone, and where to click.
    settings, registry = services.settings, services.registry
    artifacts = services.store.list(limit=1).total
    loaded = sorted(a.name for a in registry.list())
    failed = sorted(registry.issues, key=lambda i: i.name)
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    log.info("data directory: %s (%d artifacts)", settings.data_dir.resolve(), artifacts)
    log.info("metadata index: %s", services.store.describe()["index"])
    log.info("architectures loaded (%d): %s", len(loaded), ", ".join(loaded) or "none")
    if failed:
        log.warning("architectures that failed to load (%d): %s", len(failed),
                    "; ".join(f"{i.name!r} ({i.source}): {i.error}" for i in failed))
    if settings.tokens():
        log.info("auth: on (Bearer tokens from CKPT_API_TOKENS)")
    else:
        log.warning("auth: off, anyone who can reach the port can read and write (set CKPT_API_TOKENS)")
    log.info("API docs: http://%s:%d/docs", host, settings.port)


async def _collect_periodically(services: Services) -> None:
    if services.settings.gc_interval_seconds <= 0:
        return
    while True:
        await asyncio.sleep(services.settings.gc_interval_seconds)
        try:
            removed = await anyio.to_thread.run_sync(services.store.collect_garbage)
            if removed:
                log.info("garbage collection removed %d files and artifacts", removed)
        except Exception:  # keep collecting on the next round; the log has the cause
            log.exception("garbage collection failed")


def _install_docs(app: FastAPI) -> None:
    app.mount("/static-docs", StaticFiles(directory=_STATIC), name="static-docs")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="ckpt-service API",
            swagger_js_url="/static-docs/swagger-ui-bundle.js",
            swagger_css_url="/static-docs/swagger-ui.css",
            swagger_favicon_url="/static-docs/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="ckpt-service API",
            redoc_js_url="/static-docs/redoc.standalone.js",
            redoc_favicon_url="/static-docs/favicon.png",
            with_google_fonts=False,
        )


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                         tags=app.openapi_tags)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    problem_content = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path_item in schema.get("paths", {}).values():
        for op in path_item.values():
            responses = op.get("responses", {})
            # Our validation errors are problem documents, not FastAPI's default HTTPValidationError.
            if "422" in responses:
                responses["422"]["content"] = problem_content
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    app.openapi_schema = schema
    return schema
