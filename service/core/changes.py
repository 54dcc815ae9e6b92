"""Per-key and per-module change figures between two state_dicts, defined once.

Every figure is additive, so a module's figures are exactly the sums (or the max) of its keys':

    per key:     numel, changed elements, ||a||^2, ||b - a||^2, max |b - a|
    per module:  the same over every key under it (a key's module is the key minus its last part, and a module
                 rolls up into its parents up to the root "")
    relative change = sqrt(sum ||b - a||^2) / sqrt(sum ||a||^2)

The merge report's rollup, `GET /diff?values=true` and anything else that shows how much a module moved use
`measure_changes` and `rollup_modules`, so they can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from service.core.diff import ValueStats, diff_values, is_numeric_dtype

__all__ = [
    "ChangeSummary",
    "KeyChange",
    "ModuleChange",
    "changes_from_stats",
    "measure_changes",
    "rollup_modules",
    "summarize_changes",
]

_CHUNK_ELEMENTS = 1 << 22


def _relative(sq_diff: float, sq_a: float) -> float:
    if sq_a > 0:
        return math.sqrt(sq_diff) / math.sqrt(sq_a)
    return 0.0 if sq_diff == 0 else math.inf


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class KeyChange:
    """How much one tensor moved from `a` to `b` (over positions where both are finite, see `max_abs`)."""

    numel: int
    changed: int  # elements that differ (NaN == NaN)
    sq_a: float  # ||a||^2
    sq_diff: float  # ||b - a||^2
    max_abs: float  # max |b - a|; inf when a NaN/Inf of one side meets a different value on the other

    @property
    def rel_change(self) -> float:
        """sqrt(||b - a||^2) / sqrt(||a||^2); 0 when nothing changed, inf when a is zero and b is not."""
        return _relative(self.sq_diff, self.sq_a)

    @classmethod
    def from_stats(cls, stats: ValueStats) -> KeyChange:
        """The additive part of a key's `ValueStats`."""
        max_abs = math.inf if stats.nonfinite_changed else (stats.max_abs if stats.finite else 0.0)
        return cls(stats.numel, stats.changed, stats.sq_a, stats.sq_diff, max_abs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "numel": self.numel,
            "changed": self.changed,
            "rel_change": _json_float(self.rel_change),
            "max_abs": _json_float(self.max_abs),
        }


@dataclass(frozen=True)
class ModuleChange:
    """A module's figures: the sums (and the max) of the `KeyChange`s of every key under it."""

    keys: int  # keys measured under the module
    changed_keys: int  # of those, keys with at least one changed element
    numel: int
    changed: int
    sq_a: float
    sq_diff: float
    max_abs: float

    @property
    def rel_change(self) -> float:
        """sqrt(sum ||b - a||^2) / sqrt(sum ||a||^2) over the module's keys."""
        return _relative(self.sq_diff, self.sq_a)

    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "changed_keys": self.changed_keys,
            "numel": self.numel,
            "changed": self.changed,
            "rel_change": _json_float(self.rel_change),
            "max_abs": _json_float(self.max_abs),
        }


@dataclass(frozen=True)
class ChangeSummary:
    """Per-key figures and their per-module rollup (modules sorted, the root "" first)."""

    keys: Mapping[str, KeyChange]
    modules: Mapping[str, ModuleChange]

    @property
    def total(self) -> ModuleChange:
        """The whole state_dict's figures (the root module "")."""
        return self.modules.get("", _EMPTY)

    def to_dict(self, *, keys: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rel_change": _json_float(self.total.rel_change),
            "modules": {m: c.to_dict() for m, c in self.modules.items()},
        }
        if keys:
            out["keys"] = {k: c.to_dict() for k, c in self.keys.items()}
        return out


_EMPTY = ModuleChange(0, 0, 0, 0, 0.0, 0.0, 0.0)


def _sq_norm(t: torch.Tensor, buffers: dict[str, torch.Tensor]) -> float:
    t = t.detach()
    if t.layout != torch.strided:  # sparse: its dense size is within the upload's expansion bound
        t = t.to_dense()
    if t.is_quantized:
        t = t.dequantize()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj().resolve_neg())
    flat = t.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
        chunk = flat[start : start + _CHUNK_ELEMENTS]
        # float64 for exact sums, through one reused buffer: vector_norm(dtype=float64) is 3x slower, and a
        # fresh float64 copy per chunk costs as much as the arithmetic.
        values = _buffer(buffers, chunk.numel()).copy_(chunk)
        square = float(torch.dot(values, values))
        if not math.isfinite(square):  # ||a||^2 is over finite positions, as in diff_values
            values = values[torch.isfinite(values)]
            square = float(torch.dot(values, values))
        total += square
    return total


def _buffer(buffers: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    buf = buffers.get("a")
    if buf is None or buf.numel() < n:
        buf = buffers["a"] = torch.empty(n, dtype=torch.float64)
    return buf[:n]


def measure_changes(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    keys: Iterable[str],
    same: Iterable[str] = (),
    known_sq_a: Mapping[str, float] | None = None,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> dict[str, KeyChange]:
    """Measure how far each key moved from `a` to `b`.

    Args:
        a: The first state_dict (the original).
        b: The second state_dict (the trained one).
        keys: Keys whose values may differ: compared chunk by chunk (see `diff_values`). Keys absent from either
            side or of different shapes are skipped.
        same: Keys known to be identical (equal fingerprints): only ||a||^2 is computed, so that modules'
            relative changes have the right denominator.
        known_sq_a: ||a||^2 of some `same` keys, known already (a caller's cache): not computed again.
        chunk_elements: Elements per chunk.

    Returns:
        Key to `KeyChange`, `keys` first, then `same`.
    """
    stats = diff_values(a, b, keys=keys, chunk_elements=chunk_elements)
    return changes_from_stats(stats, a, same=same, known_sq_a=known_sq_a)


def changes_from_stats(
    stats: Mapping[str, ValueStats],
    a: Mapping[str, torch.Tensor],
    *,
    same: Iterable[str] = (),
    known_sq_a: Mapping[str, float] | None = None,
) -> dict[str, KeyChange]:
    """`measure_changes` for a caller that already has `diff_values` statistics of the keys that may differ.

    Args:
        stats: Key to `ValueStats` (from `diff_values`).
        a: The first state_dict, for the ||a||^2 of `same`.
        same: Keys known to be identical.
        known_sq_a: ||a||^2 of some `same` keys, known already.

    Returns:
        Key to `KeyChange`.
    """
    out = {k: KeyChange.from_stats(s) for k, s in stats.items()}
    buffers: dict[str, torch.Tensor] = {}
    for key in same:
        ta = a.get(key)
        if key in out or not isinstance(ta, torch.Tensor) or ta.is_meta or not is_numeric_dtype(ta.dtype):
            continue
        numel = ta.numel() * (2 if ta.is_complex() else 1)
        known = known_sq_a.get(key) if known_sq_a is not None else None
        out[key] = KeyChange(numel, 0, known if known is not None else _sq_norm(ta, buffers), 0.0, 0.0)
    return out


def _parents(key: str) -> Iterable[str]:
    parts = key.split(".")
    yield ""
    for i in range(1, len(parts)):
        yield ".".join(parts[:i])


def rollup_modules(changes: Mapping[str, KeyChange]) -> dict[str, ModuleChange]:
    """Aggregate key figures into every module on the way to the root.

    Args:
        changes: Key to `KeyChange`.

    Returns:
        Module path to `ModuleChange`, sorted by path; "" is the whole state_dict.
    """
    acc: dict[str, list[float]] = {}
    for key, c in changes.items():
        for module in _parents(key):
            s = acc.get(module)
            if s is None:
                s = acc[module] = [0, 0, 0, 0, 0.0, 0.0, 0.0]
            s[0] += 1
            s[1] += 1 if c.changed else 0
            s[2] += c.numel
            s[3] += c.changed
            s[4] += c.sq_a
            s[5] += c.sq_diff
            s[6] = max(s[6], c.max_abs)
    return {
        m: ModuleChange(int(s[0]), int(s[1]), int(s[2]), int(s[3]), s[4], s[5], s[6])
        for m, s in sorted(acc.items())
    }


def summarize_changes(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    keys: Iterable[str],
    same: Iterable[str] = (),
) -> ChangeSummary:
    """`measure_changes` and `rollup_modules` in one call.

    Args:
        a: The first state_dict (the original).
        b: The second state_dict (the trained one).
        keys: Keys whose values may differ.
        same: Keys known to be identical.

    Returns:
        A `ChangeSummary`.
    """
    changes = measure_changes(a, b, keys=keys, same=same)
    return ChangeSummary(changes, rollup_modules(changes))
