"""The archive writer: torch's bytes, storages copied from the files they were mapped from, CRCs checked."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from service.core import pthzip
from service.core.load import load_checkpoint
from service.core.save import save_checkpoint_hashed

BIG = 1 << 20  # pthzip copies records of at least this size in the kernel


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write(obj: object, path: Path, sources: list[pthzip.StorageRecords] | None = None) -> tuple[str, int]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        return pthzip.write_pth(obj, fd, sources or [])
    finally:
        os.close(fd)


def _state_dicts() -> dict[str, OrderedDict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.complex64,
              torch.float8_e4m3fn, torch.float8_e5m2]
    every_dtype: OrderedDict[str, torch.Tensor] = OrderedDict(
        (f"t{i}", torch.randn(3, 5, generator=g).to(dt)) for i, dt in enumerate(dtypes))
    base = torch.randn(300, 1000, generator=g)  # 1.2 MB: over the kernel-copy size
    views: OrderedDict[str, torch.Tensor] = OrderedDict(
        whole=base, row=base[7], transposed=base.t(), strided=base[::3, 5:], scalar=torch.tensor(2.5),
        empty=torch.empty(0), empty2d=torch.empty(0, 4, dtype=torch.int64))
    views._metadata = OrderedDict({"": {"version": 1}, "layer": {"version": 2}})  # type: ignore[attr-defined]
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4)).state_dict()
    return {"every_dtype": every_dtype, "views": views, "module": model}


@pytest.mark.parametrize("name", list(_state_dicts()))
def test_the_archive_is_torch_save_byte_for_byte_up_to_its_id(tmp_path: Path, name: str) -> None:
    sd = _state_dicts()[name]
    digest, size = _write(sd, tmp_path / "ours.pth")
    ours = (tmp_path / "ours.pth").read_bytes()
    theirs = _torch_bytes(sd)
    assert (digest, size) == (hashlib.sha256(ours).hexdigest(), len(ours))
    ours_zip, theirs_zip = zipfile.ZipFile(io.BytesIO(ours)), zipfile.ZipFile(io.BytesIO(theirs))
    layout = [(i.filename, i.header_offset, i.file_size, i.flag_bits) for i in ours_zip.infolist()]
    assert layout == [(i.filename, i.header_offset, i.file_size, i.flag_bits) for i in theirs_zip.infolist()]
    assert ours_zip.testzip() is None
    # torch's serialization id hashes the record names with std::hash; everything before it is identical.
    last = ours_zip.getinfo("archive/.data/serialization_id")
    assert ours[:last.header_offset] == theirs[:last.header_offset]
    assert len(ours_zip.read(last)) == 40 and ours_zip.read(last).isdigit()


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_loads_it_back_with_views_shared_and_metadata(tmp_path: Path, mmap: bool) -> None:
    sd = _state_dicts()["views"]
    _write(sd, tmp_path / "ours.pth")
    back = torch.load(tmp_path / "ours.pth", weights_only=True, mmap=mmap)
    assert list(back) == list(sd)
    for key, tensor in sd.items():
        assert torch.equal(back[key], tensor) and back[key].stride() == tensor.stride(), key
    assert back["row"].untyped_storage().data_ptr() == back["whole"].untyped_storage().data_ptr()
    assert back._metadata == sd._metadata  # type: ignore[attr-defined]


def _mapped_source(tmp_path: Path) -> tuple[Path, OrderedDict[str, torch.Tensor]]:
    sd: OrderedDict[str, torch.Tensor] = OrderedDict(
        big=torch.arange(BIG // 4 * 2, dtype=torch.float32), small=torch.arange(10.0), other=torch.ones(3, 3))
    sd["big_view"] = sd["big"][100:200]
    path = tmp_path / "source.pth"
    path.write_bytes(_torch_bytes(sd))
    return path, sd


def test_storages_of_a_mapped_load_are_copied_from_the_file_not_memory(tmp_path: Path) -> None:
    path, original = _mapped_source(tmp_path)
    loaded = load_checkpoint(path, mmap=True)
    assert loaded.records is not None and len(loaded.records.by_address) == 3
    # The mapping is private: writing to it changes memory only. A file-to-file copy still writes the file's
    # bytes, which shows where each record came from (the contract is that callers never do this).
    for key in ("big", "small", "other"):  # one per storage ("big_view" shares big's)
        loaded.state_dict[key].add_(1000)
    _write(loaded.state_dict, tmp_path / "copied.pth", [loaded.records])
    _write(loaded.state_dict, tmp_path / "from_memory.pth")
    copied = torch.load(tmp_path / "copied.pth", weights_only=True)
    from_memory = torch.load(tmp_path / "from_memory.pth", weights_only=True)
    for key in original:
        assert torch.equal(copied[key], original[key]), key
        assert torch.equal(from_memory[key], original[key] + 1000), key


def test_a_copied_archive_is_the_same_bytes_as_one_written_from_memory(tmp_path: Path) -> None:
    path, _ = _mapped_source(tmp_path)
    loaded = load_checkpoint(path, mmap=True)
    assert loaded.records is not None
    digest_copied, _ = _write(loaded.state_dict, tmp_path / "a.pth", [loaded.records])
    digest_memory, _ = _write(loaded.state_dict, tmp_path / "b.pth")
    assert (tmp_path / "a.pth").read_bytes() == (tmp_path / "b.pth").read_bytes()
    assert digest_copied == digest_memory == hashlib.sha256((tmp_path / "a.pth").read_bytes()).hexdigest()


def test_the_source_may_be_renamed_or_unlinked_after_loading(tmp_path: Path) -> None:
    path, original = _mapped_source(tmp_path)
    loaded = load_checkpoint(path, mmap=True)
    assert loaded.records is not None
    path.rename(tmp_path / "moved.pth")
    (tmp_path / "moved.pth").unlink()
    _write(loaded.state_dict, tmp_path / "out.pth", [loaded.records])
    out = torch.load(tmp_path / "out.pth", weights_only=True)
    assert all(torch.equal(out[k], original[k]) for k in original)


def _corrupt_central_crc(path: Path, member: str) -> None:
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo(member)
    at = data.index(member.encode(), data.index(b"PK\x01\x02")) - 46  # its central directory header
    assert data[at:at + 4] == b"PK\x01\x02"
    struct.pack_into("<I", data, at + 16, info.CRC ^ 0xFFFF)
    path.write_bytes(bytes(data))


def test_a_wrong_crc_in_the_source_is_corrected_not_copied(tmp_path: Path) -> None:
    path, original = _mapped_source(tmp_path)
    _corrupt_central_crc(path, "archive/data/0")  # the big record: copied in the kernel
    assert zipfile.ZipFile(path).testzip() == "archive/data/0"
    loaded = load_checkpoint(path, mmap=True)
    assert loaded.records is not None
    digest, size = _write(loaded.state_dict, tmp_path / "out.pth", [loaded.records])
    out_bytes = (tmp_path / "out.pth").read_bytes()
    assert zipfile.ZipFile(tmp_path / "out.pth").testzip() is None
    assert (digest, size) == (hashlib.sha256(out_bytes).hexdigest(), len(out_bytes))
    assert out_bytes == _write_plain(original, tmp_path)
    for mmap in (False, True):
        out = torch.load(tmp_path / "out.pth", weights_only=True, mmap=mmap)
        assert all(torch.equal(out[k], original[k]) for k in original)


def _write_plain(sd: OrderedDict[str, torch.Tensor], tmp_path: Path) -> bytes:
    _write(sd, tmp_path / "plain.pth")
    return (tmp_path / "plain.pth").read_bytes()


def test_zip64_fields_are_read_by_torch_and_zipfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Offsets and sizes past 4 GiB need zip64 fields; forcing them for every entry tests their encoding
    # without writing 4 GiB.
    path, original = _mapped_source(tmp_path)
    loaded = load_checkpoint(path, mmap=True)
    assert loaded.records is not None
    monkeypatch.setattr(pthzip, "_ZIP64_AT", 0)
    _write(loaded.state_dict, tmp_path / "out.pth", [loaded.records])
    archive = zipfile.ZipFile(tmp_path / "out.pth")
    assert archive.testzip() is None
    assert all(info.extract_version == 45 for info in archive.infolist())
    for mmap in (False, True):
        out = torch.load(tmp_path / "out.pth", weights_only=True, mmap=mmap)
        assert all(torch.equal(out[k], original[k]) for k in original)


def test_the_store_save_uses_the_records_and_still_verifies_every_byte(tmp_path: Path) -> None:
    path, original = _mapped_source(tmp_path)
    loaded = load_checkpoint(path, mmap=True)
    assert loaded.records is not None
    digest, size = save_checkpoint_hashed(loaded.state_dict, tmp_path / "saved.pth", sources=[loaded.records])
    saved = (tmp_path / "saved.pth").read_bytes()
    assert (digest, size) == (hashlib.sha256(saved).hexdigest(), len(saved))
    again = load_checkpoint(tmp_path / "saved.pth")
    assert all(torch.equal(again.state_dict[k], original[k]) for k in original)


def test_without_torchs_private_save_the_public_one_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = _state_dicts()["views"]
    monkeypatch.setattr(pthzip, "available", lambda: False)
    digest, size = save_checkpoint_hashed(sd, tmp_path / "saved.pth")
    saved = (tmp_path / "saved.pth").read_bytes()
    assert (digest, size) == (hashlib.sha256(saved).hexdigest(), len(saved))
    back = torch.load(tmp_path / "saved.pth", weights_only=True)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_this_torch_has_the_private_save_we_rely_on() -> None:
    assert pthzip.available()


def test_a_plain_state_dict_is_pickled_without_torchs_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = _state_dicts()["every_dtype"]
    reference = _torch_bytes(sd)

    def refuse(*args: object) -> None:
        raise AssertionError("torch.serialization._save was used")

    monkeypatch.setattr(torch.serialization, "_save", refuse)
    _write(sd, tmp_path / "ours.pth")
    ours = (tmp_path / "ours.pth").read_bytes()
    last = zipfile.ZipFile(io.BytesIO(ours)).getinfo("archive/.data/serialization_id")
    assert ours[:last.header_offset] == reference[:last.header_offset]


def test_anything_else_is_pickled_by_torch(tmp_path: Path) -> None:
    sd: OrderedDict[str, object] = OrderedDict(w=torch.ones(3), p=torch.nn.Parameter(torch.zeros(2)), n=5)
    reference = _torch_bytes(sd)
    _write(sd, tmp_path / "ours.pth")
    ours = (tmp_path / "ours.pth").read_bytes()
    last = zipfile.ZipFile(io.BytesIO(ours)).getinfo("archive/.data/serialization_id")
    assert ours[:last.header_offset] == reference[:last.header_offset]
    back = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert isinstance(back["p"], torch.nn.Parameter) and back["n"] == 5


def test_one_storage_viewed_as_two_dtypes_is_refused_as_torch_refuses_it(tmp_path: Path) -> None:
    base = torch.zeros(4)
    sd = OrderedDict(f=base, i=base.view(torch.int32))
    with pytest.raises(RuntimeError, match="view the same data as different types"):
        torch.save(sd, io.BytesIO())
    with pytest.raises(RuntimeError, match="view the same data as different types"):
        _write(sd, tmp_path / "ours.pth")
