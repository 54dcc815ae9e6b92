"""`create_app(settings)`: builds the store, the registry, the work pool and the routes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service import __version__
from service.api.deps import Services
from service.api.metrics import Metrics, MetricsMiddleware
from service.api.problems import PROBLEM_MEDIA_TYPE, install_problem_handlers
from service.api.routes import architectures, checkpoints, health, operations
from service.api.schemas import Problem
from service.api.work import WorkPool
from service.config import Settings
from service.core.types import ArchiveLimits
from service.registry import ArchitectureRegistry
from service.runtime import tune_gc
from service.sandbox import ParserSandbox
from service.store import ArtifactStore, Inspector, inspect_checkpoint

log = logging.getLogger("ckpt.service")

DESCRIPTION = """Post-process PyTorch checkpoints of frozen-backbone fine-tunes: strip wrapper prefixes, diff,
merge the trained state_dict with the original (BatchNorm running stats dropped by `track_running_stats=False`),
verify with `load_state_dict(strict=True)` against the real architecture, and keep every result in a
content-addressed artifact directory. Errors are RFC 9457 `application/problem+json`."""

# Swagger UI and ReDoc assets ship inside the fastapi-offline wheel: no CDN, for air-gapped clusters.
_STATIC = Path(fastapi_offline.__file__).parent / "static"


def build_services(settings: Settings) -> Services:
    """Build the long-lived objects of one app from its settings."""
    limits = ArchiveLimits(
        max_keys=settings.max_keys,
        max_total_bytes=settings.archive_max_total_bytes,
        max_expansion_ratio=settings.max_expansion_ratio,
        max_expanded_bytes=settings.expanded_bytes_cap(),
    )
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
            safe_globals=settings.safe_globals,
            limits=limits,
        )
        inspector = sandbox.inspect
    else:
        inspector = functools.partial(inspect_checkpoint, safe_globals=tuple(settings.safe_globals), limits=limits)
    store = ArtifactStore(
        settings.data_dir,
        inspector=inspector,
        tmp_grace_seconds=settings.tmp_grace_seconds,
        conversion_cache_bytes=settings.conversion_cache_bytes,
        conversion_cache_max_age_seconds=settings.conversion_cache_max_age_seconds,
        limits=limits,
    )
    registry = ArchitectureRegistry(specs_dir=settings.data_dir / "architectures", config_path=settings.config)
    for issue in registry.load():
        log.error("architecture %r (%s) is unavailable: %s", issue.name, issue.source, issue.error)
    pool = WorkPool(
        concurrency=settings.heavy_concurrency,
        queue=settings.heavy_queue,
        retry_after=settings.retry_after_seconds,
        kind="write",
        time_budget=settings.heavy_time_budget_seconds,
    )
    read_pool = WorkPool(
        concurrency=settings.read_concurrency,
        queue=settings.read_queue,
        retry_after=settings.retry_after_seconds,
        kind="read",
        time_budget=settings.heavy_time_budget_seconds,
    )
    metrics = Metrics()
    for work_pool in (pool, read_pool):
        metrics.heavy_admitted.labels(work_pool.kind).set_function(functools.partial(_admitted, work_pool))
    return Services(
        settings=settings,
        store=store,
        registry=registry,
        pool=pool,
        metrics=metrics,
        sandbox=sandbox,
        read_pool=read_pool,
    )


def _admitted(pool: WorkPool) -> float:
    return float(pool.inflight)


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
        task = asyncio.create_task(_collect_periodically(services))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if services.sandbox is not None:
                await anyio.to_thread.run_sync(services.sandbox.stop_workers)

    app = FastAPI(
        title="ckpt-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.services = services
    install_problem_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)
    for module in (checkpoints, operations, architectures, health):
        app.include_router(module.router)
    _install_docs(app)
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    return app


async def _collect_periodically(services: Services) -> None:
    while True:
        await asyncio.sleep(services.settings.gc_interval_seconds)
        try:
            removed = await anyio.to_thread.run_sync(services.store.collect_garbage)
            if removed:
                log.info("collected %d stale temp files", removed)
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
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
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
