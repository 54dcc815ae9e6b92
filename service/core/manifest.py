"""Manifests: key -> shape, dtype, byte size, content fingerprint. Built once; diffs then load no tensors."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence

import blake3
import torch

from service.core.budget import check_budget
from service.core.types import CURRENT_FINGERPRINT_VERSION, Manifest, TensorEntry
from service.errors import InvalidCheckpoint

__all__ = ["FINGERPRINT_VERSION", "build_manifest", "compute_schema_fingerprint", "dtype_name", "fingerprint_tensor",
           "is_quantized_dtype"]

# 1: the bytes only (a quantized tensor's int_repr). 2: also every field that changes a quantized tensor's value
# (dtype, qscheme, scale, zero point, axis, per-channel scales and zero points). Other tensors hash the same.
FINGERPRINT_VERSION = CURRENT_FINGERPRINT_VERSION

_FINGERPRINT_BYTES = 16  # 32 hex digits: collisions are not a concern at checkpoint scale
# blake3 can spread one large input over cores; below this size the thread handoff costs more than it saves.
_THREADED_MIN_BYTES = 8 << 20
_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """Name a dtype without the "torch." prefix ("float32", "bfloat16", "int64").

    Args:
        dtype: A torch dtype.

    Returns:
        The short name used in manifests and specs.
    """
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


_QUANTIZED_DTYPES = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})


def is_quantized_dtype(name: str) -> bool:
    """Whether a manifest dtype name ("qint8", "quint4x2", ...) is a quantized dtype."""
    return name in _QUANTIZED_DTYPES


def _quantization_fields(t: torch.Tensor) -> bytes:
    # Everything besides int_repr that dequantize() reads. Floats as hex: exact, and the same on every platform.
    scheme = t.qscheme()
    head: list[object] = [dtype_name(t.dtype), str(scheme).removeprefix("torch.")]
    tail = b""
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        head += [float(t.q_scale()).hex(), int(t.q_zero_point())]
    else:
        scales = t.q_per_channel_scales().to(torch.float64).contiguous()
        zero_points = t.q_per_channel_zero_points().to(torch.int64).contiguous()
        head += [int(t.q_per_channel_axis()), scales.numel()]
        tail = scales.numpy().tobytes() + zero_points.numpy().tobytes()
    return b"\0quantized\0" + json.dumps(head, separators=(",", ":")).encode() + tail


def _normalise(data: torch.Tensor) -> torch.Tensor:
    if data.is_quantized:
        data = data.int_repr()
    if data.layout != torch.strided:
        data = data.to_dense()  # sparse: rare in checkpoints, and the dense bytes are what a diff compares
    if not data.is_cpu:
        data = data.cpu()
    return data.contiguous()


def fingerprint_tensor(t: torch.Tensor) -> str:
    """Hash a tensor's bytes with blake3 through a zero-copy buffer view.

    The bytes are viewed as uint8 (so bfloat16 and float8 work) and handed to blake3 as a numpy view of the
    tensor's own memory; only a non-contiguous or non-CPU tensor is copied first. Shape and dtype are not part
    of the hash (manifests record them next to it), except for a quantized tensor: its integer representation is
    hashed followed by its dtype, scheme, scale, zero point, axis and per-channel scales and zero points, so any
    change of its value changes the fingerprint (`FINGERPRINT_VERSION` 2).

    Args:
        t: Any tensor on the CPU or another real device (not meta).

    Returns:
        32 hex digits.
    """
    data = t.detach() if t.requires_grad else t
    quantization = _quantization_fields(data) if data.is_quantized else b""
    # The common case (a contiguous real CPU tensor) must stay cheap: manifests of 20k-key checkpoints hash
    # mostly tiny tensors, where per-call overhead dominates.
    if not (data.is_cpu and data.layout == torch.strided and not data.is_quantized and data.is_contiguous()):
        data = _normalise(data)
    nbytes = data.numel() * data.element_size()
    if nbytes == 0:
        return blake3.blake3(quantization).hexdigest(length=_FINGERPRINT_BYTES)
    if data.is_complex():
        # resolve_conj/resolve_neg materialise lazy bits; they return the tensor itself when none is set.
        data = torch.view_as_real(data.resolve_conj().resolve_neg())
    if data.dim() == 0:
        data = data.reshape(1)
    buffer = data.view(torch.uint8).numpy().data  # a memoryview over the tensor's memory, no copy
    threads = blake3.blake3.AUTO if nbytes >= _THREADED_MIN_BYTES else 1
    hasher = blake3.blake3(buffer, max_threads=threads)
    if quantization:
        hasher.update(quantization)
    return hasher.hexdigest(length=_FINGERPRINT_BYTES)


def compute_schema_fingerprint(items: Iterable[tuple[str, Sequence[int], str]]) -> str:
    """Hash a key/shape/dtype schema, independent of key order and content.

    Args:
        items: (key, shape, dtype name) triples.

    Returns:
        sha256 hex of the JSON of the key-sorted [key, shape, dtype] list.
    """
    rows = [[key, [int(d) for d in shape], dtype] for key, shape, dtype in sorted(items, key=lambda r: r[0])]
    payload = json.dumps(rows, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def build_manifest(state_dict: Mapping[str, torch.Tensor]) -> Manifest:
    """Describe every tensor of a state_dict: shape, dtype, byte size and blake3 fingerprint.

    Args:
        state_dict: Key to tensor.

    Returns:
        A `Manifest` in the state_dict's key order; `to_dict()` is JSON-serialisable.

    Raises:
        InvalidCheckpoint: A value is not a tensor, or is on the meta device (it has no bytes to hash).
    """
    entries: dict[str, TensorEntry] = {}
    for key, t in state_dict.items():
        check_budget()
        if not isinstance(t, torch.Tensor):
            raise InvalidCheckpoint(f"value of {key!r} is a {type(t).__name__}, not a tensor", keys=[key])
        if t.is_meta:
            raise InvalidCheckpoint(f"tensor {key!r} is on the meta device and has no data", keys=[key])
        entries[key] = TensorEntry(
            shape=tuple(t.shape),
            dtype=dtype_name(t.dtype),
            nbytes=t.numel() * t.element_size(),
            fingerprint=fingerprint_tensor(t),
        )
    schema = compute_schema_fingerprint((k, e.shape, e.dtype) for k, e in entries.items())
    return Manifest(entries=entries, schema_fingerprint=schema)
