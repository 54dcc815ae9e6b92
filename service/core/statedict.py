"""A state_dict's ``_metadata``, in one place: read it, carry it to a new dict, copy it, rename its module paths.

``nn.Module.state_dict()`` returns an ``OrderedDict`` with a ``_metadata`` instance attribute: module path ->
a per-module dict (``{"version": 2}`` for BatchNorm) that ``load_state_dict`` hands to each module's
``_load_from_state_dict``. It is an attribute, not an entry, so every new dict built from a state_dict loses it
unless it is carried over, and a pickle can set other attributes next to it. Every place that builds a
state_dict goes through this module; nothing else reads or sets the attribute.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from service.errors import CorruptCheckpoint, quote_keys

__all__ = ["copy_metadata", "has_metadata", "metadata_of", "read_pickled_metadata", "rename_metadata",
           "with_metadata"]

V = TypeVar("V")
_ATTRIBUTE = "_metadata"


def metadata_of(state_dict: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``_metadata`` a state_dict carries, or None.

    Args:
        state_dict: Any mapping; plain dicts never carry it.

    Returns:
        The mapping of module path -> per-module dict, as it is (not copied).
    """
    metadata = getattr(state_dict, _ATTRIBUTE, None)
    return metadata if isinstance(metadata, Mapping) else None


def has_metadata(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state_dict carries ``_metadata``."""
    return metadata_of(state_dict) is not None


def with_metadata(entries: Mapping[str, V] | Iterable[tuple[str, V]], metadata: Mapping[str, Any] | None, *,
                  copy: bool = False) -> OrderedDict[str, V]:
    """A new ``OrderedDict`` of ``entries`` carrying ``metadata`` (when not None).

    Args:
        entries: The keys and values, in order.
        metadata: What to carry: usually `metadata_of` another state_dict.
        copy: Carry a copy (`copy_metadata`) instead of the same object, for a caller that hands the result
            to ``load_state_dict``, which writes into the per-module dicts.

    Returns:
        The state_dict.
    """
    out: OrderedDict[str, V] = OrderedDict(entries)
    if metadata is not None:
        vars(out)[_ATTRIBUTE] = copy_metadata(metadata) if copy else metadata
    return out


def copy_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Copy ``_metadata`` and its per-module dicts, keeping their kinds (``OrderedDict`` stays one).

    ``load_state_dict(assign=True)`` writes ``assign_to_params_buffers`` into each per-module dict, so a
    state_dict that is loaded into a module must not share them with one that is kept.
    """
    return _like(metadata, ((k, _like(v, v.items()) if isinstance(v, Mapping) else v) for k, v in metadata.items()))


def rename_metadata(metadata: Mapping[str, Any], rename: Callable[[str], str]) -> OrderedDict[str, Any]:
    """``_metadata`` with every module path renamed, as a prefix strip renames the keys.

    Wrapper metadata collides by nature (DataParallel's root ``""`` and the wrapped model's ``"module"`` both
    become ``""``): the innermost module's entry is the real one, so the longest source path wins.

    Args:
        metadata: Module path (no trailing dot; ``""`` is the root) -> per-module dict.
        rename: The transform of one module path.

    Returns:
        The renamed metadata, in the original order of the entries kept.
    """
    targets = [(path, rename(path)) for path in metadata]
    chosen: dict[str, str] = {}
    for path, target in targets:
        if target not in chosen or len(path) > len(chosen[target]):
            chosen[target] = path
    return OrderedDict((target, metadata[path]) for path, target in targets if chosen[target] == path)


def read_pickled_metadata(found: dict[Any, Any]) -> dict[Any, Any] | None:
    """The ``_metadata`` of a state_dict an unpickler built, validated; None when it has none.

    An unpickler keeps a BUILD state as instance attributes of an ``OrderedDict``; ``items`` or ``values`` there
    would hide the real entries from any reader calling ``obj.items()``. A state_dict may carry only
    ``_metadata``, and only as a dict of per-module dicts.

    Args:
        found: The dict holding the state_dict's entries.

    Returns:
        The metadata object as unpickled (not copied), or None.

    Raises:
        CorruptCheckpoint: Other instance attributes, or a ``_metadata`` of another shape.
    """
    try:
        attrs: dict[str, Any] = object.__getattribute__(found, "__dict__")
    except AttributeError:
        return None
    others = sorted(str(k) for k in attrs if k != _ATTRIBUTE)
    if others:
        raise CorruptCheckpoint(
            f"the state_dict carries instance attributes other than '_metadata': {quote_keys(others)}"
        )
    if _ATTRIBUTE not in attrs:
        return None
    metadata = attrs[_ATTRIBUTE]
    if not isinstance(metadata, dict) or _instance_attrs(metadata) or not all(
        isinstance(k, str) and isinstance(v, dict) and not _instance_attrs(v) for k, v in dict.items(metadata)
    ):
        raise CorruptCheckpoint("the state_dict's '_metadata' is not a dict of per-module dicts")
    return metadata


def _like(template: object, items: Iterable[tuple[Any, Any]]) -> dict[Any, Any]:
    return dict(items) if type(template) is dict else OrderedDict(items)


def _instance_attrs(value: object) -> bool:
    try:
        return bool(object.__getattribute__(value, "__dict__"))
    except AttributeError:
        return False
