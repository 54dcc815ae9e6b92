"""Strip wrapper prefixes (DataParallel, torch.compile, Lightning) from state_dict keys.

Two modes:

* known wrappers (``prefixes=None``): the components in `KNOWN_WRAPPERS` are removed wherever they occur in a
  key's module path, because wrappers nest (``module._orig_mod.head.bias``) and wrap submodules
  (``features.module.0.weight``). A wrapper is removed only as a whole dotted component sequence, and never as
  a key's last component (that is the tensor's own name).
* explicit prefixes (``prefixes=["model."]``): removed only at the start of keys, repeatedly while one
  matches.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from service.core.statedict import metadata_of, rename_metadata, with_metadata
from service.core.types import StateDict
from service.errors import PrefixCollision, quote_keys

__all__ = [
    "KNOWN_WRAPPERS",
    "PrefixMatch",
    "StripResult",
    "match_prefixes",
    "strip_key",
    "strip_prefixes",
]

KNOWN_WRAPPERS: tuple[str, ...] = (
    "module.",  # nn.DataParallel / DistributedDataParallel
    "_orig_mod.",  # torch.compile's OptimizedModule
    "_forward_module.",  # Lightning's _LightningModuleWrapperBase / DeepSpeed engines
)

# Lightning keeps the user's network under `self.model` by convention only, so "model." is a real attribute
# name in many models: it is stripped only when asked for or when `match_prefixes` finds that it fits.
LIGHTNING_PREFIX = "model."

# Every known wrapper is one component ("module", not "a.b"), so removing one is a per-component lookup.
_WRAPPER_OF: dict[str, str] = {w.rstrip("."): w for w in KNOWN_WRAPPERS}
assert all("." not in c for c in _WRAPPER_OF)


@dataclass(frozen=True)
class StripResult:
    """The renamed state_dict and what was done to it."""

    state_dict: StateDict
    applied: dict[str, int]  # prefix -> number of keys it was removed from
    renamed: int  # keys whose name changed
    has_metadata: bool  # the input carried `_metadata` (renamed with the same transform)

    def to_dict(self) -> dict[str, Any]:
        return {
            "applied": dict(self.applied),
            "renamed": self.renamed,
            "has_metadata": self.has_metadata,
            "key_count": len(self.state_dict),
        }


@dataclass(frozen=True)
class PrefixMatch:
    """The strip transform that best fits a set of expected keys."""

    prefixes: tuple[str, ...] | None  # None: strip known wrappers; (): change nothing
    matched: int  # transformed keys that are expected keys
    total: int  # keys in the checkpoint
    expected: int  # expected keys
    score: float  # matched / |union of transformed and expected keys| (Jaccard), 0..1

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefixes": None if self.prefixes is None else list(self.prefixes),
            "matched": self.matched,
            "total": self.total,
            "expected": self.expected,
            "score": self.score,
        }


def _remove_wrappers(parts: list[str], applied: dict[str, int] | None) -> list[str]:
    out = [p for p in parts if p not in _WRAPPER_OF]
    if applied is not None and len(out) != len(parts):
        for wrapper in {_WRAPPER_OF[p] for p in parts if p in _WRAPPER_OF}:
            applied[wrapper] = applied.get(wrapper, 0) + 1
    return out


def _strip_start(name: str, prefixes: Sequence[str], applied: dict[str, int] | None) -> str:
    seen: set[str] = set()
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            # Never strip a key down to nothing: what is left must still name a tensor.
            if prefix and name.startswith(prefix) and len(name) > len(prefix):
                name = name[len(prefix) :]
                seen.add(prefix)
                changed = True
                break
    if applied is not None:
        for prefix in seen:
            applied[prefix] = applied.get(prefix, 0) + 1
    return name


def _normalise(prefixes: Sequence[str] | None) -> tuple[str, ...] | None:
    # A prefix names whole components: "model" means "model.", never "model_ema." or "modelx.".
    if prefixes is None:
        return None
    if isinstance(prefixes, str):
        raise TypeError("prefixes must be a sequence of strings, not a string")
    return tuple(p if p.endswith(".") else p + "." for p in prefixes if p.strip("."))


def _transform_key(key: str, prefixes: Sequence[str] | None, applied: dict[str, int] | None = None) -> str:
    if prefixes is None:
        *path, leaf = key.split(".")
        return ".".join([*_remove_wrappers(path, applied), leaf])
    return _strip_start(key, prefixes, applied)


def _transform_module_path(path: str, prefixes: Sequence[str] | None) -> str:
    # `_metadata` keys are module paths without a trailing dot; "" is the root.
    if not path:
        return path
    if prefixes is None:
        return ".".join(_remove_wrappers(path.split("."), None))
    # Stripping "module." from "module" (the wrapped root) must give "", so strip from "path." instead.
    stripped = path + "."
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if prefix and stripped.startswith(prefix):
                stripped = stripped[len(prefix) :]
                changed = True
                break
    return stripped[:-1] if stripped.endswith(".") else stripped


def strip_key(key: str, prefixes: Sequence[str] | None = None) -> str:
    """Apply the transform of `strip_prefixes` to one key.

    Args:
        key: A state_dict key.
        prefixes: None for the known wrappers anywhere in the module path; else prefixes removed at the start.

    Returns:
        The renamed key (the key itself if nothing applies).
    """
    return _transform_key(key, _normalise(prefixes))


def strip_prefixes(
    state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str] | None = None
) -> StripResult:
    """Remove wrapper prefixes from every key of a state_dict.

    Args:
        state_dict: Key to tensor, maybe with a `_metadata` attribute (as `nn.Module.state_dict()` returns).
        prefixes: None strips the known wrappers (`KNOWN_WRAPPERS`) wherever they occur in a module path.
            A sequence strips those prefixes at the start of keys only, repeatedly while one matches; a
            missing trailing dot is added ("model" means "model.").

    Returns:
        A `StripResult` whose `state_dict` is a new OrderedDict holding the same tensor objects (no copies),
        with `_metadata` renamed by the same transform when the input had it.

    Raises:
        PrefixCollision: Two keys would map to the same name.
        TypeError: `prefixes` is a single string rather than a sequence of them.
    """
    prefixes = _normalise(prefixes)
    applied: dict[str, int] = {}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    sources: dict[str, list[str]] = {}
    renamed = 0
    for key, value in state_dict.items():
        target = _transform_key(key, prefixes, applied)
        sources.setdefault(target, []).append(key)
        if target != key:
            renamed += 1
        out[target] = value
    collisions = {target: keys for target, keys in sources.items() if len(keys) > 1}
    if collisions:
        first = sorted(collisions)[0]
        involved = [k for keys in collisions.values() for k in keys]
        more = f" ({len(collisions) - 1} more collisions)" if len(collisions) > 1 else ""
        raise PrefixCollision(
            f"keys {quote_keys(collisions[first])} would all become {first!r}{more}", keys=involved
        )
    metadata = metadata_of(state_dict)
    if metadata is not None:
        out = with_metadata(out, rename_metadata(metadata, lambda path: _transform_module_path(path, prefixes)))
    return StripResult(state_dict=out, applied=applied, renamed=renamed, has_metadata=metadata is not None)


def _candidates(keys: Sequence[str]) -> list[tuple[str, ...] | None]:
    candidates: list[tuple[str, ...] | None] = [
        (),
        None,
        (LIGHTNING_PREFIX,),
        (*KNOWN_WRAPPERS, LIGHTNING_PREFIX),
    ]
    # Also try each leading component shared by many keys ("net.", "backbone.", "encoder."): checkpoints are
    # often saved from a container that held the model under an attribute.
    counts: dict[str, int] = {}
    for key in keys:
        head, sep, _ = key.partition(".")
        if sep:
            counts[head] = counts.get(head, 0) + 1
    for head, _count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:8]:
        prefix = head + "."
        if prefix not in KNOWN_WRAPPERS and prefix != LIGHTNING_PREFIX:
            candidates.append((prefix,))
            candidates.append((*KNOWN_WRAPPERS, prefix))
    return candidates


def _leaves_all_unchanged(keys: Sequence[str], candidate: tuple[str, ...] | None) -> bool:
    # A cheap, conservative test (C-level string scans) that saves transforming every key.
    if candidate is None:
        return not any(wrapper in key for wrapper in _WRAPPER_OF for key in keys)
    return not candidate or not any(key.startswith(candidate) for key in keys)


def match_prefixes(keys: Iterable[str], expected_keys: Iterable[str]) -> PrefixMatch:
    """Find the strip transform under which a checkpoint's keys best match an architecture's keys.

    Candidates: nothing, the known wrappers, "model.", the known wrappers plus "model.", and the checkpoint's
    most common leading components. Transforms that would make keys collide are skipped. Ties go to the
    earlier (simpler) candidate.

    Args:
        keys: The checkpoint's keys.
        expected_keys: The keys the architecture expects.

    Returns:
        The best `PrefixMatch`; pass its `prefixes` to `strip_prefixes`.
    """
    key_list = list(keys)
    expected = set(expected_keys)
    best: PrefixMatch | None = None
    for candidate in _candidates(key_list):
        if best is not None and _leaves_all_unchanged(key_list, candidate):
            continue  # the same keys as the empty transform, which came first and wins the tie
        transformed = {_transform_key(k, candidate) for k in key_list}
        if len(transformed) != len(set(key_list)):
            continue
        matched = len(transformed & expected)
        union = len(transformed | expected)
        score = matched / union if union else 1.0
        if best is None or score > best.score:
            best = PrefixMatch(candidate, matched, len(key_list), len(expected), score)
    # The empty transform never collides, so `best` is always set.
    assert best is not None
    return best
