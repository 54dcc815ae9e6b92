"""The default inspector: parse an upload once, at ingest, into what the store keeps beside the blob."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from service.core.layout import describe_layout
from service.core.load import load_checkpoint
from service.core.manifest import build_manifest
from service.core.types import ArchiveLimits
from service.store.types import Inspection

_DEFAULT_LIMITS = ArchiveLimits()


def inspect_checkpoint(
    path: Path, *, safe_globals: Sequence[str] = (), limits: ArchiveLimits = _DEFAULT_LIMITS,
    container_key: str | None = None,
) -> Inspection:
    """Load a checkpoint safely (weights_only, mmap where possible) and build its manifest.

    Args:
        path: The checkpoint file. Its name is never looked at; the format is detected from the content.
        safe_globals: Extra "module.qualname" globals the unpickler may accept for this load only.
        limits: Zip pre-check limits.
        container_key: The state_dict to use inside the file; None applies the default rule.

    Returns:
        The format, container key, extras, `_metadata` presence, manifest, and the tensors' layout in the file.

    Raises:
        InvalidCheckpoint: Any subclass, from the loader, when the file is not an acceptable checkpoint.
    """
    loaded = load_checkpoint(path, mmap=True, safe_globals=safe_globals, limits=limits, container_key=container_key)
    return Inspection(
        format=loaded.format,
        container_key=loaded.container_key,
        extras=dict(loaded.extras),
        has_metadata=loaded.has_metadata,
        manifest=build_manifest(loaded.state_dict),
        layout=describe_layout(loaded),
        candidates=dict(loaded.candidates),
        default_container_key=loaded.default_container_key,
    )
