"""How many bytes a checkpoint expands to, and the bound on it that uploads and safetensors writes are held to.

A torch file stores storages, and any number of keys may view one storage: 2,000 keys over one 1 MiB storage
make a 1.2 MB file. Everything that handles keys one by one (hashing, a safetensors file, which holds each key's
bytes on its own) pays for every view, so the size that matters is the sum over keys of each view's bytes, not
the sum over storages. Tied weights (an embedding shared with an output head) double a few tensors; the bound
``ratio × file size + slack`` leaves them far inside while refusing an alias blow-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from service.core.types import ArchiveLimits
from service.errors import ExpansionLimitExceeded

__all__ = ["check_expansion", "expanded_bytes", "expansion_budget"]


def expanded_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Sum over keys of each tensor's own bytes (``numel × itemsize``), counting every view in full.

    Args:
        state_dict: Key to tensor; non-tensor values count 0.

    Returns:
        The bytes a format that stores each key separately (safetensors, a manifest's hashing) has to handle.
    """
    total = 0
    for tensor in state_dict.values():
        if isinstance(tensor, torch.Tensor):
            total += tensor.numel() * tensor.element_size()
    return total


def expansion_budget(source_bytes: Iterable[int], limits: ArchiveLimits) -> int:
    """The most bytes a checkpoint derived from files of these sizes may expand to.

    Each file allows ``limits.max_expansion_ratio × size + limits.expansion_slack_bytes``; the total is
    capped by ``limits.max_expanded_bytes``.

    Args:
        source_bytes: Sizes of the files the checkpoint's tensors come from.
        limits: The configured bound.

    Returns:
        The budget in bytes.
    """
    allowed = sum(int(limits.max_expansion_ratio * size) + limits.expansion_slack_bytes for size in source_bytes)
    return min(allowed, limits.max_expanded_bytes)


def check_expansion(state_dict: Mapping[str, torch.Tensor], *, budget: int, what: str = "the checkpoint") -> int:
    """Refuse a state_dict whose keys expand to more than ``budget`` bytes; nothing is allocated here.

    Args:
        state_dict: Key to tensor.
        budget: What `expansion_budget` allows.
        what: How the message names the checkpoint.

    Returns:
        The expanded size in bytes.

    Raises:
        ExpansionLimitExceeded: The keys expand to more than ``budget`` (``expanded_bytes`` and ``limit`` say
            by how much).
    """
    total = expanded_bytes(state_dict)
    if total > budget:
        raise ExpansionLimitExceeded(
            f"{what} expands to {total} bytes over its {len(state_dict)} keys (views of one storage count once "
            f"per key), more than the limit of {budget} bytes",
            expanded_bytes=total,
            limit=budget,
        )
    return total
