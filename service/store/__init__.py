"""The artifact store: a content-addressed directory of checkpoints (layout: docs/artifact-store.md)."""

from service.store.conversions import ConversionCache, ConvertedBlob
from service.store.ids import (
    ID_RE,
    MIN_ID_PREFIX,
    NAME_RE,
    NAME_RULES,
    is_id,
    is_id_prefix,
    validate_id,
    validate_name,
    validate_new_name,
)
from service.store.inspection import inspect_checkpoint
from service.store.store import ArtifactStore
from service.store.types import (
    LINEAGE_OPERATIONS,
    ArtifactMeta,
    IngestResult,
    Inspection,
    Inspector,
    Lineage,
    Page,
    VerifyBlobResult,
)
from service.store.upload import PendingUpload

__all__ = [
    "ID_RE",
    "LINEAGE_OPERATIONS",
    "NAME_RE",
    "ArtifactMeta",
    "ArtifactStore",
    "ConversionCache",
    "ConvertedBlob",
    "IngestResult",
    "Inspection",
    "Inspector",
    "Lineage",
    "Page",
    "PendingUpload",
    "VerifyBlobResult",
    "inspect_checkpoint",
    "is_id",
    "validate_id",
    "validate_name",
    "validate_new_name",
    "is_id_prefix",
    "MIN_ID_PREFIX",
    "NAME_RULES",
]
