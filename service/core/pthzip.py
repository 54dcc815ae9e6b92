"""Write torch zip checkpoints, copying storage records straight from the files they were memory-mapped from.

``torch.save`` pickles the object, then copies every storage's bytes through memory into the archive, computing a
CRC-32 of each on the way. For a merge or strip result whose tensors are memory-mapped from stored checkpoints,
that reads the whole input through freshly faulted mappings and writes it back out byte for byte.

This writer pickles a state_dict of plain tensors itself, emitting exactly the opcodes torch's pickler emits
(tests compare the bytes) without torch's per-object hooks, which cost ~40 us a tensor; anything else is pickled
by ``torch.serialization._save``. It then writes the archive: a storage that is a whole record of a known source
file is copied file-to-file in the kernel (``copy_file_range``) and its CRC-32 is taken from the source's central
directory; a helper thread reads the same range once to compute the archive's sha256 and to check that CRC (a
wrong one is corrected in place, so the result is always a valid archive). Other storages are written from
memory. The layout is torch's: entries under ``archive/``, data aligned to the ``.storage_alignment`` record (64
bytes), a data descriptor after each entry, zip64 end records. ``torch.load`` (mapped or not) and ``zipfile``
read it; the same input gives the same bytes.
"""

from __future__ import annotations

import copyreg
import ctypes
import errno
import functools
import hashlib
import inspect
import io
import os
import pickle
import queue
import struct
import sys
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from service.core.hashing import PARALLEL_MIN_BYTES, hashing_pool

__all__ = ["Record", "StorageRecords", "available", "write_pth"]

_ARCHIVE = b"archive/"
# Records at least this big are copied in the kernel and hashed by the helper thread; smaller ones are read
# into the write buffer (a syscall per record costs more than copying a few KiB).
_COPY_MIN = 1 << 20
_FLUSH = 4 << 20
_CHUNK = 8 << 20
_EARLY_SYNC_BYTES = 64 << 20
# Offsets and sizes from here on need zip64 fields (a module constant so that tests can force them).
_ZIP64_AT = 0xFFFFFFFF
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_FLAGS = 0x0808  # sizes in a data descriptor after the data, UTF-8 names (as torch writes them)
_FLAGS_EMPTY = 0x0800  # an empty record has no data descriptor


@dataclass(frozen=True)
class Record:
    """A storage record of a zip checkpoint: where its bytes start in the file, how many, and their CRC-32."""

    offset: int
    size: int
    crc: int


class StorageRecords:
    """The storage records of one memory-mapped load, by the address of the storage mapped over each.

    Holds the file open, so the records stay readable after the path is renamed or unlinked (an upload is moved
    into the store while a merge still uses it). Valid while the loaded tensors are alive: keep this object with
    them. The tensors must not be modified in place (the file's bytes, not the memory, are written).
    """

    def __init__(self, path: Path, by_address: Mapping[int, Record]) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._close = weakref.finalize(self, os.close, self.fd)
        self.by_address = dict(by_address)

    def find(self, address: int, nbytes: int) -> Record | None:
        record = self.by_address.get(address)
        return record if record is not None and record.size == nbytes else None


@functools.cache
def available() -> bool:
    """Whether this torch's private ``_save(obj, zip_file, pickle_module, protocol, disable_byteorder)`` exists."""
    save = getattr(torch.serialization, "_save", None)
    if save is None:
        return False
    try:
        names = list(inspect.signature(save).parameters)
    except (TypeError, ValueError):
        return False
    return names[:5] == ["obj", "zip_file", "pickle_module", "pickle_protocol", "_disable_byteorder_record"]


def write_pth(obj: object, fd: int, sources: Iterable[StorageRecords] = ()) -> tuple[str, int]:
    """Write ``obj`` as torch's zip archive to ``fd`` (at its current position, which must be 0).

    Args:
        obj: What ``torch.save`` would be given (a state_dict).
        fd: A file descriptor open for writing, positioned at the start of an empty regular file.
        sources: Records of memory-mapped loads whose storages may be copied file-to-file.

    Returns:
        The sha256 of the bytes written and their count.

    Raises:
        OSError: Writing failed (ENOSPC included); the file is then incomplete.
        RuntimeError: torch refused to pickle ``obj``.
    """
    writer = _ArchiveWriter(fd, list(sources))
    try:
        if not _save_state_dict(obj, writer):
            torch.serialization._save(obj, writer, pickle, 2, False)  # type: ignore[no-untyped-call]
        return writer.finish()
    finally:
        writer.close()


def _plain(tensor: object) -> bool:
    # What torch's Tensor.__reduce_ex__ pickles with its fast path: _rebuild_tensor_v2 / v3 of a CPU storage.
    return (type(tensor) is torch.Tensor and tensor.device.type == "cpu" and tensor.layout == torch.strided
            and not tensor.is_quantized and not tensor.is_nested and not tensor._backward_hooks
            and not torch._utils._get_obj_state(tensor)  # type: ignore[no-untyped-call]
            and not torch._utils.get_tensor_metadata(tensor))  # type: ignore[no-untyped-call]


def _save_state_dict(obj: object, writer: _ArchiveWriter) -> bool:
    """Pickle a dict of plain tensors as torch.serialization._save would, and write its records; False if not."""
    if _FAST is None or not isinstance(obj, dict) or not all(_plain(v) for v in obj.values()):
        return False
    data = io.BytesIO()
    pickler = _StatePickler(data, *_FAST)
    pickler.dump(obj)
    writer.write_record("data.pkl", data.getvalue(), len(data.getvalue()))
    writer.write_record(".format_version", "1", 1)
    alignment = str(torch.serialization._get_storage_alignment())
    writer.write_record(".storage_alignment", alignment, len(alignment))
    writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    for key, storage in pickler.storages.items():
        writer.write_record(f"data/{key}", storage, storage.nbytes())
    return True


class _Pid:
    """Stands for a storage in the pickle: the persistent id torch's pickler would give it."""

    __slots__ = ("value",)

    def __init__(self, value: tuple[Any, ...]) -> None:
        self.value = value


class _StatePickler(pickle.Pickler):
    def __init__(self, file: IO[bytes], legacy: Mapping[torch.dtype, Any], v2: Any, v3: Any) -> None:
        super().__init__(file, protocol=2)
        self.dispatch_table = {**copyreg.dispatch_table, torch.Tensor: self._reduce_tensor}
        self.storages: dict[str, torch.UntypedStorage] = {}
        self._keys: dict[int, str] = {}
        self._dtypes: dict[int, torch.dtype] = {}
        self._legacy, self._v2, self._v3 = legacy, v2, v3

    def persistent_id(self, obj: Any) -> Any:
        return obj.value if type(obj) is _Pid else None

    def _reduce_tensor(self, tensor: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
        storage = tensor.untyped_storage()
        key = self._keys.get(storage._cdata)
        if key is None:
            key = self._keys[storage._cdata] = str(len(self._keys))
            self.storages[key] = storage
        storage_type = self._legacy.get(tensor.dtype)
        storage_dtype = tensor.dtype if storage_type is not None else torch.uint8
        if storage.data_ptr():
            if self._dtypes.setdefault(storage.data_ptr(), storage_dtype) != storage_dtype:
                raise RuntimeError(
                    "Cannot save multiple tensors or storages that view the same data as different types")
        view: tuple[Any, ...] = (tensor.storage_offset(), tuple(tensor.size()), tensor.stride(),
                                 tensor.requires_grad, OrderedDict())
        if storage_type is not None:
            numel = storage.nbytes() // tensor.element_size()
            return self._v2, (_Pid(("storage", storage_type, key, "cpu", numel)), *view)
        return self._v3, (_Pid(("storage", torch.UntypedStorage, key, "cpu", storage.nbytes())), *view, tensor.dtype)


def _fast_pickling() -> tuple[dict[torch.dtype, Any], Any, Any] | None:
    # The private pieces of torch's format the fast path reproduces; without any of them, torch pickles.
    try:
        legacy = {dtype: getattr(torch, name) for dtype, name in torch.storage._dtype_to_storage_type_map().items()}
        fast = (legacy, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_tensor_v3)
        torch.serialization._get_storage_alignment  # noqa: B018
        torch._utils._get_obj_state  # noqa: B018
    except AttributeError:
        return None
    return fast


_FAST = _fast_pickling()


@dataclass
class _Entry:
    name: bytes
    offset: int
    size: int
    crc: int
    descriptor_at: int
    flags: int = _FLAGS


class _ArchiveWriter:
    """The ``zip_file`` that ``torch.serialization._save`` writes records to."""

    def __init__(self, fd: int, sources: Sequence[StorageRecords]) -> None:
        self._fd = fd
        self._sources = sources
        self._pos = 0  # bytes written to fd + len(self._buf)
        self._buf = bytearray()
        self._entries: list[_Entry] = []
        self._align = 64
        self._hasher = _Hasher()

    # -- torch's interface -------------------------------------------------------------------------------------

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        if isinstance(data, str):
            data = data.encode()
        if name == ".storage_alignment":
            self._align = max(1, int(bytes(data)))
        if isinstance(data, (bytes, bytearray, memoryview)):
            self._small(name, bytes(data))
            return
        storage = data
        if nbytes == 0:
            self._small(name, b"")
            return
        address = storage.data_ptr()
        for source in self._sources:
            record = source.find(address, nbytes)
            if record is None:
                continue
            if nbytes < _COPY_MIN:
                self._small(name, _pread_exactly(source.fd, nbytes, record.offset))
            else:
                self._copied(name, source.fd, record)
            return
        if nbytes < _COPY_MIN:
            self._small(name, ctypes.string_at(address, nbytes))
        else:
            self._from_memory(name, storage, nbytes)

    def write_record_metadata(self, name: str, nbytes: int) -> None:
        raise NotImplementedError("records without data (torch's skip_data mode) are not supported")

    # -- entries -----------------------------------------------------------------------------------------------

    def _header(self, name: str, size: int) -> tuple[bytes, bytes]:
        full = _ARCHIVE + name.encode()
        start = self._pos + _LOCAL.size + len(full) + 4
        pad = -start % self._align
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        flags = _FLAGS if size else _FLAGS_EMPTY
        return full, _LOCAL.pack(0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(full), len(extra)) + full + extra

    def _small(self, name: str, data: bytes) -> None:
        full, header = self._header(name, len(data))
        offset = self._pos
        crc = zlib.crc32(data)
        self._put(header)
        self._put(data)
        if not data:
            self._entries.append(_Entry(full, offset, 0, 0, self._pos, _FLAGS_EMPTY))
            return
        self._entries.append(_Entry(full, offset, len(data), crc, self._pos))
        self._put(_descriptor(crc, len(data)))

    def _from_memory(self, name: str, storage: Any, nbytes: int) -> None:
        full, header = self._header(name, nbytes)
        offset = self._pos
        self._put(header)
        self._flush()
        array: Any = np.asarray(torch.empty(0, dtype=torch.uint8).set_(storage))  # shares the storage's memory
        view = memoryview(array).cast("B")
        crc = zlib.crc32(view)
        self._hasher.put(view)
        _write_all(self._fd, view)
        self._pos += nbytes
        self._entries.append(_Entry(full, offset, nbytes, crc, self._pos))
        self._put(_descriptor(crc, nbytes))

    def _copied(self, name: str, source_fd: int, record: Record) -> None:
        full, header = self._header(name, record.size)
        offset = self._pos
        self._put(header)
        self._flush()
        entry = _Entry(full, offset, record.size, record.crc, offset + len(header) + record.size)
        self._hasher.put_file(source_fd, record, entry)
        _copy_range(source_fd, self._fd, record.offset, record.size)
        self._pos += record.size
        # Written with the source's CRC; the helper hashes the descriptor with the CRC it computes, and a
        # mismatch is patched in the file in finish(), so the file ends up as hashed.
        descriptor = _descriptor(record.crc, record.size)
        _write_all(self._fd, memoryview(descriptor))
        self._pos += len(descriptor)
        self._entries.append(entry)

    # -- end ---------------------------------------------------------------------------------------------------

    def finish(self) -> tuple[str, int]:
        # What torch's C++ writer adds at the end: the file format version (kMinProducedFileFormatVersion) and an
        # id: torch's is a hash of the record names, then a combined CRC; ours is derived the same deterministic way.
        self._small("version", b"3\n")
        self._flush()
        if self._pos >= _EARLY_SYNC_BYTES:
            # Put the bytes on disk while the helper still hashes (the caller's fsync then has only the tail).
            os.fdatasync(self._fd)
        self._hasher.sync()  # the CRCs of copied records are checked (and corrected) before the id combines them
        names = hashlib.blake2b(b"\0".join(sorted(e.name for e in self._entries)), digest_size=8).digest()
        self._small(".data/serialization_id", b"%020d%020d" % (int.from_bytes(names, "little"), self._crc_id()))
        self._flush()
        digest, patched = self._hasher.finish()
        for entry in patched:
            _pwrite_all(self._fd, _descriptor(entry.crc, entry.size), entry.descriptor_at)
        central_at = self._pos
        for e in self._entries:
            self._put(_central(e))
        central_size = self._pos - central_at
        zip64_eocd_at = self._pos
        count = len(self._entries)
        self._put(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, count, count, central_size,
                              central_at))
        self._put(struct.pack("<IIQI", 0x07064B50, 0, zip64_eocd_at, 1))
        self._put(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                              min(central_size, 0xFFFFFFFF), min(central_at, 0xFFFFFFFF), 0))
        tail = bytes(self._buf)
        self._buf.clear()
        _write_all(self._fd, memoryview(tail))
        digest.update(tail)
        return digest.hexdigest(), self._pos

    def _crc_id(self) -> int:
        mask = (1 << 64) - 1
        combined = 0
        for e in self._entries:
            combined ^= (e.crc + 0x9E3779B9 + (combined << 6) + (combined >> 2)) & mask
        return combined & mask

    def close(self) -> None:
        self._hasher.close()

    def _put(self, data: bytes) -> None:
        self._buf += data
        self._pos += len(data)
        if len(self._buf) >= _FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            chunk = bytes(self._buf)
            self._buf.clear()
            self._hasher.put(chunk)
            _write_all(self._fd, memoryview(chunk))


class _Hasher:
    """sha256 of the archive in a helper thread, in write order; checks (and corrects) copied records' CRCs."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._digest = hashlib.sha256()
        self._patched: list[_Entry] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ckpt-archive-sha256", daemon=True)
        self._thread.start()

    def put(self, data: bytes | memoryview) -> None:
        self._queue.put(data)

    def put_file(self, fd: int, record: Record, entry: _Entry) -> None:
        self._queue.put((fd, record, entry))

    def sync(self) -> None:
        """Wait until everything put so far is hashed."""
        done = threading.Event()
        self._queue.put(done)
        done.wait()
        if self._error is not None:
            raise self._error

    def finish(self) -> tuple[Any, list[_Entry]]:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest, self._patched

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            if self._error is not None:
                continue
            try:
                if isinstance(item, tuple):
                    self._hash_file(*item)
                else:
                    self._digest.update(item)
            except BaseException as exc:  # reported by finish(); keep draining so the writer never blocks
                self._error = exc

    def _hash_file(self, fd: int, record: Record, entry: _Entry) -> None:
        crc = 0
        done = 0
        buf = bytearray(min(_CHUNK, record.size))
        view = memoryview(buf)
        while done < record.size:
            want = min(len(buf), record.size - done)
            n = os.preadv(fd, [view[:want]], record.offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"source record ended after {done} of {record.size} bytes")
            chunk = view[:n]
            # CRC-32 on another core while this one runs sha256 (both release the GIL)
            crc_so_far = hashing_pool().submit(zlib.crc32, chunk, crc) if n >= PARALLEL_MIN_BYTES else None
            self._digest.update(chunk)
            crc = zlib.crc32(chunk, crc) if crc_so_far is None else crc_so_far.result()
            done += n
        if crc != record.crc:
            entry.crc = crc
            self._patched.append(entry)
        self._digest.update(_descriptor(crc, record.size))


def _descriptor(crc: int, size: int) -> bytes:
    if size >= _ZIP64_AT:
        return struct.pack("<IIQQ", 0x08074B50, crc, size, size)
    return struct.pack("<IIII", 0x08074B50, crc, size, size)


def _central(e: _Entry) -> bytes:
    zip64: list[int] = []
    size32 = e.size
    offset32 = e.offset
    if e.size >= _ZIP64_AT:
        zip64 += [e.size, e.size]
        size32 = 0xFFFFFFFF
    if e.offset >= _ZIP64_AT:
        zip64.append(e.offset)
        offset32 = 0xFFFFFFFF
    extra = struct.pack(f"<HH{len(zip64)}Q", 1, 8 * len(zip64), *zip64) if zip64 else b""
    return _CENTRAL.pack(0x02014B50, 0, 45 if zip64 else 0, e.flags, 0, 0, 0, e.crc, size32, size32, len(e.name),
                         len(extra), 0, 0, 0, 0, offset32) + e.name + extra


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _pread_exactly(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(errno.EIO, f"source record ended after {len(data)} of {size} bytes")
    return data


_KERNEL_COPY = hasattr(os, "copy_file_range")


def _copy_range(src: int, dst: int, offset: int, size: int) -> None:
    """Append ``size`` bytes of ``src`` from ``offset`` to ``dst``, in the kernel where it can."""
    global _KERNEL_COPY
    done = 0
    while done < size and _KERNEL_COPY:
        try:
            n = os.copy_file_range(src, dst, size - done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            _KERNEL_COPY = False
            break
        if n == 0:
            raise OSError(errno.EIO, f"source record ended after {done} of {size} bytes")
        done += n
    buf = bytearray(min(_CHUNK, size - done)) if done < size else bytearray()
    view = memoryview(buf)
    while done < size:
        n = os.preadv(src, [view[:min(len(buf), size - done)]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"source record ended after {done} of {size} bytes")
        _write_all(dst, view[:n])
        done += n
