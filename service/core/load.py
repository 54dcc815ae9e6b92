"""Load untrusted checkpoints safely: detect the format, read it without running anything, find the state_dict.

The format's module does the reading (`service.core.formats`); the private modules of `service.core.loading` do
the allowlist, the opcode scan, the archive checks and the search for the state_dict. This module is the public
face and holds no branch per format.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from service.core.formats import FORMATS, Format, LoadOptions, Probe, detect
from service.core.loading._allowlist import resolve_globals, safe_globals_hint
from service.core.loading._container import (
    CONTAINER_KEYS,
    default_container_key,
    find_state_dict,
    is_module_record,
    list_candidates,
    module_state_dict,
)
from service.core.types import DEFAULT_LIMITS, ArchiveLimits, LoadedCheckpoint

__all__ = ["CONTAINER_KEYS", "is_module_record", "list_candidates", "load_checkpoint", "module_state_dict",
           "resolve_globals", "safe_globals_hint"]


def load_checkpoint(path: Path, *, mmap: bool = True, container_key: str | None = None,
                    safe_globals: Sequence[str] = (), placeholders: bool = True,
                    limits: ArchiveLimits = DEFAULT_LIMITS, formats: Sequence[Format] = FORMATS) -> LoadedCheckpoint:
    """Load a checkpoint file of any accepted format and find the state_dict inside it.

    The format is detected from the content. torch files are read by the placeholder unpickler
    (`service.core.unpickle`: tensors built as torch builds them, every other object an inert record, nothing
    imported or called), or with ``placeholders=False`` by torch's ``weights_only=True`` loader and the
    ``safe_globals`` allowlist (for callers that need real objects). Zip archives pass `check_archive` first and
    are memory-mapped when ``mmap``; safetensors headers are validated before safetensors reads the file.
    The state_dict is the top level when that is a dict of tensors, else the first of `CONTAINER_KEYS` (also
    one level deep, e.g. ``"model.state_dict"``) holding one; a whole pickled ``nn.Module`` gives the
    state_dict its ``state_dict()`` would return. Everything next to it, and non-tensor values inside it, are
    reported in ``extras`` (placeholders by their global's dotted name) rather than dropped silently.

    Args:
        path: The checkpoint file.
        mmap: Memory-map zip archives so tensors are paged in lazily (legacy files cannot be mapped).
        container_key: Dotted path of the state_dict inside the checkpoint; ``None`` searches for it.
        safe_globals: Extra ``"module.qualname"`` globals the allowlist loader may accept, for this load only.
        placeholders: Read pickles with the placeholder unpickler (the default); False uses torch's
            weights-only loader with the ``safe_globals`` allowlist.
        limits: Pre-check limits (keys, zip entries and sizes).
        formats: The format table (`service.core.formats.FORMATS`; tests pass a copy with a format of their own).

    Returns:
        The state_dict (an ``OrderedDict`` of str -> Tensor, keeping ``_metadata`` when present) and what
        was found around it.

    Raises:
        UnsafeCheckpoint: The pickle references globals that only serve to run code (or, with
            ``placeholders=False``, globals outside the allowlist), listed in ``unsafe_globals``.
        UnsupportedFormat: A format that is refused with a way out (TorchScript, a torch.distributed checkpoint,
            a DeepSpeed ZeRO shard), or a safetensors dtype torch cannot hold.
        CorruptCheckpoint: Empty, truncated, garbage, or otherwise unreadable content.
        ArchiveLimitExceeded: The zip archive fails a pre-check.
        ContainerKeyError: ``container_key`` is absent, or no state_dict was found (the message says what
            the file looks like: an optimizer state, an RNG state, training arguments...).
        InvalidRequest: A ``safe_globals`` name cannot be resolved or is not allowed.
        OSError: The file cannot be opened.
    """
    path = Path(path)
    options = LoadOptions(mmap=mmap, placeholders=placeholders, allowed=resolve_globals(safe_globals),
                          limits=limits)
    probe = Probe.of(path)
    fmt = detect(probe, formats=formats)
    raw = fmt.load(probe, options)
    for other in formats:
        if other.detect_content(raw.obj):
            raise other.refused()
    state_dict, key, extras, has_metadata = find_state_dict(raw.obj, container_key)
    return LoadedCheckpoint(
        state_dict=state_dict, format=fmt.name, container_key=key, extras=extras, has_metadata=has_metadata,
        metadata=dict(raw.metadata), mmapped=raw.mmapped, records=raw.records, candidates=list_candidates(raw.obj),
        default_container_key=key if container_key is None else default_container_key(raw.obj),
    )
