"""Application operations: strip, merge and diff over stored artifacts (conversions: `ArtifactStore.convert`).

This layer sits between the API and store/core/registry: it composes core functions over artifacts and decides
what gets stored. It is synchronous and CPU/IO-heavy; the API runs it in its bounded work pool, and a script can
call it directly on an `ArtifactStore`.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, Literal, cast

import torch

from service.core import sharding
from service.core.budget import current_job, job_scope
from service.core.changes import ChangeSummary, changes_from_stats, measure_changes, rollup_modules
from service.core.diff import ManifestDiff, diff_manifests, diff_values, normalize_entries
from service.core.expansion import expansion_budget
from service.core.formats import writer_for
from service.core.formats.pth_zip import FORMAT as PTH_ZIP
from service.core.formats.safetensors import FORMAT as SAFETENSORS
from service.core.frozen import FrozenReport, check_frozen_manifests, with_value_changes
from service.core.layout import map_layout
from service.core.load import load_checkpoint
from service.core.lru import LRUCache
from service.core.manifest import build_manifest, compute_schema_fingerprint
from service.core.merge import (
    BN_STAT_NAMES,
    ShardEvidence,
    SwapSignals,
    detect_swap,
    merge_state_dicts,
    shard_evidence,
)
from service.core.prefixes import (
    KeyTransform,
    align_keys,
    align_prefixes,
    apply_transform,
    is_lightning,
    lightning_transform,
    match_prefixes,
    strip_prefixes,
)
from service.core.pthzip import StorageRecords
from service.core.statedict import metadata_of, with_metadata
from service.core.types import ArchiveLimits, LoadedCheckpoint, Manifest, TensorEntry
from service.core.verify import verify_state_dict
from service.errors import (
    ArchiveLimitExceeded,
    ArtifactNotFound,
    FrozenPartChanged,
    IncompleteTrained,
    InconsistentShards,
    InputsSwapped,
    InvalidRequest,
    PayloadTooLarge,
    ShardNotFound,
    UnconvertibleCheckpoint,
    VerificationFailed,
    quote_keys,
)
from service.format_names import OutputFormat
from service.importer import ObjectImporter, RemoteObject
from service.registry import ArchitectureRegistry
from service.store import (
    ArtifactMeta,
    ArtifactStore,
    ConvertedBlob,
    IngestResult,
    Inspection,
    Lineage,
    PendingUpload,
)
from service.store.types import LabelChanges

# False: keys as stored; True: known wrappers stripped (and a Lightning file's module attribute); "align": the
# transform of each side that gives the most keys in common.
NormalizeMode = bool | Literal["align"]


@dataclass
class Source:
    """One input of an operation: a stored artifact, an upload that is not committed yet, or an object to import.

    `Operations` reads an object to import (`url`) into an upload or, for a version it stored before, a stored
    artifact, before the operation runs; `origin` then describes the object, for the lineage of what is stored.
    """

    artifact_id: str | None = None
    upload: PendingUpload | None = None
    filename: str | None = None
    inspection: Inspection | None = None
    # the state_dict to use inside the file (dotted, e.g. "model.ema"); None: the one chosen at ingest
    container_key: str | None = None
    # how an upload was made (shards combined: `combine_shards`; an object read: `import_lineage`); recorded when
    # it is committed
    lineage: Lineage | None = None
    url: str | None = None  # s3://bucket/key, checked against the import allowlist (`ObjectImporter.check`)
    origin: RemoteObject | None = None


@dataclass(frozen=True)
class UploadedFile:
    """One file part of a request: the client's file name, its bytes, and the sha256 the client declared."""

    filename: str | None
    upload: PendingUpload
    expected_sha256: str | None = None


@dataclass(frozen=True)
class OperationResult:
    artifact: ArtifactMeta
    created: bool
    report: dict[str, Any]
    labels_changed: LabelChanges | None = None  # the result existed and labels were given: what they changed


@dataclass(frozen=True)
class MergeOptions:
    architecture: str
    strip: str | Sequence[str] = (
        "auto"  # "auto" (match the architecture), "known", "none", or explicit prefixes
    )
    drop_unexpected: bool = False
    output_format: OutputFormat = "pth"
    # None: no frozen check (the merge cannot know what the training froze); else the frozen part's key prefixes.
    frozen_prefixes: tuple[str, ...] | None = None
    require_frozen: bool = False  # a changed frozen tensor is an error (FrozenPartChanged) and nothing is stored
    frozen_atol: float = 0.0  # largest absolute difference of a frozen tensor still counted as unchanged
    labels: Mapping[str, str] = field(default_factory=dict)
    require_complete: bool = False  # a parameter taken from the original is an error (IncompleteTrained)
    allow_swapped: bool = False  # merge even when original and trained look swapped

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "strip_prefixes": self.strip if isinstance(self.strip, str) else list(self.strip),
            "drop_unexpected": self.drop_unexpected,
            "output_format": self.output_format,
            "frozen_prefixes": list(self.frozen_prefixes) if self.frozen_prefixes is not None else None,
        }
        # Only when set, so that the lineage (and the id) of a merge without them is what it always was.
        if self.require_frozen:
            out["require_frozen"] = True
        if self.frozen_atol:
            out["frozen_atol"] = self.frozen_atol
        if self.require_complete:
            out["require_complete"] = True
        if self.allow_swapped:
            out["allow_swapped"] = True
        return out


@dataclass(frozen=True)
class _Opened:
    state_dict: dict[str, torch.Tensor]
    manifest: Manifest
    artifact_id: str
    records: StorageRecords | None
    lightning: bool = False  # written by Lightning's Trainer (its module attribute is a wrapper)
    filename: str | None = None


def _open(
    store: ArtifactStore, source: Source, *, safe_globals: Sequence[str], limits: ArchiveLimits
) -> _Opened:
    if source.artifact_id is not None:
        loaded = store.load(source.artifact_id, safe_globals=safe_globals, container_key=source.container_key)
        sd = loaded.state_dict
        meta = store.metadata(source.artifact_id)
        manifest = (store.manifest(source.artifact_id) if source.container_key is None
                    or source.container_key == meta.container_key else build_manifest(sd))
        return _Opened(_own(sd), manifest, source.artifact_id, loaded.records,
                       is_lightning(meta.extras), meta.filename)
    assert source.upload is not None
    upload = source.upload
    if source.inspection is None:
        source.inspection = store.inspect_upload(upload, container_key=source.container_key)
    if source.inspection.layout is not None:
        # The parser already unpickled it (in the sandbox); map the tensors where it says they are instead.
        sd, records = map_layout(upload.path, source.inspection.layout)
        return _Opened(sd, source.inspection.manifest, upload.sha256, records,
                       is_lightning(source.inspection.extras), source.filename)
    loaded = load_checkpoint(
        upload.path,
        mmap=True,
        container_key=source.inspection.container_key,
        safe_globals=safe_globals,
        limits=limits,
    )
    sd = loaded.state_dict
    return _Opened(_own(sd), source.inspection.manifest, upload.sha256, loaded.records,
                   is_lightning(source.inspection.extras), source.filename)


def _own(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A dict of the caller's own (the store may cache the one it was given), with the same `_metadata`.
    return with_metadata(state_dict, metadata_of(state_dict))


def _carry_manifest(
    renamed: Mapping[str, torch.Tensor], original: Mapping[str, torch.Tensor], manifest: Manifest
) -> dict[str, TensorEntry]:
    # Stripping and merging keep tensor objects, so each output key's entry is its input key's entry: the
    # fingerprints are reused instead of hashing gigabytes again.
    by_tensor = {id(t): manifest.entries[k] for k, t in original.items() if k in manifest.entries}
    return {k: by_tensor[id(t)] for k, t in renamed.items() if id(t) in by_tensor}


def _strip(
    sd: dict[str, torch.Tensor], mode: str | Sequence[str], expected: Iterable[str] | None, *, lightning: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if isinstance(mode, str):
        if mode == "none":
            return sd, {"mode": "none", "applied": {}}
        if mode == "known" or (mode == "auto" and expected is None):
            result = strip_prefixes(sd, lightning=lightning)
            return _own(result.state_dict), {
                "mode": "known",
                "applied": dict(result.applied),
            }
        if mode != "auto":
            raise InvalidRequest(
                f"strip_prefixes must be 'auto', 'known', 'none' or a prefix list, not {mode!r}"
            )
        assert expected is not None
        match = match_prefixes(sd.keys(), expected)
        if match.prefixes == ():
            return sd, {"mode": "auto", "applied": {}, "match": match.to_dict()}
        result = apply_transform(sd, match.transform)
        return _own(result.state_dict), {
            "mode": "auto",
            "applied": dict(result.applied),
            "match": match.to_dict(),
        }
    result = strip_prefixes(sd, list(mode))
    return _own(result.state_dict), {
        "mode": "explicit",
        "applied": dict(result.applied),
    }


def import_lineage(origin: RemoteObject) -> Lineage:
    """The lineage of an artifact imported by reference: no inputs, the object it was read from in `params`."""
    return Lineage(operation="import", inputs={}, params=origin.lineage_params())


def _stored(sources: Iterable[Source]) -> list[str]:
    """The ids of the sources that are stored artifacts (to lease while an operation reads them)."""
    return [s.artifact_id for s in sources if s.artifact_id is not None]


def _commit_inputs(store: ArtifactStore, sources: Iterable[Source]) -> None:
    for source in sources:
        if source.upload is not None and source.artifact_id is None:
            meta = store.commit_upload(
                source.upload, filename=source.filename, inspection=source.inspection, lineage=source.lineage
            ).artifact
            source.artifact_id = meta.id


def merge_checkpoints(
    store: ArtifactStore,
    registry: ArchitectureRegistry,
    *,
    original: Source,
    trained: Source,
    options: MergeOptions,
    safe_globals: Sequence[str] = (),
    limits: ArchiveLimits | None = None,
    caches: OperationCaches | None = None,
) -> OperationResult:
    """Strip, merge, verify strictly against the architecture, and only then store.

    Args:
        store: The artifact store.
        registry: Where `options.architecture` is looked up.
        original: The pretrained checkpoint that fills what the trained one lacks.
        trained: The fine-tuned checkpoint; its values win.
        options: Architecture and merge options.
        safe_globals: Extra globals allowed while unpickling.
        limits: Zip pre-check limits for uploads; None: the store's.
        caches: What to remember between calls (`Operations.caches`); None: nothing is remembered.

    Returns:
        The stored result and the merge report.

    Raises:
        VerificationFailed: The merged state_dict does not load strictly; nothing is stored.
    """
    limits = limits or store.limits
    arch = registry.get(options.architecture)
    expected = list(arch.spec.keys)
    o = _open(store, original, safe_globals=safe_globals, limits=limits)
    t = _open(store, trained, safe_globals=safe_globals, limits=limits)
    o_sd, o_strip = _strip(o.state_dict, options.strip, expected, lightning=o.lightning)
    t_sd, t_strip = _strip(t.state_dict, options.strip, expected, lightning=t.lightning)
    swap = detect_swap(o_sd.keys(), t_sd.keys(), original_prefixes=o_strip["applied"],
                       trained_prefixes=t_strip["applied"])
    shards = {role: shard_evidence(opened.filename, opened.state_dict.keys())
              for role, opened in (("original", o), ("trained", t))}
    merged = merge_state_dicts(o_sd, t_sd, expected_keys=expected, drop_unexpected=options.drop_unexpected)
    verification = verify_state_dict(merged.state_dict, arch.verify_target())
    o_entries = _carry_manifest(o_sd, o.state_dict, o.manifest)
    t_entries = _carry_manifest(t_sd, t.state_dict, t.manifest)
    sq_norms = (caches if caches is not None else OperationCaches()).sq_norms
    changes = _trained_changes(o_sd, t_sd, o_entries, t_entries, sq_norms)
    frozen = None
    if options.frozen_prefixes is not None:
        fingerprints = check_frozen_manifests(
            Manifest(o_entries, o.manifest.schema_fingerprint),
            Manifest(t_entries, t.manifest.schema_fingerprint),
            prefixes=options.frozen_prefixes,
        )
        frozen = with_value_changes(fingerprints, changes.keys, atol=options.frozen_atol)
    mr = merged.report
    filled = _filled_parameters(mr.filled_parameters, mr.filled_parameter_modules, merged.state_dict)
    report: dict[str, Any] = {
        "architecture": arch.name,
        "provenance_counts": dict(mr.counts),
        "filled": list(mr.filled),
        "filled_modules": list(mr.filled_modules),
        "partial_bn_modules": {k: list(v) for k, v in mr.partial_bn_modules.items()},
        "unexpected": list(mr.unexpected),
        "dropped": list(mr.dropped),
        "metadata": mr.metadata,
        "prefixes": {"original": o_strip, "trained": t_strip},
        "verification": verification.to_dict(),
        "frozen": frozen.to_dict() if frozen is not None else None,
        "changes": changes.to_dict(),
        "filled_parameters": filled,
        "shards": {role: e.to_dict() if e is not None else None for role, e in shards.items()},
        "swap": swap.to_dict(),
        "warnings": _warnings(mr.metadata_warning, frozen, mr.partial_bn_modules)
        + _input_warnings(filled, shards, swap),
    }
    if swap.swapped and not options.allow_swapped:
        raise InputsSwapped(
            f"original and trained look swapped: {swap.describe()}; pass allow_swapped=true if they are "
            "the right way round; nothing was stored",
            keys=list(swap.bn_stats),
            report=report,
        )
    if not verification.ok:
        raise VerificationFailed(
            _verification_detail(
                verification.missing,
                verification.unexpected,
                verification.shape_mismatches,
                verification.dtype_mismatches,
                arch.name,
            ),
            missing_keys=sorted(verification.missing),
            unexpected_keys=sorted(verification.unexpected),
            report=report,
        )
    if options.require_complete and mr.filled_parameters:
        shard = shards["trained"]
        hint = f" (it looks like shard {shard.shard} of {shard.of})" if shard is not None else ""
        raise IncompleteTrained(
            f"require_complete: {len(mr.filled_parameters)} parameters would come from the original because "
            f"the trained checkpoint lacks them{hint}: {quote_keys(mr.filled_parameters)}; nothing was stored",
            filled_keys=list(mr.filled_parameters),
            report=report,
        )
    if frozen is not None and options.require_frozen and (frozen.changed or frozen.mismatched):
        raise FrozenPartChanged(
            f"require_frozen: {_frozen_changed_text(frozen)}; nothing was stored",
            changed_keys=list(frozen.changed) + list(frozen.mismatched),
            report=report,
        )
    writer = writer_for(options.output_format)
    # Before the inputs are committed: a merge that cannot be written stores nothing.
    budget = None
    if writer.expands_views:
        budget = expansion_budget([_source_size(store, s) for s in (original, trained)], store.limits)
    writer.check_output(merged.state_dict, max_expanded_bytes=budget)
    _commit_inputs(store, (original, trained))
    assert original.artifact_id is not None and trained.artifact_id is not None
    entries = {**o_entries, **t_entries}
    out_entries = {k: entries[k] for k in merged.state_dict if k in entries}
    params = options.params()
    chosen = {role: s.container_key for role, s in (("original", original), ("trained", trained)) if s.container_key}
    if chosen:
        params["container_keys"] = chosen
    lineage = Lineage(
        operation="merge",
        inputs={"original": original.artifact_id, "trained": trained.artifact_id},
        params=params,
        report={**report, "provenance": {k: v.to_dict() for k, v in mr.provenance.items()}},
    )
    out_manifest = _manifest_or_none(out_entries, merged.state_dict)
    stored = store.store_state_dict(
        merged.state_dict,
        format=options.output_format,
        lineage=lineage,
        labels=dict(options.labels),
        manifest=out_manifest,
        sources=_records(o, t),
        expanded_from=[original.artifact_id, trained.artifact_id],
    )
    return OperationResult(stored.artifact, stored.created, report, stored.labels_changed)


def _source_size(store: ArtifactStore, source: Source) -> int:
    if source.artifact_id is not None:
        return store.metadata(source.artifact_id).size
    assert source.upload is not None
    return source.upload.size


def _records(*inputs: _Opened | LoadedCheckpoint) -> list[StorageRecords]:
    # The mapped files the tensors come from: their records are copied file-to-file into the result.
    return [i.records for i in inputs if i.records is not None]


def _manifest_or_none(entries: dict[str, TensorEntry], sd: Mapping[str, torch.Tensor]) -> Manifest | None:
    if len(entries) != len(sd):
        return None  # the store builds it from the tensors
    return Manifest(entries, compute_schema_fingerprint((k, e.shape, e.dtype) for k, e in entries.items()))


def _trained_changes(
    o_sd: Mapping[str, torch.Tensor],
    t_sd: Mapping[str, torch.Tensor],
    o_entries: Mapping[str, TensorEntry],
    t_entries: Mapping[str, TensorEntry],
    sq_norms: LRUCache[tuple[str, str, tuple[int, ...]], float],
) -> ChangeSummary:
    # What training moved: values are compared only for keys whose fingerprints differ; identical keys add
    # their ||a||^2 so that a module's relative change has the right denominator.
    changed: list[str] = []
    same: list[str] = []
    for key, ta in o_sd.items():
        tb = t_sd.get(key)
        if tb is None or tuple(ta.shape) != tuple(tb.shape):
            continue
        ea, eb = o_entries.get(key), t_entries.get(key)
        if ea is not None and eb is not None and ea.dtype == eb.dtype and ea.fingerprint == eb.fingerprint:
            same.append(key)
        else:
            changed.append(key)
    # ||a||^2 of an unchanged tensor depends only on its content, and the same original is merged with one
    # trained checkpoint after another: remember it by (fingerprint, dtype, shape) instead of reading the whole
    # frozen backbone again for every merge.
    content = {k: (o_entries[k].fingerprint, o_entries[k].dtype, tuple(o_entries[k].shape))
               for k in same if k in o_entries}
    known = {k: v for k, c in content.items() if (v := sq_norms.get(c)) is not None}
    keys = measure_changes(o_sd, t_sd, keys=changed, same=same, known_sq_a=known)
    for key, c in content.items():
        if key not in known and key in keys:
            sq_norms.put(c, keys[key].sq_a)
    return ChangeSummary(keys, rollup_modules(keys))


def _format_change(key: str, frozen: FrozenReport) -> str:
    max_abs, rel = frozen.max_abs.get(key), frozen.rel_change.get(key)
    if max_abs is None or rel is None:
        return repr(key)
    return f"{key!r} (max abs {max_abs:.3g}, relative {rel:.3g})"


def _frozen_changed_text(frozen: FrozenReport) -> str:
    parts = []
    if frozen.changed:
        shown = ", ".join(_format_change(k, frozen) for k in frozen.changed[:5])
        more = f" (+{len(frozen.changed) - 5} more)" if len(frozen.changed) > 5 else ""
        parts.append(f"{len(frozen.changed)} frozen tensors changed during training: {shown}{more}")
    if frozen.mismatched:
        parts.append(f"{len(frozen.mismatched)} frozen tensors changed shape: {quote_keys(frozen.mismatched, limit=5)}")
    return "; ".join(parts)


def _warnings(
    metadata_warning: str | None, frozen: FrozenReport | None, partial: Mapping[str, Sequence[str]]
) -> list[str]:
    out: list[str] = []
    if metadata_warning:
        out.append(metadata_warning)
    if frozen is not None and (frozen.changed or frozen.mismatched):
        out.append(_frozen_changed_text(frozen))
    if partial:
        out.append(
            f"BatchNorm modules with partial running stats, refilled from the original: "
            f"{quote_keys(partial.keys(), limit=5)}"
        )
    return out


def _filled_parameters(
    keys: Sequence[str], modules: Mapping[str, int], merged: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    total = sum(1 for k in merged if k.rpartition(".")[2] not in BN_STAT_NAMES)
    return {"count": len(keys), "total": total, "modules": dict(modules)}


def _modules_text(modules: Mapping[str, int], limit: int = 5) -> str:
    ranked = sorted(modules.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(f"{m!r} ({n})" if m else f"the whole model ({n})" for m, n in ranked[:limit])
    return shown + (f" (+{len(ranked) - limit} more)" if len(ranked) > limit else "")


def _input_warnings(
    filled: Mapping[str, Any], shards: Mapping[str, ShardEvidence | None], swap: SwapSignals
) -> list[str]:
    out: list[str] = []
    if filled["count"]:
        out.append(
            f"{filled['count']} of {filled['total']} parameters were taken from the original because the trained "
            f"checkpoint lacks them, in {_modules_text(filled['modules'])}: expected for a frozen-backbone "
            "fine-tune saved without its backbone; require_complete=true refuses it"
        )
    out.extend(e.describe(role) for role, e in shards.items() if e is not None)
    if swap.any:
        verdict = "look swapped (allowed by allow_swapped)" if swap.swapped else "may be swapped"
        out.append(f"original and trained {verdict}: {swap.describe()}")
    return out


def _verification_detail(
    missing: Sequence[str],
    unexpected: Sequence[str],
    shapes: Mapping[str, Any],
    dtypes: Mapping[str, Any],
    arch: str,
) -> str:
    parts = []
    if missing:
        parts.append(f"missing {quote_keys(missing, limit=5)}")
    if unexpected:
        parts.append(f"unexpected {quote_keys(unexpected, limit=5)}")
    if shapes:
        parts.append(f"shape mismatch {quote_keys(shapes.keys(), limit=5)}")
    if dtypes:
        parts.append(f"dtype mismatch {quote_keys(dtypes.keys(), limit=5)}")
    return f"the merged state_dict does not load strictly into {arch!r}: " + "; ".join(
        parts or ["load failed"]
    )


@dataclass(frozen=True)
class StripTarget:
    """Keys to line a checkpoint up with (`POST /strip` with `like` or `like_architecture`)."""

    keys: Sequence[str]
    param: tuple[str, str]  # ("like", artifact id) or ("like_architecture", name), for the lineage


def strip_checkpoint(
    store: ArtifactStore,
    artifact_id: str,
    *,
    prefixes: Sequence[str] | None = None,
    output_format: OutputFormat = "pth",
    safe_globals: Sequence[str] = (),
    container_key: str | None = None,
    like: StripTarget | None = None,
) -> OperationResult:
    """Remove wrapper prefixes from a stored checkpoint and store the result with its lineage.

    Args:
        store: The artifact store.
        artifact_id: The stored input.
        prefixes: Prefixes to remove from the start of keys; None strips known wrappers anywhere (and, in a
            Lightning checkpoint, the LightningModule attribute every key starts with).
        output_format: "pth" or "safetensors".
        safe_globals: Extra globals allowed while unpickling.
        container_key: The state_dict to use inside the file; None uses the one chosen at ingest.
        like: Instead of `prefixes`: rename (strip and add prefixes) so that the keys line up with these keys.

    Returns:
        The stored result and a report of what was stripped.

    Raises:
        InvalidRequest: Both `prefixes` and `like`.
        PrefixCollision: Two keys would become one.
    """
    if like is not None and prefixes is not None:
        raise InvalidRequest("give prefixes or a key set to line up with, not both")
    opened = _open(store, Source(artifact_id=artifact_id, container_key=container_key),
                   safe_globals=safe_globals, limits=store.limits)
    sd = opened.state_dict
    alignment = align_keys(sd.keys(), like.keys) if like is not None else None
    if alignment is not None:
        result = apply_transform(sd, alignment.a)
    else:
        result = strip_prefixes(sd, prefixes, lightning=opened.lightning)
    out = _own(result.state_dict)
    report = result.to_dict()
    if alignment is not None or result.transform.lead:
        report["transform"] = result.transform.to_dict()
    if alignment is not None:
        report["matched"] = alignment.matched
        report["target_keys"] = alignment.b_keys
    entries = _carry_manifest(out, sd, opened.manifest)
    params: dict[str, Any] = {"prefixes": list(prefixes) if prefixes is not None else None,
                              "output_format": output_format}
    if container_key is not None:
        params["container_key"] = container_key
    if like is not None:
        params[like.param[0]] = like.param[1]
    lineage = Lineage(operation="strip", inputs={"checkpoint": artifact_id}, params=params, report=report)
    stored = store.store_state_dict(
        out, format=output_format, lineage=lineage, manifest=_manifest_or_none(entries, out),
        sources=_records(opened), expanded_from=[artifact_id],
    )
    return OperationResult(stored.artifact, stored.created, report, stored.labels_changed)


def extract_state_dict(
    store: ArtifactStore, artifact_id: str, *, container_key: str, safe_globals: Sequence[str] = ()
) -> OperationResult:
    """Store the state_dict at ``container_key`` of a stored checkpoint as a clean file (lineage ``extract``).

    Args:
        store: The artifact store.
        artifact_id: The stored checkpoint (a training checkpoint holding several state_dicts).
        container_key: Dotted path of the state_dict to keep, e.g. ``"state_dict_ema"`` or ``"model.ema"``.
        safe_globals: Extra globals allowed while unpickling.

    Returns:
        The stored state_dict, with lineage pointing to ``artifact_id``.
    """
    opened = _open(store, Source(artifact_id=artifact_id, container_key=container_key),
                   safe_globals=safe_globals, limits=store.limits)
    sd = opened.state_dict
    lineage = Lineage(operation="extract", inputs={"checkpoint": artifact_id},
                      params={"container_key": container_key}, report={"key_count": len(sd)})
    stored = store.store_state_dict(
        sd, format="pth", lineage=lineage, manifest=_manifest_or_none(dict(opened.manifest.entries), sd),
        sources=_records(opened), expanded_from=[artifact_id],
    )
    return OperationResult(stored.artifact, stored.created, {"key_count": len(sd)})


def diff_checkpoints(
    store: ArtifactStore,
    a: Source,
    b: Source,
    *,
    normalize_prefixes: NormalizeMode = False,
    values: bool = False,
    frozen: Sequence[str] | None = None,
    safe_globals: Sequence[str] = (),
    limits: ArchiveLimits | None = None,
    caches: OperationCaches | None = None,
) -> DiffResult:
    """Diff two checkpoints from their manifests; optionally value statistics and the frozen-part check.

    Args:
        store: The artifact store.
        a: The first checkpoint (for the frozen check: the original).
        b: The second checkpoint (for the frozen check: the trained one).
        normalize_prefixes: True strips known wrapper prefixes from both sides first (and a Lightning file's
            LightningModule attribute); "align" renames each side with the transform that gives the most keys in
            common (`align_prefixes`; the diff's `alignment` says which).
        values: Also compute numeric statistics of changed keys (opens the blobs).
        frozen: None for no frozen check; [] for the original's parameters; else key prefixes to check.
        safe_globals: Extra globals allowed while unpickling.
        limits: Zip pre-check limits for uploads; None: the store's.
        caches: What to remember between calls (`Operations.caches`); None: nothing is remembered.

    Returns:
        The manifest diff; with `values`, per-key statistics of the changed keys and the per-module change
        figures (cached per pair of stored ids); with `frozen`, the frozen report (with each changed key's max
        abs and relative change when `values` is set too).
    """
    limits = limits or store.limits
    caches = caches if caches is not None else OperationCaches()
    pair = None
    cached = None
    if a.artifact_id is not None and b.artifact_id is not None and a.container_key is None and b.container_key is None:
        # Two stored artifacts never change, and neither does their diff: dashboards ask for the same one
        # again and again. The existence checks keep a deleted artifact a 404.
        for artifact_id in (a.artifact_id, b.artifact_id):
            if not store.exists(artifact_id):
                raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id)
        pair = (a.artifact_id, b.artifact_id, normalize_prefixes)
        cached = caches.diffs.get(pair)
    if pair is not None and cached is not None and frozen is None and not values:
        return DiffResult(cached)
    ma = _manifest_of(store, a, safe_globals=safe_globals)
    mb = _manifest_of(store, b, safe_globals=safe_globals)
    alignment = align_prefixes(ma.entries, mb.entries) if normalize_prefixes == "align" else None
    transforms: tuple[KeyTransform, KeyTransform] | None = None
    if alignment is not None:
        transforms = (alignment.a, alignment.b)
    elif normalize_prefixes:
        transforms = (_known_transform(store, a, ma), _known_transform(store, b, mb))
    if pair is not None and cached is not None:
        diff = cached
    elif alignment is not None:
        plain = diff_manifests(_renamed(ma, alignment.a), _renamed(mb, alignment.b))
        diff = dataclasses.replace(plain, normalized=True, alignment=alignment.to_dict())
    elif transforms is not None:
        # The same comparison diff_manifests makes after normalizing both sides, with each side's normalized
        # table computed once per stored artifact (normalizing 20k keys costs far more than comparing them).
        na, coll_a = _normalized_entries(caches, a.artifact_id if a.container_key is None else None, ma, transforms[0])
        nb, coll_b = _normalized_entries(caches, b.artifact_id if b.container_key is None else None, mb, transforms[1])
        plain = diff_manifests(Manifest(na, ma.schema_fingerprint), Manifest(nb, mb.schema_fingerprint))
        collisions = {side: dict(c) for side, c in (("a", coll_a), ("b", coll_b)) if c}
        diff = dataclasses.replace(plain, normalized=True, collisions=collisions)
    else:
        diff = diff_manifests(ma, mb)
    if pair is not None:
        caches.diffs.put(pair, diff)
    frozen_report = None
    if frozen is not None:
        fa, fb = (_renamed(ma, transforms[0]), _renamed(mb, transforms[1])) if transforms else (ma, mb)
        frozen_report = check_frozen_manifests(fa, fb, prefixes=list(frozen) or None)
    if not values:
        return DiffResult(diff, frozen=frozen_report.to_dict() if frozen_report is not None else None)
    measured = caches.values.get(pair) if pair is not None else None
    if measured is None:
        oa = _open(store, a, safe_globals=safe_globals, limits=limits)
        ob = _open(store, b, safe_globals=safe_globals, limits=limits)
        sa, sb = oa.state_dict, ob.state_dict
        if transforms is not None:
            sa = dict(apply_transform(sa, transforms[0]).state_dict)
            sb = dict(apply_transform(sb, transforms[1]).state_dict)
        stats = diff_values(sa, sb, keys=diff.changed)
        keys = changes_from_stats(stats, sa, same=diff.unchanged)
        measured = (stats, ChangeSummary(keys, rollup_modules(keys)))
        if pair is not None:
            caches.values.put(pair, measured)
    stats, changes = measured
    if frozen_report is not None:
        frozen_report = with_value_changes(frozen_report, changes.keys)
    return DiffResult(
        diff,
        values={k: v.to_dict() for k, v in stats.items()},
        frozen=frozen_report.to_dict() if frozen_report is not None else None,
        changes=changes,
    )


@dataclass(frozen=True)
class DiffResult:
    """What `diff_checkpoints` found."""

    diff: ManifestDiff
    values: dict[str, Any] | None = None  # changed key -> ValueStats.to_dict()
    frozen: dict[str, Any] | None = None  # FrozenReport.to_dict()
    changes: ChangeSummary | None = None  # per-key and per-module change figures (values=True)


_NormalizedEntries = tuple[dict[str, TensorEntry], dict[str, list[str]]]


class OperationCaches:
    """What the operations remember about stored artifacts, owned by one `Operations` (so by one store).

    Artifacts never change, so nothing here goes stale; a deleted artifact's entries age out (each lookup of a
    stored pair checks that both still exist first).
    """

    def __init__(self) -> None:
        # (id a, id b, normalize_prefixes) -> the diff of two stored artifacts.
        self.diffs: LRUCache[tuple[str, str, NormalizeMode], ManifestDiff] = LRUCache(max_items=64)
        # id -> normalized entries and collisions; bounded by the entries it holds.
        self.normalized: LRUCache[str, _NormalizedEntries] = LRUCache(max_weight=400_000, weigh=lambda v: len(v[0]))
        # (id a, id b, normalize_prefixes) -> (value stats, change figures): a repeated values=true diff of two
        # 1 GB checkpoints costs a lookup instead of reading both again. Weighed by keys measured.
        self.values: LRUCache[tuple[str, str, NormalizeMode], tuple[dict[str, Any], ChangeSummary]] = LRUCache(
            max_weight=400_000, weigh=lambda v: len(v[1].keys))
        # (fingerprint, dtype, shape) -> ||a||^2, for the unchanged keys of merges.
        self.sq_norms: LRUCache[tuple[str, str, tuple[int, ...]], float] = LRUCache(max_weight=1_000_000)


def _manifest_of(store: ArtifactStore, source: Source, *, safe_globals: Sequence[str] = ()) -> Manifest:
    if source.artifact_id is not None:
        stored_key = store.metadata(source.artifact_id).container_key
        if source.container_key is not None and source.container_key != stored_key:
            loaded = store.load(source.artifact_id, safe_globals=safe_globals, container_key=source.container_key)
            return build_manifest(loaded.state_dict)
        return store.manifest(source.artifact_id)
    assert source.upload is not None
    if source.inspection is None:
        source.inspection = store.inspect_upload(source.upload, container_key=source.container_key)
    return source.inspection.manifest


def _normalized_entries(
    caches: OperationCaches, artifact_id: str | None, manifest: Manifest, transform: KeyTransform
) -> _NormalizedEntries:
    # The transform is a function of the artifact (its keys and whether Lightning wrote it), so the cache key
    # need not hold it.
    if artifact_id is None:
        return normalize_entries(manifest.entries, transform)
    hit = caches.normalized.get(artifact_id)
    if hit is not None:
        return hit
    # Stored artifacts are immutable, so their normalized table never goes stale.
    value = normalize_entries(manifest.entries, transform)
    caches.normalized.put(artifact_id, value)
    return value


def _renamed(manifest: Manifest, transform: KeyTransform) -> Manifest:
    renamed = apply_transform(manifest.entries, transform)  # type: ignore[arg-type]
    entries: dict[str, TensorEntry] = dict(renamed.state_dict)  # type: ignore[arg-type]
    return Manifest(entries, manifest.schema_fingerprint)


def _known_transform(store: ArtifactStore, source: Source, manifest: Manifest) -> KeyTransform:
    # normalize_prefixes=true: the known wrappers, and a Lightning file's LightningModule attribute.
    if source.artifact_id is not None:
        extras: Mapping[str, str] = store.metadata(source.artifact_id).extras
    else:
        extras = source.inspection.extras if source.inspection is not None else {}
    return lightning_transform(manifest.entries) if is_lightning(extras) else KeyTransform(wrappers=True)


def combine_shards(
    store: ArtifactStore,
    files: Sequence[UploadedFile],
    *,
    safe_globals: Sequence[str] = (),
    limits: ArchiveLimits | None = None,
    max_bytes: int | None = None,
) -> Source:
    """Check the files of a sharded checkpoint and combine them into one upload, not yet committed.

    Each shard is checked against its declared sha256 and parsed like any single upload (the store's inspector:
    sandboxed, with the limits). A file named ``*.index.json`` is the index; the shards are matched to its
    ``weight_map`` by file name and must hold every key it names exactly once, in the shard it names. Without an
    index the shards' keys must be disjoint. Shards are taken in file-name order, whatever order they came in,
    so the same files always combine to the same bytes.

    The result is safetensors when every shard is (the header, then each tensor's bytes copied from its shard in
    chunks: memory stays at a chunk), else a torch zip written from the shards' memory-mapped tensors.

    Args:
        store: The artifact store (its inspector parses each shard).
        files: The file parts, in the order they came.
        safe_globals: Extra globals allowed while unpickling.
        limits: The parse limits; None: the store's.
        max_bytes: The largest combined file.

    Returns:
        A source holding the combined upload, its inspection, its file name (the index's without
        ``.index.json``) and its lineage (``combine``: each shard's file name, sha256, size and key count). The
        caller aborts the upload unless it commits it.

    Raises:
        DigestMismatch: A file does not hash to its declared sha256.
        InconsistentShards: Two indexes, a bad file name, or shards that do not match the index or overlap.
        InvalidCheckpoint: From a shard's parse.
        ArchiveLimitExceeded: More keys in all than the key limit.
    """
    limits = limits or store.limits
    for f in files:
        if f.expected_sha256:
            store.check_digest(f.upload, f.expected_sha256)
    indexes = [f for f in files if sharding.is_index_filename(f.filename)]
    if len(indexes) > 1:
        names = sorted(str(f.filename) for f in indexes)
        raise InconsistentShards(f"more than one shard index: {quote_keys(names)}", files=names)
    parts = [f for f in files if not sharding.is_index_filename(f.filename)]
    if len(parts) > sharding.MAX_SHARDS:
        raise InconsistentShards(f"{len(parts)} shards, more than {sharding.MAX_SHARDS}", limit=sharding.MAX_SHARDS)
    named = sorted(((sharding.check_shard_filename(f.filename) if f.filename is not None else f"part-{i + 1}", f)
                    for i, f in enumerate(parts)), key=lambda item: item[0])
    index = _read_index(indexes[0], max_keys=limits.max_keys) if indexes else None
    inspections = [store.inspect_upload(f.upload) for _, f in named]
    sharding.check_shards([(name, list(i.manifest.entries)) for (name, _), i in zip(named, inspections, strict=True)],
                          index)
    total_keys = sum(len(i.manifest.entries) for i in inspections)
    if total_keys > limits.max_keys:
        raise ArchiveLimitExceeded(f"the shards hold {total_keys} keys, more than the limit of {limits.max_keys}",
                                   limit=limits.max_keys)
    combined = store.open_upload(max_bytes=max_bytes)
    try:
        sources = [Source(upload=f.upload, inspection=i) for (_, f), i in zip(named, inspections, strict=True)]
        if all(i.format == SAFETENSORS.name for i in inspections):
            inspection = _combine_safetensors(combined, sources)
        else:
            inspection = _combine_pth(store, combined, sources, safe_globals=safe_globals, limits=limits)
    except BaseException:
        combined.abort()
        raise
    shards = [{"filename": name, "sha256": f.upload.sha256, "size": f.upload.size, "key_count": len(i.manifest.entries),
               "format": i.format} for (name, f), i in zip(named, inspections, strict=True)]
    params: dict[str, Any] = {"shards": shards, "index": None}
    filename = None
    if indexes:
        f = indexes[0]
        params["index"] = {"filename": f.filename, "sha256": f.upload.sha256, "size": f.upload.size}
        filename = str(f.filename).removesuffix(sharding.INDEX_SUFFIX) or None
    lineage = Lineage(operation="combine", inputs={}, params=params,
                      report={"key_count": total_keys, "format": inspection.format})
    return Source(upload=combined, filename=filename, inspection=inspection, lineage=lineage)


def _read_index(file: UploadedFile, *, max_keys: int) -> sharding.ShardIndex:
    file.upload.finish()
    if file.upload.size > sharding.MAX_INDEX_BYTES:
        raise InconsistentShards(
            f"the shard index {file.filename!r} has {file.upload.size} bytes, more than {sharding.MAX_INDEX_BYTES}",
            limit=sharding.MAX_INDEX_BYTES,
        )
    with open(file.upload.path, "rb") as fh:
        return sharding.parse_index(fh.read(sharding.MAX_INDEX_BYTES + 1), max_keys=max_keys)


def _combine_safetensors(out: PendingUpload, shards: Sequence[Source]) -> Inspection:
    # The combined header first, then each tensor's bytes copied from its shard in data order, in chunks.
    fds: list[int] = []
    try:
        where: dict[str, tuple[int, int]] = {}
        table: list[sharding.SafetensorsEntry] = []
        metadata: list[dict[str, str]] = []
        for shard in shards:
            assert shard.upload is not None
            fd = os.open(shard.upload.path, os.O_RDONLY | os.O_CLOEXEC)
            fds.append(fd)
            start, entries, meta = sharding.read_safetensors_entries(fd)
            metadata.append(meta)
            for key, (entry, begin) in entries.items():
                table.append(entry)
                where[key] = (fd, start + begin)
        # transformers writes {"format": "pt"} into every shard; what all shards agree on is kept.
        common = metadata[0] if metadata and all(m == metadata[0] for m in metadata) else None
        header, order = sharding.safetensors_header(table, metadata=common)
        pieces: list[bytes] = [header]
        pending = len(header)
        for entry in order:
            fd, offset = where[entry.key]
            for piece in sharding.iter_file_range(fd, offset, entry.nbytes):
                pieces.append(piece)
                pending += len(piece)
                if pending >= 8 << 20:
                    out.write_chunks(pieces)
                    pieces, pending = [], 0
        out.write_chunks(pieces)
    finally:
        for fd in fds:
            os.close(fd)
    known = {k: e for s in shards if s.inspection is not None for k, e in s.inspection.manifest.entries.items()}
    return _combined_inspection(SAFETENSORS.name, {e.key: known[e.key] for e in order},
                                has_metadata=False)


class _UploadWriter:
    # The file object torch.save writes to: every byte goes into the upload (hashed there), in order.
    def __init__(self, upload: PendingUpload) -> None:
        self._upload = upload

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._upload.write(view)  # written before returning: torch's buffer is only valid during the call
        return view.nbytes

    def flush(self) -> None:
        pass


def _combine_pth(
    store: ArtifactStore, out: PendingUpload, shards: Sequence[Source], *, safe_globals: Sequence[str],
    limits: ArchiveLimits,
) -> Inspection:
    # The shards' tensors stay memory-mapped (their pages are the shard files' page cache): torch.save writes each
    # storage from there, so memory holds no more than the pickled dict and one write at a time.
    combined: OrderedDict[str, torch.Tensor] = OrderedDict()
    module_metadata: OrderedDict[str, Any] = OrderedDict()
    entries: dict[str, TensorEntry] = {}
    opened = [_open(store, shard, safe_globals=safe_globals, limits=limits) for shard in shards]
    for o in opened:
        combined.update(o.state_dict)
        module_metadata.update(metadata_of(o.state_dict) or {})
        entries.update(o.manifest.entries)
    if module_metadata:
        combined = with_metadata(combined, module_metadata)
    torch.save(combined, cast(IO[bytes], _UploadWriter(out)))
    return _combined_inspection(PTH_ZIP.name, {k: entries[k] for k in combined},
                                has_metadata=bool(module_metadata))


def _combined_inspection(fmt: str, entries: dict[str, TensorEntry], *, has_metadata: bool) -> Inspection:
    # The shards were inspected one by one; a fingerprint depends on a tensor's bytes only, so the combined
    # manifest is theirs, in the combined file's key order, and the file need not be parsed and hashed again.
    schema = compute_schema_fingerprint((k, e.shape, e.dtype) for k, e in entries.items())
    return Inspection(format=fmt, container_key=None, extras={}, has_metadata=has_metadata,
                      manifest=Manifest(entries, schema), candidates={"": len(entries)})


SHARD_METADATA = {"format": "pt"}  # what transformers writes into every safetensors shard


@dataclass(frozen=True)
class ShardPlan:
    """How a stored checkpoint splits into safetensors shards (`sharding.plan_shards`)."""

    artifact_id: str
    max_shard_size: int
    shards: list[list[str]]  # the keys of each shard
    entries: dict[str, sharding.SafetensorsEntry]

    @property
    def total_size(self) -> int:
        """The tensor bytes of all shards (transformers' ``metadata.total_size``)."""
        return sum(e.nbytes for e in self.entries.values())

    def filename(self, number: int) -> str:
        """The file name of shard `number` (1-based)."""
        return sharding.shard_filename(number, len(self.shards))

    def header(self, number: int) -> tuple[bytes, list[sharding.SafetensorsEntry]]:
        """Shard `number`'s safetensors header and its tensors in data order."""
        if not 1 <= number <= len(self.shards):
            raise ShardNotFound(
                f"artifact {self.artifact_id} has {len(self.shards)} shards of at most {self.max_shard_size} bytes, "
                f"not a shard {number}", ref=self.artifact_id,
            )
        return sharding.safetensors_header((self.entries[k] for k in self.shards[number - 1]),
                                           metadata=SHARD_METADATA)

    def size(self, number: int) -> int:
        """The byte size of shard `number`'s file."""
        header, order = self.header(number)
        return len(header) + sum(e.nbytes for e in order)

    def weight_map(self) -> dict[str, str]:
        """Key -> the file name of its shard, in key order of the checkpoint."""
        return {key: self.filename(n) for n, keys in enumerate(self.shards, start=1) for key in keys}


def plan_checkpoint_shards(store: ArtifactStore, artifact_id: str, *, max_shard_size: int) -> ShardPlan:
    """Split a stored checkpoint into safetensors shards, from its manifest alone (no tensor is read).

    Args:
        store: The artifact store.
        artifact_id: The stored checkpoint.
        max_shard_size: The most tensor bytes in one shard (a larger tensor gets a shard of its own).

    Returns:
        The split: the same artifact and size always give the same one.

    Raises:
        UnconvertibleCheckpoint: A dtype safetensors cannot hold, or a key named ``__metadata__``.
    """
    manifest = store.manifest(artifact_id)
    bad = sorted(k for k, e in manifest.entries.items() if sharding.safetensors_code(e.dtype) is None)
    if bad:
        dtypes = sorted({manifest.entries[k].dtype for k in bad})
        raise UnconvertibleCheckpoint(
            f"safetensors cannot hold the dtypes of {len(bad)} keys ({', '.join(dtypes)}): {quote_keys(bad)}",
            keys=bad, dtypes=dtypes,
        )
    if "__metadata__" in manifest.entries:
        raise UnconvertibleCheckpoint("safetensors reserves the key '__metadata__'", keys=["__metadata__"])
    entries = {k: sharding.SafetensorsEntry(k, str(sharding.safetensors_code(e.dtype)), tuple(e.shape), e.nbytes)
               for k, e in manifest.entries.items()}
    shards = sharding.plan_shards(((k, e.nbytes) for k, e in entries.items()), max_shard_size=max_shard_size)
    return ShardPlan(artifact_id, max_shard_size, shards or [[]], entries)


def stream_shard(
    store: ArtifactStore, plan: ShardPlan, number: int, *, safe_globals: Sequence[str] = ()
) -> tuple[int, Iterator[bytes | memoryview]]:
    """Shard `number` of a plan as a safetensors file: its size, and its bytes a chunk at a time.

    The tensors are loaded memory-mapped and checked before the first byte is produced; the bytes are the
    header and then each tensor's bytes (a non-contiguous tensor is copied, one at a time). Nothing is stored.

    Raises:
        ShardNotFound: No shard `number` in the plan.
        UnconvertibleCheckpoint: A tensor is sparse or differs from the manifest.
    """
    header, order = plan.header(number)
    state_dict = store.load(plan.artifact_id, safe_globals=safe_globals).state_dict
    tensors: dict[str, torch.Tensor] = {}
    for entry in order:
        tensor = state_dict.get(entry.key)
        if (tensor is None or tensor.layout != torch.strided or tuple(tensor.shape) != entry.shape
                or tensor.numel() * tensor.element_size() != entry.nbytes):
            raise UnconvertibleCheckpoint(f"tensor {entry.key!r} cannot be written as it is described",
                                          keys=[entry.key])
        tensors[entry.key] = tensor

    def chunks() -> Iterator[bytes | memoryview]:
        yield header
        for entry in order:
            yield from sharding.iter_tensor_bytes(tensors[entry.key])

    return len(header) + sum(e.nbytes for e in order), chunks()


class Operations:
    """The operations of one service, built once from its settings: the only thing the API's routes call.

    It holds the store, the registry, the unpickling allowlist and the limits, so that no call site picks a
    setting (or forgets one and falls back to a library default). The module-level functions above stay the
    building blocks; a method here is the same verb with the service's allowlist and limits filled in.
    """

    def __init__(
        self,
        store: ArtifactStore,
        registry: ArchitectureRegistry,
        *,
        safe_globals: Sequence[str] = (),
        max_upload_bytes: int = 32 << 30,
        max_request_bytes: int | None = None,
        importer: ObjectImporter | None = None,
    ) -> None:
        """Bind the operations to a store and a registry.

        Args:
            store: The artifact store; its `limits` are the archive limits of every load.
            registry: The architectures merges verify against.
            safe_globals: Extra "module.qualname" globals unpickling may accept (already validated).
            max_upload_bytes: The largest accepted upload (each file of a request).
            max_request_bytes: The most bytes of files in one request (the shards of a checkpoint together);
                None: 8 x `max_upload_bytes`.
            importer: Reads objects imported by reference; None: import by reference is off.
        """
        self.store = store
        self.registry = registry
        self.safe_globals: tuple[str, ...] = tuple(safe_globals)
        self.max_upload_bytes = max_upload_bytes
        self.max_request_bytes = max_request_bytes if max_request_bytes is not None else 8 * max_upload_bytes
        self.importer = importer if importer is not None else ObjectImporter(())
        self.caches = OperationCaches()

    @property
    def limits(self) -> ArchiveLimits:
        """The zip pre-check limits of every load and parse."""
        return self.store.limits

    def open_upload(self) -> PendingUpload:
        """Start a streaming upload bounded by `max_upload_bytes`."""
        return self.store.open_upload(max_bytes=self.max_upload_bytes)

    def commit_upload(
        self,
        upload: PendingUpload,
        *,
        expected_sha256: str | None = None,
        filename: str | None = None,
        labels: Mapping[str, str] | None = None,
        container_key: str | None = None,
        lineage: Lineage | None = None,
    ) -> IngestResult:
        """Parse (with the service's limits) and publish an upload; see `ArtifactStore`.

        A `container_key` other than the one the default rule picks keeps the upload as sent and answers with a
        derived artifact holding only the chosen state_dict (lineage `extract`).
        """
        inspection = None
        if container_key is not None:
            if expected_sha256:
                self.store.check_digest(upload, expected_sha256)
            inspection = self.store.inspect_upload(upload, container_key=container_key)
        raw = self.store.commit_upload(
            upload, expected_sha256=expected_sha256, filename=filename, labels=dict(labels or {}),
            inspection=inspection, lineage=lineage,
        )
        if container_key is None or inspection is None or inspection.container_key == inspection.default_container_key:
            return raw
        derived = extract_state_dict(
            self.store, raw.artifact.id, container_key=container_key, safe_globals=self.safe_globals
        )
        return IngestResult(derived.artifact, derived.created)

    def combine(self, files: Sequence[UploadedFile]) -> Source:
        """`combine_shards` with the service's allowlist and limits; the caller aborts the source's upload."""
        return combine_shards(self.store, files, safe_globals=self.safe_globals, limits=self.limits,
                              max_bytes=self.max_request_bytes)

    def commit_combined(self, source: Source, *, labels: Mapping[str, str] | None = None) -> IngestResult:
        """Publish a source from `combine` as an artifact, with its lineage (``combine``)."""
        assert source.upload is not None
        return self.store.commit_upload(source.upload, filename=source.filename, labels=dict(labels or {}),
                                        lineage=source.lineage, inspection=source.inspection)

    def plan_shards(self, artifact_id: str, *, max_shard_size: int) -> ShardPlan:
        """`plan_checkpoint_shards`."""
        return plan_checkpoint_shards(self.store, artifact_id, max_shard_size=max_shard_size)

    def stream_shard(self, plan: ShardPlan, number: int) -> tuple[int, Iterator[bytes | memoryview]]:
        """`stream_shard` with the service's allowlist."""
        return stream_shard(self.store, plan, number, safe_globals=self.safe_globals)

    def check_import(self, url: str, *, field: str = "url") -> None:
        """Refuse an import URL before any work: not an s3:// object (400), or not allowed (403). Sends nothing."""
        self.importer.check(url, field=field)

    def read_import(self, url: str, *, field: str = "url", reuse: bool = True) -> Source:
        """Read an allowed object for an operation (a HEAD, then a streamed GET into an upload).

        Returns:
            With `reuse`, the stored artifact when this process imported the same object version before and it
            still exists; else an upload of the object's bytes, not yet parsed, that the caller commits or
            aborts. `origin` describes the object either way.

        Raises:
            InvalidRequest, SourceNotAllowed: As for `check_import`.
            SourceNotFound, SourceUnavailable: The object store has no such object, or failed.
            PayloadTooLarge: The object is over `max_upload_bytes` (known from the HEAD, before any download).
        """
        importer = self.importer
        obj = importer.head(importer.check(url, field=field))
        known = importer.stored_as(obj) if reuse else None
        if known is not None and self.store.exists(known):
            return Source(artifact_id=known, filename=obj.filename, origin=obj)
        upload = self.open_upload()
        try:
            importer.download(obj, upload)
        except BaseException:
            upload.abort()
            raise
        return Source(upload=upload, filename=obj.filename, origin=obj, lineage=import_lineage(obj))

    def import_object(
        self,
        url: str,
        *,
        labels: Mapping[str, str] | None = None,
        container_key: str | None = None,
    ) -> IngestResult:
        """Import an object by reference: read it (`read_import`) and ingest it as an upload, lineage `import`.

        The same checks as an upload apply (sandboxed parse, hostile-input limits); nothing is stored when they
        fail. For bytes already stored the existing artifact is returned (`created` False) and kept as it was.

        Raises:
            InvalidCheckpoint: The object is not a checkpoint the service accepts.
            (and what `read_import` raises)
        """
        # Another state_dict than the default one is chosen while the file is parsed: read the bytes again.
        source = self.read_import(url, reuse=container_key is None)
        assert source.origin is not None
        if source.artifact_id is not None:
            return IngestResult(self.store.metadata(source.artifact_id), created=False)
        assert source.upload is not None
        try:
            result = self.commit_upload(source.upload, filename=source.filename, labels=labels,
                                        container_key=container_key, lineage=source.lineage)
        finally:
            source.upload.abort()  # a no-op once committed
        self.importer.remember(source.origin, source.upload.sha256)
        return result

    def import_shards(self, urls: Sequence[str], *, labels: Mapping[str, str] | None = None) -> IngestResult:
        """Import the shards of one checkpoint (and its index) by reference, as uploaded shards are combined.

        Each object is read as `read_import` reads one, then they are combined (`combine`: each shard checked and
        parsed, against the index when there is one); the lineage (``combine``) also records the URLs.

        Raises:
            InconsistentShards: More objects than a checkpoint may have shards, or shards that do not fit together.
            PayloadTooLarge: The objects together are over `max_request_bytes` (known from their HEADs).
            (and what `read_import` and `combine` raise)
        """
        importer = self.importer
        if len(urls) > sharding.MAX_SHARDS + 1:
            raise InconsistentShards(f"{len(urls)} objects, more than {sharding.MAX_SHARDS} shards and an index",
                                     limit=sharding.MAX_SHARDS)
        objects = [importer.head(importer.check(url, field=f"urls[{i}]")) for i, url in enumerate(urls)]
        total = sum(obj.size for obj in objects)
        if total > self.max_request_bytes:
            raise PayloadTooLarge(f"the objects hold {total} bytes together, over the limit of "
                                  f"{self.max_request_bytes} bytes", limit=self.max_request_bytes)
        files: list[UploadedFile] = []
        try:
            for obj in objects:
                files.append(UploadedFile(obj.filename, self.open_upload()))
                importer.download(obj, files[-1].upload)
            source = self.combine(files)
            try:
                assert source.lineage is not None
                source.lineage = dataclasses.replace(
                    source.lineage, params={**source.lineage.params, "urls": [obj.url for obj in objects]})
                return self.commit_combined(source, labels=labels)
            finally:
                assert source.upload is not None
                source.upload.abort()  # a no-op once committed
        finally:
            for f in files:
                f.upload.abort()

    def _read_imports(self, sources: Mapping[str, Source]) -> None:
        # The objects of an operation's inputs, read at once (each into its own upload), under the job's budget.
        wanted = {role: s for role, s in sources.items() if s.url is not None and s.origin is None}
        if not wanted:
            return
        job = current_job()

        def read(role: str, source: Source) -> Source:
            assert source.url is not None
            with job_scope(job.kind, job.remaining()):
                read_source = self.read_import(source.url, field=role)
                if read_source.upload is not None:
                    try:  # parsed here as well, so that the inputs' sandboxed parses run at once too
                        read_source.inspection = self.store.inspect_upload(
                            read_source.upload, container_key=source.container_key)
                    except BaseException:
                        read_source.upload.abort()
                        raise
                return read_source

        with ThreadPoolExecutor(len(wanted), thread_name_prefix="import") as pool:
            futures = {role: pool.submit(read, role, s) for role, s in wanted.items()}
        read_sources: dict[str, Source] = {}
        errors: list[BaseException] = []
        for role, future in futures.items():
            try:
                read_sources[role] = future.result()
            except BaseException as exc:  # re-raised below, once the other reads are released
                errors.append(exc)
        if errors:
            for read_source in read_sources.values():
                if read_source.upload is not None:
                    read_source.upload.abort()
            raise errors[0]
        for role, read_source in read_sources.items():
            source = wanted[role]
            source.artifact_id, source.upload = read_source.artifact_id, read_source.upload
            source.filename, source.origin = read_source.filename, read_source.origin
            source.inspection, source.lineage = read_source.inspection, read_source.lineage

    def _remember_imports(self, sources: Iterable[Source]) -> None:
        for source in sources:
            if source.origin is not None and source.upload is not None:
                self.importer.remember(source.origin, source.upload.sha256)

    def load(self, artifact_id: str) -> LoadedCheckpoint:
        """Load a stored checkpoint with the service's allowlist and limits."""
        return self.store.load(artifact_id, safe_globals=self.safe_globals)

    def strip(
        self,
        artifact_id: str,
        *,
        prefixes: Sequence[str] | None = None,
        output_format: OutputFormat = "pth",
        container_key: str | None = None,
        like: StripTarget | None = None,
    ) -> OperationResult:
        """`strip_checkpoint` with the service's allowlist and limits, its input leased (safe from retention GC)."""
        with self.store.lease([artifact_id]):
            return strip_checkpoint(
                self.store, artifact_id, prefixes=prefixes, output_format=output_format,
                safe_globals=self.safe_globals, container_key=container_key, like=like,
            )

    def strip_target(self, *, like: str | None = None, like_architecture: str | None = None) -> StripTarget:
        """The keys `POST /strip` lines a checkpoint up with: another stored checkpoint's, or an architecture's.

        Args:
            like: An artifact id or name.
            like_architecture: A registered architecture name.

        Returns:
            The target keys, and what to record in the lineage.

        Raises:
            InvalidRequest: Neither or both.
            ArtifactNotFound: No such checkpoint.
            ArchitectureNotFound: No such architecture.
        """
        if (like is None) == (like_architecture is None):
            raise InvalidRequest("give exactly one of 'like' and 'like_architecture'")
        if like is not None:
            target_id = self.store.resolve(like)
            return StripTarget(list(self.store.manifest(target_id).entries), ("like", target_id))
        assert like_architecture is not None
        arch = self.registry.get(like_architecture)
        return StripTarget(list(arch.spec.keys), ("like_architecture", arch.name))

    def convert(self, artifact_id: str, *, output_format: OutputFormat) -> ConvertedBlob:
        """`ArtifactStore.convert` (the conversion cache) with the service's allowlist and limits."""
        return self.store.convert(artifact_id, output_format, safe_globals=self.safe_globals)

    def merge(self, *, original: Source, trained: Source, options: MergeOptions) -> OperationResult:
        """`merge_checkpoints` with the service's registry, allowlist and limits.

        Inputs given by `url` are read first, both at once (`read_import`); a merge that fails stores nothing, and
        one that succeeds stores them too, as imported artifacts (lineage `import`). Stored inputs are leased
        while it runs: retention GC does not delete them under it.
        """
        self._read_imports({"original": original, "trained": trained})
        try:
            with self.store.lease(_stored((original, trained))):
                result = merge_checkpoints(
                    self.store,
                    self.registry,
                    original=original,
                    trained=trained,
                    options=options,
                    safe_globals=self.safe_globals,
                    limits=self.limits,
                    caches=self.caches,
                )
        finally:
            for source in (original, trained):
                if source.url is not None and source.upload is not None:
                    source.upload.abort()  # a no-op once committed
        self._remember_imports((original, trained))
        return result

    def diff(
        self,
        a: Source,
        b: Source,
        *,
        normalize_prefixes: NormalizeMode = False,
        values: bool = False,
        frozen: Sequence[str] | None = None,
    ) -> DiffResult:
        """`diff_checkpoints` with the service's allowlist and limits, its stored inputs leased."""
        with self.store.lease(_stored((a, b))):
            return diff_checkpoints(
                self.store,
                a,
                b,
                normalize_prefixes=normalize_prefixes,
                values=values,
                frozen=frozen,
                safe_globals=self.safe_globals,
                limits=self.limits,
                caches=self.caches,
            )
