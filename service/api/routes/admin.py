"""Operator routes (admin scope): the store's consistency check and the retention policy."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import AdminAuth, ServicesDep
from service.api.problems import problem_responses
from service.api.schemas import FsckOut, GcIn, GcOut

router = APIRouter()


@router.post(
    "/admin/fsck",
    response_model=FsckOut,
    operation_id="fsck",
    summary="Check that the index and the blobs agree",
    tags=["admin"],
    dependencies=[AdminAuth],
    responses=problem_responses(401, 403, 503),
)
async def fsck(services: ServicesDep, repair: bool = False, deep: bool = False) -> FsckOut:
    """Find rows without blobs, blobs without rows, bad sizes and manifests; `repair` fixes what is safe."""
    report = await services.pool.run(lambda: services.store.fsck(repair=repair, deep=deep))
    return FsckOut.model_validate(report.to_dict())


@router.post(
    "/admin/gc",
    response_model=GcOut,
    operation_id="gc",
    summary="Apply the retention policy (dry run by default)",
    tags=["admin"],
    dependencies=[AdminAuth],
    responses=problem_responses(401, 403, 422, 503),
)
async def gc(services: ServicesDep, body: GcIn | None = None) -> GcOut:
    """Report the artifacts the retention policy does not keep, and with `{"dry_run": false}` delete them.

    The policy (docs/artifact-store.md): named artifacts, artifacts younger than CKPT_RETENTION_DAYS, the newest
    CKPT_RETENTION_KEEP_LAST per value of each key in CKPT_RETENTION_LABEL_KEYS, artifacts an operation holds, and
    everything in the lineage of those, stay; other artifacts go.
    """
    dry_run = True if body is None else body.dry_run
    report = await services.pool.run(lambda: services.store.retain(dry_run=dry_run))
    return GcOut.model_validate(report.to_dict())
