"""Result types of the artifact store. Frozen dataclasses; each has `to_dict()` for JSON."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.core.types import Manifest

# combine: shards of one checkpoint made one file (params: each shard's file name and sha256, and the index's)
LINEAGE_OPERATIONS: tuple[str, ...] = ("strip", "merge", "convert", "extract", "combine", "import")


@dataclass(frozen=True)
class Inspection:
    """What the store learns from parsing an upload once, at ingest."""

    format: str  # a name of service.core.formats.FORMATS: "pth-zip", "pth-legacy", "safetensors"
    container_key: str | None
    extras: dict[str, str]
    has_metadata: bool
    manifest: Manifest
    # Where the state_dict's tensors are in the file (service.core.layout), when they can be described: lets
    # the API process map them without unpickling the upload again. Not stored.
    layout: dict[str, Any] | None = None
    # every state_dict in the file (container key -> tensor count), and the key the default rule picks
    candidates: dict[str, int] = field(default_factory=dict)
    default_container_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "container_key": self.container_key,
            "extras": dict(self.extras),
            "has_metadata": self.has_metadata,
            "manifest": self.manifest.to_dict(),
            "layout": self.layout,
            "candidates": dict(self.candidates),
            "default_container_key": self.default_container_key,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Inspection:
        return cls(
            format=str(data["format"]),
            container_key=data["container_key"],
            extras={str(k): str(v) for k, v in data["extras"].items()},
            has_metadata=bool(data["has_metadata"]),
            manifest=Manifest.from_dict(data["manifest"]),
            layout=data.get("layout") if isinstance(data.get("layout"), dict) else None,
            candidates={str(k): int(v) for k, v in data.get("candidates", {}).items()},
            default_container_key=data.get("default_container_key"),
        )


# Parses a checkpoint file into an Inspection, raising InvalidCheckpoint subclasses. Injected into the store
# so that the parse of untrusted bytes can run in a sandboxed worker process.
# Called as inspector(path) or inspector(path, container_key=key) to use another state_dict inside the file.
Inspector = Callable[..., Inspection]


@dataclass(frozen=True)
class Lineage:
    """How a derived artifact was made: the operation, its inputs by role, its options and its report."""

    operation: str  # one of LINEAGE_OPERATIONS
    inputs: dict[str, str]  # role -> artifact id, e.g. {"original": id, "trained": id}
    params: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "inputs": dict(self.inputs),
            "params": dict(self.params),
            "report": dict(self.report),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lineage:
        return cls(
            operation=str(data["operation"]),
            inputs={str(k): str(v) for k, v in data["inputs"].items()},
            params=dict(data.get("params", {})),
            report=dict(data.get("report", {})),
        )


@dataclass(frozen=True)
class ArtifactMeta:
    """The published record of one artifact. `names` is not stored with it: it is filled in on read."""

    id: str
    size: int
    created: str  # ISO-8601 UTC, microseconds, "Z" suffix: sorts as text
    filename: str | None  # as uploaded; metadata only, never used for a path or for format detection
    format: str  # a name of service.core.formats.FORMATS: "pth-zip", "pth-legacy", "safetensors"
    container_key: str | None
    key_count: int
    tensor_bytes: int
    schema_fingerprint: str
    has_metadata: bool
    extras: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    lineage: Lineage | None = None
    names: tuple[str, ...] = ()
    candidates: dict[str, int] = field(default_factory=dict)  # state_dicts in the file: container key -> keys

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "size": self.size,
            "created": self.created,
            "filename": self.filename,
            "format": self.format,
            "container_key": self.container_key,
            "key_count": self.key_count,
            "tensor_bytes": self.tensor_bytes,
            "schema_fingerprint": self.schema_fingerprint,
            "has_metadata": self.has_metadata,
            "extras": dict(self.extras),
            "labels": dict(self.labels),
            "lineage": self.lineage.to_dict() if self.lineage is not None else None,
            "names": list(self.names),
            "candidates": dict(self.candidates),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactMeta:
        lineage = data.get("lineage")
        return cls(
            id=str(data["id"]),
            size=int(data["size"]),
            created=str(data["created"]),
            filename=data.get("filename"),
            format=str(data["format"]),
            container_key=data.get("container_key"),
            key_count=int(data["key_count"]),
            tensor_bytes=int(data["tensor_bytes"]),
            schema_fingerprint=str(data["schema_fingerprint"]),
            has_metadata=bool(data["has_metadata"]),
            extras={str(k): str(v) for k, v in data.get("extras", {}).items()},
            labels={str(k): str(v) for k, v in data.get("labels", {}).items()},
            lineage=Lineage.from_dict(lineage) if lineage is not None else None,
            names=tuple(data.get("names", ())),
            candidates={str(k): int(v) for k, v in data.get("candidates", {}).items()},
        )


@dataclass(frozen=True)
class LabelChanges:
    """The label keys an update added, changed (another value) and removed, each sorted."""

    added: list[str]
    changed: list[str]
    removed: list[str]

    def to_dict(self) -> dict[str, list[str]]:
        return {"added": list(self.added), "changed": list(self.changed), "removed": list(self.removed)}



@dataclass(frozen=True)
class IngestResult:
    artifact: ArtifactMeta
    created: bool  # False: the same bytes were already stored and nothing was rewritten
    # bytes already stored, with labels given: the keys those labels added or changed (merged into the artifact's)
    labels_changed: LabelChanges | None = None

    def to_dict(self) -> dict[str, Any]:
        changed = self.labels_changed.to_dict() if self.labels_changed is not None else None
        return {"artifact": self.artifact.to_dict(), "created": self.created, "labels_changed": changed}


@dataclass(frozen=True)
class Page:
    items: list[ArtifactMeta]
    next_cursor: str | None  # pass back as `cursor` for the next page; None on the last page
    total: int  # artifacts matching the filters, over all pages

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": [m.to_dict() for m in self.items],
            "next_cursor": self.next_cursor,
            "total": self.total,
        }


@dataclass(frozen=True)
class VerifyBlobResult:
    id: str
    ok: bool
    actual_sha256: str
    expected_size: int
    actual_size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ok": self.ok,
            "actual_sha256": self.actual_sha256,
            "expected_size": self.expected_size,
            "actual_size": self.actual_size,
        }
