"""Merge a trained state_dict with the original one (the recipe's step 4.2).

Training with `track_running_stats=False` drops each BatchNorm's running_mean, running_var and
num_batches_tracked from the trained state_dict; the merge takes every trained key and fills the rest from the
original. No tensor data is copied: the result holds the input tensor objects, so mmapped inputs stay mmapped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from service.core.statedict import metadata_of, with_metadata
from service.core.types import StateDict

__all__ = ["BN_STAT_NAMES", "KeyProvenance", "MergeReport", "MergeResult", "merge_state_dicts"]

# The buffers `track_running_stats=False` removes from a BatchNorm's state_dict.
BN_STAT_NAMES: tuple[str, ...] = ("running_mean", "running_var", "num_batches_tracked")

REASON_TRAINED = "present in trained"
REASON_MISSING = "missing from trained"
REASON_BN = "missing from trained: BatchNorm running stats (track_running_stats=False)"

METADATA_WARNING = (
    "neither state_dict carries `_metadata`: load_state_dict then treats every module as version None, and "
    "BatchNorm silently fills a missing num_batches_tracked with 0 instead of reporting it as missing"
)


@dataclass(frozen=True)
class KeyProvenance:
    """Where a merged key's tensor came from, and why."""

    source: Literal["trained", "original"]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "reason": self.reason}


@dataclass(frozen=True)
class MergeReport:
    """What the merge took from where."""

    provenance: dict[str, KeyProvenance]  # merged key -> source, in the merged order
    counts: dict[str, int]  # "trained"/"original" -> keys taken from it
    filled: tuple[str, ...]  # keys taken from the original (sorted)
    filled_modules: tuple[str, ...]  # BatchNorm modules whose running stats came from the original as a unit
    partial_bn_modules: dict[str, list[str]]  # module -> its stat keys trained had, when it had only some
    unexpected: tuple[str, ...]  # keys not in expected_keys (sorted; empty without expected_keys)
    dropped: tuple[str, ...]  # unexpected keys left out (drop_unexpected)
    metadata: Literal["trained", "original", "absent"]
    metadata_warning: str | None
    missing: tuple[str, ...] = ()  # expected keys in neither state_dict (sorted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "provenance": {k: p.to_dict() for k, p in self.provenance.items()},
            "counts": dict(self.counts),
            "filled": list(self.filled),
            "filled_modules": list(self.filled_modules),
            "partial_bn_modules": {m: list(keys) for m, keys in self.partial_bn_modules.items()},
            "unexpected": list(self.unexpected),
            "dropped": list(self.dropped),
            "missing": list(self.missing),
            "metadata": self.metadata,
            "metadata_warning": self.metadata_warning,
        }


@dataclass(frozen=True)
class MergeResult:
    state_dict: StateDict
    report: MergeReport

    def to_dict(self) -> dict[str, Any]:
        return {"report": self.report.to_dict(), "key_count": len(self.state_dict)}


def _bn_units(original: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    units: dict[str, list[str]] = {}
    for key in original:
        module, _, name = key.rpartition(".")
        if name in BN_STAT_NAMES:
            units.setdefault(module, []).append(key)
    return units


def merge_state_dicts(
    original: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    *,
    expected_keys: Iterable[str] | None = None,
    drop_unexpected: bool = False,
) -> MergeResult:
    """Take every key of `trained` and fill the keys it lacks from `original`.

    A BatchNorm module's running stats (running_mean, running_var, num_batches_tracked) are filled as a
    unit: if trained has only some of them, the whole set comes from the original, and the module is listed in
    `partial_bn_modules`. `_metadata` is taken from trained if present, else from the original.

    Args:
        original: The pretrained state_dict, prefixes already stripped.
        trained: The trained state_dict, prefixes already stripped.
        expected_keys: The keys the target architecture expects; keys outside it are reported as `unexpected`,
            and expected keys in neither input as `missing`. Also fixes the output order.
        drop_unexpected: Leave the unexpected keys out of the result.

    Returns:
        A `MergeResult` whose state_dict is a new OrderedDict of the input tensor objects, ordered as
        `expected_keys` (then any kept unexpected keys) or else as `original` followed by trained-only keys.
    """
    provenance: dict[str, KeyProvenance] = {}
    for key in trained:
        provenance[key] = KeyProvenance("trained", REASON_TRAINED)
    for key in original:
        if key not in trained:
            provenance[key] = KeyProvenance("original", REASON_MISSING)

    filled_modules: list[str] = []
    partial: dict[str, list[str]] = {}
    for module, keys in _bn_units(original).items():
        present = [k for k in keys if k in trained]
        if len(present) == len(keys):
            continue
        filled_modules.append(module)
        if present:
            partial[module] = sorted(present)
            names = ", ".join(k.rpartition(".")[2] for k in sorted(present))
            reason = f"BatchNorm running stats taken from original as a unit: trained had only {names}"
        else:
            reason = REASON_BN
        for key in keys:
            provenance[key] = KeyProvenance("original", reason)

    unexpected: list[str] = []
    missing: list[str] = []
    if expected_keys is None:
        order = [*original, *(k for k in trained if k not in original)]
    else:
        expected = list(dict.fromkeys(expected_keys))
        expected_set = set(expected)
        unexpected = [k for k in provenance if k not in expected_set]
        missing = [k for k in expected if k not in provenance]
        order = [k for k in expected if k in provenance]
        if not drop_unexpected:
            order += unexpected
    dropped = unexpected if drop_unexpected else []

    merged: OrderedDict[str, torch.Tensor] = OrderedDict()
    kept: dict[str, KeyProvenance] = {}
    for key in order:
        source = provenance[key]
        merged[key] = trained[key] if source.source == "trained" else original[key]
        kept[key] = source

    metadata_source: Literal["trained", "original", "absent"] = "absent"
    metadata = metadata_of(trained)
    if metadata is not None:
        metadata_source = "trained"
    else:
        metadata = metadata_of(original)
        if metadata is not None:
            metadata_source = "original"
    if metadata is not None:
        merged = with_metadata(merged, metadata, copy=True)

    counts = {"trained": 0, "original": 0}
    for source in kept.values():
        counts[source.source] += 1
    return MergeResult(
        state_dict=merged,
        report=MergeReport(
            provenance=kept,
            counts=counts,
            filled=tuple(sorted(k for k, p in kept.items() if p.source == "original")),
            filled_modules=tuple(sorted(filled_modules)),
            partial_bn_modules={m: partial[m] for m in sorted(partial)},
            unexpected=tuple(sorted(unexpected)),
            dropped=tuple(sorted(dropped)),
            metadata=metadata_source,
            metadata_warning=METADATA_WARNING if metadata is None else None,
            missing=tuple(sorted(missing)),
        ),
    )
