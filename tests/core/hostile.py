"""Builders of hostile checkpoint files: each `make_xxx(path, ...) -> Path` writes one file and returns it.

Plain functions on purpose, so API tests can upload the same files. Nothing here unpickles anything. The
zip builders write archives by hand (`_write_zip`) because `zipfile` refuses or warns about exactly the
things we need (duplicate names, declared sizes we do not want to compress for real).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import struct
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "make_absolute_entry", "make_backslash_entry", "make_deflate_bomb", "make_dotdot_entry",
    "make_duplicate_entries", "make_empty", "make_garbage", "make_junk_prefix", "make_many_entries",
    "make_non_torch_zip", "make_nul_entry", "make_overlapping_entries", "make_rce_legacy",
    "make_rce_raw_pickle", "make_rce_zip", "make_safetensors_bad_dtype", "make_safetensors_header_too_long",
    "make_safetensors_offsets_beyond_file", "make_safetensors_overlapping", "make_text", "make_torchscript",
    "make_truncated", "make_two_top_level_folders",
]


class _Touch:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint does, made observable."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(3, 2).state_dict()


def _rce_payload(marker: Path) -> dict[str, object]:
    return {"state_dict": _state_dict(), "payload": _Touch(marker)}


def make_rce_zip(path: Path, marker: Path) -> Path:
    """A torch.save zip archive whose data.pkl calls os.system (GLOBAL posix.system)."""
    torch.save(_rce_payload(marker), path)
    return path


def make_rce_legacy(path: Path, marker: Path) -> Path:
    """The same payload in the legacy (non-zip) torch.save format."""
    torch.save(_rce_payload(marker), path, _use_new_zipfile_serialization=False)
    return path


def make_rce_raw_pickle(path: Path, marker: Path) -> Path:
    """A plain pickle (default protocol, so STACK_GLOBAL) of the payload, no torch framing at all."""
    path.write_bytes(pickle.dumps(_rce_payload(marker)))
    return path


def make_torchscript(path: Path) -> Path:
    """A TorchScript archive of a tiny module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated in 2.13
        torch.jit.script(nn.Linear(2, 2)).save(str(path))  # type: ignore[no-untyped-call]
    return path


def make_truncated(path: Path) -> Path:
    """A real zip checkpoint cut in half (the central directory is gone)."""
    data = _torch_zip_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def make_garbage(path: Path) -> Path:
    # Not starting like any format we detect (a random 0x80 / "PK" / "{" prefix would be a different test).
    path.write_bytes(b"\x00\xff" + os.urandom(4094))
    return path


def make_text(path: Path) -> Path:
    path.write_text("this is not a checkpoint\n" * 20)
    return path


def make_junk_prefix(path: Path) -> Path:
    """A valid zip checkpoint with bytes before it (zipfile tolerates that; torch's reader may not)."""
    path.write_bytes(b"JUNK" * 64 + _torch_zip_bytes())
    return path


def make_deflate_bomb(path: Path, *, declared_bytes: int = 1 << 30) -> Path:
    """A torch archive with DEFLATED entries plus one entry of `declared_bytes` zeros (~1000x smaller)."""
    entries = [_deflated(name, data) for name, data in _torch_zip_entries()]
    entries.append(_zeros_bomb("archive/data/bomb", declared_bytes))
    return _write_zip(path, entries)


def make_duplicate_entries(path: Path) -> Path:
    """Two `archive/data.pkl` entries: which one a reader uses differs between zip implementations."""
    entries = _torch_zip_entries()
    data_pkl = dict(entries)["archive/data.pkl"]
    return _write_zip(path, [*(_stored(n, d) for n, d in entries), _stored("archive/data.pkl", data_pkl)])


def make_dotdot_entry(path: Path) -> Path:
    return _with_extra_entry(path, "archive/../../evil")


def make_absolute_entry(path: Path) -> Path:
    return _with_extra_entry(path, "/tmp/evil")


def make_backslash_entry(path: Path) -> Path:
    return _with_extra_entry(path, "archive\\..\\evil")


def make_nul_entry(path: Path) -> Path:
    return _with_extra_entry(path, "archive/data/ev\x00il")


def make_two_top_level_folders(path: Path) -> Path:
    return _with_extra_entry(path, "other/data.pkl")


def make_many_entries(path: Path, *, count: int = 64) -> Path:
    """A real checkpoint plus `count` tiny extra entries (test with a small `ArchiveLimits.max_keys`)."""
    extra = [_stored(f"archive/extra/{i}", b"x") for i in range(count)]
    return _write_zip(path, [*(_stored(n, d) for n, d in _torch_zip_entries()), *extra])


def make_overlapping_entries(path: Path) -> Path:
    """Two central-directory records pointing at one local entry (how overlapping-entry bombs amplify)."""
    entries = [_stored(n, d) for n, d in _torch_zip_entries()]
    return _write_zip(path, entries, alias={"archive/data/alias": "archive/data/0"})


def make_non_torch_zip(path: Path) -> Path:
    return _write_zip(path, [_stored("archive/readme.txt", b"hello")])


def make_safetensors_offsets_beyond_file(path: Path) -> Path:
    """A header declaring 4000 data bytes for a tensor, with 16 bytes present."""
    header = {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    return _write_safetensors(path, header, b"\x00" * 16)


def make_safetensors_header_too_long(path: Path) -> Path:
    """A header length (1 MB) larger than the whole file."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", 1_000_000) + header + b"\x00" * 4)
    return path


def make_safetensors_overlapping(path: Path) -> Path:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    return _write_safetensors(path, header, b"\x00" * 24)


def make_safetensors_bad_dtype(path: Path) -> Path:
    header = {"a": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}
    return _write_safetensors(path, header, b"\x00" * 16)


def _write_safetensors(path: Path, header: Mapping[str, object], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _torch_zip_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(_state_dict(), buffer)  # a buffer: the archive folder is "archive"
    return buffer.getvalue()


def _torch_zip_entries() -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(_torch_zip_bytes())) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


@dataclass(frozen=True)
class _Entry:
    name: str
    payload: bytes  # as stored in the file: compressed for DEFLATED
    crc: int
    size: int  # uncompressed
    method: int = zipfile.ZIP_STORED


def _stored(name: str, data: bytes) -> _Entry:
    return _Entry(name, data, zlib.crc32(data), len(data))


def _deflated(name: str, data: bytes) -> _Entry:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as zip wants
    return _Entry(name, compressor.compress(data) + compressor.flush(), zlib.crc32(data), len(data),
                  zipfile.ZIP_DEFLATED)


def _zeros_bomb(name: str, size: int) -> _Entry:
    # After a full flush the compressor state resets, so every 1 MiB block of zeros compresses to the
    # same bytes: compress one block and repeat it instead of compressing `size` bytes.
    block = 1 << 20
    if size % block:
        raise ValueError("declared_bytes must be a multiple of 1 MiB")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(block)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    payload = first * (size // block) + compressor.flush()
    return _Entry(name, payload, _crc_of_zeros(size), size, zipfile.ZIP_DEFLATED)


@cache
def _crc_of_zeros(size: int) -> int:
    crc, zeros = 0, bytes(1 << 20)
    for _ in range(size // len(zeros)):
        crc = zlib.crc32(zeros, crc)
    return crc


def _with_extra_entry(path: Path, name: str) -> Path:
    return _write_zip(path, [*(_stored(n, d) for n, d in _torch_zip_entries()), _stored(name, b"x")])


def _write_zip(path: Path, entries: list[_Entry], *, alias: dict[str, str] | None = None) -> Path:
    # Local headers + data, then the central directory, then the end record; no zip64, no extras.
    offsets: dict[str, int] = {}
    directory = bytearray()
    with open(path, "wb") as f:
        for entry in entries:
            name = entry.name.encode()
            offsets.setdefault(entry.name, f.tell())
            f.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0x800, entry.method, 0, 0x21,
                                entry.crc, len(entry.payload), entry.size, len(name), 0))
            f.write(name + entry.payload)
            directory += _directory_record(entry, name, f.tell() - len(entry.payload) - len(name) - 30)
        by_name = {e.name: e for e in entries}
        for new_name, target in (alias or {}).items():
            directory += _directory_record(by_name[target], new_name.encode(), offsets[target])
        count = len(entries) + len(alias or {})
        cd_offset = f.tell()
        f.write(directory)
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(directory), cd_offset, 0))
    return path


def _directory_record(entry: _Entry, name: bytes, offset: int) -> bytes:
    return struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0x800, entry.method, 0, 0x21, entry.crc,
                       len(entry.payload), entry.size, len(name), 0, 0, 0, 0, 0, offset) + name
