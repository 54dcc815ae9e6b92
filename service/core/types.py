"""Shared result types of the core. Frozen dataclasses; each has `to_dict()` for JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from service.core.pthzip import StorageRecords

# A state_dict as torch produces it: ordered str -> Tensor, maybe with a `_metadata` attribute
# (per-module version info that `load_state_dict` hands to `_load_from_state_dict`).
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ArchiveLimits:
    """Limits a parse is held to: cheap zip pre-checks before torch sees an archive, and the expansion bound."""

    # Tensors or mapping entries in one checkpoint (safetensors: header entries), counted before any per-key
    # work; a zip archive may hold this many entries plus a few records of its own.
    max_keys: int = 500_000
    max_total_bytes: int = 64 << 30
    max_name_length: int = 1024
    # The keys of a checkpoint may expand to ratio x file size + slack bytes, and never more than the cap
    # (service.core.expansion): views of one storage count once per key.
    max_expansion_ratio: float = 4.0
    expansion_slack_bytes: int = 64 << 20
    max_expanded_bytes: int = 128 << 30

    @property
    def max_entries(self) -> int:
        """Zip entries allowed: one per storage (at most one per key) and torch's own records."""
        return self.max_keys + 64


# ArchiveLimits is frozen, so one shared default instance is safe (and keeps ruff's B008 quiet).
DEFAULT_LIMITS = ArchiveLimits()


@dataclass(frozen=True)
class LoadedCheckpoint:
    state_dict: StateDict
    format: str  # the name of its format in service.core.formats.FORMATS: "pth-zip", "pth-legacy", "safetensors"
    container_key: str | None  # which top-level key held the state_dict ("state_dict", "model", ...)
    extras: Mapping[str, str]  # non-tensor entries next to the state_dict: name -> type name
    has_metadata: bool  # the state_dict carried `_metadata`
    metadata: Mapping[str, str] = field(default_factory=dict)  # safetensors header metadata
    mmapped: bool = False
    # where the mapped storages' bytes are in the file, for saving them without reading them (service.core.pthzip)
    records: StorageRecords | None = field(default=None, compare=False, repr=False)
    # every state_dict in the file: dotted container key ("" = top level) -> tensor count
    candidates: Mapping[str, int] = field(default_factory=dict)
    # the container key the default rule picks (differs from container_key when the caller chose another)
    default_container_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "container_key": self.container_key,
            "extras": dict(self.extras),
            "has_metadata": self.has_metadata,
            "metadata": dict(self.metadata),
            "key_count": len(self.state_dict),
            "candidates": dict(self.candidates),
        }


@dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix: "float32", "bfloat16", "int64"
    nbytes: int
    fingerprint: str  # blake3 of the tensor's bytes, 32 hex digits

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "nbytes": self.nbytes,
                "fingerprint": self.fingerprint}


# How fingerprints are computed (service.core.manifest.FINGERPRINT_VERSION); manifests written before the field
# existed are version 1 and are recomputed by the store on first use when the difference matters.
CURRENT_FINGERPRINT_VERSION = 2


@dataclass(frozen=True)
class Manifest:
    entries: Mapping[str, TensorEntry]
    schema_fingerprint: str  # sha256 of the sorted (key, shape, dtype) list
    fingerprint_version: int = CURRENT_FINGERPRINT_VERSION

    @property
    def tensor_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_fingerprint": self.schema_fingerprint,
            "fingerprint_version": self.fingerprint_version,
            "entries": {k: e.to_dict() for k, e in self.entries.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        entries = {
            k: TensorEntry(tuple(e["shape"]), e["dtype"], int(e["nbytes"]), e["fingerprint"])
            for k, e in data["entries"].items()
        }
        return cls(entries=entries, schema_fingerprint=data["schema_fingerprint"],
                   fingerprint_version=int(data.get("fingerprint_version", 1)))
