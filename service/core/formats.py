"""Recognise checkpoint files by their bytes, and vet zip archives before torch reads them.

Nothing here unpickles anything: detection reads magic numbers, the zip central directory and, for legacy
files, the first opcodes of the first pickle (`pickletools.genops` only parses).
"""

from __future__ import annotations

import io
import os
import pickletools
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from service.core.types import ArchiveLimits, CheckpointFormat
from service.errors import ArchiveLimitExceeded, CorruptCheckpoint, quote_keys

__all__ = ["DEFAULT_LIMITS", "LEGACY_MAGIC_NUMBER", "MAX_DATA_PKL_BYTES", "check_archive", "detect_format"]

# ArchiveLimits is frozen, so one shared default instance is safe (and keeps ruff's B008 quiet).
DEFAULT_LIMITS = ArchiveLimits()

ZIP_LOCAL_MAGIC = b"PK\x03\x04"
# torch.serialization.MAGIC_NUMBER: the first pickle of every legacy (non-zip) torch.save file.
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
# safetensors refuses headers above 100 MB itself; anything larger is not a safetensors file.
SAFETENSORS_MAX_HEADER = 100_000_000

_EOCD_MAGIC = b"PK\x05\x06"
_EOCD64_LOCATOR_MAGIC = b"PK\x06\x07"
_EOCD64_MAGIC = b"PK\x06\x06"
_EOCD_SIZE = 22
_CD_ENTRY_MIN_SIZE = 46  # a central directory record with an empty name
_LOCAL_HEADER_SIZE = 30
# torch reads data.pkl whole into memory; a state_dict needs ~100 bytes per tensor, so 1 GiB is generous.
MAX_DATA_PKL_BYTES = 1 << 30


def detect_format(path: Path) -> CheckpointFormat:
    """Tell what a checkpoint file is from its content; the file name is never consulted.

    A zip (``PK\\x03\\x04`` at byte 0) is TorchScript when it has ``<top>/code/`` or ``<top>/constants.pkl``
    entries and a torch.save archive when it has ``<top>/data.pkl``. A zip whose central directory cannot be
    read is reported as ``PTH_ZIP`` so that `check_archive` names the damage. A pickle whose first object is
    torch's legacy magic number is ``PTH_LEGACY``. Any other pickle is ``UNKNOWN`` on purpose: torch would
    reject it anyway, and not handing arbitrary pickles to an unpickler at all is the safer default.
    A safetensors file has a sane 8-byte little-endian header length followed by ``{``.

    Args:
        path: The file to inspect.

    Returns:
        The detected format, ``UNKNOWN`` when nothing matches (including an empty file).

    Raises:
        OSError: The file cannot be opened or read.
    """
    with open(path, "rb") as f:
        head = f.read(64)
        size = os.fstat(f.fileno()).st_size
        if head.startswith(ZIP_LOCAL_MAGIC):
            return _detect_zip_format(f, size)
    if is_pickle_start(head) and _is_legacy_torch(head):
        return CheckpointFormat.PTH_LEGACY
    # Before the pickle test: a header of 0x280, 0x380, 0x480 or 0x580 bytes makes a safetensors file start with
    # what looks like a pickle's PROTO opcode (80 02..05).
    if _safetensors_header_length(head, size) is not None:
        return CheckpointFormat.SAFETENSORS
    return CheckpointFormat.UNKNOWN


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


def is_pickle_start(head: bytes) -> bool:
    """Whether the bytes open with a PROTO opcode of protocol 2 to 5 (what torch.save and pickle write)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def safetensors_header_claim(head: bytes) -> int | None:
    """The header length a safetensors-looking file declares (8 bytes LE then ``{``), sane or not."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    return int.from_bytes(head[:8], "little")


def _safetensors_header_length(head: bytes, size: int) -> int | None:
    claimed = safetensors_header_claim(head)
    if claimed is None or claimed >= SAFETENSORS_MAX_HEADER or claimed + 8 > size:
        return None
    return claimed


def _is_legacy_torch(head: bytes) -> bool:
    # The first pickle of a legacy file is just the magic number: PROTO, (FRAME,) LONG1 magic, STOP.
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(head)):
            if op.name in ("PROTO", "FRAME"):
                continue
            return op.name == "LONG1" and arg == LEGACY_MAGIC_NUMBER
    except (ValueError, EOFError, struct.error):
        return False
    return False


def _detect_zip_format(f: BinaryIO, size: int) -> CheckpointFormat:
    try:
        # A directory too large to parse cheaply is not classified; check_archive refuses it later.
        _check_declared_entry_count(f, size, DEFAULT_LIMITS)
        with zipfile.ZipFile(f) as zf:
            names = zf.namelist()
    except (ArchiveLimitExceeded, CorruptCheckpoint, zipfile.BadZipFile, zipfile.LargeZipFile, ValueError,
            EOFError, struct.error):
        return CheckpointFormat.PTH_ZIP
    return classify_zip_names(names)


def classify_zip_names(names: Sequence[str]) -> CheckpointFormat:
    """Classify a zip by entry names: TorchScript, torch.save archive, or neither."""
    has_data_pkl = False
    for name in names:
        parts = name.split("/")
        if len(parts) >= 2 and (parts[1] == "code" or parts[1:] == ["constants.pkl"]):
            return CheckpointFormat.TORCHSCRIPT
        if parts[1:] == ["data.pkl"]:
            has_data_pkl = True
    return CheckpointFormat.PTH_ZIP if has_data_pkl else CheckpointFormat.UNKNOWN


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
