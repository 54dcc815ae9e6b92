"""Pydantic models of the HTTP API. Imports pydantic only, so the client can share them without torch."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.format_names import OutputFormat

Category = Literal["only_in_a", "only_in_b", "shape_mismatch", "dtype_mismatch", "changed", "unchanged"]
CATEGORIES: tuple[Category, ...] = (
    "only_in_a",
    "only_in_b",
    "shape_mismatch",
    "dtype_mismatch",
    "changed",
    "unchanged",
)


class Problem(BaseModel):
    """RFC 9457 problem details, with the typed extension fields this service uses."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    missing_keys: list[str] | None = None
    unexpected_keys: list[str] | None = None
    unsafe_globals: list[str] | None = None
    keys: list[str] | None = None
    names: list[str] | None = None
    expected: str | None = None
    actual: str | None = None
    limit: int | None = None
    retry_after: int | None = None
    report: dict[str, Any] | None = None
    errors: list[dict[str, Any]] | None = None
    url: str | None = None
    setting: str | None = None


class LineageOut(BaseModel):
    operation: str
    inputs: dict[str, str]
    params: dict[str, Any]
    report: dict[str, Any]


class LabelsChangedOut(BaseModel):
    """Which label keys a request added, changed (new value) and removed."""

    added: list[str]
    changed: list[str]
    removed: list[str] = []


class ArtifactOut(BaseModel):
    id: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int
    created: str
    filename: str | None = None
    format: str
    container_key: str | None = None
    key_count: int
    tensor_bytes: int
    schema_fingerprint: str
    has_metadata: bool
    extras: dict[str, str] = {}
    labels: dict[str, str] = {}
    names: list[str] = []
    lineage: LineageOut | None = None
    candidates: dict[str, int] = Field(
        {}, description="Every state_dict in the file: container key ('' = top level) -> tensor count.")
    download_url: str
    labels_changed: LabelsChangedOut | None = Field(
        None, description="Bytes already stored, labels given: the keys merged into the artifact's labels (a new "
        "value wins); PATCH: what the patch did. Absent otherwise.")


class DownloadUrlOut(BaseModel):
    url: str = Field(description="GET it without a token until `expires`; it opens this artifact in this format only.")
    id: str
    format: OutputFormat
    expires: int = Field(description="Unix seconds.")


class ArtifactPage(BaseModel):
    items: list[ArtifactOut]
    next_cursor: str | None
    total: int


class TensorEntryOut(BaseModel):
    shape: list[int]
    dtype: str
    nbytes: int
    fingerprint: str


class ManifestOut(BaseModel):
    id: str
    schema_fingerprint: str
    key_count: int
    tensor_bytes: int
    entries: dict[str, TensorEntryOut]


class ShardIndexMetadata(BaseModel):
    total_size: int = Field(description="The tensor bytes of all shards (transformers' meaning).")


class ShardOut(BaseModel):
    name: str = Field(description="The shard's file name, model-0000x-of-0000y.safetensors.")
    url: str = Field(description="GET it for the shard's safetensors bytes, computed on the fly.")
    size: int = Field(description="The shard file's size in bytes.")
    key_count: int


class ShardIndexOut(BaseModel):
    """transformers' model.safetensors.index.json (`metadata`, `weight_map`), with where to get each shard."""

    metadata: ShardIndexMetadata
    weight_map: dict[str, str] = Field(description="Key -> the name of the shard that holds it.")
    id: str = Field(description="The artifact split.")
    max_shard_size: int = Field(description="The most tensor bytes in a shard (a larger tensor has its own).")
    shards: list[ShardOut]


class NameIn(BaseModel):
    id: str = Field(description="An artifact id (64 hex) or another name.")


class NameOut(BaseModel):
    name: str
    id: str


class DeletedOut(BaseModel):
    deleted: str
    names_removed: list[str] = []


class StripIn(BaseModel):
    checkpoint: str = Field(description="An artifact id or name.")
    prefixes: list[str] | None = Field(
        None, description="Prefixes to remove; omitted: detect known wrappers (and, in a Lightning checkpoint, the "
        "LightningModule attribute every key starts with).")
    like: str | None = Field(
        None, max_length=200, description="Instead of `prefixes`: rename (strip or add prefixes) so that the keys "
        "line up with this stored checkpoint's (an id or name).")
    like_architecture: str | None = Field(
        None, max_length=128, description="Instead of `prefixes`: line the keys up with a registered architecture's.")
    output_format: OutputFormat = "pth"
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    container_key: str | None = Field(
        None, min_length=1, max_length=1024,
        description="The state_dict to use inside the file (dotted, e.g. 'model.ema'); omitted: the one chosen "
        "at upload.",
    )


class ImportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        None,
        max_length=2048,
        description="The object to import, s3://bucket/key, under a prefix of CKPT_IMPORT_ALLOWED; the service reads "
        "it itself with its own object-store credentials.",
    )
    urls: list[Annotated[str, Field(max_length=2048)]] | None = Field(
        None,
        min_length=1,
        max_length=257,
        description="Instead of `url`: the shards of one checkpoint and its '*.index.json', combined into one "
        "artifact as uploaded shards are (lineage 'combine', with the URLs).",
    )
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                             description="Point this name at the artifact.")
    labels: dict[str, str] | None = Field(None, description="Key/value labels for a new artifact.")
    container_key: str | None = Field(
        None, min_length=1, max_length=1024,
        description="The state_dict to use inside the file (dotted, e.g. 'model.ema'); when it is not the default "
        "one, the object is stored as read and the answer is a derived artifact holding that state_dict alone.",
    )


class OperationOut(BaseModel):
    id: str
    created: bool
    download_url: str
    artifact: ArtifactOut
    report: dict[str, Any]


class DiffCategoryKeys(BaseModel):
    keys: list[str]
    total: int
    truncated: bool


class DiffOut(BaseModel):
    a: str
    b: str
    normalized: bool
    summary: dict[str, int]
    keys: dict[str, DiffCategoryKeys]
    details: dict[str, dict[str, Any]]
    modules: dict[str, dict[str, int]]
    values: dict[str, dict[str, Any]] | None = None
    frozen: dict[str, Any] | None = None
    # values=true: per-module change figures (service.core.changes): {"rel_change", "modules": {module: {keys,
    # changed_keys, numel, changed, rel_change, max_abs}}}, over the keys in both with equal shape and dtype.
    changes: dict[str, Any] | None = None
    alignment: dict[str, Any] | None = Field(
        None, exclude_if=lambda v: v is None,
        description="normalize_prefixes=align: each side's transform ({strip_wrappers, strip_lead, strip, add}) and "
        "how many keys the two sides have in common after it.")


class TensorSpecIO(BaseModel):
    shape: list[int]
    dtype: str


class ArchitectureOut(BaseModel):
    name: str
    source: str
    key_count: int
    schema_fingerprint: str
    description: str | None = None
    keys: dict[str, TensorSpecIO] | None = None


class ArchitectureMatchOut(BaseModel):
    """How well a checkpoint fits one architecture, after the prefix transform that fits it best."""

    name: str
    score: float = Field(description="Keys that match with the right shape / keys in either (0..1).")
    matched: int = Field(description="Checkpoint keys the architecture expects (after the transform).")
    missing: int = Field(description="Expected keys the checkpoint lacks.")
    unexpected: int = Field(description="Checkpoint keys the architecture does not have.")
    shape_mismatches: int = Field(description="Matched keys of another shape.")
    dtype_mismatches: int = Field(description="Matched keys of the right shape and another dtype.")
    transform: dict[str, Any] = Field(description="The rename applied first: {strip_wrappers, strip_lead, strip, add}.")


class ArchitectureMatches(BaseModel):
    checkpoint: str = Field(description="The id of the checkpoint ranked against.")
    key_count: int
    ranking: list[ArchitectureMatchOut] = Field(description="Best fit first.")


class ArchitectureList(BaseModel):
    items: list[ArchitectureOut]
    issues: list[dict[str, str]]
    matches: ArchitectureMatches | None = Field(
        None, exclude_if=lambda v: v is None,
        description="With `?matches=REF`: the architectures ranked by how well that checkpoint fits them.")


class ArchitectureIn(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    from_checkpoint: str | None = Field(None, description="Take keys, shapes and dtypes from a stored artifact.")
    keys: dict[str, TensorSpecIO] | None = None
    description: str | None = None


class Health(BaseModel):
    status: str
    checks: dict[str, Any] = {}


ReadinessStatus = Literal["ok", "degraded", "unavailable"]


class ReadinessCheck(BaseModel):
    status: ReadinessStatus
    detail: str


class Readiness(BaseModel):
    """GET /readyz: the worst check decides; 200 for ok and degraded, 503 for unavailable."""

    status: ReadinessStatus
    checks: dict[str, ReadinessCheck]


class LabelsPatchIn(BaseModel):
    """PATCH /checkpoints/{ref}: label keys to set (a string) or delete (null)."""

    model_config = ConfigDict(extra="forbid")
    labels: dict[str, str | None] = Field(description="key -> new value, or null to delete the key.")


class GcIn(BaseModel):
    """POST /admin/gc."""

    model_config = ConfigDict(extra="forbid")
    dry_run: bool = Field(True, description="Only report what the retention policy would remove.")


class GcItemOut(BaseModel):
    id: str
    size: int
    created: str


class GcOut(BaseModel):
    """POST /admin/gc: what the retention policy removed, or would remove (dry run)."""

    dry_run: bool
    enabled: bool = Field(description="False: no retention age is configured (CKPT_RETENTION_DAYS), nothing goes.")
    reason: str | None = Field(description="Why the listed artifacts go: the policy in words.")
    removed: list[GcItemOut] = Field(description="Artifacts removed (or that would be), oldest first.")
    count: int
    bytes: int = Field(description="Their total size.")
    skipped: list[str] = Field(description="Candidates named or leased by an operation when their turn came.")


class FsckOut(BaseModel):
    """POST /admin/fsck: whether the index and the blobs agree, and what was repaired."""

    ok: bool = Field(description="No artifact is broken (orphan blobs alone do not make it false).")
    checked: int = Field(description="Published artifacts checked.")
    missing_blobs: list[str] = Field(description="Artifacts whose blob is gone.")
    size_mismatches: list[str] = Field(description="Artifacts whose blob has another size than recorded.")
    digest_mismatches: list[str] = Field(description="Artifacts whose bytes do not hash to their id (deep only).")
    bad_manifests: list[str] = Field(description="Artifacts whose manifest is unreadable or not their key count.")
    orphan_blobs: list[str] = Field(description="Blobs without an artifact (young ones may be uploads in flight).")
    repaired: list[str] = Field(description="What `repair` did, one line each.")
    names_removed: list[str] = Field(description="Names that pointed at unpublished broken artifacts.")
