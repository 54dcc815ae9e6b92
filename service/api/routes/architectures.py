"""The architecture registry over HTTP."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Path, Query, Response

from service.api.deps import ReadAuth, RegistryDep, StoreDep, WriteAuth
from service.api.problems import problem_responses
from service.api.schemas import (
    ArchitectureIn,
    ArchitectureList,
    ArchitectureMatches,
    ArchitectureMatchOut,
    ArchitectureOut,
)
from service.core.verify import ArchitectureSpec, TensorSpec, spec_from_manifest
from service.errors import InvalidArchitecture
from service.registry import Architecture, rank_architectures
from service.store import ArtifactStore

router = APIRouter()

ArchName = Path(max_length=128)


def _out(arch: Architecture, *, with_keys: bool) -> ArchitectureOut:
    return ArchitectureOut.model_validate(arch.to_dict(with_keys=with_keys))


@router.get(
    "/architectures",
    response_model=ArchitectureList,
    operation_id="list_architectures",
    summary="List architectures",
    tags=["architectures"],
    dependencies=[ReadAuth],
    responses=problem_responses(400, 401, 404),
)
def list_architectures(
    registry: RegistryDep,
    store: StoreDep,
    matches: Annotated[
        str | None,
        Query(max_length=200, description="A checkpoint (id or name): also rank the architectures by how well it "
              "fits them, after the prefix transform that fits each best."),
    ] = None,
) -> ArchitectureList:
    """Name, source, key count and schema fingerprint of every registered architecture."""
    archs = registry.list()
    return ArchitectureList(
        items=[_out(a, with_keys=False) for a in archs],
        issues=[{k: str(v) for k, v in i.to_dict().items()} for i in registry.issues],
        matches=_matches(store, matches, archs) if matches is not None else None,
    )


def _matches(store: ArtifactStore, ref: str, archs: list[Architecture]) -> ArchitectureMatches:
    artifact_id = store.resolve(ref)
    entries = {k: (e.shape, e.dtype) for k, e in store.manifest(artifact_id).entries.items()}
    ranking = rank_architectures(entries, ((a.name, a.spec) for a in archs))
    return ArchitectureMatches(
        checkpoint=artifact_id,
        key_count=len(entries),
        ranking=[ArchitectureMatchOut.model_validate(m.to_dict()) for m in ranking],
    )


@router.get(
    "/architectures/{name}",
    response_model=ArchitectureOut,
    operation_id="get_architecture",
    summary="Get an architecture's expected keys",
    tags=["architectures"],
    dependencies=[ReadAuth],
    responses=problem_responses(401, 404),
)
def get_architecture(registry: RegistryDep, name: str = ArchName) -> ArchitectureOut:
    """One architecture with its expected keys, shapes and dtypes."""
    return _out(registry.get(name), with_keys=True)


@router.post(
    "/architectures",
    status_code=201,
    response_model=ArchitectureOut,
    operation_id="register_architecture",
    summary="Register a code-free architecture spec",
    tags=["architectures"],
    dependencies=[WriteAuth],
    responses=problem_responses(400, 401, 403, 404, 409, 422),
)
async def register_architecture(body: ArchitectureIn, registry: RegistryDep, store: StoreDep) -> ArchitectureOut:
    """Register a code-free spec, from a stored checkpoint or from explicit keys."""
    if (body.from_checkpoint is None) == (body.keys is None):
        raise InvalidArchitecture("give exactly one of 'from_checkpoint' and 'keys'")
    if body.from_checkpoint is not None:
        artifact_id = await anyio.to_thread.run_sync(store.resolve, body.from_checkpoint)
        spec = spec_from_manifest(await anyio.to_thread.run_sync(store.manifest, artifact_id))
    else:
        assert body.keys is not None
        spec = ArchitectureSpec(keys={k: TensorSpec(tuple(v.shape), v.dtype) for k, v in body.keys.items()})
    arch = await anyio.to_thread.run_sync(lambda: registry.register_spec(body.name, spec, description=body.description))
    return _out(arch, with_keys=True)


@router.delete(
    "/architectures/{name}",
    status_code=204,
    operation_id="delete_architecture",
    summary="Remove a registered architecture spec",
    tags=["architectures"],
    dependencies=[WriteAuth],
    responses=problem_responses(401, 403, 404, 409),
)
def delete_architecture(registry: RegistryDep, name: str = ArchName) -> Response:
    """Remove a spec-registered architecture (built-in, config and plugin ones cannot be removed)."""
    registry.delete(name)
    return Response(status_code=204)
