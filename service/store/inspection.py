"""The default inspector: parse an upload once, at ingest, into what the store keeps beside the blob."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from service.core.expansion import check_expansion, expansion_budget
from service.core.layout import describe_layout
from service.core.load import load_checkpoint
from service.core.manifest import build_manifest
from service.core.types import DEFAULT_LIMITS, ArchiveLimits
from service.errors import InvalidCheckpoint, quote_keys
from service.store.types import Inspection


def inspect_checkpoint(
    path: Path, *, safe_globals: Sequence[str] = (), limits: ArchiveLimits = DEFAULT_LIMITS,
    container_key: str | None = None,
) -> Inspection:
    """Load a checkpoint safely (placeholder unpickler, mmap where possible) and build its manifest.

    Before any per-key work (hashing), the keys are checked: each must be a valid UTF-8 string, and together
    they may expand to at most `expansion_budget` of the file's size (views of one storage count per key).

    Args:
        path: The checkpoint file. Its name is never looked at; the format is detected from the content.
        safe_globals: Extra "module.qualname" globals the unpickler may accept for this load only.
        limits: Zip pre-check limits and the expansion bound.
        container_key: The state_dict to use inside the file; None applies the default rule.

    Returns:
        The format, container key, extras, `_metadata` presence, manifest, and the tensors' layout in the file.

    Raises:
        InvalidCheckpoint: Any subclass, from the loader, when the file is not an acceptable checkpoint; itself
            for keys that are not valid UTF-8.
        ExpansionLimitExceeded: The keys expand to more than the bound.
    """
    loaded = load_checkpoint(path, mmap=True, safe_globals=safe_globals, limits=limits, container_key=container_key)
    _check_keys(loaded.state_dict)
    check_expansion(loaded.state_dict, budget=expansion_budget([os.stat(path).st_size], limits))
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


def _check_keys(state_dict: Mapping[str, torch.Tensor]) -> None:
    # A pickle can hold str objects that are not Unicode text (lone surrogates, "w\ud800"): no JSON, HTTP header
    # or safetensors file can carry them, so every later use of the key would fail.
    bad = []
    for key in state_dict:
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(key)
    if bad:
        shown = [k.encode("utf-8", "backslashreplace").decode("utf-8") for k in bad]
        raise InvalidCheckpoint(
            f"{len(bad)} keys are not valid UTF-8 (lone surrogates): {quote_keys(shown)}", keys=sorted(shown)
        )
