"""Diffs: key-level from two manifests (no tensors loaded), and value-level statistics computed in chunks."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from service.core.budget import check_budget
from service.core.prefixes import KeyTransform, strip_key
from service.core.types import Manifest, TensorEntry

__all__ = [
    "CATEGORIES",
    "ManifestDiff",
    "ValueStats",
    "diff_manifests",
    "diff_values",
    "is_numeric_dtype",
    "iter_chunk_pairs",
    "module_of",
    "normalize_entries",
]

CATEGORIES: tuple[str, ...] = (
    "only_in_a",
    "only_in_b",
    "shape_mismatch",
    "dtype_mismatch",
    "changed",
    "unchanged",
)


def module_of(key: str) -> str:
    """Return the module path of a state_dict key: the key without its last component ("" at the root).

    Args:
        key: A state_dict key such as "features.1.running_mean".

    Returns:
        The module path, e.g. "features.1".
    """
    return key.rpartition(".")[0]


# Tensors up to this size are compared in batches (see _stats_batch); larger ones chunk by chunk.
_SMALL_NUMEL = 1 << 16


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class ManifestDiff:
    """Key-level differences between two manifests. Categories are exclusive; every key is in exactly one.

    A key whose shape differs is in `shape_mismatch` only (even if its dtype differs too);
    `dtype_mismatch` holds keys of equal shape and different dtype; `changed` and `unchanged` compare
    fingerprints of keys whose shape and dtype agree.
    """

    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    shape_mismatch: tuple[str, ...]
    dtype_mismatch: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    shape_details: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # key -> (a shape, b shape)
    dtype_details: dict[str, tuple[str, str]]  # key -> (a dtype, b dtype)
    modules: dict[str, dict[str, int]]  # module path -> category -> count
    normalized: bool
    # side ("a"/"b") -> normalized key -> the source keys that collided on it; the first one was kept.
    collisions: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    # normalize_prefixes=align: the transform of each side and the keys they have in common (`Alignment.to_dict`)
    alignment: dict[str, Any] | None = None

    @property
    def summary(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in CATEGORIES}

    @property
    def identical(self) -> bool:
        return len(self.unchanged) == sum(self.summary.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            **{name: list(getattr(self, name)) for name in CATEGORIES},
            "shape_details": {k: {"a": list(a), "b": list(b)} for k, (a, b) in self.shape_details.items()},
            "dtype_details": {k: {"a": a, "b": b} for k, (a, b) in self.dtype_details.items()},
            "summary": self.summary,
            "modules": {m: dict(c) for m, c in self.modules.items()},
            "normalized": self.normalized,
            "collisions": {side: {k: list(v) for k, v in c.items()} for side, c in self.collisions.items()},
            "alignment": self.alignment,
        }


def normalize_entries(
    entries: Mapping[str, TensorEntry], transform: KeyTransform | None = None
) -> tuple[dict[str, TensorEntry], dict[str, list[str]]]:
    """Strip known wrapper prefixes from manifest keys; the first key that maps to a name keeps it.

    Args:
        entries: Manifest entries by key.
        transform: Another rename than the known wrappers' (e.g. `lightning_transform` of the keys).

    Returns:
        The renamed entries, and the collisions (target name -> the source keys that map to it).
    """
    out: dict[str, TensorEntry] = {}
    sources: dict[str, list[str]] = {}
    rename = transform.apply if transform is not None else strip_key
    for key, entry in entries.items():
        target = rename(key)
        sources.setdefault(target, []).append(key)
        if target not in out:
            out[target] = entry
    return out, {t: s for t, s in sources.items() if len(s) > 1}


def diff_manifests(a: Manifest, b: Manifest, *, normalize_prefixes: bool = False) -> ManifestDiff:
    """Compare two manifests key by key, by shape, dtype and content fingerprint.

    Args:
        a: The first manifest (e.g. the original).
        b: The second manifest (e.g. the trained one).
        normalize_prefixes: Strip the known wrapper prefixes from both sides' keys first. When two keys of one
            side collide, the first is kept and the collision is listed in `collisions`.

    Returns:
        A `ManifestDiff` with sorted key tuples, details for mismatches and a per-module rollup.
    """
    entries_a: Mapping[str, TensorEntry] = a.entries
    entries_b: Mapping[str, TensorEntry] = b.entries
    collisions: dict[str, dict[str, list[str]]] = {}
    if normalize_prefixes:
        entries_a, coll_a = normalize_entries(a.entries)
        entries_b, coll_b = normalize_entries(b.entries)
        collisions = {side: c for side, c in (("a", coll_a), ("b", coll_b)) if c}

    buckets: dict[str, list[str]] = {name: [] for name in CATEGORIES}
    shape_details: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    dtype_details: dict[str, tuple[str, str]] = {}
    for key, ea in entries_a.items():
        eb = entries_b.get(key)
        if eb is None:
            buckets["only_in_a"].append(key)
        elif tuple(ea.shape) != tuple(eb.shape):
            buckets["shape_mismatch"].append(key)
            shape_details[key] = (tuple(ea.shape), tuple(eb.shape))
        elif ea.dtype != eb.dtype:
            buckets["dtype_mismatch"].append(key)
            dtype_details[key] = (ea.dtype, eb.dtype)
        elif ea.fingerprint != eb.fingerprint:
            buckets["changed"].append(key)
        else:
            buckets["unchanged"].append(key)
    buckets["only_in_b"] = [k for k in entries_b if k not in entries_a]

    modules: dict[str, dict[str, int]] = {}
    for name, keys in buckets.items():
        for key in keys:
            counts = modules.setdefault(module_of(key), dict.fromkeys(CATEGORIES, 0))
            counts[name] += 1
    sorted_buckets: dict[str, Any] = {name: tuple(sorted(keys)) for name, keys in buckets.items()}
    return ManifestDiff(
        **sorted_buckets,
        shape_details={k: shape_details[k] for k in sorted(shape_details)},
        dtype_details={k: dtype_details[k] for k in sorted(dtype_details)},
        modules={m: modules[m] for m in sorted(modules)},
        normalized=normalize_prefixes,
        collisions=collisions,
    )


@dataclass(frozen=True)
class ValueStats:
    """Differences between the values of one key in two state_dicts, over positions where both are finite.

    `rel_l2` is ||a - b|| / ||a|| and `cosine` is the cosine similarity of a and b; both are NaN when
    undefined (a zero norm with a nonzero difference, or no finite positions), and `to_dict` renders NaN/Inf
    as None.
    """

    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    nan_a: int
    inf_a: int
    nan_b: int
    inf_b: int
    numel: int = 0
    finite: int = 0  # positions where both values are finite: the statistics are over these
    # The additive figures modules aggregate exactly (service.core.changes): ||a||^2 and ||b - a||^2 over the
    # finite positions, elements that differ (NaN == NaN), and of those, positions where only one is finite.
    sq_a: float = 0.0
    sq_diff: float = 0.0
    changed: int = 0
    nonfinite_changed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs": _json_float(self.max_abs),
            "mean_abs": _json_float(self.mean_abs),
            "rel_l2": _json_float(self.rel_l2),
            "cosine": _json_float(self.cosine),
            "nan_a": self.nan_a,
            "inf_a": self.inf_a,
            "nan_b": self.nan_b,
            "inf_b": self.inf_b,
            "numel": self.numel,
            "finite": self.finite,
            "changed": self.changed,
        }


def _real(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():
        # A view: real and imaginary parts become a trailing dimension of 2, compared like any other values.
        return torch.view_as_real(t.resolve_conj().resolve_neg())
    return t


def iter_chunk_pairs(
    a: torch.Tensor, b: torch.Tensor, chunk_elements: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield aligned flat chunks of two same-shaped tensors without copying whole tensors.

    Contiguous tensors are sliced as flat views; otherwise whole rows of the first dimension are taken per
    chunk and only the chunk is made contiguous.

    Args:
        a: A tensor.
        b: A tensor of the same shape.
        chunk_elements: The target number of elements per chunk (at least one row is always taken).

    Yields:
        (chunk of a, chunk of b), both one-dimensional and of equal length.
    """
    chunk_elements = max(1, chunk_elements)
    a, b = _real(a), _real(b)
    numel = a.numel()
    if numel == 0:
        return
    if a.dim() == 0 or (a.is_contiguous() and b.is_contiguous()):
        fa, fb = a.reshape(-1), b.reshape(-1)
        for start in range(0, numel, chunk_elements):
            yield fa[start : start + chunk_elements], fb[start : start + chunk_elements]
        return
    row = numel // a.shape[0]
    rows = max(1, chunk_elements // row)
    for start in range(0, a.shape[0], rows):
        yield a[start : start + rows].reshape(-1), b[start : start + rows].reshape(-1)


@dataclass
class _Sums:
    count: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    sq_diff: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0
    dot: float = 0.0
    nan_a: int = 0
    inf_a: int = 0
    nan_b: int = 0
    inf_b: int = 0
    changed: int = 0
    nonfinite_changed: int = 0


def _buffer(cache: dict[str, torch.Tensor], name: str, n: int) -> torch.Tensor:
    # Reused across chunks: allocating (and page-faulting) fresh float64 chunks costs as much as the math.
    buf = cache.get(name)
    if buf is None or buf.numel() < n:
        buf = cache[name] = torch.empty(n, dtype=torch.float64)
    return buf[:n]


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t))


def _accumulate(sums: _Sums, ca: torch.Tensor, cb: torch.Tensor, cache: dict[str, torch.Tensor]) -> None:
    # float64 per chunk: exact for every float16/bfloat16/float32 value and for integers up to 2**53.
    da = _buffer(cache, "a", ca.numel()).copy_(ca)
    db = _buffer(cache, "b", cb.numel()).copy_(cb)
    norm_a, norm_b = _norm(da), _norm(db)
    # A norm is finite exactly when every value is, so the (slow) elementwise checks run only for chunks
    # that hold a NaN or an infinity.
    if not (math.isfinite(norm_a) and math.isfinite(norm_b)):
        fin_a, fin_b = torch.isfinite(da), torch.isfinite(db)
        sums.nan_a += int(torch.isnan(da).sum())
        sums.nan_b += int(torch.isnan(db).sum())
        sums.inf_a += int(torch.isinf(da).sum())
        sums.inf_b += int(torch.isinf(db).sum())
        both = fin_a & fin_b
        differs = ~((da == db) | (torch.isnan(da) & torch.isnan(db)))
        sums.nonfinite_changed += int((differs & ~both).sum())
        sums.changed += int((differs & ~both).sum())
        da, db = da[both], db[both]
        norm_a, norm_b = _norm(da), _norm(db)
    if da.numel() == 0:
        return
    sums.dot += float(torch.dot(da, db))
    diff = da.sub_(db)  # da is not needed any more
    low, high = torch.aminmax(diff)
    sums.count += diff.numel()
    sums.changed += int(torch.count_nonzero(diff))
    sums.max_abs = max(sums.max_abs, -float(low), float(high))
    sums.sum_abs += float(torch.linalg.vector_norm(diff, 1))
    sums.sq_diff += _norm(diff) ** 2
    sums.sq_a += norm_a**2
    sums.sq_b += norm_b**2


def _finish(sums: _Sums, numel: int) -> ValueStats:
    if numel == 0:
        # Two empty tensors are equal; there is nothing to be undefined about.
        return ValueStats(0.0, 0.0, 0.0, 1.0, 0, 0, 0, 0, numel=0, finite=0)
    count = sums.count
    norm_a, norm_b, norm_diff = math.sqrt(sums.sq_a), math.sqrt(sums.sq_b), math.sqrt(sums.sq_diff)
    if norm_a > 0:
        rel_l2 = norm_diff / norm_a
    else:
        rel_l2 = 0.0 if norm_diff == 0 else math.nan
    if norm_a > 0 and norm_b > 0:
        cosine = max(-1.0, min(1.0, sums.dot / (norm_a * norm_b)))
    else:
        cosine = 1.0 if (norm_a == 0 and norm_b == 0 and count) else math.nan
    return ValueStats(
        max_abs=sums.max_abs if count else math.nan,
        mean_abs=sums.sum_abs / count if count else math.nan,
        rel_l2=rel_l2 if count else math.nan,
        cosine=cosine,
        nan_a=sums.nan_a,
        inf_a=sums.inf_a,
        nan_b=sums.nan_b,
        inf_b=sums.inf_b,
        numel=numel,
        finite=count,
        sq_a=sums.sq_a,
        sq_diff=sums.sq_diff,
        changed=sums.changed,
        nonfinite_changed=sums.nonfinite_changed,
    )


def _stats(a: torch.Tensor, b: torch.Tensor, chunk_elements: int) -> ValueStats:
    sums = _Sums()
    cache: dict[str, torch.Tensor] = {}
    for ca, cb in iter_chunk_pairs(a, b, chunk_elements):
        _accumulate(sums, ca, cb, cache)
    return _finish(sums, a.numel())


def _flat64(tensors: list[torch.Tensor]) -> torch.Tensor:
    views = [_real(t).reshape(-1) for t in tensors]
    if len({v.dtype for v in views}) == 1:
        return torch.cat(views).to(torch.float64)  # one conversion instead of one per tensor
    return torch.cat([v.to(torch.float64) for v in views])


def _stats_batch(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[ValueStats]:
    # Many small tensors (biases, norms, BN stats) cost more in per-call overhead than in arithmetic: compare
    # them together, concatenated, with per-tensor segment sums.
    sizes = [ta.numel() for ta, _ in pairs]
    n = len(pairs)
    da = _flat64([ta for ta, _ in pairs])
    db = _flat64([tb for _, tb in pairs])
    seg = torch.repeat_interleave(torch.arange(n), torch.tensor(sizes, dtype=torch.int64))

    def per_tensor(values: torch.Tensor) -> list[float]:
        return torch.zeros(n, dtype=torch.float64).index_add_(0, seg, values.to(torch.float64)).tolist()

    counts = [float(s) for s in sizes]
    nans_a = infs_a = nans_b = infs_b = nonfinite_changed = [0.0] * n
    if not (math.isfinite(_norm(da)) and math.isfinite(_norm(db))):
        fin = torch.isfinite(da) & torch.isfinite(db)
        differs = ~((da == db) | (torch.isnan(da) & torch.isnan(db)))
        nonfinite_changed = per_tensor(differs & ~fin)
        nans_a, infs_a = per_tensor(torch.isnan(da)), per_tensor(torch.isinf(da))
        nans_b, infs_b = per_tensor(torch.isnan(db)), per_tensor(torch.isinf(db))
        counts = per_tensor(fin)
        da, db = torch.where(fin, da, 0.0), torch.where(fin, db, 0.0)
    diff = (da - db).abs_()
    changed = per_tensor(diff != 0)
    max_abs = torch.zeros(n, dtype=torch.float64).scatter_reduce_(0, seg, diff, "amax").tolist()
    sum_abs, sq_diff = per_tensor(diff), per_tensor(diff * diff)
    sq_a, sq_b, dot = per_tensor(da * da), per_tensor(db * db), per_tensor(da * db)
    out = []
    for i, numel in enumerate(sizes):
        sums = _Sums(
            count=int(counts[i]),
            max_abs=max_abs[i],
            sum_abs=sum_abs[i],
            sq_diff=sq_diff[i],
            sq_a=sq_a[i],
            sq_b=sq_b[i],
            dot=dot[i],
            nan_a=int(nans_a[i]),
            inf_a=int(infs_a[i]),
            nan_b=int(nans_b[i]),
            inf_b=int(infs_b[i]),
            changed=int(changed[i] + nonfinite_changed[i]),
            nonfinite_changed=int(nonfinite_changed[i]),
        )
        out.append(_finish(sums, numel))
    return out


@functools.cache
def is_numeric_dtype(dtype: torch.dtype) -> bool:
    """Tell whether values of `dtype` can be compared as numbers (not bits16, uint1, ... which are raw bits).

    Args:
        dtype: A torch dtype.

    Returns:
        True when the values convert to float64 (quantized ones after dequantize(), complex ones as pairs).
    """
    if dtype.is_complex or dtype in (torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4):
        return True
    try:
        torch.zeros(1, dtype=dtype).to(torch.float64)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def diff_values(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    keys: Iterable[str] | None = None,
    chunk_elements: int = 1 << 22,
) -> dict[str, ValueStats]:
    """Compute value statistics for keys present in both state_dicts with equal shapes.

    Tensors are compared chunk by chunk over their flattened elements with float64 accumulators, so memory
    stays bounded by the chunk size (mmapped inputs are paged in one chunk at a time). Integer and bool
    tensors are compared as numbers. Different dtypes of the same shape are compared by value.

    Args:
        a: The first state_dict.
        b: The second state_dict.
        keys: The keys to compare; default: the keys of `a` that are also in `b`, in `a`'s order. Keys absent
            from either side, with different shapes, on the meta device, or complex on one side only are
            skipped.
        chunk_elements: Elements per chunk.

    Returns:
        Key to `ValueStats`, in the order compared.
    """
    wanted = list(a.keys()) if keys is None else list(keys)
    chunk_elements = max(1, chunk_elements)
    small_max = min(_SMALL_NUMEL, chunk_elements)
    found: dict[str, ValueStats] = {}
    batch: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    batch_elements = 0

    def flush() -> None:
        nonlocal batch_elements
        if batch:
            stats = _stats_batch([(x, y) for _, x, y in batch])
            found.update(zip([k for k, _, _ in batch], stats, strict=True))
            batch.clear()
            batch_elements = 0

    for key in wanted:
        check_budget()  # a request's time budget ends value diffs between keys
        ta, tb = a.get(key), b.get(key)
        if not isinstance(ta, torch.Tensor) or not isinstance(tb, torch.Tensor) or ta.shape != tb.shape:
            continue
        if ta.is_meta or tb.is_meta or ta.is_complex() != tb.is_complex():
            continue  # no values to compare, or no common real representation without copying
        if not (is_numeric_dtype(ta.dtype) and is_numeric_dtype(tb.dtype)):
            continue  # bits16, uint1, ...: bytes without arithmetic; the fingerprints say whether they changed
        if ta.is_quantized or tb.is_quantized:
            # Compared by their dequantized values (one float copy of the tensor, as torch offers no view).
            ta = ta.dequantize() if ta.is_quantized else ta
            tb = tb.dequantize() if tb.is_quantized else tb
        numel = ta.numel() * (2 if ta.is_complex() else 1)
        if numel > small_max:
            found[key] = _stats(ta, tb, chunk_elements)
            continue
        batch.append((key, ta, tb))
        batch_elements += numel
        if batch_elements >= chunk_elements:
            flush()
    flush()
    return {key: found[key] for key in wanted if key in found}
