"""Merge a trained state_dict with the original one (the recipe's step 4.2).

Training with `track_running_stats=False` drops each BatchNorm's running_mean, running_var and
num_batches_tracked from the trained state_dict; the merge takes every trained key and fills the rest from the
original. No tensor data is copied: the result holds the input tensor objects, so mmapped inputs stay mmapped.

Filling is also what hides wrong inputs, so the report says what was filled beyond BatchNorm statistics
(`filled_parameters`, rolled up to modules), and two checks look at the inputs themselves: `shard_evidence` (a
file that is one shard of a sharded checkpoint) and `detect_swap` (original and trained given the wrong way round).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from service.core.statedict import metadata_of, with_metadata
from service.core.types import StateDict
from service.errors import quote_keys

__all__ = [
    "BN_STAT_NAMES",
    "KeyProvenance",
    "MergeReport",
    "MergeResult",
    "ShardEvidence",
    "SwapSignals",
    "detect_swap",
    "merge_state_dicts",
    "shard_evidence",
]

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
    # Keys taken from the original other than BatchNorm running stats (sorted): what a frozen-backbone fine-tune
    # leaves out on purpose, and what a single shard or a wrong file leaves out by accident.
    filled_parameters: tuple[str, ...] = ()
    # The largest modules those keys fill completely (no trained key under them) -> keys filled there.
    filled_parameter_modules: dict[str, int] = field(default_factory=dict)

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
            "filled_parameters": list(self.filled_parameters),
            "filled_parameter_modules": dict(self.filled_parameter_modules),
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
    filled = tuple(sorted(k for k, p in kept.items() if p.source == "original"))
    parameters = tuple(k for k in filled if k.rpartition(".")[2] not in BN_STAT_NAMES)
    return MergeResult(
        state_dict=merged,
        report=MergeReport(
            provenance=kept,
            counts=counts,
            filled=filled,
            filled_modules=tuple(sorted(filled_modules)),
            partial_bn_modules={m: partial[m] for m in sorted(partial)},
            unexpected=tuple(sorted(unexpected)),
            dropped=tuple(sorted(dropped)),
            metadata=metadata_source,
            metadata_warning=METADATA_WARNING if metadata is None else None,
            missing=tuple(sorted(missing)),
            filled_parameters=parameters,
            filled_parameter_modules=_filled_roots(parameters, trained),
        ),
    )


def _filled_roots(filled: Iterable[str], trained: Iterable[str]) -> dict[str, int]:
    # Each filled key counts under its highest ancestor module with no trained key under it ("features" when the
    # trained file holds only "head.*"; "" when it holds nothing at all), or under its own module when the
    # trained file has keys right there.
    trained_modules: set[str] = set()
    for key in trained:
        parts = key.split(".")[:-1]
        trained_modules.add("")
        trained_modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    out: dict[str, int] = {}
    for key in filled:
        parts = key.split(".")[:-1]
        root = ".".join(parts)
        for i in range(len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate not in trained_modules:
                root = candidate
                break
        out[root] = out.get(root, 0) + 1
    return {m: out[m] for m in sorted(out)}


# transformers' shard names: model-00001-of-00002.safetensors, pytorch_model-00001-of-00003.bin.
_SHARD_NAME = re.compile(r"(?:^|[-_.])(\d{1,6})-of-(\d{1,6})(?=\.|$)")


@dataclass(frozen=True)
class ShardEvidence:
    """A sign that a checkpoint is one shard of a sharded checkpoint, not the whole model."""

    shard: int  # 1-based
    of: int
    source: Literal["filename", "index"]  # its name says so, or its keys are exactly one shard of a known index
    filename: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"shard": self.shard, "of": self.of, "source": self.source, "filename": self.filename}

    def describe(self, role: str) -> str:
        """One sentence for the merge's warnings."""
        named = f" ({self.filename!r})" if self.filename else ""
        why = "by its name" if self.source == "filename" else "by its keys (one shard of a known index)"
        return (f"the {role} checkpoint{named} looks like shard {self.shard} of {self.of} {why}: a merge of one "
                "shard takes the other shards' parameters from the original; send every shard and the index "
                "as one checkpoint")


def shard_evidence(
    filename: str | None,
    keys: Collection[str] = (),
    *,
    indexes: Iterable[Mapping[str, str]] = (),
) -> ShardEvidence | None:
    """Whether a checkpoint looks like one shard of a sharded checkpoint.

    Args:
        filename: The name the file was sent or stored under (any directory part is ignored).
        keys: The checkpoint's keys, compared with `indexes`.
        indexes: `weight_map`s (key -> shard file name) of sharded checkpoints seen before.

    Returns:
        The evidence, or None. The name rule: ``-0000x-of-0000y`` before the extension, with 1 <= x <= y and
        y >= 2. The key rule: the keys are exactly the keys one index assigns to one of its (two or more) shards.
    """
    if filename:
        base = filename.replace("\\", "/").rpartition("/")[2]
        found = _SHARD_NAME.search(base)
        if found is not None:
            shard, of = int(found.group(1)), int(found.group(2))
            if 1 <= shard <= of and of >= 2:
                return ShardEvidence(shard, of, "filename", base)
    key_set = set(keys)
    if not key_set:
        return None
    for weight_map in indexes:
        shards: dict[str, set[str]] = {}
        for key, shard_file in weight_map.items():
            shards.setdefault(shard_file, set()).add(key)
        names = sorted(shards)
        for position, name in enumerate(names, start=1):
            if len(names) >= 2 and shards[name] == key_set:
                return ShardEvidence(position, len(names), "index", filename)
    return None


@dataclass(frozen=True)
class SwapSignals:
    """The two signs that `original` and `trained` were given the wrong way round.

    The recipe trains under a wrapper (DataParallel's `module.`) with `track_running_stats=False`, so its trained
    file has wrapper prefixes and no BatchNorm running stats, and the pretrained original has the stats and no
    wrapper. Seen the other way round, both signs point to a swap; one alone is only worth a warning.
    """

    original_prefixes: tuple[str, ...]  # wrapper prefixes removed from the original while the trained had none
    bn_stats: tuple[str, ...]  # BatchNorm running stats the trained has and the original lacks (sorted)

    @property
    def swapped(self) -> bool:
        """Both signs hold."""
        return bool(self.original_prefixes) and bool(self.bn_stats)

    @property
    def any(self) -> bool:
        """At least one sign holds."""
        return bool(self.original_prefixes) or bool(self.bn_stats)

    def describe(self) -> str:
        """What was seen, as one clause per sign."""
        parts = []
        if self.original_prefixes:
            shown = ", ".join(repr(p) for p in self.original_prefixes)
            parts.append(f"the original has wrapper prefixes ({shown}) and the trained has none")
        if self.bn_stats:
            modules = sorted({k.rpartition(".")[0] for k in self.bn_stats})
            parts.append(f"BatchNorm running stats are missing from the original but present in the trained "
                         f"({len(modules)} modules: {quote_keys(modules, limit=5)})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"swapped": self.swapped, "original_prefixes": list(self.original_prefixes),
                "bn_stats": list(self.bn_stats)}


def detect_swap(
    original: Collection[str],
    trained: Collection[str],
    *,
    original_prefixes: Iterable[str] = (),
    trained_prefixes: Iterable[str] = (),
) -> SwapSignals:
    """Look for the signs that the original and the trained checkpoint were swapped.

    Args:
        original: The original's keys, prefixes already stripped.
        trained: The trained keys, prefixes already stripped.
        original_prefixes: The prefixes stripping removed from the original's keys.
        trained_prefixes: The prefixes stripping removed from the trained keys.

    Returns:
        The `SwapSignals`: the wrapper sign holds when prefixes were removed from the original and none from the
        trained; the BatchNorm sign when the trained has running stats of modules the original has without them.
    """
    removed = sorted(set(original_prefixes))
    wrappers = tuple(removed) if removed and not set(trained_prefixes) else ()
    original_modules = {k.rpartition(".")[0] for k in original}
    stats = tuple(sorted(
        k for k in trained
        if k.rpartition(".")[2] in BN_STAT_NAMES and k not in original and k.rpartition(".")[0] in original_modules
    ))
    return SwapSignals(wrappers, stats)
