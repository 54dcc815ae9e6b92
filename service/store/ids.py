"""Validation of artifact ids and names. Only what passes here ever becomes part of a path."""

from __future__ import annotations

import re
from typing import Any

from service.errors import InvalidReference

ID_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME = re.compile(NAME_RE)
# A name must never be mistaken for an id, whatever its case.
_HEX64 = re.compile(r"^[0-9A-Fa-f]{64}$")
# The shortest id prefix that is a ref (`ckpt ls` shows 12); a new name may not look like one.
MIN_ID_PREFIX = 8
_ID_PREFIX = re.compile(rf"^[0-9A-Fa-f]{{{MIN_ID_PREFIX},63}}$")
NAME_RULES = (
    "a name is 1 to 128 characters: letters, digits, '.', '_' and '-', starting with a letter or digit; "
    f"and not only hex digits when {MIN_ID_PREFIX} or more (that reads as an id)"
)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_id(ref: str) -> bool:
    """Tell whether `ref` is a well-formed artifact id (64 lowercase hex digits).

    Args:
        ref: Any string.

    Returns:
        True for a well-formed id; it says nothing about whether the artifact exists.
    """
    return isinstance(ref, str) and ID_RE.fullmatch(ref) is not None


def validate_id(artifact_id: str) -> str:
    """Check an artifact id before any path is built from it.

    Args:
        artifact_id: The sha256 of an artifact's bytes, as 64 lowercase hex digits.

    Returns:
        The id, unchanged.

    Raises:
        InvalidReference: It is not 64 lowercase hex digits.
    """
    if not is_id(artifact_id):
        raise InvalidReference(f"not an artifact id (64 lowercase hex digits): {_shown(artifact_id)}",
                               ref=str(artifact_id)[:200])
    return artifact_id


def validate_name(name: str) -> str:
    """Check a human name (like a registry tag) before it becomes a file name under names/.

    Args:
        name: 1 to 128 characters from ``[A-Za-z0-9._-]``, starting with a letter or digit, not 64 hex digits.

    Returns:
        The name, unchanged.

    Raises:
        InvalidReference: The name breaks one of those rules.
    """
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or _HEX64.fullmatch(name) is not None:
        raise InvalidReference(f"not a valid name: {_shown(name)}; {NAME_RULES}", ref=str(name)[:200])
    return name


def is_id_prefix(ref: str) -> bool:
    """Tell whether `ref` has the form of an id prefix: 8 to 63 hex digits (any case).

    Args:
        ref: Any string.

    Returns:
        True when `ref` may abbreviate an id.
    """
    return isinstance(ref, str) and _ID_PREFIX.fullmatch(ref) is not None


def validate_new_name(name: str) -> str:
    """Check a name about to be created: a valid name that cannot hide an id prefix.

    Names made only of 8 or more hex digits that exist already keep working (`validate_name`); new ones are
    refused, so that `ckpt pull 12fe7ea7` always means the artifact whose id starts with those digits.

    Args:
        name: The new name.

    Returns:
        The name, unchanged.

    Raises:
        InvalidReference: Not a valid name, or only hex digits.
    """
    validate_name(name)
    if is_id_prefix(name):
        raise InvalidReference(
            f"not a valid new name: {_shown(name)} is only hex digits and would read as an id prefix; "
            f"add a letter outside a-f (e.g. 'v-{name}')",
            ref=name,
        )
    return name
