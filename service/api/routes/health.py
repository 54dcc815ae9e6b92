"""Liveness, readiness and metrics."""

from __future__ import annotations

import os
import tempfile

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.api.deps import MetricsDep, ServicesDep
from service.api.schemas import Health

router = APIRouter()


@router.get("/healthz", response_model=Health, operation_id="healthz")
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    operation_id="readyz",
    responses={503: {"model": Health, "description": "Not ready"}},
)
def readyz(services: ServicesDep) -> Response:
    """Readiness: the store is writable and the registry is loaded."""
    checks: dict[str, object] = {}
    try:
        # In tmp/, where garbage collection finds it should the process die right here.
        fd, path = tempfile.mkstemp(dir=services.store.root / "tmp", prefix="ready-")
        os.close(fd)
        os.unlink(path)
        checks["store_writable"] = True
    except OSError as exc:
        checks["store_writable"] = f"{type(exc).__name__}: {exc.strerror}"
    checks["architectures"] = len(services.registry.list())
    checks["registry_issues"] = len(services.registry.issues)
    ok = checks["store_writable"] is True
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    operation_id="metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics: requests and latency per route, bytes ingested, merges, verification failures."""
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
