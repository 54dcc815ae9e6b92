"""The recipe's "check regularly that the fixed part is constant": compare frozen keys before and after."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from service.core.changes import KeyChange
from service.core.diff import iter_chunk_pairs
from service.core.merge import BN_STAT_NAMES
from service.core.types import Manifest

__all__ = ["FrozenReport", "check_frozen", "check_frozen_manifests", "with_value_changes"]

_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class FrozenReport:
    """Whether the frozen part of a model stayed constant."""

    checked: int  # frozen keys compared
    changed: tuple[str, ...]  # frozen keys whose values differ (sorted)
    missing: tuple[str, ...]  # frozen keys absent from the trained state_dict (sorted)
    max_abs: dict[str, float]  # changed key -> largest absolute difference (inf: NaN/Inf placement differs)
    ok: bool
    mismatched: tuple[str, ...] = ()  # frozen keys whose shape differs in the trained state_dict (sorted)
    rel_change: dict[str, float] = field(default_factory=dict)  # changed key -> ||b - a|| / ||a||
    within_atol: tuple[str, ...] = ()  # keys whose bytes differ by at most atol: counted as unchanged (sorted)
    prefixes: tuple[str, ...] | None = None  # the frozen part checked; None: every parameter of the original

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "changed": list(self.changed),
            "missing": list(self.missing),
            "mismatched": list(self.mismatched),
            "max_abs": {k: (v if math.isfinite(v) else None) for k, v in self.max_abs.items()},
            "rel_change": {k: (v if math.isfinite(v) else None) for k, v in self.rel_change.items()},
            "within_atol": list(self.within_atol),
            "prefixes": list(self.prefixes) if self.prefixes is not None else None,
            "ok": self.ok,
        }


def _under(key: str, prefixes: Sequence[str]) -> bool:
    for prefix in prefixes:
        base = prefix.rstrip(".")
        if not base or key == base or key.startswith(base + "."):
            return True
    return False


def _select(keys: Iterable[str], prefixes: Sequence[str] | None, parameters_only: bool) -> list[str]:
    # Every dtype is checked: a frozen integer or quantized tensor is compared by equality like any other.
    selected = []
    for key in keys:
        if prefixes is not None and not _under(key, prefixes):
            continue
        if parameters_only and key.rpartition(".")[2] in BN_STAT_NAMES:
            continue
        selected.append(key)
    return selected


def _max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.is_quantized or b.is_quantized:
        return _quantized_difference(a, b)
    if a.dtype == b.dtype and torch.equal(a, b):
        return 0.0
    worst = 0.0
    for ca, cb in iter_chunk_pairs(a, b, _CHUNK_ELEMENTS):
        da, db = ca.to(torch.float64), cb.to(torch.float64)
        # NaN in both and equal infinities count as unchanged; any other NaN/Inf disagreement is inf.
        same = (da == db) | (torch.isnan(da) & torch.isnan(db))
        if bool(same.all()):
            continue
        diff = (da - db).abs_()[~same]
        diff = torch.nan_to_num(diff, nan=math.inf)
        worst = max(worst, float(diff.max()))
    return worst


def _quantized_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    # Equal when the dequantized values are; a quantized tensor against a plain one compares values too.
    da = a.dequantize() if a.is_quantized else a
    db = b.dequantize() if b.is_quantized else b
    return _max_abs_difference(da, db)


def check_frozen(
    original: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    *,
    prefixes: Sequence[str] | None = None,
    parameters_only: bool = True,
    atol: float = 0.0,
) -> FrozenReport:
    """Check that the frozen part of `original` is unchanged in `trained`, comparing values chunk by chunk.

    The frozen set is every key of `original` (pass the fixed part's state_dict, as the recipe's
    `freeze_model(to_freeze_dict=...)` does), or its keys under `prefixes`. With `parameters_only`, BatchNorm
    buffers (running_mean, running_var, num_batches_tracked) are left out: the recipe drops them from the trained
    state_dict on purpose. Tensors of every dtype are compared: integer ones exactly, quantized ones by their
    dequantized values.

    Args:
        original: The pretrained state_dict (or its frozen part).
        trained: The trained state_dict, with wrapper prefixes already stripped.
        prefixes: Module paths ("features." or "features") whose keys are frozen; None: all of `original`.
        parameters_only: Leave out BatchNorm buffers.
        atol: Largest absolute difference still counted as unchanged.

    Returns:
        A `FrozenReport`; `ok` is False when a frozen key changed, is missing or changed shape.
    """
    frozen = _select(original, prefixes, parameters_only)
    changed: dict[str, float] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    for key in frozen:
        after = trained.get(key)
        if after is None:
            missing.append(key)
            continue
        before = original[key]
        if before.shape != after.shape:
            mismatched.append(key)
            continue
        worst = _max_abs_difference(before, after)
        if worst > atol:
            changed[key] = worst
    return FrozenReport(
        checked=len(frozen),
        changed=tuple(sorted(changed)),
        missing=tuple(sorted(missing)),
        max_abs={k: changed[k] for k in sorted(changed)},
        ok=not (changed or missing or mismatched),
        mismatched=tuple(sorted(mismatched)),
    )


def check_frozen_manifests(
    original: Manifest,
    trained: Manifest,
    *,
    prefixes: Sequence[str] | None = None,
    parameters_only: bool = True,
) -> FrozenReport:
    """Check the frozen part by manifest fingerprints only, without loading tensors.

    Same frozen set as `check_frozen`. A fingerprint covers the bytes (and a quantized tensor's scale, zero point
    and axis), so a dtype change counts as a change even when the values survive the cast; `max_abs` is not
    available and stays empty.

    Args:
        original: Manifest of the pretrained state_dict (or its frozen part).
        trained: Manifest of the trained state_dict, with wrapper prefixes already stripped.
        prefixes: Module paths whose keys are frozen; None: all of `original`.
        parameters_only: Leave out BatchNorm buffers.

    Returns:
        A `FrozenReport` with an empty `max_abs`.
    """
    frozen = _select(original.entries, prefixes, parameters_only)
    changed: list[str] = []
    missing: list[str] = []
    mismatched: list[str] = []
    for key in frozen:
        after = trained.entries.get(key)
        if after is None:
            missing.append(key)
            continue
        before = original.entries[key]
        if tuple(before.shape) != tuple(after.shape):
            mismatched.append(key)
        elif before.dtype != after.dtype or before.fingerprint != after.fingerprint:
            changed.append(key)
    return FrozenReport(
        checked=len(frozen),
        changed=tuple(sorted(changed)),
        missing=tuple(sorted(missing)),
        max_abs={},
        ok=not (changed or missing or mismatched),
        mismatched=tuple(sorted(mismatched)),
        prefixes=tuple(prefixes) if prefixes is not None else None,
    )


def with_value_changes(report: FrozenReport, changes: Mapping[str, KeyChange], *, atol: float = 0.0) -> FrozenReport:
    """Add each changed frozen key's max abs and relative change to a fingerprint-based report.

    Only the keys whose fingerprints differ need values (`changes` from `service.core.changes.measure_changes`
    over `report.changed`), so the check stays a manifest comparison for the frozen part that did not move.
    A key whose largest difference is at most `atol` (a bfloat16 round trip) counts as unchanged and is listed in
    `within_atol`.

    Args:
        report: The report of `check_frozen_manifests`.
        changes: Key to `KeyChange`, at least for `report.changed`; keys without figures stay changed.
        atol: Largest absolute difference still counted as unchanged.

    Returns:
        The report with `max_abs` and `rel_change` filled, and `changed`/`ok` after `atol`.
    """
    changed: list[str] = []
    within: list[str] = []
    for key in report.changed:
        c = changes.get(key)
        if c is not None and c.max_abs <= atol:
            within.append(key)
        else:
            changed.append(key)
    return replace(
        report,
        changed=tuple(changed),
        within_atol=tuple(within),
        max_abs={k: changes[k].max_abs for k in changed if k in changes},
        rel_change={k: changes[k].rel_change for k in changed if k in changes},
        ok=not (changed or report.missing or report.mismatched),
    )
