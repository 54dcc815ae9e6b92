"""Liveness, readiness and metrics."""

from __future__ import annotations

import os
import tempfile

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.api.deps import MetricsDep, Services, ServicesDep
from service.api.schemas import Health

router = APIRouter()


@router.get(
    "/healthz",
    response_model=Health,
    operation_id="healthz",
    summary="Check that the process answers",
    tags=["health"],
)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    operation_id="readyz",
    summary="Check that the service is ready",
    tags=["health"],
    responses={503: {"model": Health, "description": "Not ready"}},
)
def readyz(services: ServicesDep) -> Response:
    """Readiness: the store is writable (else 503); `degraded` (200) when an architecture failed to load."""
    checks: dict[str, object] = {}
    try:
        # In tmp/, where garbage collection finds it should the process die right here.
        fd, path = tempfile.mkstemp(dir=services.store.root / "tmp", prefix="ready-")
        os.close(fd)
        os.unlink(path)
        checks["store_writable"] = True
    except OSError as exc:
        checks["store_writable"] = f"{type(exc).__name__}: {exc.strerror}"
    architectures = checks["architectures"] = architectures_check(services)
    checks["registry_issues"] = len(services.registry.issues)
    ok = checks["store_writable"] is True
    status = "unavailable" if not ok else ("degraded" if architectures["status"] != "ok" else "ok")
    body = Health(status=status, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


def architectures_check(services: Services) -> dict[str, str]:
    """The `architectures` readiness check: degraded, naming them, when some failed to load."""
    loaded = len(services.registry.list())
    issues = services.registry.issues
    if not issues:
        return {"status": "ok", "detail": f"{loaded} loaded"}
    failed = "; ".join(f"{i.name!r} ({i.source}): {i.error}" for i in sorted(issues, key=lambda i: i.name))
    return {"status": "degraded", "detail": f"{loaded} loaded, {len(issues)} failed to load: {failed}"}


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    tags=["health"],
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics: requests and latency per route, bytes ingested, merges, verification failures."""
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
