"""Find the state_dict inside what was unpickled, and list what is around it.

The default rule (`find_state_dict` without a key): the top level when it is a state_dict, else the first of
`CONTAINER_KEYS` holding one, at the top level or one level down. A whole pickled ``nn.Module`` counts as the
state_dict its ``state_dict()`` would return (`module_state_dict`). Everything next to the state_dict, and
non-tensor values inside it, become ``extras`` (placeholders by their global's dotted name).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, TypeGuard, cast

import torch

from service.core.statedict import read_pickled_metadata, with_metadata
from service.core.types import StateDict
from service.core.unpickle import Placeholder, iter_placeholders
from service.errors import ContainerKeyError, CorruptCheckpoint, quote_keys

__all__ = ["CONTAINER_KEYS", "default_container_key", "find_state_dict", "is_module_record", "list_candidates",
           "module_state_dict"]

# Where training scripts commonly put the state_dict inside a bigger checkpoint dict, in search order.
CONTAINER_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state", "model_state_dict", "state_dict_ema",
                                   "model_ema", "module", "net", "network", "weights", "params")

# Candidates are looked for this deep, and this many are listed (a container of containers of state_dicts).
_CANDIDATE_DEPTH = 3
_MAX_CANDIDATES = 100


def list_candidates(obj: object) -> dict[str, int]:
    """Every state_dict a checkpoint holds, by container key, with its key count.

    ``""`` is the top level. Dicts are searched a few levels deep (``"model.ema"``); a whole pickled module
    counts as the state_dict it stands for. Values of a state_dict are not searched.

    Args:
        obj: What the unpickler returned.

    Returns:
        Dotted container key -> number of tensors, in the order found (at most 100).
    """
    out: dict[str, int] = {}
    stack: list[tuple[str, object, int]] = [("", obj, 0)]
    while stack and len(out) < _MAX_CANDIDATES:
        path, value, depth = stack.pop()
        if isinstance(value, dict) and _is_rng_state(value):
            continue
        try:
            found = _as_state_dict(value, path)
        except CorruptCheckpoint:
            found = None
        if found is not None:
            out[path] = sum(isinstance(v, torch.Tensor) for v in dict.values(found[0]))
            continue
        if isinstance(value, dict) and depth < _CANDIDATE_DEPTH:
            children = [(f"{path}.{k}" if path else k, v, depth + 1)
                        for k, v in dict.items(value) if isinstance(k, str) and isinstance(v, (dict, Placeholder))]
            stack.extend(reversed(children))
    return out


def default_container_key(obj: object) -> str | None:
    """The container key the default rule picks in ``obj`` (None: the top level, or no state_dict at all)."""
    try:
        return None if _as_state_dict(obj, "") is not None else _search(obj)[2]
    except (ContainerKeyError, CorruptCheckpoint):
        return None


def find_state_dict(obj: object, container_key: str | None) -> tuple[StateDict, str | None, dict[str, str], bool]:
    """The state_dict in an unpickled checkpoint, by ``container_key`` or the default rule.

    Args:
        obj: What the unpickler returned.
        container_key: Dotted path of the state_dict; None applies the default rule.

    Returns:
        The state_dict (an ``OrderedDict`` of str -> Tensor, carrying ``_metadata`` when the file has it), the
        container key it was found at (None: the top level), the extras, and whether ``_metadata`` was found.

    Raises:
        ContainerKeyError: ``container_key`` is absent or holds no state_dict, or no state_dict was found (the
            message says what the file looks like).
        CorruptCheckpoint: A view reaches past its storage, or the state_dict carries other attributes.
    """
    if container_key is not None:
        found, parents = _follow(obj, container_key)
        candidate = _as_state_dict(found, container_key)
        if candidate is None:
            raise ContainerKeyError(
                f"{container_key!r} holds {_looks_like(found)}, not a state_dict", container_key=container_key,
            )
        key: str | None = container_key
    else:
        candidate = _as_state_dict(obj, "")
        if candidate is not None:
            parents, key = [], None
        else:
            candidate, parents, key = _search(obj)
    found_dict, extras = candidate
    for prefix, parent, chosen in parents:
        for name, value in dict.items(parent):
            if name != chosen:
                _add_extra(extras, prefix + str(name), value)
    tensors: list[tuple[str, torch.Tensor]] = []
    inner = f"{key}." if key else ""
    for name, value in dict.items(found_dict):
        if isinstance(name, str) and isinstance(value, torch.Tensor):
            # nn.Parameter -> plain Tensor sharing the same storage (no copy).
            _check_view_extent(name, value)
            tensors.append((name, value.detach() if isinstance(value, torch.nn.Parameter) else value))
        else:
            _add_extra(extras, inner + str(name), value)
    metadata = read_pickled_metadata(found_dict)
    return with_metadata(tensors, metadata), key, extras, metadata is not None


# A file can hold many placeholders (an MMEngine message hub holds hundreds); the extras list the first ones.
_MAX_EXTRAS = 1000


def _add_extra(extras: dict[str, str], path: str, value: object) -> None:
    if len(extras) >= _MAX_EXTRAS:
        return
    extras[path] = _kind(value)
    if isinstance(value, (dict, list, tuple)):
        for inner, placeholder in iter_placeholders(value, path):
            if len(extras) >= _MAX_EXTRAS:
                return
            extras[inner] = placeholder.name


def _kind(value: object) -> str:
    return value.name if isinstance(value, Placeholder) else type(value).__name__


def _check_view_extent(name: str, tensor: torch.Tensor) -> None:
    # A stride-0 (expanded) or overlapping view of a tiny storage can claim terabytes: hashing or saving it
    # would materialise them. torch already refuses views that reach past their storage.
    if tensor.layout != torch.strided or tensor.is_quantized:
        return
    needed = tensor.numel() * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if needed > held:
        raise CorruptCheckpoint(
            f"tensor {name!r} is a view of {needed} bytes over a storage of {held} bytes (expanded or overlapping)"
        )


def _as_state_dict(value: object, path: str) -> tuple[dict[Any, Any], dict[str, str]] | None:
    """The state_dict a value is or (a whole pickled nn.Module) stands for, and the extras that come with it."""
    if _is_tensor_dict(value) and not _is_rng_state(value):
        return value, {}
    if is_module_record(value):
        return module_state_dict(value, path)
    return None


def _is_tensor_dict(value: object) -> TypeGuard[dict[Any, Any]]:
    # A state_dict: str keys, at least one tensor, and no nested tensor dict (that would be a container).
    # dict.* on purpose: instance attributes of an OrderedDict (a BUILD state) must not change what is read.
    if not isinstance(value, dict) or not dict.__len__(value):
        return False
    if not all(isinstance(k, str) for k in dict.keys(value)):
        return False
    values = dict.values(value)
    tensors = sum(isinstance(v, torch.Tensor) for v in values)
    return tensors > 0 and not any(_holds_tensors(v) for v in values)


def _holds_tensors(value: object) -> bool:
    return isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in dict.values(value))


def is_module_record(value: object) -> TypeGuard[Placeholder]:
    """Whether a placeholder is a pickled ``nn.Module`` (its BUILD state has the module's own tables)."""
    if not isinstance(value, Placeholder) or not value.called or not isinstance(value.state, dict):
        return False
    return all(dict.__contains__(value.state, k) for k in ("_parameters", "_buffers", "_modules"))


# Bounds the module walk: a module tree shares sub-modules (visited again, as state_dict() does) or is cyclic.
_MAX_MODULE_VISITS = 1_000_000


def module_state_dict(root: Placeholder, path: str = "") -> tuple[OrderedDict[str, Any], dict[str, str]]:
    """What ``nn.Module.state_dict()`` returns for a pickled module tree, built from its records alone.

    Each module's own parameters, then its persistent buffers, then its children's, depth first, keys in
    the same order; ``None`` entries and ``_non_persistent_buffers_set`` members are left out. Classes outside
    ``torch.nn`` are listed in the extras (their ``_save_to_state_dict`` or hooks could differ, which cannot be
    known without running their code; strict verification catches a difference).

    Args:
        root: A placeholder for which `is_module_record` holds.
        path: Where the module is in the checkpoint (prefix of the extras' paths).

    Returns:
        The state_dict and the extras: module path -> class name for custom classes, and non-tensor entries.

    Raises:
        CorruptCheckpoint: The tree is cyclic or too large, or its tables are not dicts.
    """
    out: OrderedDict[str, Any] = OrderedDict()
    extras: dict[str, str] = {}
    stack: list[tuple[str, Placeholder]] = [("", root)]
    visits = 0
    while stack:
        prefix, module = stack.pop()
        visits += 1
        if visits > _MAX_MODULE_VISITS:
            raise CorruptCheckpoint("the pickled module tree is cyclic or has too many modules")
        where = ".".join(p for p in (path, prefix.rstrip(".")) if p)
        if not module.name.startswith("torch.nn.") and len(extras) < _MAX_EXTRAS:
            extras[where or "(module)"] = module.name
        state = module.state
        tables = [dict.get(state, name) for name in ("_parameters", "_buffers", "_modules")]
        if not all(isinstance(t, dict) for t in tables):
            raise CorruptCheckpoint(f"the pickled module {where or '(root)'!r} has malformed tables")
        params, buffers, children = cast(list[dict[Any, Any]], tables)
        non_persistent = dict.get(state, "_non_persistent_buffers_set")
        skip = non_persistent if isinstance(non_persistent, (set, frozenset)) else set()
        for table, persistent_only in ((params, False), (buffers, True)):
            for name, value in dict.items(table):
                if value is None or (persistent_only and name in skip):
                    continue
                if isinstance(value, torch.Tensor):
                    out[f"{prefix}{name}"] = value
                elif len(extras) < _MAX_EXTRAS:
                    extras[f"{where}.{name}" if where else str(name)] = _kind(value)
        for name, child in reversed(list(dict.items(children))):
            if is_module_record(child):
                stack.append((f"{prefix}{name}.", child))
            elif child is not None and len(extras) < _MAX_EXTRAS:
                extras[f"{where}.{name}" if where else str(name)] = _kind(child)
    return out, extras


ParentChain = list[tuple[str, dict[Any, Any], Any]]  # (extras prefix, mapping, key taken from it)


def _search(obj: object) -> tuple[tuple[dict[Any, Any], dict[str, str]], ParentChain, str]:
    if not isinstance(obj, dict):
        raise ContainerKeyError(f"no state_dict found: the checkpoint holds {_looks_like(obj)}")
    for key in CONTAINER_KEYS:
        value = dict.get(obj, key)
        found = _as_state_dict(value, key)
        if found is not None:
            return found, [("", obj, key)], key
        if isinstance(value, dict):
            for inner in CONTAINER_KEYS:
                nested = dict.get(value, inner)
                found = _as_state_dict(nested, f"{key}.{inner}")
                if found is not None:
                    return found, [("", obj, key), (f"{key}.", value, inner)], f"{key}.{inner}"
    keys = sorted(str(k) for k in dict.keys(obj))
    raise ContainerKeyError(
        f"no state_dict found: the checkpoint holds {_looks_like(obj)}; top-level keys: "
        f"{quote_keys(keys) or 'none'}",
        available_keys=keys,
    )


_RNG_KEYS = frozenset({"python", "numpy", "cpu", "cuda", "mps", "xpu", "npu", "torch", "random", "rng_state"})
_SCHEDULER_KEYS = frozenset({"base_lrs", "last_epoch", "_last_lr", "_step_count"})


def _is_rng_state(obj: dict[Any, Any]) -> bool:
    # transformers' rng_state.pth and similar: {"python": ..., "numpy": ..., "cpu": ByteTensor, "cuda": ...}
    keys = {str(k) for k in dict.keys(obj)}
    return bool(keys) and keys <= _RNG_KEYS and bool(keys & {"python", "numpy", "cpu", "rng_state"})


def _looks_like(obj: object) -> str:
    """A few words on what a value that holds no model state_dict looks like, for error messages."""
    if isinstance(obj, Placeholder):
        if obj.name.endswith(("TrainingArguments", "Namespace", "DictConfig", "ListConfig")):
            return f"training arguments ({obj.name}), not a model"
        return f"a {obj.name} object, not a model's weights"
    if isinstance(obj, torch.Tensor):
        return "a single tensor, not a state_dict"
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}, not a dict with a state_dict"
    keys = {str(k) for k in dict.keys(obj)}
    if {"state", "param_groups"} <= keys:
        return "an optimizer state, not a model"
    if len(keys & _SCHEDULER_KEYS) >= 2:
        return "a learning-rate scheduler state, not a model"
    if _is_rng_state(obj):
        return "an RNG state, not a model"
    if keys & {"optimizer", "optimizer_states", "optimizer_state_dict", "lr_schedulers", "scheduler"}:
        return "a training state without model weights"
    if not any(isinstance(v, (torch.Tensor, dict, Placeholder)) for v in dict.values(obj)):
        return "no tensors (training arguments or metadata?), not a model"
    return "a dict without a model state_dict"


def _follow(obj: object, dotted: str) -> tuple[object, ParentChain]:
    parents: ParentChain = []
    current, rest, prefix = obj, dotted, ""
    while True:
        if not isinstance(current, dict):
            raise ContainerKeyError(
                f"cannot look up {dotted!r}: {prefix.rstrip('.') or 'the checkpoint'} is "
                f"{_looks_like(current)}",
                container_key=dotted,
            )
        # Prefer the longest key that matches, so keys that themselves contain dots still work.
        head = rest if dict.__contains__(current, rest) else None
        if head is None:
            cut = rest.rfind(".")
            while cut > 0 and not dict.__contains__(current, rest[:cut]):
                cut = rest.rfind(".", 0, cut)
            head = rest[:cut] if cut > 0 else None
        if head is None:
            available = sorted(str(k) for k in dict.keys(current))
            raise ContainerKeyError(
                f"container key {dotted!r} not found; available keys"
                f"{' in ' + repr(prefix.rstrip('.')) if prefix else ''}: {quote_keys(available) or 'none'}",
                container_key=dotted, available_keys=available,
            )
        parents.append((prefix, current, head))
        current = dict.__getitem__(current, head)
        if head == rest:
            return current, parents
        prefix, rest = f"{prefix}{head}.", rest[len(head) + 1:]
