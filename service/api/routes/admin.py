"""Operator routes (admin scope): the store's consistency check."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import AdminAuth, ServicesDep
from service.api.problems import problem_responses
from service.api.schemas import FsckOut

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
