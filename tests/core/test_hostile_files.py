"""Every hostile file gives one domain error with a short message; none runs code, crashes or hangs."""

from __future__ import annotations

import io
import pickletools
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from service.core.formats import Format, check_archive, detect_format
from service.core.load import load_checkpoint
from service.core.types import ArchiveLimits
from service.errors import (
    ArchiveLimitExceeded,
    CorruptCheckpoint,
    InvalidCheckpoint,
    UnsafeCheckpoint,
    UnsupportedFormat,
)
from tests.core import hostile

pytestmark = pytest.mark.timeout(120)

RCE_BUILDERS = {
    "zip": hostile.make_rce_zip,
    "legacy": hostile.make_rce_legacy,
    "raw-pickle": hostile.make_rce_raw_pickle,
}


def assert_short_domain_error(error: InvalidCheckpoint) -> None:
    assert error.detail and len(error.detail) < 300
    assert "Traceback" not in error.detail and "\n" not in error.detail


@pytest.mark.parametrize("form", sorted(RCE_BUILDERS))
def test_code_execution_payload_never_runs(tmp_path: Path, form: str) -> None:
    marker = tmp_path / "MARKER"
    path = RCE_BUILDERS[form](tmp_path / "evil.pth", marker)
    # The control: the file really does reference os.system (statically, nothing is executed).
    assert "system" in _pickle_globals_text(path, form)

    with pytest.raises(UnsafeCheckpoint) as info:
        load_checkpoint(path)

    assert not marker.exists()
    assert {"posix.system", "os.system"} & set(info.value.unsafe_globals)
    assert "system" in info.value.detail
    assert_short_domain_error(info.value)


def test_code_execution_payload_is_refused_even_with_an_allowlist(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = hostile.make_rce_zip(tmp_path / "evil.pth", marker)

    with pytest.raises(UnsafeCheckpoint):
        load_checkpoint(path, safe_globals=["argparse.Namespace"])

    assert not marker.exists()


def test_torchscript_is_unsupported(tmp_path: Path) -> None:
    path = hostile.make_torchscript(tmp_path / "scripted.pt")

    assert detect_format(path).name == "torchscript"
    with pytest.raises(UnsupportedFormat, match="TorchScript") as info:
        load_checkpoint(path)
    assert "state_dict" in info.value.detail


@pytest.mark.parametrize(("builder", "fragment"), [
    (hostile.make_truncated, "truncated"),
    (hostile.make_empty, "empty"),
    (hostile.make_garbage, "unrecognised"),
    (hostile.make_text, "text"),
    (hostile.make_junk_prefix, "precedes"),
    (hostile.make_non_torch_zip, "data.pkl"),
    (hostile.make_safetensors_offsets_beyond_file, "outside"),
    (hostile.make_safetensors_header_too_long, "claims"),
    (hostile.make_safetensors_overlapping, "overlap"),
])
def test_damaged_files_are_corrupt(tmp_path: Path, builder: Callable[[Path], Path], fragment: str) -> None:
    path = builder(tmp_path / "damaged.bin")

    with pytest.raises(CorruptCheckpoint) as info:
        load_checkpoint(path)

    assert fragment in info.value.detail
    assert_short_domain_error(info.value)


def test_safetensors_with_an_unknown_dtype_is_unsupported(tmp_path: Path) -> None:
    path = hostile.make_safetensors_bad_dtype(tmp_path / "bad.safetensors")

    with pytest.raises(UnsupportedFormat, match="F99"):
        load_checkpoint(path)


def test_deflate_bomb_is_refused_from_the_directory(tmp_path: Path) -> None:
    path = hostile.make_deflate_bomb(tmp_path / "bomb.pth")
    # The control: a real zip whose bomb entry really inflates to zeros, ~1000x its stored size.
    with zipfile.ZipFile(path) as zf:
        bomb = zf.getinfo("archive/data/bomb")
        assert bomb.file_size == 1 << 30 and bomb.compress_size < bomb.file_size // 500
        with zf.open(bomb) as stream:
            assert stream.read(1 << 16) == bytes(1 << 16)

    with pytest.raises(ArchiveLimitExceeded, match="compressed") as info:
        load_checkpoint(path)

    assert_short_domain_error(info.value)


@pytest.mark.parametrize(("builder", "fragment"), [
    (hostile.make_duplicate_entries, "duplicate"),
    (hostile.make_dotdot_entry, "not allowed"),
    (hostile.make_absolute_entry, "not allowed"),
    (hostile.make_backslash_entry, "not allowed"),
    (hostile.make_nul_entry, "not allowed"),
    (hostile.make_two_top_level_folders, "top-level"),
    (hostile.make_overlapping_entries, "overlaps"),
])
def test_bad_archive_layouts_are_refused(
    tmp_path: Path, builder: Callable[[Path], Path], fragment: str
) -> None:
    path = builder(tmp_path / "bad.pth")
    # The control: Python's zipfile reads the archive; only our pre-check objects.
    with zipfile.ZipFile(path) as zf:
        assert "archive/data.pkl" in zf.namelist()

    with pytest.raises(ArchiveLimitExceeded, match=fragment) as info:
        load_checkpoint(path)

    assert_short_domain_error(info.value)


def test_too_many_entries(tmp_path: Path) -> None:
    # A zip may hold max_keys entries plus a few records of torch's own.
    path = hostile.make_many_entries(tmp_path / "many.pth", count=200)

    with pytest.raises(ArchiveLimitExceeded, match="entries"):
        load_checkpoint(path, limits=ArchiveLimits(max_keys=20))
    # Within the limit the same archive is a fine checkpoint (the extra entries are ignored by torch).
    assert load_checkpoint(path, limits=ArchiveLimits(max_keys=200)).state_dict


def test_total_size_limit(tmp_path: Path) -> None:
    path = hostile.make_many_entries(tmp_path / "many.pth", count=0)

    with pytest.raises(ArchiveLimitExceeded, match="bytes"):
        check_archive(path, limits=ArchiveLimits(max_total_bytes=16))
    check_archive(path)


def test_check_archive_refuses_a_junk_prefix_directly(tmp_path: Path) -> None:
    path = hostile.make_junk_prefix(tmp_path / "junk.pth")

    with pytest.raises(CorruptCheckpoint):
        check_archive(path)


@pytest.mark.parametrize("name", sorted(n for n in hostile.__all__ if not n.startswith("make_rce")))
def test_detect_format_never_raises_on_hostile_files(tmp_path: Path, name: str) -> None:
    path = getattr(hostile, name)(tmp_path / "file.bin")

    assert isinstance(detect_format(path), Format)


def _pickle_globals_text(path: Path, form: str) -> str:
    if form == "zip":
        return " ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    # Legacy files are several pickles in a row (magic, protocol, sys info, object); genops stops at each
    # STOP, so reading on from the same stream walks them one by one.
    stream = io.BytesIO(path.read_bytes())
    words: list[str] = []
    for _ in range(4 if form == "legacy" else 1):
        for op, arg, _pos in pickletools.genops(stream):
            if "GLOBAL" in op.name or op.name.endswith("UNICODE"):
                words.append(str(arg))
    return " ".join(words)
