"""Write state_dicts atomically and deterministically, as torch zip archives or safetensors files."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal, cast

import safetensors.torch
import torch

from service.core import pthzip
from service.core.expansion import check_expansion
from service.core.hashing import PARALLEL_MIN_BYTES, hashing_pool
from service.core.manifest import dtype_name
from service.core.pthzip import StorageRecords
from service.errors import InvalidRequest, StorageFull, UnconvertibleCheckpoint, quote_keys

__all__ = ["SAFETENSORS_DTYPES", "check_safetensors_output", "save_checkpoint", "save_checkpoint_hashed"]

# What a safetensors file can hold and both safetensors and our loader read back (service.core.load). Anything
# else (complex128, complex32, bits16, quantized, float8 *fnuz, ...) is refused with a 422, never a KeyError.
SAFETENSORS_DTYPES: frozenset[torch.dtype] = frozenset({
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint64, torch.uint32, torch.uint16, torch.uint8, torch.bool, torch.complex64,
    torch.float8_e4m3fn, torch.float8_e5m2,
})
# The header's own entry: a tensor of that name would make a file safetensors refuses to read.
_SAFETENSORS_RESERVED = "__metadata__"

# torch.save hands each record to the file object as a memoryview of the tensor's own memory. Its sha256 is
# computed in a helper thread while the same bytes are written (hashlib releases the GIL for large updates),
# so the digest costs no second read of the file and little extra time on two cores.
_READ_CHUNK = 8 << 20


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: Path, *,
                    format: Literal["pth", "safetensors"] = "pth",
                    metadata: Mapping[str, str] | None = None,
                    max_expanded_bytes: int | None = None) -> None:
    """Save a state_dict so that the file appears complete or not at all.

    The bytes go to a temp file in the destination directory, which is fsynced, renamed over ``path``,
    and then the directory is fsynced. The same tensors in the same order give the same bytes.

    ``"pth"`` writes torch's zip format (what plain ``torch.load`` reads). The state_dict's ``_metadata``
    (per-module versions for ``load_state_dict``) is kept. Tensors are written from their storages as they
    are, so memory-mapped inputs stream out without a second copy. There is no place for ``metadata`` in
    a plain state_dict file, so passing any is an error rather than being dropped.

    ``"safetensors"`` writes ``metadata`` into the header's ``__metadata__``. safetensors cannot hold
    ``_metadata`` (it is not written), refuses aliased tensors and needs contiguous ones: tensors that
    overlap an earlier tensor in memory (tied weights, ``{"a": t, "b": t}``) are saved as copies and
    non-contiguous ones are made contiguous; everything else is written from memory without a copy.

    Args:
        state_dict: Ordered str -> Tensor mapping, maybe with a ``_metadata`` attribute.
        path: Destination file; replaced if it exists.
        format: ``"pth"`` or ``"safetensors"``.
        metadata: str -> str header metadata (safetensors only).
        max_expanded_bytes: For ``"safetensors"``, which writes every key's bytes on its own (views of one
            storage are copied apart): refuse, before anything is allocated, a state_dict whose keys expand to
            more than this (`service.core.expansion`). None: no bound.

    Raises:
        InvalidRequest: A key is not a str, a value is not a dense CPU tensor, ``metadata`` is not str -> str
            or is given for ``"pth"``, or ``format`` is unknown.
        UnconvertibleCheckpoint: For ``"safetensors"``: a dtype it cannot hold, or a key named ``__metadata__``.
        ExpansionLimitExceeded: For ``"safetensors"``: the keys expand to more than ``max_expanded_bytes``.
        StorageFull: The disk filled up (ENOSPC) while writing.
        OSError: Any other failure to write; no temp file is left behind.
    """
    path = Path(path)
    tensors = _checked_tensors(state_dict)
    if format == "pth":
        if metadata:
            raise InvalidRequest("metadata can only be stored in safetensors files")

        def write(tmp: Path) -> None:
            _write_pth(state_dict, tensors, tmp)

        _write_atomically(path, write)
    elif format == "safetensors":
        header = _checked_metadata(metadata)
        check_safetensors_output(tensors, max_expanded_bytes=max_expanded_bytes)
        _write_atomically(path, lambda tmp: _write_safetensors(tensors, header, tmp))
    else:
        raise InvalidRequest(f"unknown checkpoint format {format!r}; use 'pth' or 'safetensors'")


def save_checkpoint_hashed(state_dict: Mapping[str, torch.Tensor], path: Path, *,
                           format: Literal["pth", "safetensors"] = "pth",
                           sources: Sequence[StorageRecords] = (),
                           max_expanded_bytes: int | None = None) -> tuple[str, int]:
    """Save like `save_checkpoint` and return the sha256 and size of the bytes written.

    For ``"pth"`` the digest is computed while the archive is written, so the file is not read again, and
    storages memory-mapped from one of ``sources`` are copied file-to-file (see `service.core.pthzip`); a
    safetensors file is read back once.

    Args:
        state_dict: As for `save_checkpoint`.
        path: As for `save_checkpoint`.
        format: ``"pth"`` or ``"safetensors"``.
        sources: The storage records of the memory-mapped loads the tensors come from (``records`` of a
            `LoadedCheckpoint`); tensors found there must not have been modified in place.
        max_expanded_bytes: As for `save_checkpoint`.

    Returns:
        The hex sha256 of the file's bytes and its size.

    Raises:
        InvalidRequest, UnconvertibleCheckpoint, ExpansionLimitExceeded, StorageFull, OSError: As for
            `save_checkpoint`.
    """
    path = Path(path)
    if format != "pth":
        save_checkpoint(state_dict, path, format=format, max_expanded_bytes=max_expanded_bytes)
        return _hash_file(path)
    tensors = _checked_tensors(state_dict)
    result: list[tuple[str, int]] = []

    def write(tmp: Path) -> None:
        result.append(_write_pth(state_dict, tensors, tmp, sources))

    _write_atomically(path, write)
    return result[0]


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_READ_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size




class _HashingWriter:
    """The file object torch.save writes to: every byte goes to `fd` in full and into the sha256."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        hashing = hashing_pool().submit(self.digest.update, view) if n >= PARALLEL_MIN_BYTES else None
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        finally:
            # torch's buffer is only valid during this call: the hash must be done before returning.
            if hashing is not None:
                hashing.result()
        if hashing is None:
            self.digest.update(data)
        self.size += n
        return n

    def flush(self) -> None:
        pass


def _checked_tensors(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    bad_keys = [repr(k) for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise InvalidRequest(f"state_dict keys must be strings, got {', '.join(sorted(bad_keys)[:8])}")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InvalidRequest(f"state_dict values must be tensors: {quote_keys(not_tensors)}")
    # detach() shares storage: it drops Parameter wrappers and requires_grad without copying data.
    return OrderedDict((k, v.detach()) for k, v in state_dict.items())


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
    if _SAFETENSORS_RESERVED in tensors:
        raise UnconvertibleCheckpoint(
            f"safetensors reserves the key {_SAFETENSORS_RESERVED!r} for its header; the checkpoint has a tensor "
            "of that name (download or store as pth)",
            keys=[_SAFETENSORS_RESERVED],
        )
    if max_expanded_bytes is not None:
        check_expansion(tensors, budget=max_expanded_bytes, what="the safetensors output")


def _is_utf8(key: str) -> bool:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _checked_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidRequest("safetensors metadata must map strings to strings")
    return dict(metadata)


def _write_pth(original: Mapping[str, torch.Tensor], tensors: OrderedDict[str, torch.Tensor],
               tmp: Path, sources: Sequence[StorageRecords] = ()) -> tuple[str, int]:
    metadata = getattr(original, "_metadata", None)
    if metadata is not None:
        tensors._metadata = metadata  # type: ignore[attr-defined]
    # A file object, not a path: torch names the archive's top folder after a path's file name, which
    # for a random temp name would make identical inputs give different bytes. With a buffer it is
    # always "archive".
    fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        if pthzip.available():
            result = pthzip.write_pth(tensors, fd, sources)
        else:  # a torch without the private _save this relies on: its own writer, hashed as it goes
            writer = _HashingWriter(fd)
            torch.save(tensors, cast(IO[bytes], writer))  # it only calls write() and flush()
            result = writer.digest.hexdigest(), writer.size
        os.fsync(fd)
    finally:
        os.close(fd)
    return result


def _write_safetensors(tensors: OrderedDict[str, torch.Tensor], metadata: dict[str, str] | None,
                       tmp: Path) -> None:
    sparse = [k for k, v in tensors.items() if v.layout != torch.strided]
    if sparse:
        raise InvalidRequest(f"safetensors cannot hold sparse tensors: {quote_keys(sparse)}")
    prepared = _unaliased(tensors)
    safetensors.torch.save_file(prepared, str(tmp), metadata=metadata)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    except OSError as exc:
        if _is_enospc(exc):
            raise StorageFull(f"no space left on the device while writing {path.name!r}") from exc
        raise
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _is_enospc(exc):
            raise StorageFull(f"no space left on the device while writing {path.name!r}") from exc
        raise
    _fsync_directory(directory)


def _is_enospc(exc: BaseException) -> bool:
    # torch.save reports a failed write of its buffer as a RuntimeError; look down the chain too.
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    return "No space left on device" in str(exc)


def _fsync_directory(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
