"""Strip wrapper prefixes (DataParallel, torch.compile, Lightning) from state_dict keys.

Two modes:

* known wrappers (``prefixes=None``): the components in `KNOWN_WRAPPERS` are removed wherever they occur in a
  key's module path, because wrappers nest (``module._orig_mod.head.bias``) and wrap submodules
  (``features.module.0.weight``). A wrapper is removed only as a whole dotted component sequence, and never as
  a key's last component (that is the tensor's own name).
* explicit prefixes (``prefixes=["model."]``): removed only at the start of keys, repeatedly while one
  matches.

Lightning checkpoints (a top-level ``pytorch-lightning_version`` entry in the file) keep the network under an
attribute of the LightningModule (``model.``, ``net.``, ``backbone.``): when every key shares that one leading
component, known-wrapper stripping removes it too (``strip_prefixes(..., lightning=True)``).

Both modes are a `KeyTransform` (remove known wrappers anywhere, strip prefixes at the start, add a prefix at the
start). `match_prefixes` picks the strip transform that fits an architecture's keys; `align_keys` the transform
under which one key set lines up with a fixed other one (adding prefixes too); `align_prefixes` the pair of
transforms under which two key sets have the most keys in common.
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
    "LIGHTNING_VERSION_KEY",
    "Alignment",
    "KeyTransform",
    "PrefixMatch",
    "StripResult",
    "align_keys",
    "align_prefixes",
    "apply_transform",
    "common_leading_component",
    "is_lightning",
    "lightning_transform",
    "match_prefixes",
    "prefix_candidates",
    "strip_key",
    "strip_prefixes",
]

KNOWN_WRAPPERS: tuple[str, ...] = (
    "module.",  # nn.DataParallel / DistributedDataParallel
    "_orig_mod.",  # torch.compile's OptimizedModule
    "_forward_module.",  # Lightning's _LightningModuleWrapperBase / DeepSpeed engines
)

# Lightning keeps the user's network under an attribute (`self.model`, `self.net`) by convention only, and
# "model." is a real attribute name in many models: a leading component is stripped only when asked for, when
# `match_prefixes` finds that it fits, or when the file is a Lightning checkpoint (`lightning_transform`).

# The top-level entry Lightning's Trainer writes into every checkpoint it saves (next to `state_dict`).
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"

# Every known wrapper is one component ("module", not "a.b"), so removing one is a per-component lookup.
_WRAPPER_OF: dict[str, str] = {w.rstrip("."): w for w in KNOWN_WRAPPERS}
assert all("." not in c for c in _WRAPPER_OF)


@dataclass(frozen=True)
class KeyTransform:
    """A rename of state_dict keys: remove known wrappers, strip a leading component once, strip prefixes, add one.

    The steps run in the order of the fields. `KeyTransform()` changes nothing; `strip_prefixes(sd)` is
    `KeyTransform(wrappers=True)` and `strip_prefixes(sd, ["model."])` is `KeyTransform(strip=("model.",))`.
    """

    wrappers: bool = False  # remove the KNOWN_WRAPPERS components anywhere in a key's module path
    lead: str = ""  # then remove this leading component once ("net."): a container attribute, e.g. Lightning's
    strip: tuple[str, ...] = ()  # then remove these at the start, repeatedly while one matches
    add: str = ""  # then put this in front

    @property
    def identity(self) -> bool:
        """True when no key changes."""
        return not (self.wrappers or self.lead or self.strip or self.add)

    @property
    def cost(self) -> int:
        """How much the transform does: of two that fit equally, the cheaper wins (removing beats adding)."""
        return int(self.wrappers) + int(bool(self.lead)) + len(self.strip) + 2 * int(bool(self.add))

    def apply(self, key: str) -> str:
        """The renamed key."""
        return _apply(key, self, None)

    def to_dict(self) -> dict[str, Any]:
        return {"strip_wrappers": self.wrappers, "strip_lead": self.lead or None, "strip": list(self.strip),
                "add": self.add or None}


IDENTITY = KeyTransform()
_WRAPPERS = KeyTransform(wrappers=True)


@dataclass(frozen=True)
class StripResult:
    """The renamed state_dict and what was done to it."""

    state_dict: StateDict
    applied: dict[str, int]  # prefix -> number of keys it was removed from
    renamed: int  # keys whose name changed
    has_metadata: bool  # the input carried `_metadata` (renamed with the same transform)
    transform: KeyTransform = _WRAPPERS  # the rename that was applied

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

    # For display and for `strip_prefixes`: None strips known wrappers, () changes nothing, else prefixes removed
    # at the start. `transform` is the exact rename (a container attribute is removed once, not repeatedly).
    prefixes: tuple[str, ...] | None
    matched: int  # transformed keys that are expected keys
    total: int  # keys in the checkpoint
    expected: int  # expected keys
    score: float  # matched / |union of transformed and expected keys| (Jaccard), 0..1
    transform: KeyTransform = IDENTITY

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefixes": None if self.prefixes is None else list(self.prefixes),
            "matched": self.matched,
            "total": self.total,
            "expected": self.expected,
            "score": self.score,
            "transform": self.transform.to_dict(),
        }


@dataclass(frozen=True)
class Alignment:
    """The transforms under which two key sets have the most keys in common (`b` is fixed for `align_keys`)."""

    a: KeyTransform
    b: KeyTransform
    matched: int  # keys in common after the transforms
    a_keys: int
    b_keys: int

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "matched": self.matched,
                "a_keys": self.a_keys, "b_keys": self.b_keys}


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


def _as_transform(prefixes: tuple[str, ...] | None) -> KeyTransform:
    return _WRAPPERS if prefixes is None else KeyTransform(strip=prefixes)


def _apply(key: str, transform: KeyTransform, applied: dict[str, int] | None) -> str:
    if transform.wrappers:
        *path, leaf = key.split(".")
        key = ".".join([*_remove_wrappers(path, applied), leaf])
    lead = transform.lead
    if lead and key.startswith(lead) and len(key) > len(lead):
        key = key[len(lead) :]
        if applied is not None:
            applied[lead] = applied.get(lead, 0) + 1
    if transform.strip:
        key = _strip_start(key, transform.strip, applied)
    return transform.add + key


def _transform_module_path(path: str, transform: KeyTransform) -> str:
    # `_metadata` keys are module paths without a trailing dot; "" is the root. Work on "path." so that
    # stripping "module." from "module" (the wrapped root) gives the root.
    dotted = path + "." if path else ""
    if transform.wrappers and dotted:
        kept = _remove_wrappers(dotted[:-1].split("."), None)
        dotted = ".".join(kept) + "." if kept else ""
    if transform.lead and dotted.startswith(transform.lead):
        dotted = dotted[len(transform.lead) :]
    changed = bool(transform.strip)
    while changed:
        changed = False
        for prefix in transform.strip:
            if prefix and dotted.startswith(prefix):
                dotted = dotted[len(prefix) :]
                changed = True
                break
    dotted = transform.add + dotted
    return dotted[:-1] if dotted else dotted


def strip_key(key: str, prefixes: Sequence[str] | None = None) -> str:
    """Apply the transform of `strip_prefixes` to one key.

    Args:
        key: A state_dict key.
        prefixes: None for the known wrappers anywhere in the module path; else prefixes removed at the start.

    Returns:
        The renamed key (the key itself if nothing applies).
    """
    return _apply(key, _as_transform(_normalise(prefixes)), None)


def is_lightning(extras: Iterable[str]) -> bool:
    """Whether a checkpoint was written by Lightning's Trainer.

    Args:
        extras: The names of the non-tensor entries next to the state_dict (an artifact's `extras`).

    Returns:
        True when the file has a top-level `pytorch-lightning_version` entry.
    """
    return LIGHTNING_VERSION_KEY in extras


def common_leading_component(keys: Iterable[str]) -> str | None:
    """The one leading component every key shares ("net."), when each key has more after it.

    Args:
        keys: State_dict keys.

    Returns:
        The component with its dot, or None (no keys, a key without a dot, or two different first components).
    """
    lead: str | None = None
    for key in keys:
        head, sep, rest = key.partition(".")
        if not sep or not rest or (lead is not None and head != lead):
            return None
        lead = head
    return None if lead is None else lead + "."


def lightning_transform(keys: Iterable[str]) -> KeyTransform:
    """Known-wrapper stripping for a Lightning checkpoint: the LightningModule's one attribute is a wrapper too.

    Args:
        keys: The checkpoint's keys.

    Returns:
        Known wrappers removed, then the leading component all keys share (``model.``, ``net.``), if any, once.
    """
    lead = common_leading_component(_apply(k, _WRAPPERS, None) for k in keys)
    return KeyTransform(wrappers=True, lead=lead or "")


def apply_transform(state_dict: Mapping[str, torch.Tensor], transform: KeyTransform) -> StripResult:
    """Rename every key of a state_dict with one `KeyTransform`.

    Args:
        state_dict: Key to tensor, maybe with a `_metadata` attribute (as `nn.Module.state_dict()` returns).
        transform: The rename.

    Returns:
        A `StripResult` whose `state_dict` is a new OrderedDict holding the same tensor objects (no copies),
        with `_metadata` renamed by the same transform when the input had it.

    Raises:
        PrefixCollision: Two keys would map to the same name.
    """
    applied: dict[str, int] = {}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    sources: dict[str, list[str]] = {}
    renamed = 0
    for key, value in state_dict.items():
        target = _apply(key, transform, applied)
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
        out = with_metadata(out, rename_metadata(metadata, lambda path: _transform_module_path(path, transform)))
    return StripResult(state_dict=out, applied=applied, renamed=renamed, has_metadata=metadata is not None,
                       transform=transform)


def strip_prefixes(
    state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str] | None = None, *, lightning: bool = False
) -> StripResult:
    """Remove wrapper prefixes from every key of a state_dict.

    Args:
        state_dict: Key to tensor, maybe with a `_metadata` attribute (as `nn.Module.state_dict()` returns).
        prefixes: None strips the known wrappers (`KNOWN_WRAPPERS`) wherever they occur in a module path.
            A sequence strips those prefixes at the start of keys only, repeatedly while one matches; a
            missing trailing dot is added ("model" means "model.").
        lightning: The state_dict comes from a Lightning checkpoint: with `prefixes=None`, the leading
            component every key shares (the LightningModule's attribute) is stripped too (`lightning_transform`).

    Returns:
        A `StripResult` whose `state_dict` is a new OrderedDict holding the same tensor objects (no copies),
        with `_metadata` renamed by the same transform when the input had it.

    Raises:
        PrefixCollision: Two keys would map to the same name.
        TypeError: `prefixes` is a single string rather than a sequence of them.
    """
    normalised = _normalise(prefixes)
    if normalised is None and lightning:
        return apply_transform(state_dict, lightning_transform(state_dict.keys()))
    return apply_transform(state_dict, _as_transform(normalised))


def _has_wrappers(keys: Sequence[str]) -> bool:
    # A cheap, conservative test (C-level substring scans) before transforming every key.
    return any(wrapper in key for wrapper in _WRAPPER_OF for key in keys) and any(
        _apply(key, _WRAPPERS, None) != key for key in keys
    )


def _heads(keys: Iterable[str], *, limit: int, min_share: float = 0.0) -> list[str]:
    # The most common leading components ("net.", "backbone.", "encoder."), most common first.
    counts: dict[str, int] = {}
    total = 0
    for key in keys:
        total += 1
        head, sep, rest = key.partition(".")
        if sep and rest:
            counts[head + "."] = counts.get(head + ".", 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [head for head, count in ranked[:limit] if count >= min_share * total]


def _strip_candidates(keys: Sequence[str], *, heads: int = 8, min_share: float = 0.0) -> list[KeyTransform]:
    # Nothing, the known wrappers, and each common leading component removed once (with the wrappers first when
    # there are any): checkpoints are often saved from a container that held the model under an attribute. Once,
    # because the model inside may have an attribute of the same name (a LightningModule's `model` holding a
    # transformers *ForCausalLM, whose body is `model` again); repeatedly too where keys start with it twice.
    wrapped = _has_wrappers(keys)
    bases = [IDENTITY, _WRAPPERS] if wrapped else [IDENTITY]
    out = list(bases)
    plain = [_apply(k, _WRAPPERS, None) for k in keys] if wrapped else keys
    for head in _heads(plain, limit=heads, min_share=min_share):
        out.extend(KeyTransform(wrappers=b.wrappers, lead=head) for b in bases)
        if any(k.startswith(head + head) for k in plain):
            out.extend(KeyTransform(wrappers=b.wrappers, strip=(head,)) for b in bases)
    return out


def _add_candidates(keys: Sequence[str], other: Sequence[str]) -> list[KeyTransform]:
    # The other side's container prefix ("model." of a Lightning reference, "module." of a DataParallel one),
    # added in front of this side's keys with their own wrappers removed or not.
    own = set(_heads(keys, limit=4, min_share=0.5))
    adds = [h for h in _heads(other, limit=2, min_share=0.5) if h not in own]
    bases = [IDENTITY, _WRAPPERS] if _has_wrappers(keys) else [IDENTITY]
    return [KeyTransform(wrappers=b.wrappers, add=h) for h in adds for b in bases]


def _legacy_prefixes(transform: KeyTransform) -> tuple[str, ...] | None:
    if transform == _WRAPPERS:
        return None
    removed = (transform.lead,) if transform.lead else transform.strip
    return (*KNOWN_WRAPPERS, *removed) if transform.wrappers else removed


def _transformed(keys: Sequence[str], transform: KeyTransform) -> set[str] | None:
    # None when two keys would collide: such a transform is never a candidate.
    out = {_apply(k, transform, None) for k in keys} if not transform.identity else set(keys)
    return out if len(out) == len(set(keys)) else None


PrefixCandidates = list[tuple[KeyTransform, set[str]]]


def prefix_candidates(keys: Iterable[str]) -> PrefixCandidates:
    """The strip transforms `match_prefixes` tries, with the keys each one gives (computed once for many matches).

    Args:
        keys: The checkpoint's keys.

    Returns:
        (transform, transformed keys) pairs, simplest first: nothing, the known wrappers, and each of the
        most common leading components removed once (after the known wrappers when there are any). Transforms
        that would make keys collide are left out.
    """
    key_list = list(dict.fromkeys(keys))
    out: PrefixCandidates = []
    for candidate in _strip_candidates(key_list):
        transformed = _transformed(key_list, candidate)
        if transformed is not None:
            out.append((candidate, transformed))
    return out


def match_prefixes(
    keys: Iterable[str], expected_keys: Iterable[str], *, candidates: PrefixCandidates | None = None
) -> PrefixMatch:
    """Find the strip transform under which a checkpoint's keys best match an architecture's keys.

    Candidates: see `prefix_candidates`. Ties go to the earlier (simpler) candidate.

    Args:
        keys: The checkpoint's keys.
        expected_keys: The keys the architecture expects.
        candidates: `prefix_candidates(keys)`, when the caller matches the same keys against many key sets.

    Returns:
        The best `PrefixMatch`; apply its `transform` with `apply_transform`.
    """
    key_list = list(dict.fromkeys(keys))
    expected = set(expected_keys)
    best: PrefixMatch | None = None
    for candidate, transformed in candidates if candidates is not None else prefix_candidates(key_list):
        matched = len(transformed & expected)
        union = len(transformed | expected)
        score = matched / union if union else 1.0
        if best is None or score > best.score:
            best = PrefixMatch(_legacy_prefixes(candidate), matched, len(key_list), len(expected), score,
                               candidate)
    # The empty transform never collides, so `best` is always set.
    assert best is not None
    return best


def _candidate_sets(keys: Sequence[str], other: Sequence[str], *, move: bool) -> list[tuple[KeyTransform, set[str]]]:
    candidates = [IDENTITY]
    if move:
        candidates = [*_strip_candidates(keys, heads=4, min_share=0.25), *_add_candidates(keys, other)]
    out = []
    for candidate in candidates:
        transformed = _transformed(keys, candidate)
        if transformed is not None:
            out.append((candidate, transformed))
    return out


def align_prefixes(a_keys: Iterable[str], b_keys: Iterable[str], *, move_b: bool = True) -> Alignment:
    """Find the transforms of each side under which two key sets have the most keys in common.

    Each side may have its known wrappers removed, a common leading component removed, or the other side's
    container prefix added. Transforms that would make a side's keys collide are skipped; of two pairs with as
    many keys in common, the one with fewer steps wins (so keys that already line up stay as they are).

    Args:
        a_keys: The first side's keys.
        b_keys: The second side's keys.
        move_b: False keeps `b` as it is (see `align_keys`).

    Returns:
        The `Alignment`.
    """
    a_list, b_list = list(dict.fromkeys(a_keys)), list(dict.fromkeys(b_keys))
    a_sets = _candidate_sets(a_list, b_list, move=True)
    b_sets = _candidate_sets(b_list, a_list, move=move_b)
    best: tuple[int, int] | None = None
    chosen = (IDENTITY, IDENTITY)
    for ta, sa in a_sets:
        for tb, sb in b_sets:
            rank = (len(sa & sb), -(ta.cost + tb.cost))
            if best is None or rank > best:
                best, chosen = rank, (ta, tb)
    assert best is not None  # the identity never collides
    return Alignment(chosen[0], chosen[1], best[0], len(a_list), len(b_list))


def align_keys(keys: Iterable[str], target_keys: Iterable[str]) -> Alignment:
    """Find the transform under which a checkpoint's keys line up with another key set that stays as it is.

    Args:
        keys: The keys to rename.
        target_keys: The keys to line up with (another checkpoint's, or an architecture's).

    Returns:
        The `Alignment`; its `a` is the transform for `keys`, its `b` the identity.
    """
    return align_prefixes(keys, target_keys, move_b=False)
