"""FastAPI dependencies as `Annotated` aliases, so route bodies hold no lookup, auth or 404 boilerplate."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.guard import authorize
from service.api.metrics import Metrics
from service.api.signing import DownloadSigner
from service.api.work import WorkPool
from service.config import Settings
from service.core.lru import LRUCache
from service.operations import Operations
from service.registry import ArchitectureRegistry
from service.sandbox import ParserSandbox
from service.store import ArtifactMeta, ArtifactStore


class RenderedCache:
    """Response bodies by key, least recently used out past `max_bytes` in total; a body over a quarter of the
    bound is not kept (it would push out everything else). Thread-safe."""

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._bodies: LRUCache[Hashable, bytes] = LRUCache(max_weight=max_bytes, weigh=len)

    def get(self, key: Hashable) -> bytes | None:
        return self._bodies.get(key)

    def put(self, key: Hashable, body: bytes) -> None:
        if len(body) <= self.max_bytes // 4:
            self._bodies.put(key, body)


@dataclass(frozen=True)
class Services:
    """Everything `create_app` builds once and routes share."""

    settings: Settings
    operations: Operations  # store, registry, allowlist and limits: what the routes call
    pool: WorkPool  # heavy work of write-scope requests
    metrics: Metrics
    tokens: Mapping[str, str] = field(default_factory=dict)  # token -> scope, parsed once; empty: open
    sandbox: ParserSandbox | None = None  # the parser worker pool, closed when the app shuts down
    signer: DownloadSigner = field(default_factory=lambda: DownloadSigner(b"unset"))  # create_app sets it
    # Heavy work of read-scope requests: its own slots, so that reads never delay writes.
    read_pool: WorkPool = field(default_factory=lambda: WorkPool(concurrency=1, queue=4, retry_after=2, kind="read"))
    # Rendered GET /diff bodies by (ids, options): artifacts never change, so neither does their diff.
    rendered_diffs: RenderedCache = field(default_factory=lambda: RenderedCache(max_bytes=64 << 20))

    @property
    def store(self) -> ArtifactStore:
        return self.operations.store

    @property
    def registry(self) -> ArchitectureRegistry:
        return self.operations.registry


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_settings(services: ServicesDep) -> Settings:
    return services.settings


def get_store(services: ServicesDep) -> ArtifactStore:
    return services.store


def get_registry(services: ServicesDep) -> ArchitectureRegistry:
    return services.registry


def get_pool(services: ServicesDep) -> WorkPool:
    return services.pool


def get_operations(services: ServicesDep) -> Operations:
    return services.operations


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
RegistryDep = Annotated[ArchitectureRegistry, Depends(get_registry)]
PoolDep = Annotated[WorkPool, Depends(get_pool)]
OperationsDep = Annotated[Operations, Depends(get_operations)]


def get_metrics(services: ServicesDep) -> Metrics:
    return services.metrics


MetricsDep = Annotated[Metrics, Depends(get_metrics)]

RefPath = Annotated[str, Path(description="An artifact id (64 lowercase hex) or a name.", max_length=200)]


def get_artifact(ref: RefPath, store: StoreDep) -> ArtifactMeta:
    # A plain def: FastAPI runs it in the threadpool, so the metadata read stays off the event loop.
    return store.metadata(store.resolve(ref))


ArtifactDep = Annotated[ArtifactMeta, Depends(get_artifact)]

_bearer = HTTPBearer(
    auto_error=False, description="`read:`, `write:` or `admin:` token from CKPT_API_TOKENS"
)


# The RequestGuard middleware (service.api.guard) enforces these from the headers before any body is read, by
# finding them in each route's dependencies; here they run again, and give OpenAPI its security scheme.
def require_read(
    request: Request, services: ServicesDep, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    authorize(services.tokens, request.headers.get("authorization"), "read")


def require_write(
    request: Request, services: ServicesDep, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    authorize(services.tokens, request.headers.get("authorization"), "write")


def require_read_or_signature(
    request: Request,
    services: ServicesDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    # A signed URL (POST /checkpoints/{ref}/download-url) stands for a read token, for its one file and format.
    # The RequestGuard does not know this dependency, so it passes the route through; it is checked here.
    sig = request.query_params.get("sig")
    if sig is None:
        authorize(services.tokens, request.headers.get("authorization"), "read")
        return
    services.signer.check(
        request.path_params.get("ref", ""),
        request.query_params.get("format"),
        request.query_params.get("expires"),
        sig,
    )


def require_admin(
    request: Request, services: ServicesDep, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    authorize(services.tokens, request.headers.get("authorization"), "admin")


ReadAuth = Depends(require_read)
ReadOrSignedAuth = Depends(require_read_or_signature)
WriteAuth = Depends(require_write)
AdminAuth = Depends(require_admin)
AUTH_SCOPES = {require_read: "read", require_write: "write", require_admin: "admin"}
