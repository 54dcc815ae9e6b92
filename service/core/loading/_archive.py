"""Checks of zip archives: before torch's reader sees one (its central directory alone), and after a mapped load.

Nothing here unpickles anything, except `check_storage_records`' fallback, which loads on the ``meta`` device.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

from service.core.loading._pickle import read_torch_file
from service.core.pthzip import Record, StorageRecords
from service.core.types import DEFAULT_LIMITS, ArchiveLimits
from service.core.unpickle import Placeholder
from service.errors import ArchiveLimitExceeded, CorruptCheckpoint, quote_keys

__all__ = ["MAX_DATA_PKL_BYTES", "ZIP_LOCAL_MAGIC", "check_archive", "check_storage_records", "first_entry_name",
           "read_zip_directory"]

ZIP_LOCAL_MAGIC = b"PK\x03\x04"

_EOCD_MAGIC = b"PK\x05\x06"
_EOCD64_LOCATOR_MAGIC = b"PK\x06\x07"
_EOCD64_MAGIC = b"PK\x06\x06"
_EOCD_SIZE = 22
_CD_ENTRY_MIN_SIZE = 46  # a central directory record with an empty name
_LOCAL_HEADER_SIZE = 30
# torch reads data.pkl whole into memory; a state_dict needs ~100 bytes per tensor, so 1 GiB is generous.
MAX_DATA_PKL_BYTES = 1 << 30


def check_archive(path: Path, *, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
    """Vet a zip archive from its central directory alone, before torch's reader sees it.

    Checks the entry count (from the end record first, so a huge directory is refused before it is
    parsed), the total uncompressed size, the size of ``data.pkl`` (torch reads it whole, so at most
    `MAX_DATA_PKL_BYTES`), that every entry is STORED (torch never compresses; a deflated
    entry is how a decompression bomb works), unique and safe names (no absolute, ``..``, empty, backslash
    or NUL components), exactly one top-level folder, no data before the first entry, and entries that lie
    inside the file without overlapping.

    Args:
        path: The archive.
        limits: Entry count, total size and name length limits.

    Raises:
        ArchiveLimitExceeded: A limit is exceeded or an entry is compressed, encrypted or badly named.
        CorruptCheckpoint: The file is not a readable zip archive or its directory is inconsistent.
        OSError: The file cannot be opened or read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(4) != ZIP_LOCAL_MAGIC:
            raise CorruptCheckpoint("not a zip archive, or data precedes the archive")
        _check_declared_entry_count(f, size, limits)
        try:
            with zipfile.ZipFile(f) as zf:
                infos = zf.infolist()
                # Where the central directory starts (zipfile sets it while reading the directory).
                start_dir = getattr(zf, "start_dir", size)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, struct.error) as exc:
            raise CorruptCheckpoint(f"not a readable zip archive (truncated?): {exc}") from exc
    _check_infos(infos, limits, start_dir if isinstance(start_dir, int) else size)


def read_zip_directory(f: BinaryIO, size: int) -> list[zipfile.ZipInfo] | None:
    """The entries of a zip archive for detection, or None when its directory is too large or unreadable.

    A directory too large to parse cheaply is not read; `check_archive` refuses it later.
    """
    try:
        _check_declared_entry_count(f, size, DEFAULT_LIMITS)
        with zipfile.ZipFile(f) as zf:
            return zf.infolist()
    except (ArchiveLimitExceeded, CorruptCheckpoint, zipfile.BadZipFile, zipfile.LargeZipFile, ValueError,
            EOFError, struct.error):
        return None


def first_entry_name(f: BinaryIO) -> bytes | None:
    """The name in the local header at the start of the file, when the file opens with one."""
    f.seek(0)
    header = f.read(_LOCAL_HEADER_SIZE)
    if len(header) < _LOCAL_HEADER_SIZE or header[:4] != ZIP_LOCAL_MAGIC:
        return None
    return f.read(struct.unpack("<H", header[26:28])[0])


def _check_declared_entry_count(f: BinaryIO, size: int, limits: ArchiveLimits) -> None:
    # The end-of-central-directory record sits in the last 22 bytes plus an optional comment (<= 64 KiB).
    tail_len = min(size, _EOCD_SIZE + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(_EOCD_MAGIC)
    if at < 0 or at + _EOCD_SIZE > len(tail):
        raise CorruptCheckpoint("not a readable zip archive (no end of central directory; truncated?)")
    (_sig, _disk, _cd_disk, _n_disk, count, cd_size, _cd_offset, _comment) = struct.unpack(
        "<4s4H2LH", tail[at : at + _EOCD_SIZE]
    )
    if count == 0xFFFF or cd_size == 0xFFFFFFFF:
        count, cd_size = _zip64_counts(f, size - tail_len + at)
    # A lying count cannot make the parse more expensive than the directory's byte size allows.
    if min(count, cd_size // _CD_ENTRY_MIN_SIZE) > limits.max_entries:
        raise ArchiveLimitExceeded(
            f"archive declares {count} entries, more than the limit of {limits.max_entries}",
            limit=limits.max_entries,
        )


def _zip64_counts(f: BinaryIO, eocd_at: int) -> tuple[int, int]:
    if eocd_at < 20:
        raise CorruptCheckpoint("not a readable zip archive (bad zip64 end record)")
    f.seek(eocd_at - 20)
    locator = f.read(20)
    if locator[:4] != _EOCD64_LOCATOR_MAGIC:
        raise CorruptCheckpoint("not a readable zip archive (missing zip64 end record)")
    (record_at,) = struct.unpack("<Q", locator[8:16])
    f.seek(record_at)
    record = f.read(56)
    if len(record) < 56 or record[:4] != _EOCD64_MAGIC:
        raise CorruptCheckpoint("not a readable zip archive (bad zip64 end record)")
    count, cd_size = struct.unpack("<QQ", record[32:48])
    return int(count), int(cd_size)


def _check_infos(infos: list[zipfile.ZipInfo], limits: ArchiveLimits, start_dir: int) -> None:
    if not infos:
        raise CorruptCheckpoint("the zip archive has no entries")
    if len(infos) > limits.max_entries:
        raise ArchiveLimitExceeded(
            f"archive has {len(infos)} entries, more than the limit of {limits.max_entries}",
            limit=limits.max_entries,
        )
    seen: set[str] = set()
    duplicates: set[str] = set()
    tops: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        # orig_filename is the name as stored; zipfile's `filename` silently cuts it at a NUL byte.
        _check_name(info.orig_filename, limits)
        if name in seen:
            duplicates.add(name)
        seen.add(name)
        tops.add(name.split("/", 1)[0])
        if info.compress_type != zipfile.ZIP_STORED:
            raise ArchiveLimitExceeded(
                f"archive entry {name!r} is compressed; torch.save archives store entries uncompressed"
            )
        if info.flag_bits & 0x1:
            raise ArchiveLimitExceeded(f"archive entry {name!r} is encrypted")
        if info.compress_size != info.file_size:
            raise CorruptCheckpoint(f"archive entry {name!r} declares inconsistent sizes")
        if name.split("/")[1:] == ["data.pkl"] and info.file_size > MAX_DATA_PKL_BYTES:
            raise ArchiveLimitExceeded(
                f"archive entry {name!r} holds {info.file_size} bytes, more than {MAX_DATA_PKL_BYTES}",
                limit=MAX_DATA_PKL_BYTES,
            )
        total += info.file_size
    if duplicates:
        raise ArchiveLimitExceeded(f"archive has duplicate entries: {quote_keys(duplicates)}")
    if len(tops) != 1:
        raise ArchiveLimitExceeded(
            f"archive must have exactly one top-level folder, found {quote_keys(tops) or 'none'}"
        )
    if total > limits.max_total_bytes:
        raise ArchiveLimitExceeded(
            f"archive holds {total} bytes uncompressed, more than the limit of {limits.max_total_bytes}",
            limit=limits.max_total_bytes,
        )
    _check_extents(infos, start_dir)


def _check_name(name: str, limits: ArchiveLimits) -> None:
    if len(name) > limits.max_name_length:
        raise ArchiveLimitExceeded(f"archive entry name is longer than {limits.max_name_length} characters")
    parts = name.split("/")
    bad = (
        "\\" in name
        or "\x00" in name
        or name.startswith("/")
        or (len(parts[0]) == 2 and parts[0][1] == ":")  # a Windows drive
        or len(parts) < 2  # torch puts every entry under the archive folder
        or any(part in ("", ".", "..") for part in parts)
    )
    if bad:
        raise ArchiveLimitExceeded(f"archive entry name {name[:200]!r} is not allowed")


def _check_extents(infos: list[zipfile.ZipInfo], start_dir: int) -> None:
    # zipfile adds any bytes found before the archive to every offset: a first entry not at 0 means junk.
    ordered = sorted(infos, key=lambda i: i.header_offset)
    if ordered[0].header_offset != 0:
        raise CorruptCheckpoint("data precedes the zip archive")
    # Lower bounds of each entry's extent (the local extra field length is unknown without reading it):
    # if even those overlap, two entries share bytes, which is how overlapping-entry bombs amplify.
    previous_end = 0
    for info in ordered:
        if info.header_offset < previous_end:
            raise ArchiveLimitExceeded(f"archive entry {info.filename!r} overlaps another entry")
        stored_name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
        previous_end = info.header_offset + _LOCAL_HEADER_SIZE + len(stored_name) + info.file_size
        if previous_end > start_dir:
            raise CorruptCheckpoint(
                f"archive entry {info.filename!r} extends past the archive data (truncated?)"
            )


def check_storage_records(path: Path, obj: object, *, name: str, placeholders: bool,
                          allowed: Sequence[Any] = ()) -> StorageRecords | None:
    """Refuse storages that do not cover exactly one storage record of the archive; say which record each is.

    A memory-mapped load slices each storage out of the mapped file at its record's offset, with the byte size
    the pickle declares, and never compares that with the record's size (a plain load does): a storage longer
    than its record reads the bytes of the next entries. The storages of the mapped load are slices of one
    mapping, so their addresses, sorted, must line up with the records' offsets and sizes. Anything else
    (orphan records, exotic tensors whose storages are out of reach) is settled by a load on the meta device,
    which reads no data and tags each storage with its record offset.

    Args:
        path: The archive, already loaded memory-mapped.
        obj: What the mapped load returned.
        name: The format's name, for error messages.
        placeholders: ``obj`` came from the placeholder unpickler (else the weights-only loader).
        allowed: The allowlist of that weights-only load.

    Returns:
        Where each storage's record is in the file (by the storage's address), when the mapped storages line up
        with the records one to one; otherwise None (a save then writes them from memory).

    Raises:
        CorruptCheckpoint: A storage starts at no record, or is larger or smaller than its record.
    """
    records = _storage_records(path)
    extents = sorted({(s.data_ptr(), s.nbytes()) for s in _reachable_storages(obj) if s.nbytes()})
    layout = sorted((offset, size, crc) for offset, (_, size, crc) in records.items() if size)
    if len(extents) == len(layout) and all(
        ptr - extents[0][0] == offset - layout[0][0] and nbytes == size
        for (ptr, nbytes), (offset, size, _) in zip(extents, layout, strict=True)
    ):
        return StorageRecords(path, {ptr: Record(offset, size, crc)
                                     for (ptr, _), (offset, size, crc) in zip(extents, layout, strict=True)})
    try:
        meta = read_torch_file(path, name=name, legacy=False, mmap=False, placeholders=placeholders,
                               allowed=allowed, map_location="meta")
    except Exception:  # the real load succeeded; a failure of the meta-only load proves nothing
        return None
    for storage in _reachable_storages(meta):
        offset, nbytes = getattr(storage, "_checkpoint_offset", None), storage.nbytes()
        if not nbytes or not isinstance(offset, int):
            continue
        entry, size, _ = records.get(offset, ("", -1, 0))
        if not entry:
            raise CorruptCheckpoint(f"a storage of {nbytes} bytes starts at no storage record of the archive")
        if size != nbytes:
            raise CorruptCheckpoint(f"storage record {entry!r} holds {size} bytes but the pickle declares {nbytes}")
    return None


def _storage_records(path: Path) -> dict[int, tuple[str, int, int]]:
    # data offset -> (name, size, CRC-32) of each "<top>/data/<key>" entry. check_archive has already refused junk
    # before the archive, so zipfile's offsets are file offsets.
    out: dict[int, tuple[str, int, int]] = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if len(parts) != 3 or parts[1] != "data":
                continue
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) < 30:
                raise CorruptCheckpoint(f"archive entry {info.filename!r} is truncated")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            out[info.header_offset + 30 + name_len + extra_len] = (info.filename, info.file_size, info.CRC)
    return out


def _reachable_storages(obj: object) -> list[torch.UntypedStorage]:
    # Iterative, and each object once: a 200k-deep or shared-reference ("billion laughs") structure costs
    # its number of distinct objects, not its depth or its expanded size.
    out: list[torch.UntypedStorage] = []
    stack: list[object] = [obj]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            if item.layout == torch.strided:
                try:
                    out.append(item.untyped_storage())
                except (RuntimeError, NotImplementedError):
                    continue
        elif isinstance(item, torch.TypedStorage):
            out.append(item._untyped_storage)
        elif isinstance(item, torch.UntypedStorage):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(dict.values(item))
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, Placeholder):
            stack.extend((item.args, item.state, item.listitems))
            stack.extend(value for pair in item.dictitems for value in pair)
    return out

