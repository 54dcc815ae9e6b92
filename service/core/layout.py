"""Describe where a mapped load's tensors live in their file, and map them again from that description alone.

An upload is parsed (unpickled, weights-only) in the sandbox's worker process. For a merge the API process needs
the same tensors; unpickling the file a second time costs ~60 us a tensor. Instead the worker describes each
tensor of the state_dict (its storage record's offset, size and CRC, dtype, shape, stride and offset) as JSON,
and the API process maps the file and builds the tensors from that: no pickle is ever read in the API process.

The description comes from a process that parsed untrusted bytes, so it is validated as strictly as a file:
every record must lie inside the file and every view inside its record, or the mapping is refused.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from service.core.manifest import dtype_name
from service.core.pthzip import Record, StorageRecords
from service.core.statedict import metadata_of, with_metadata
from service.core.types import LoadedCheckpoint
from service.errors import CorruptCheckpoint

__all__ = ["describe_layout", "map_layout"]

_DTYPES: dict[str, torch.dtype] = {
    dtype_name(dt): dt
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.complex128,
               torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2)
}
_MAX_DIMS = 64


def describe_layout(loaded: LoadedCheckpoint) -> dict[str, Any] | None:
    """Describe a memory-mapped load's state_dict by storage records, or None when it cannot be described.

    Only plain dense CPU tensors whose storages are whole records (`LoadedCheckpoint.records`) can be; a
    ``_metadata`` must survive a JSON round trip unchanged. Anything else (Parameters, tensors that require
    grad, quantized or conjugated tensors, other dtypes) gives None, and the caller loads the file itself.

    Args:
        loaded: A load with ``records`` (a mapped zip archive).

    Returns:
        ``{"records": [[offset, size, crc], ...], "tensors": [[key, dtype, shape, stride, storage_offset,
        record index or -1], ...], "metadata": {...} or None}``.
    """
    if loaded.records is None:
        return None
    metadata = metadata_of(loaded.state_dict)
    metadata_json = None
    if metadata is not None:
        try:
            metadata_json = json.loads(json.dumps(metadata))
        except (TypeError, ValueError):
            return None
        if metadata_json != metadata:
            return None
    index: dict[int, int] = {}
    records: list[list[int]] = []
    tensors: list[list[Any]] = []
    for key, tensor in loaded.state_dict.items():
        if (not isinstance(key, str) or type(tensor) is not torch.Tensor or tensor.layout != torch.strided
                or tensor.device.type != "cpu" or tensor.requires_grad or tensor.is_conj() or tensor.is_neg()
                or tensor.dtype not in _DTYPES.values()):
            return None
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            at = -1
        else:
            record = loaded.records.find(storage.data_ptr(), storage.nbytes())
            if record is None:
                return None
            at = index.setdefault(storage.data_ptr(), len(records))
            if at == len(records):
                records.append([record.offset, record.size, record.crc])
        tensors.append([key, dtype_name(tensor.dtype), list(tensor.shape), list(tensor.stride()),
                        tensor.storage_offset(), at])
    return {"records": records, "tensors": tensors, "metadata": metadata_json}


def map_layout(path: Path, layout: Mapping[str, Any]) -> tuple[OrderedDict[str, torch.Tensor], StorageRecords]:
    """Build the state_dict a layout describes from ``path``, memory-mapped (no unpickling).

    Args:
        path: The file the layout was taken from.
        layout: What `describe_layout` returned for it (validated here: it crossed a process boundary).

    Returns:
        The state_dict (with ``_metadata`` when there was one) and its storage records, for saving by copy.

    Raises:
        CorruptCheckpoint: The layout does not fit the file: a record outside it, a view outside its record,
            an unknown dtype, a malformed entry.
    """
    size = os.stat(path).st_size
    raw_records, raw_tensors = layout.get("records"), layout.get("tensors")
    if not isinstance(raw_records, list) or not isinstance(raw_tensors, list):
        raise CorruptCheckpoint("the parser's layout of the checkpoint is malformed")
    records = [_record(r, size) for r in raw_records]
    mapped = torch.UntypedStorage.from_file(os.fspath(path), False, size) if records else None
    storages = [mapped[r.offset:r.offset + r.size] for r in records] if mapped is not None else []
    tensors: dict[str, torch.Tensor] = {}
    for entry in raw_tensors:
        key, tensor = _tensor(entry, records, storages)
        if key in tensors:
            raise CorruptCheckpoint(f"the parser's layout names key {key[:100]!r} twice")
        tensors[key] = tensor
    metadata = layout.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise CorruptCheckpoint("the parser's layout of the checkpoint is malformed")
    out = with_metadata(tensors, OrderedDict(metadata) if metadata is not None else None)
    by_address = {s.data_ptr(): r for s, r in zip(storages, records, strict=True)}
    return out, StorageRecords(path, by_address)


def _int(value: object) -> int:
    if type(value) is not int or value < 0:
        raise CorruptCheckpoint("the parser's layout of the checkpoint is malformed")
    return value


def _record(raw: object, file_size: int) -> Record:
    if not isinstance(raw, list) or len(raw) != 3:
        raise CorruptCheckpoint("the parser's layout of the checkpoint is malformed")
    offset, size, crc = (_int(v) for v in raw)
    if size == 0 or offset + size > file_size:
        raise CorruptCheckpoint(f"a storage record of {size} bytes at {offset} lies outside the {file_size}-byte file")
    return Record(offset, size, crc)


def _tensor(raw: object, records: list[Record], storages: list[torch.UntypedStorage]) -> tuple[str, torch.Tensor]:
    if not isinstance(raw, list) or len(raw) != 6 or not isinstance(raw[0], str) or not isinstance(raw[1], str):
        raise CorruptCheckpoint("the parser's layout of the checkpoint is malformed")
    key, dtype_s, shape_raw, stride_raw, offset_raw, at_raw = raw
    dtype = _DTYPES.get(dtype_s)
    if dtype is None or not isinstance(shape_raw, list) or not isinstance(stride_raw, list) \
            or len(shape_raw) != len(stride_raw) or len(shape_raw) > _MAX_DIMS:
        raise CorruptCheckpoint(f"the parser's layout of {key[:100]!r} is malformed")
    shape = [_int(d) for d in shape_raw]
    stride = [_int(s) for s in stride_raw]
    offset = _int(offset_raw)
    if type(at_raw) is not int or not -1 <= at_raw < len(records):
        raise CorruptCheckpoint(f"the parser's layout of {key[:100]!r} is malformed")
    numel = 1
    for d in shape:
        numel *= d
    if at_raw == -1:
        if numel:
            raise CorruptCheckpoint(f"{key[:100]!r} has {numel} elements but no storage")
        return key, torch.empty_strided(shape, stride, dtype=dtype)
    itemsize = dtype.itemsize
    end = (offset + sum((d - 1) * s for d, s in zip(shape, stride, strict=True)) + 1) * itemsize if numel else 0
    if end > records[at_raw].size:
        raise CorruptCheckpoint(
            f"{key[:100]!r} reaches byte {end} of a storage record of {records[at_raw].size} bytes")
    tensor = torch.empty(0, dtype=dtype).set_(storages[at_raw], offset, shape, stride)
    return key, tensor
