"""One exception tree for the whole package. No FastAPI import here: the API maps these in one table.

    CheckpointServiceError
    ├── InvalidCheckpoint            the bytes are not a checkpoint we accept (4xx at the API)
    │   ├── UnsafeCheckpoint         pickle references globals outside the allowlist (`unsafe_globals`)
    │   ├── CorruptCheckpoint        truncated, garbage, empty, inconsistent archive
    │   ├── UnsupportedFormat        recognised but not accepted (TorchScript, ...)
    │   ├── ArchiveLimitExceeded     zip pre-checks: too many entries, too large, compressed, bad names
    │   │   └── ExpansionLimitExceeded  keys expand to far more bytes than the file holds (`expanded_bytes`)
    │   ├── UnconvertibleCheckpoint  the target format cannot hold some keys or dtypes (`keys`, `dtypes`)
    │   ├── ContainerKeyError        the requested container key is absent, or no state_dict found
    │   └── InconsistentShards       shards that do not make one checkpoint (`missing_keys`, `missing_files`, ...)
    ├── PrefixCollision              two keys would map to one name (`keys`)
    ├── VerificationFailed           strict verification failed (`report`)
    │   ├── FrozenPartChanged        require_frozen: frozen tensors moved (`changed_keys`, `report`)
    │   ├── IncompleteTrained        require_complete: parameters came from the original (`filled_keys`, `report`)
    │   └── InputsSwapped            original and trained look swapped (`keys`, `report`); allow_swapped overrides
    ├── StoreError
    │   ├── ArtifactNotFound         no artifact for an id or name (`ref`)
    │   │   └── ShardNotFound        no shard of that number in an artifact's split
    │   ├── ArtifactInUse            names still point to the artifact (`names`)
    │   ├── NameNotFound             no such name (`name`)
    │   ├── InvalidReference         not a 64-hex id nor a valid name
    │   ├── AmbiguousReference       an id prefix that several artifacts share (`candidates`)
    │   ├── DigestMismatch           the declared sha256 differs from the bytes (`expected`, `actual`)
    │   ├── PayloadTooLarge          over the configured size limit (`limit`)
    │   └── StorageFull              ENOSPC while writing
    ├── SourceError                  an object imported by reference, s3://bucket/key (`url`)
    │   ├── SourceNotAllowed         outside CKPT_IMPORT_ALLOWED, or import by reference is off (`setting`)
    │   ├── SourceNotFound           no such object or bucket
    │   └── SourceUnavailable        the object store failed, or refused the service's credentials
    ├── ArchitectureError
    │   ├── ArchitectureNotFound     (`architecture`)
    │   ├── ArchitectureConflict     the name exists, or is not spec-registered and cannot be deleted
    │   └── InvalidArchitecture      a spec or factory that cannot be used
    ├── InvalidRequest               a request option that is inconsistent (e.g. both `trained` and a file)
    │   └── RequestTimeout           the client stopped sending its body
    ├── Overloaded                   the bounded work pool is full (`retry_after`)
    ├── TimeBudgetExceeded           a request's heavy work ran past its time budget (`budget_seconds`)
    ├── AuthError
    │   ├── Unauthorized             no or unknown token
    │   └── Forbidden                a read token used for a write
    └── InvalidSettings              the service's own settings are unusable: start-up stops (`setting`)

Every error carries a short human `detail` and `extensions`, a JSON-serialisable dict of typed fields that the
API puts into the RFC 9457 problem document (for example `missing_keys`, `unsafe_globals`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def quote_keys(keys: Iterable[str], *, limit: int = 8) -> str:
    """Render keys sorted and quoted for a short message: 'a', 'b', … (+N more)."""
    ordered = sorted(keys)
    shown = ", ".join(repr(k) for k in ordered[:limit])
    extra = len(ordered) - limit
    return f"{shown} (+{extra} more)" if extra > 0 else shown


class CheckpointServiceError(Exception):
    """Base of every error this package raises on purpose."""

    title = "Checkpoint service error"

    def __init__(self, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extensions: dict[str, Any] = extensions


class InvalidCheckpoint(CheckpointServiceError):
    title = "Invalid checkpoint"


class UnsafeCheckpoint(InvalidCheckpoint):
    title = "Unsafe checkpoint"

    def __init__(self, detail: str, *, unsafe_globals: list[str]) -> None:
        super().__init__(detail, unsafe_globals=sorted(unsafe_globals))
        self.unsafe_globals = sorted(unsafe_globals)


class CorruptCheckpoint(InvalidCheckpoint):
    title = "Corrupt checkpoint"


class UnsupportedFormat(InvalidCheckpoint):
    title = "Unsupported checkpoint format"


class ArchiveLimitExceeded(InvalidCheckpoint):
    title = "Archive limit exceeded"


class ExpansionLimitExceeded(ArchiveLimitExceeded):
    title = "Expansion limit exceeded"


class UnconvertibleCheckpoint(InvalidCheckpoint):
    title = "Checkpoint cannot be converted"


class ContainerKeyError(InvalidCheckpoint):
    title = "State dict not found in checkpoint"


class InconsistentShards(InvalidCheckpoint):
    title = "Inconsistent shards"


class PrefixCollision(CheckpointServiceError):
    title = "Prefix collision"

    def __init__(self, detail: str, *, keys: list[str]) -> None:
        super().__init__(detail, keys=sorted(keys))
        self.keys = sorted(keys)


class VerificationFailed(CheckpointServiceError):
    title = "Verification failed"


class FrozenPartChanged(VerificationFailed):
    title = "Frozen part changed"


class IncompleteTrained(VerificationFailed):
    title = "Trained checkpoint incomplete"


class InputsSwapped(VerificationFailed):
    title = "Original and trained look swapped"


class StoreError(CheckpointServiceError):
    title = "Artifact store error"


class ArtifactNotFound(StoreError):
    title = "Artifact not found"


class ShardNotFound(ArtifactNotFound):
    title = "Shard not found"


class ArtifactInUse(StoreError):
    title = "Artifact in use"


class NameNotFound(StoreError):
    title = "Name not found"


class InvalidReference(StoreError):
    title = "Invalid reference"


class AmbiguousReference(StoreError):
    title = "Ambiguous reference"


class DigestMismatch(StoreError):
    title = "Digest mismatch"


class PayloadTooLarge(StoreError):
    title = "Payload too large"


class StorageFull(StoreError):
    title = "Storage full"


class SourceError(CheckpointServiceError):
    title = "Import source error"


class SourceNotAllowed(SourceError):
    title = "Import source not allowed"


class SourceNotFound(SourceError):
    title = "Import source not found"


class SourceUnavailable(SourceError):
    title = "Import source unavailable"


class ArchitectureError(CheckpointServiceError):
    title = "Architecture error"


class ArchitectureNotFound(ArchitectureError):
    title = "Architecture not found"


class ArchitectureConflict(ArchitectureError):
    title = "Architecture conflict"


class InvalidArchitecture(ArchitectureError):
    title = "Invalid architecture"


class InvalidRequest(CheckpointServiceError):
    title = "Invalid request"


class RequestTimeout(InvalidRequest):
    title = "Request timeout"


class Overloaded(CheckpointServiceError):
    title = "Service overloaded"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.retry_after = retry_after


class TimeBudgetExceeded(CheckpointServiceError):
    title = "Time budget exceeded"


class AuthError(CheckpointServiceError):
    title = "Authentication error"


class Unauthorized(AuthError):
    title = "Unauthorized"


class Forbidden(AuthError):
    title = "Forbidden"


class InvalidSettings(CheckpointServiceError):
    title = "Invalid settings"

    def __init__(self, detail: str, *, setting: str) -> None:
        super().__init__(detail, setting=setting)
        self.setting = setting
