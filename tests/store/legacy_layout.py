"""Data directories of layout 1, written file by file exactly as the store wrote them before the index.

Layout 1: ``ckpt-store.json`` (layout_version 1), ``blobs/<id[:2]>/<id>`` (read-only), ``manifests/<id[:2]>/
<id>.json``, ``meta/<id[:2]>/<id>.json`` (the metadata without ``names``, sorted keys, compact, newline: the
publication point), ``names/<name>`` (the id and a newline) and ``architectures/<name>.json`` (the registry's
spec files: format 1, name, description, keys).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.core.manifest import build_manifest
from service.store.types import ArtifactMeta, Lineage


def _dump(data: Any) -> bytes:
    return (json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _write(path: Path, data: bytes, mode: int = 0o444) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


@dataclass(frozen=True)
class LegacyArtifact:
    meta: ArtifactMeta
    manifest: dict[str, Any]


def legacy_artifact(
    state_dict: dict[str, torch.Tensor],
    *,
    created: str,
    labels: dict[str, str] | None = None,
    lineage: Lineage | None = None,
    filename: str | None = None,
) -> tuple[LegacyArtifact, bytes]:
    """A real torch file of `state_dict` and the metadata layout 1 kept for it."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    data = buf.getvalue()
    manifest = build_manifest(state_dict)
    meta = ArtifactMeta(
        id=hashlib.sha256(data).hexdigest(), size=len(data), created=created, filename=filename,
        format="pth-zip", container_key=None, key_count=len(manifest.entries),
        tensor_bytes=manifest.tensor_bytes, schema_fingerprint=manifest.schema_fingerprint, has_metadata=False,
        extras={"epoch": "3"}, labels=dict(labels or {}), lineage=lineage, candidates={"": len(state_dict)},
    )
    return LegacyArtifact(meta, manifest.to_dict()), data


def write_layout_v1(
    root: Path,
    artifacts: list[tuple[LegacyArtifact, bytes]],
    *,
    names: dict[str, str],
    specs: dict[str, dict[str, Any]],
) -> None:
    """Write a layout-1 data directory holding these artifacts, names and architecture specs."""
    root.mkdir(parents=True)
    _write(root / "ckpt-store.json", _dump({"kind": "ckpt-service artifact store", "layout_version": 1}))
    for sub in ("blobs", "manifests", "meta", "names", "tmp", "locks"):
        (root / sub).mkdir()
    for artifact, data in artifacts:
        aid = artifact.meta.id
        _write(root / "blobs" / aid[:2] / aid, data)
        _write(root / "manifests" / aid[:2] / f"{aid}.json", _dump(artifact.manifest))
        record = artifact.meta.to_dict()
        del record["names"]
        _write(root / "meta" / aid[:2] / f"{aid}.json", _dump(record))
    for name, aid in names.items():
        _write(root / "names" / name, f"{aid}\n".encode(), 0o644)
    for name, keys in specs.items():
        document = {"format": 1, "name": name, "description": f"spec {name}", "keys": keys}
        _write(root / "architectures" / f"{name}.json", json.dumps(document, indent=1).encode(), 0o644)
