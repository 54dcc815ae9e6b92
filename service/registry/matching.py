"""Which registered architecture does a checkpoint fit? Rank them by keys and shapes, after prefix alignment.

Only the checkpoint's manifest (key -> shape, dtype) and each architecture's spec are compared: no tensor is read
and no model is built beyond the spec the registry already holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.core.prefixes import KeyTransform, match_prefixes, prefix_candidates
from service.core.verify import ArchitectureSpec

__all__ = ["ArchitectureMatch", "rank_architectures"]


@dataclass(frozen=True)
class ArchitectureMatch:
    """How well a checkpoint fits one architecture after the strip transform that fits it best."""

    name: str
    matched: int  # checkpoint keys (after the transform) that the architecture expects
    missing: int  # expected keys the checkpoint lacks
    unexpected: int  # checkpoint keys the architecture does not have
    shape_mismatches: int  # matched keys of another shape
    dtype_mismatches: int  # matched keys of the same shape and another dtype
    score: float  # matched keys of the right shape / keys in either side (Jaccard), 0..1
    transform: KeyTransform

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "score": self.score,
            "matched": self.matched,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "shape_mismatches": self.shape_mismatches,
            "dtype_mismatches": self.dtype_mismatches,
            "transform": self.transform.to_dict(),
        }


def rank_architectures(
    entries: Mapping[str, tuple[Sequence[int], str]], architectures: Iterable[tuple[str, ArchitectureSpec]]
) -> list[ArchitectureMatch]:
    """Rank architectures by how well a checkpoint fits them.

    Args:
        entries: The checkpoint's keys with their shape and dtype (from its manifest).
        architectures: (name, spec) pairs.

    Returns:
        One `ArchitectureMatch` per architecture, best first: highest score, then fewer shape mismatches, then
        by name.
    """
    keys = list(entries)
    candidates = prefix_candidates(keys)
    out: list[ArchitectureMatch] = []
    for name, spec in architectures:
        match = match_prefixes(keys, spec.keys, candidates=candidates)
        shapes = dtypes = matched = 0
        for key, (shape, dtype) in entries.items():
            expected = spec.keys.get(match.transform.apply(key))
            if expected is None:
                continue
            matched += 1
            if tuple(shape) != expected.shape:
                shapes += 1
            elif dtype != expected.dtype:
                dtypes += 1
        union = len(keys) + len(spec.keys) - matched
        score = (matched - shapes) / union if union else 1.0
        out.append(ArchitectureMatch(
            name=name, matched=matched, missing=len(spec.keys) - matched, unexpected=len(keys) - matched,
            shape_mismatches=shapes, dtype_mismatches=dtypes, score=score, transform=match.transform,
        ))
    out.sort(key=lambda m: (-m.score, m.shape_mismatches, m.name))
    return out
