"""Write state_dicts atomically and deterministically, in any writable format of `service.core.formats`."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from service.core.formats import FORMATS, Format, writer_for
from service.core.formats.safetensors import SAFETENSORS_DTYPES, check_safetensors_output
from service.core.pthzip import StorageRecords
from service.core.statedict import metadata_of, with_metadata
from service.errors import InvalidRequest, StorageFull, quote_keys
from service.format_names import OutputFormat

__all__ = ["SAFETENSORS_DTYPES", "check_safetensors_output", "save_checkpoint", "save_checkpoint_hashed"]

_READ_CHUNK = 8 << 20


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: Path, *,
                    format: OutputFormat = "pth",
                    metadata: Mapping[str, str] | None = None,
                    max_expanded_bytes: int | None = None,
                    formats: Sequence[Format] = FORMATS) -> None:
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
        format: An output format name (`service.format_names.OUTPUT_FORMATS`): ``"pth"`` or ``"safetensors"``.
        metadata: str -> str header metadata (safetensors only).
        max_expanded_bytes: For ``"safetensors"``, which writes every key's bytes on its own (views of one
            storage are copied apart): refuse, before anything is allocated, a state_dict whose keys expand to
            more than this (`service.core.expansion`). None: no bound.
        formats: The format table (`service.core.formats.FORMATS`; tests pass a copy with a format of their own).

    Raises:
        InvalidRequest: A key is not a str, a value is not a dense CPU tensor, ``metadata`` is not str -> str
            or is given for ``"pth"``, or ``format`` is unknown.
        UnconvertibleCheckpoint: For ``"safetensors"``: a dtype it cannot hold, or a key named ``__metadata__``.
        ExpansionLimitExceeded: For ``"safetensors"``: the keys expand to more than ``max_expanded_bytes``.
        StorageFull: The disk filled up (ENOSPC) while writing.
        OSError: Any other failure to write; no temp file is left behind.
    """
    _save(state_dict, Path(path), format=format, metadata=metadata, sources=(), max_expanded_bytes=max_expanded_bytes,
          formats=formats)


def save_checkpoint_hashed(state_dict: Mapping[str, torch.Tensor], path: Path, *,
                           format: OutputFormat = "pth",
                           sources: Sequence[StorageRecords] = (),
                           max_expanded_bytes: int | None = None) -> tuple[str, int]:
    """Save like `save_checkpoint` and return the sha256 and size of the bytes written.

    For ``"pth"`` the digest is computed while the archive is written, so the file is not read again, and
    storages memory-mapped from one of ``sources`` are copied file-to-file (see `service.core.pthzip`); a
    safetensors file is read back once.

    Args:
        state_dict: As for `save_checkpoint`.
        path: As for `save_checkpoint`.
        format: As for `save_checkpoint`.
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
    written = _save(state_dict, path, format=format, metadata=None, sources=sources,
                    max_expanded_bytes=max_expanded_bytes, formats=FORMATS)
    return written if written is not None else _hash_file(path)


def _save(state_dict: Mapping[str, torch.Tensor], path: Path, *, format: str, metadata: Mapping[str, str] | None,
          sources: Sequence[StorageRecords], max_expanded_bytes: int | None,
          formats: Sequence[Format]) -> tuple[str, int] | None:
    tensors = _checked_tensors(state_dict)
    writer = writer_for(format, formats=formats)
    if metadata and not writer.holds_header_metadata:
        holders = " or ".join(f.name for f in formats if f.writable and f.holds_header_metadata)
        raise InvalidRequest(f"metadata can only be stored in {holders} files")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidRequest(f"{writer.name} metadata must map strings to strings")
    writer.check_output(tensors, max_expanded_bytes=max_expanded_bytes)
    result: list[tuple[str, int] | None] = []
    _write_atomically(path, lambda tmp: result.append(writer.write(tensors, tmp, metadata=metadata, sources=sources)))
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


def _checked_tensors(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    bad_keys = [repr(k) for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise InvalidRequest(f"state_dict keys must be strings, got {', '.join(sorted(bad_keys)[:8])}")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise InvalidRequest(f"state_dict values must be tensors: {quote_keys(not_tensors)}")
    # detach() shares storage: it drops Parameter wrappers and requires_grad without copying data.
    return with_metadata(((k, v.detach()) for k, v in state_dict.items()), metadata_of(state_dict))


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
