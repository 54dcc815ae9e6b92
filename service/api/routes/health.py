"""Liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.api.deps import MetricsDep, Services, ServicesDep
from service.api.schemas import Health, Readiness, ReadinessCheck
from service.config import is_loopback

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


_RANK = {"ok": 0, "degraded": 1, "unavailable": 2}


@router.get(
    "/readyz",
    response_model=Readiness,
    operation_id="readyz",
    summary="Check that the service is ready",
    tags=["health"],
    responses={503: {"model": Readiness, "description": "Not ready"}},
)
def readyz(services: ServicesDep) -> Response:
    """Readiness: each check ok, degraded or unavailable; the worst decides (503 only when unavailable)."""
    checks = readiness_checks(services)
    status = max((c.status for c in checks.values()), key=_RANK.__getitem__, default="ok")
    body = Readiness(status=status, checks=checks)
    return JSONResponse(body.model_dump(), status_code=503 if status == "unavailable" else 200)


def readiness_checks(services: Services) -> dict[str, ReadinessCheck]:
    """Every readiness check by name. A check that cannot serve anything is unavailable; one that serves less
    than it should (or less safely) is degraded."""
    return {
        "store": _store_check(services),
        "architectures": _architectures_check(services),
        "auth": _auth_check(services),
    }


def _store_check(services: Services) -> ReadinessCheck:
    health = services.store.ready()
    return ReadinessCheck(status="ok" if health.ok else "unavailable", detail=health.detail)


def _architectures_check(services: Services) -> ReadinessCheck:
    loaded = len(services.registry.list())
    issues = services.registry.issues
    if not issues:
        return ReadinessCheck(status="ok", detail=f"{loaded} architectures loaded")
    failed = "; ".join(f"{i.name!r} ({i.source}): {i.error}" for i in sorted(issues, key=lambda i: i.name))
    return ReadinessCheck(
        status="degraded", detail=f"{loaded} loaded, {len(issues)} failed to load: {failed}"
    )


def _auth_check(services: Services) -> ReadinessCheck:
    host = services.settings.host
    if services.tokens:
        return ReadinessCheck(status="ok", detail=f"{len(services.tokens)} tokens configured")
    if is_loopback(host):
        return ReadinessCheck(status="ok", detail=f"open (no CKPT_API_TOKENS), bound to loopback {host}")
    return ReadinessCheck(
        status="degraded", detail=f"open (no CKPT_API_TOKENS) on the non-loopback address {host}: anyone may write"
    )


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
