"""Sharded checkpoints: transformers' index, shards checked against it, and safetensors files written as a stream.

A sharded transformers checkpoint is a set of files (``model-00001-of-00003.safetensors``, or
``pytorch_model-00001-of-00003.bin``) and an index, ``model.safetensors.index.json``::

    {"metadata": {"total_size": 94080}, "weight_map": {"encoder.layer.0.attention.self.query.weight":
     "model-00001-of-00003.safetensors", ...}}

Going in, `parse_index` reads the index and `check_shards` checks the shards against it (or, without one, that
their keys are disjoint). Coming out, `plan_shards` splits a state_dict the way huggingface_hub's
``split_torch_state_dict_into_shards`` does (greedily, in key order), and `safetensors_header` writes the header
that safetensors' own ``save_file`` writes for the same tensors, so that a file assembled from a header and each
tensor's bytes in `SafetensorsEntry` order is byte for byte what ``save_file`` would have written, without ever
holding more than one chunk in memory.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from service.core.formats.safetensors import DTYPES as _SAFETENSORS_DTYPES
from service.core.formats.safetensors import MAX_HEADER as SAFETENSORS_MAX_HEADER
from service.core.manifest import dtype_name
from service.errors import CorruptCheckpoint, InconsistentShards, InvalidRequest, UnconvertibleCheckpoint, quote_keys

__all__ = [
    "INDEX_SUFFIX",
    "MAX_INDEX_BYTES",
    "MAX_SHARDS",
    "SafetensorsEntry",
    "ShardIndex",
    "check_shard_filename",
    "check_shards",
    "is_index_filename",
    "iter_file_range",
    "iter_tensor_bytes",
    "parse_index",
    "parse_size",
    "plan_shards",
    "read_safetensors_entries",
    "safetensors_code",
    "safetensors_header",
    "shard_filename",
]

INDEX_SUFFIX = ".index.json"
# An index of 500k keys (CKPT_MAX_KEYS) with long names is ~60 MB; a larger one is not an index.
MAX_INDEX_BYTES = 64 << 20
# Shards of one checkpoint in one request (each is an open temp file while the request lasts).
MAX_SHARDS = 256
# Key and file lists in an error's extensions are cut here; the message says how many there were.
_MAX_LISTED = 1000
_CHUNK = 8 << 20
# safetensors writes tensors sorted by dtype (this order: its Dtype enum, largest first) and then by name, so
# that every tensor starts aligned; `safetensors_header` sorts the same way to write the same bytes.
_DATA_ORDER = ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3",
               "F8_E5M2", "I8", "U8", "BOOL")
_RANK = {code: rank for rank, code in enumerate(_DATA_ORDER)}
_CODE_OF_DTYPE = {dtype_name(dtype): code for code, dtype in _SAFETENSORS_DTYPES.items()}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


@dataclass(frozen=True)
class ShardIndex:
    """A parsed ``*.index.json``: which shard file holds each key, and its ``metadata`` as given."""

    weight_map: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def filenames(self) -> list[str]:
        """The shard files the index names, sorted."""
        return sorted(set(self.weight_map.values()))


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file: its key, dtype code (``"F32"``), shape and byte count."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def is_index_filename(name: str | None) -> bool:
    """Whether a multipart filename names a shard index (``*.index.json``)."""
    return name is not None and name.endswith(INDEX_SUFFIX)


def check_shard_filename(name: str) -> str:
    """Refuse a shard file name that is not a plain file name.

    Names are only ever compared (a part's name with the index's), never used as paths; a name that could be
    one (``../x``, ``a/b``) is still refused, because no honest index or client sends it.

    Args:
        name: A multipart filename or a ``weight_map`` value.

    Returns:
        The name, unchanged.

    Raises:
        InconsistentShards: Empty, ``.``/``..``, a path separator or a control character, or over 255 chars.
    """
    if (not name or name in (".", "..") or "/" in name or "\\" in name or len(name) > 255
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        shown = name[:64].encode("unicode_escape").decode("ascii")
        raise InconsistentShards(f"shard file name {shown!r} is not a plain file name", files=[shown])
    return name


def parse_index(raw: bytes, *, max_keys: int) -> ShardIndex:
    """Parse a transformers shard index.

    Args:
        raw: The bytes of ``model.safetensors.index.json`` (or ``pytorch_model.bin.index.json``).
        max_keys: The most keys its ``weight_map`` may hold (`CKPT_MAX_KEYS`).

    Returns:
        The index.

    Raises:
        InconsistentShards: Not JSON, not an object with a ``weight_map`` of key -> file name, a key given twice,
            more than `max_keys` keys or `MAX_SHARDS` files, or a file name that is not a plain name.
    """
    if len(raw) > MAX_INDEX_BYTES:
        raise InconsistentShards(f"the shard index has {len(raw)} bytes, more than {MAX_INDEX_BYTES}")
    try:
        data = json.loads(raw, object_pairs_hook=_unique_pairs)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InconsistentShards(f"the shard index is not valid JSON: {str(exc)[:200]}") from exc
    except RecursionError as exc:
        raise InconsistentShards("the shard index is nested too deeply") from exc
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise InconsistentShards('the shard index is not an object with a "weight_map" object')
    weight_map = data["weight_map"]
    if len(weight_map) > max_keys:
        raise InconsistentShards(
            f"the shard index names {len(weight_map)} keys, more than the limit of {max_keys}", limit=max_keys
        )
    bad = sorted(k for k, v in weight_map.items() if not isinstance(v, str))
    if bad:
        raise InconsistentShards(f"weight_map values must be file names: {quote_keys(bad)}", keys=bad[:_MAX_LISTED])
    files = set(weight_map.values())
    if len(files) > MAX_SHARDS:
        raise InconsistentShards(f"the shard index names {len(files)} files, more than {MAX_SHARDS}",
                                 limit=MAX_SHARDS)
    for name in files:
        check_shard_filename(name)
    metadata = data.get("metadata")
    return ShardIndex(weight_map=dict(weight_map), metadata=dict(metadata) if isinstance(metadata, dict) else {})


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        twice = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
        raise ValueError(f"keys given twice: {quote_keys(twice)}")
    return out


def check_shards(shards: Sequence[tuple[str, Sequence[str]]], index: ShardIndex | None) -> None:
    """Check that shards make one checkpoint: each key exactly once, in the shard the index names.

    Args:
        shards: (file name, keys in that file) of every shard sent.
        index: The index sent with them; None: the shards' keys must be disjoint.

    Raises:
        InconsistentShards: A file sent twice; with an index: files it names that were not sent, files sent that
            it does not name, keys missing from their shard, keys in another shard than it says, keys it does
            not name; without one: keys in more than one shard. The extensions list each kind (sorted, at most
            1000 of each).
    """
    names = [name for name, _ in shards]
    twice = sorted(n for n, count in Counter(names).items() if count > 1)
    if twice:
        raise InconsistentShards(f"shard files sent twice: {quote_keys(twice)}", files=twice)
    problems: list[str] = []
    owner: dict[str, str] = {}  # key -> the first shard that holds it
    overlapping: set[str] = set()
    for name, keys in shards:
        for key in keys:
            if key in owner:
                overlapping.add(key)
            owner.setdefault(key, name)
    if index is None:
        if overlapping:
            where = sorted({n for n, keys in shards if not overlapping.isdisjoint(keys)})
            raise InconsistentShards(
                f"{len(overlapping)} keys are in more than one shard ({quote_keys(where)}), and no index says "
                f"which one holds them: {quote_keys(overlapping)}",
                overlapping_keys=_listed(overlapping), files=where,
            )
        return
    extensions: dict[str, list[str]] = {}
    named = set(index.filenames)
    missing_files = sorted(named - set(names))
    unexpected_files = sorted(set(names) - named)
    if missing_files:
        problems.append(f"{len(missing_files)} shard files it names were not sent ({quote_keys(missing_files)})")
        extensions["missing_files"] = missing_files
    if unexpected_files:
        problems.append(f"{len(unexpected_files)} files sent are not in it ({quote_keys(unexpected_files)})")
        extensions["unexpected_files"] = unexpected_files
    sent = set(names)
    missing = {k for k, f in index.weight_map.items() if f in sent and k not in owner}
    unexpected = {k for k in owner if k not in index.weight_map}
    misplaced = {k for k, f in owner.items() if k in index.weight_map and index.weight_map[k] != f}
    misplaced |= {k for k in overlapping if k in index.weight_map}
    for label, wrong, field_name in (
        ("keys it names are missing from their shard", missing, "missing_keys"),
        ("keys are not in the shard it names", misplaced, "misplaced_keys"),
        ("keys of the shards are not in it", unexpected, "unexpected_keys"),
    ):
        if wrong:
            problems.append(f"{len(wrong)} {label} ({quote_keys(wrong)})")
            extensions[field_name] = _listed(wrong)
    if problems:
        raise InconsistentShards("the shards do not match their index: " + "; ".join(problems), **extensions)


def _listed(keys: Iterable[str]) -> list[str]:
    return sorted(keys)[:_MAX_LISTED]


def safetensors_code(dtype: str) -> str | None:
    """The safetensors dtype code (``"F32"``) of a manifest dtype name (``"float32"``); None: it has none."""
    return _CODE_OF_DTYPE.get(dtype)


def safetensors_header(
    entries: Iterable[SafetensorsEntry], *, metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[SafetensorsEntry]]:
    """The header safetensors' ``save_file`` writes for these tensors, and the order their bytes follow in.

    Args:
        entries: The tensors (any order).
        metadata: The header's ``__metadata__`` (str -> str, written in its order), if any.

    Returns:
        The 8-byte length and the JSON header (space-padded to a multiple of 8), and the entries in data order.

    Raises:
        UnconvertibleCheckpoint: A dtype code safetensors does not know, or a key named ``__metadata__``.
    """
    ordered = sorted(entries, key=lambda e: (_RANK.get(e.dtype, -1), e.key))
    unknown = sorted(e.key for e in ordered if e.dtype not in _RANK)
    if unknown:
        raise UnconvertibleCheckpoint(f"safetensors cannot hold the dtypes of {quote_keys(unknown)}", keys=unknown)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in ordered:
        if e.key == "__metadata__":
            raise UnconvertibleCheckpoint("safetensors reserves the key '__metadata__'", keys=[e.key])
        header[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, ordered


def read_safetensors_entries(fd: int) -> tuple[int, dict[str, tuple[SafetensorsEntry, int]], dict[str, str]]:
    """Read a safetensors file's header (one the inspection accepted already) from an open file.

    Args:
        fd: The file, opened for reading.

    Returns:
        Where the data starts, key -> (entry, offset of its bytes from the data start) in header order, and the
        ``__metadata__``.

    Raises:
        CorruptCheckpoint: The header is not what a safetensors file holds.
    """
    head = os.pread(fd, 8, 0)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < length < SAFETENSORS_MAX_HEADER:
        raise CorruptCheckpoint("not a safetensors file")
    raw = os.pread(fd, length, 8)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpoint("the safetensors header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpoint("the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    out: dict[str, tuple[SafetensorsEntry, int]] = {}
    for key, info in header.items():
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            entry = SafetensorsEntry(key, str(info["dtype"]), tuple(int(d) for d in info["shape"]), end - begin)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpoint(f"safetensors entry {key!r} is malformed") from exc
        out[key] = (entry, begin)
    if not isinstance(metadata, dict):
        raise CorruptCheckpoint("the safetensors __metadata__ is not an object")
    return 8 + length, out, {str(k): str(v) for k, v in metadata.items()}


def iter_file_range(fd: int, offset: int, length: int, *, chunk: int = _CHUNK) -> Iterator[bytes]:
    """The bytes ``[offset, offset + length)`` of an open file, a chunk at a time.

    Raises:
        CorruptCheckpoint: The file ends first.
    """
    while length > 0:
        data = os.pread(fd, min(chunk, length), offset)
        if not data:
            raise CorruptCheckpoint("the file ended before a tensor's bytes did")
        yield data
        offset += len(data)
        length -= len(data)


def iter_tensor_bytes(tensor: torch.Tensor, *, chunk: int = _CHUNK) -> Iterator[memoryview]:
    """A dense CPU tensor's bytes in C order, as views of its memory (a non-contiguous one is copied first)."""
    if tensor.layout != torch.strided:
        raise UnconvertibleCheckpoint("safetensors cannot hold sparse tensors")
    data = tensor.detach().contiguous()
    if data.numel() == 0:
        return
    if data.is_complex():
        data = torch.view_as_real(data.resolve_conj().resolve_neg())
    view = data.reshape(-1).view(torch.uint8).numpy().data
    for start in range(0, view.nbytes, chunk):
        yield view[start:start + chunk]


def plan_shards(sizes: Iterable[tuple[str, int]], *, max_shard_size: int) -> list[list[str]]:
    """Split keys into shards the way huggingface_hub's ``split_torch_state_dict_into_shards`` does.

    Keys are taken in order; a key goes into the current shard unless it would take it past `max_shard_size`,
    in which case a new shard starts. A key larger than the limit alone gets a shard of its own (the current one
    stays open). The same keys and sizes always give the same split.

    Args:
        sizes: (key, bytes) in the state_dict's order.
        max_shard_size: The most bytes of tensors in one shard (>= 1).

    Returns:
        The keys of each shard, in order; no shard is empty.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for key, size in sizes:
        if size > max_shard_size:
            shards.append([key])
            continue
        if current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
    if current:
        shards.append(current)
    return [s for s in shards if s]


def shard_filename(number: int, count: int) -> str:
    """transformers' name of shard `number` (1-based) of `count`: ``model-00001-of-00003.safetensors``."""
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def parse_size(text: str | int) -> int:
    """Parse a size: a plain number of bytes, or a number with a unit (``"5GB"``, ``"500MB"``, ``"2GiB"``).

    KB, MB, GB and TB are powers of 1000, as in transformers and huggingface_hub; KiB, MiB, GiB and TiB are
    powers of 1024.

    Raises:
        InvalidRequest: Not a size, or below 1 byte.
    """
    match = _SIZE.match(str(text))
    if match is None:
        raise InvalidRequest(f"{str(text)[:32]!r} is not a size (e.g. 5GB, 500MB, 2GiB, 1048576)")
    number, unit = match.groups()
    value = float(number) * _UNITS[(unit or "b").lower()]
    if not math.isfinite(value) or value < 1:
        raise InvalidRequest(f"{str(text)[:32]!r} is not a size of at least one byte")
    return int(value)
