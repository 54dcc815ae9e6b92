"""service.core.sharding: the index, the checks, the split and the safetensors header, against safetensors itself."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from service.core.formats import detect_format
from service.core.load import load_checkpoint
from service.core.manifest import dtype_name
from service.core.sharding import (
    SafetensorsEntry,
    check_shards,
    iter_tensor_bytes,
    parse_index,
    parse_size,
    plan_shards,
    safetensors_code,
    safetensors_header,
)
from service.errors import InconsistentShards, InvalidRequest, UnconvertibleCheckpoint

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint64, torch.uint32, torch.uint16, torch.uint8, torch.bool, torch.complex64,
          torch.float8_e4m3fn, torch.float8_e5m2]


def assemble(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    entries = [SafetensorsEntry(k, str(safetensors_code(dtype_name(t.dtype))), tuple(t.shape),
                                t.numel() * t.element_size()) for k, t in tensors.items()]
    header, order = safetensors_header(entries, metadata=metadata)
    out = io.BytesIO(header)
    out.seek(0, io.SEEK_END)
    for entry in order:
        for chunk in iter_tensor_bytes(tensors[entry.key], chunk=7):
            out.write(chunk)
    return out.getvalue()


def test_a_header_and_the_bytes_in_its_order_are_what_safetensors_writes() -> None:
    torch.manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for i, dtype in enumerate(DTYPES):
        base = torch.randn(3, 5, dtype=torch.complex64) if dtype.is_complex else torch.randn(3, 5) * 10
        tensors[f"block.{i}.w\u00e9\n\"\\"] = base.to(dtype)
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["transposed"] = torch.arange(12.0).reshape(3, 4).t()  # not contiguous: copied on the way out
    # One metadata entry: safetensors writes several in a random order (a Rust HashMap).
    expected = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    assert assemble(tensors, {"format": "pt"}) == expected
    assert assemble(tensors) == safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()})


def test_a_header_refuses_what_safetensors_cannot_hold() -> None:
    assert safetensors_code("complex128") is None and safetensors_code("qint8") is None
    with pytest.raises(UnconvertibleCheckpoint, match="__metadata__"):
        safetensors_header([SafetensorsEntry("__metadata__", "F32", (1,), 4)])
    with pytest.raises(UnconvertibleCheckpoint):
        safetensors_header([SafetensorsEntry("w", "C128", (1,), 16)])


def test_plan_shards_is_greedy_in_key_order() -> None:
    sizes = [("a", 3), ("b", 3), ("big", 10), ("c", 2), ("d", 2), ("e", 5)]
    # a; b opens a new shard; big is alone (the open shard stays open); c joins b; d does not fit; e alone fits.
    assert plan_shards(sizes, max_shard_size=5) == [["a"], ["big"], ["b", "c"], ["d"], ["e"]]
    assert plan_shards(sizes, max_shard_size=100) == [["a", "b", "big", "c", "d", "e"]]
    assert plan_shards([], max_shard_size=5) == []
    assert plan_shards(sizes, max_shard_size=5) == plan_shards(list(sizes), max_shard_size=5)


@pytest.mark.parametrize(("text", "expected"), [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("50KB", 50_000), ("2GiB", 2 << 30), ("1.5 MiB", 3 << 19),
    (" 7tb ", 7 * 10**12), ("123", 123), (4096, 4096), ("10B", 10),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1", "0", "0.1B", "1e3", "5 G B", "nan", "1" * 400 + "GB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_size(text)


def index(weight_map: dict[str, str]) -> bytes:
    return json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}).encode()


def test_parse_index() -> None:
    parsed = parse_index(index({"a": "s1", "b": "s2", "c": "s1"}), max_keys=10)
    assert parsed.filenames == ["s1", "s2"] and parsed.metadata == {"total_size": 0}
    for raw, message in [
        (b"[]", "weight_map"),
        (b"{\"weight_map\": []}", "weight_map"),
        (b"\xff", "not valid JSON"),
        (b'{"weight_map": ' + b"[" * 100_000, "nested too deeply"),
        (b'{"weight_map": {"a": "s", "a": "t"}}', "given twice: 'a'"),
        (index({"a": 3}), "must be file names: 'a'"),  # type: ignore[dict-item]
        (index({"a": "../s"}), "not a plain file name"),
        (index({"a": "dir/s"}), "not a plain file name"),
        (index({"a": "s\x00"}), "not a plain file name"),
        (index({f"k{i}": "s" for i in range(301)}), "301 keys, more than the limit of 300"),
        (index({f"k{i}": f"s{i}" for i in range(257)}), "257 files, more than 256"),
    ]:
        with pytest.raises(InconsistentShards, match=message):
            parse_index(raw, max_keys=300)


def test_check_shards() -> None:
    idx = parse_index(index({"a": "s1", "b": "s1", "c": "s2"}), max_keys=10)
    check_shards([("s2", ["c"]), ("s1", ["a", "b"])], idx)
    check_shards([("x", ["a"]), ("y", ["b"])], None)
    cases = [
        ([("s1", ["a", "b"])], {"missing_files": ["s2"]}),
        ([("s1", ["a", "b"]), ("s2", ["c"]), ("s3", ["d"])], {"unexpected_files": ["s3"], "unexpected_keys": ["d"]}),
        ([("s1", ["a"]), ("s2", ["b", "c"])], {"misplaced_keys": ["b"]}),
        ([("s1", ["a", "b"]), ("s2", ["c", "a"])], {"misplaced_keys": ["a"]}),
        ([("s1", ["a"]), ("s2", ["c"])], {"missing_keys": ["b"]}),
        ([("s1", ["a", "b", "z"]), ("s2", ["c"])], {"unexpected_keys": ["z"]}),
    ]
    for shards, expected in cases:
        with pytest.raises(InconsistentShards) as info:
            check_shards(shards, idx)
        assert {k: v for k, v in info.value.extensions.items() if k != "limit"} == expected, shards
    with pytest.raises(InconsistentShards, match="sent twice") as info:
        check_shards([("s1", ["a", "b"]), ("s1", ["a", "b"]), ("s2", ["c"])], idx)
    assert info.value.extensions == {"files": ["s1"]}
    with pytest.raises(InconsistentShards) as info:
        check_shards([("x", ["a", "b"]), ("y", ["b"]), ("z", ["c"])], None)
    assert info.value.extensions == {"overlapping_keys": ["b"], "files": ["x", "y"]}


def test_a_safetensors_header_that_starts_like_a_pickle_is_still_safetensors(tmp_path: Path) -> None:
    # 0x280 bytes of header: the file opens with 80 02, a pickle's PROTO 2. Detection must not call it a pickle.
    tensors = {"w": torch.ones(2)}
    entry_len = len(safetensors.torch.save(tensors)) - 8 - 8
    padding = 0x280 - entry_len - len(',"__metadata__":{"p":""}')
    data = safetensors.torch.save(tensors, metadata={"p": "x" * padding})
    assert data[:2] == b"\x80\x02", data[:8].hex()
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    assert detect_format(path).name == "safetensors"
    assert torch.equal(load_checkpoint(path).state_dict["w"], torch.ones(2))
