"""safetensors: an 8-byte header length, a JSON header (dtype, shape, offsets per tensor; ``__metadata__``), data.

The header is validated here before the safetensors library reads the file (sizes, offsets inside the data,
no overlaps, no duplicate keys, known dtypes). Written by the library, after aliased tensors are copied apart.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from service.core.expansion import check_expansion
from service.core.formats.base import Format, LoadOptions, Probe, RawLoad
from service.core.loading._pickle import short_error
from service.core.manifest import dtype_name
from service.core.pthzip import StorageRecords
from service.core.types import ArchiveLimits
from service.errors import (
    ArchiveLimitExceeded,
    CorruptCheckpoint,
    InvalidRequest,
    UnconvertibleCheckpoint,
    UnsupportedFormat,
    quote_keys,
)

__all__ = ["FORMAT", "SAFETENSORS_DTYPES", "Safetensors", "check_safetensors_output", "header_claim"]

# Every dtype a safetensors file can hold that torch and this reader both know. Anything else (complex128,
# complex32, bits16, quantized, float8 *fnuz, ...) is refused with a 422 on write, never a KeyError.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPES: frozenset[torch.dtype] = frozenset(DTYPES.values())
# safetensors refuses headers above 100 MB itself; anything larger is not a safetensors file.
MAX_HEADER = 100_000_000
# The header's own entry: a tensor of that name would make a file safetensors refuses to read.
_RESERVED = "__metadata__"


class Safetensors(Format):
    name = "safetensors"
    output = "safetensors"
    writable = True
    suffix = ".safetensors"
    holds_header_metadata = True
    expands_views = True

    def detect(self, probe: Probe) -> bool:
        claimed = header_claim(probe.head)
        return claimed is not None and claimed < MAX_HEADER and claimed + 8 <= probe.size

    def load(self, probe: Probe, options: LoadOptions) -> RawLoad:
        tensors, metadata = _load_safetensors(probe.path, options.limits)
        return RawLoad(tensors, metadata=metadata)

    def check_output(self, tensors: Mapping[str, torch.Tensor], *, max_expanded_bytes: int | None) -> None:
        check_safetensors_output(tensors, max_expanded_bytes=max_expanded_bytes)

    def write(self, tensors: OrderedDict[str, torch.Tensor], path: Path, *, metadata: Mapping[str, str] | None,
              sources: Sequence[StorageRecords]) -> None:
        sparse = [k for k, v in tensors.items() if v.layout != torch.strided]
        if sparse:
            raise InvalidRequest(f"safetensors cannot hold sparse tensors: {quote_keys(sparse)}")
        prepared = _unaliased(tensors)
        safetensors.torch.save_file(prepared, str(path), metadata=dict(metadata) if metadata is not None else None)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def header_claim(head: bytes) -> int | None:
    """The header length a safetensors-looking file declares (8 bytes LE then ``{``), sane or not."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    return int.from_bytes(head[:8], "little")


def check_safetensors_output(tensors: Mapping[str, torch.Tensor], *, max_expanded_bytes: int | None = None) -> None:
    """Refuse, without allocating anything, a state_dict that cannot be written as safetensors.

    Args:
        tensors: Key to tensor.
        max_expanded_bytes: The most bytes the keys may expand to (`service.core.expansion`); None: no bound.

    Raises:
        UnconvertibleCheckpoint: A dtype outside `SAFETENSORS_DTYPES` (``keys`` and ``dtypes`` name them), or a
            key named ``__metadata__``.
        ExpansionLimitExceeded: The keys expand to more than ``max_expanded_bytes``.
    """
    by_dtype: dict[str, list[str]] = {}
    for key, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            by_dtype.setdefault(dtype_name(tensor.dtype), []).append(key)
    if by_dtype:
        keys = sorted(k for ks in by_dtype.values() for k in ks)
        listed = "; ".join(f"{name}: {quote_keys(ks, limit=5)}" for name, ks in sorted(by_dtype.items()))
        raise UnconvertibleCheckpoint(
            f"safetensors cannot hold the dtypes of {len(keys)} keys ({listed}); download or store as pth",
            keys=keys, dtypes=sorted(by_dtype),
        )
    not_utf8 = [k for k in tensors if not _is_utf8(k)]
    if not_utf8:
        shown = sorted(k.encode("utf-8", "backslashreplace").decode("utf-8") for k in not_utf8)
        raise UnconvertibleCheckpoint(f"safetensors keys must be valid UTF-8: {quote_keys(shown)}", keys=shown)
    if _RESERVED in tensors:
        raise UnconvertibleCheckpoint(
            f"safetensors reserves the key {_RESERVED!r} for its header; the checkpoint has a tensor "
            "of that name (download or store as pth)",
            keys=[_RESERVED],
        )
    if max_expanded_bytes is not None:
        check_expansion(tensors, budget=max_expanded_bytes, what="the safetensors output")


def _is_utf8(key: str) -> bool:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unaliased(tensors: OrderedDict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Byte ranges already claimed per storage; a tensor overlapping one of them is copied. Disjoint
    # views of one storage are fine for safetensors, so they are left alone.
    claimed: dict[tuple[str, int], list[tuple[int, int]]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        elif tensor.numel():
            storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
            start = tensor.data_ptr()
            end = start + tensor.numel() * tensor.element_size()
            ranges = claimed.setdefault(storage, [])
            if any(start < e and s < end for s, e in ranges):
                tensor = tensor.clone()
            else:
                ranges.append((start, end))
        out[name] = tensor
    return out




def _load_safetensors(path: Path, limits: ArchiveLimits) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    header, metadata = _read_safetensors_header(path, limits)
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except MemoryError:
        raise
    except Exception as exc:
        raise CorruptCheckpoint(f"cannot read the safetensors file: {short_error(exc)}") from exc
    # Keep the header's order (the writer's), not whatever order the reader returns.
    ordered = {name: tensors[name] for name in header if name in tensors}
    ordered.update((name, t) for name, t in tensors.items() if name not in ordered)
    return ordered, metadata


def _read_safetensors_header(path: Path, limits: ArchiveLimits) -> tuple[list[str], dict[str, str]]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = int.from_bytes(f.read(8), "little")
        if length >= MAX_HEADER or length + 8 > size:
            raise CorruptCheckpoint(f"the safetensors header claims {length} bytes but the file has {size}")
        raw = f.read(length)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpoint(f"the safetensors header is not valid JSON: {short_error(exc)}") from exc
    except RecursionError as exc:  # json's decoder recurses per nesting level
        raise CorruptCheckpoint("the safetensors header is nested too deeply") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpoint("the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptCheckpoint("the safetensors __metadata__ is not a map of strings to strings")
    if len(header) > limits.max_keys:
        raise ArchiveLimitExceeded(
            f"the safetensors file has {len(header)} tensors, more than the limit of {limits.max_keys}",
            limit=limits.max_keys,
        )
    data_len = size - 8 - length
    extents: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        extents.append(_check_safetensors_entry(name, entry, data_len))
    extents.sort()
    for (_, end, before), (begin, _, name) in zip(extents, extents[1:], strict=False):
        if begin < end:
            raise CorruptCheckpoint(f"safetensors tensors {before!r} and {name!r} overlap")
    return list(header), metadata


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Readers disagree on which duplicate wins, so a header with duplicates is refused outright.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys in the header")
    return out


def _check_safetensors_entry(name: str, entry: object, data_len: int) -> tuple[int, int, str]:
    if not isinstance(entry, dict):
        raise CorruptCheckpoint(f"safetensors entry {name!r} is not an object")
    declared, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(declared, str):
        raise CorruptCheckpoint(f"safetensors entry {name!r} has no dtype")
    dtype = DTYPES.get(declared)
    if dtype is None:
        raise UnsupportedFormat(f"safetensors entry {name!r} has unsupported dtype {declared!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CorruptCheckpoint(f"safetensors entry {name!r} has an invalid shape")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise CorruptCheckpoint(f"safetensors entry {name!r} has invalid data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CorruptCheckpoint(
            f"safetensors entry {name!r} has data_offsets [{begin}, {end}] outside the {data_len} data bytes"
        )
    numel = 1
    for d in shape:
        numel *= d
    if numel * dtype.itemsize != end - begin:
        raise CorruptCheckpoint(f"safetensors entry {name!r}: shape and data_offsets disagree")
    return begin, end, name




FORMAT = Safetensors()
