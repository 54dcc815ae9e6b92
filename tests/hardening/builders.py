"""More hostile files, next to `tests.core.hostile` (reused as is): each `make_xxx(path, ...) -> Path`.

Nothing here unpickles anything. Builders that need a torch archive with one thing changed start from a real
`torch.save` archive and rewrite it with `hostile`'s hand-made zip writer.
"""

from __future__ import annotations

import io
import os
import pickle
import shlex
import struct
import subprocess
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.core import hostile
from tests.core.hostile import _deflated, _stored, _torch_zip_entries, _write_zip, _zeros_bomb

PAYLOAD_KINDS = ("os.system", "exec", "eval", "subprocess.Popen")
PAYLOAD_FORMS = ("zip", "legacy", "raw-pickle", "hidden-in-state-dict")


class _Call:
    """Pickles as `fn(*args)`: unpickling it calls `fn`, which is what a malicious checkpoint does."""

    def __init__(self, fn: Callable[..., object], args: tuple[object, ...]) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.fn, self.args


class Custom:
    """An arbitrary user class (pickled by reference as `tests.hardening.builders.Custom`)."""

    def __init__(self) -> None:
        self.value = 1


def payload(kind: str, marker: Path) -> object:
    """An object whose unpickling creates `marker`, through the named callable."""
    code = f"open({str(marker)!r}, 'w').close()"
    calls: dict[str, _Call] = {
        "os.system": _Call(os.system, (f"touch {shlex.quote(str(marker))}",)),
        "exec": _Call(exec, (code,)),
        "eval": _Call(eval, (code,)),
        "subprocess.Popen": _Call(subprocess.Popen, (["touch", str(marker)],)),
    }
    return calls[kind]


def _state_dict() -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(3, 2).state_dict()


def make_payload(path: Path, *, kind: str, form: str, marker: Path) -> Path:
    """A code-execution payload in one of `PAYLOAD_FORMS`."""
    evil = payload(kind, marker)
    if form == "hidden-in-state-dict":
        sd: OrderedDict[str, object] = OrderedDict(_state_dict())
        sd["bias_extra"] = evil  # between real tensors, in the dict that *is* the state_dict
        sd.move_to_end("bias")
        torch.save(sd, path)
    elif form == "zip":
        torch.save({"state_dict": _state_dict(), "payload": evil}, path)
    elif form == "legacy":
        torch.save({"state_dict": _state_dict(), "payload": evil}, path, _use_new_zipfile_serialization=False)
    elif form == "raw-pickle":
        path.write_bytes(pickle.dumps({"state_dict": _state_dict(), "payload": evil}))
    else:
        raise ValueError(form)
    return path


def make_module(path: Path) -> Path:
    """A whole pickled nn.Module (`torch.save(model)`), not a state_dict."""
    torch.save(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), path)
    return path


def make_numpy(path: Path) -> Path:
    """A numpy array pickled next to the tensors (numpy's `_reconstruct` is not allowlisted)."""
    torch.save({"state_dict": _state_dict(), "mean": np.arange(6, dtype=np.float32)}, path)
    return path


def make_custom_class(path: Path) -> Path:
    torch.save({"state_dict": _state_dict(), "config": Custom()}, path)
    return path


def make_ten_bytes(path: Path) -> Path:
    path.write_bytes(b"\x80\x02PK\x03\x04\x00\x01\x02\x03")  # starts like a pickle, then like a zip
    return path


def make_random(path: Path) -> Path:
    path.write_bytes(os.urandom(64 << 10))
    return path


def make_short_storage(path: Path) -> Path:
    """archive/data/0 keeps 8 of the 24 bytes its tensor (2x3 float32) needs."""
    entries = [(n, d[:8] if n == "archive/data/0" else d) for n, d in _torch_zip_entries()]
    return _write_zip(path, [_stored(n, d) for n, d in entries])


def make_missing_data_pkl(path: Path) -> Path:
    return _write_zip(path, [_stored(n, d) for n, d in _torch_zip_entries() if n != "archive/data.pkl"])


def make_missing_storage(path: Path) -> Path:
    return _write_zip(path, [_stored(n, d) for n, d in _torch_zip_entries() if n != "archive/data/0"])


class _View:
    """Pickles as a tensor view `(size, stride, offset)` of a real storage, whatever the storage holds."""

    def __init__(self, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> None:
        storage = torch.ones(6).untyped_storage()
        self.storage = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32, _internal=True)
        self.size, self.stride, self.offset = size, stride, offset

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return torch._utils._rebuild_tensor_v2, (
            self.storage, self.offset, self.size, self.stride, False, OrderedDict()
        )


def make_view_past_storage(path: Path) -> Path:
    """A 1000-element view of a 6-element storage."""
    torch.save({"w": _View((1000,), (1,))}, path)
    return path


def make_expanded_view(path: Path) -> Path:
    """A stride-0 view claiming 2**20 x 2**20 float32 (4 TiB) over 24 bytes: a memory bomb when materialised."""
    torch.save({"w": _View((1 << 20, 1 << 20), (0, 0))}, path)
    return path


def make_legacy_with_zip(path: Path) -> Path:
    """A legacy checkpoint with a zip checkpoint appended: zip readers see the zip, torch the pickle."""
    legacy, modern = io.BytesIO(), io.BytesIO()
    torch.save(_state_dict(), legacy, _use_new_zipfile_serialization=False)
    torch.save({"other": torch.zeros(3)}, modern)
    path.write_bytes(legacy.getvalue() + modern.getvalue())
    return path


def make_data_pkl_bomb(path: Path, *, declared_bytes: int = 1 << 30) -> Path:
    """data.pkl itself DEFLATED, declaring `declared_bytes` of content (zeros), ~1000x its stored size."""
    entries = [_deflated(n, d) for n, d in _torch_zip_entries() if n != "archive/data.pkl"]
    return _write_zip(path, [_zeros_bomb("archive/data.pkl", declared_bytes), *entries])


def make_storage_bomb(path: Path) -> Path:
    return hostile.make_deflate_bomb(path)


def _laughs(levels: int = 30) -> list[object]:
    nested: list[object] = ["lol"]
    for _ in range(levels):
        nested = [nested] * 10  # 10**30 leaves when expanded, 30 lists in memory
    return nested


def make_billion_laughs(path: Path) -> Path:
    """Shared references: 10**30 leaves if anything expanded it, a few hundred bytes of pickle."""
    torch.save({"state_dict": _laughs()}, path)
    return path


def _deep_pickle(depth: int) -> bytes:
    # PROTO 2, `depth` EMPTY_LISTs, then APPENDs that nest each into the one below, STOP.
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def make_deep_zip(path: Path, *, depth: int = 200_000) -> Path:
    """data.pkl is a list nested `depth` deep."""
    entries = [_stored(n, d) for n, d in _torch_zip_entries() if n != "archive/data.pkl"]
    return _write_zip(path, [_stored("archive/data.pkl", _deep_pickle(depth)), *entries])


def make_deep_legacy(path: Path, *, depth: int = 200_000) -> Path:
    """A legacy file whose object is a list nested `depth` deep."""
    head = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (
            0x1950A86A20F9469CFC6C,  # torch's legacy magic number
            1001,
            {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
        )
    )
    path.write_bytes(head + _deep_pickle(depth) + pickle.dumps([], protocol=2))
    return path


def make_deep_safetensors(path: Path, *, depth: int = 200_000) -> Path:
    """A safetensors header with a JSON array nested `depth` deep."""
    header = b'{"w":' + b"[" * depth + b"]" * depth + b"}"
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


class _HugeStorage:
    """Persistent id of a storage that declares `numel` float32 elements."""

    def __init__(self, numel: int) -> None:
        self.numel = numel


class _LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _HugeStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel, None)
        return None


class _HugeTensor:
    def __init__(self, numel: int) -> None:
        self.storage = _HugeStorage(numel)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (4,), (1,), False, OrderedDict())


def make_legacy_huge_storage(path: Path, *, numel: int = 1 << 31) -> Path:
    """A 1 KB legacy file declaring one storage of `numel` float32 (8 GiB by default) that holds 4 values.

    The legacy loader allocates the declared size before it reads the data and finds it short.
    """
    head = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (
            0x1950A86A20F9469CFC6C,
            1001,
            {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
        )
    )
    body = io.BytesIO()
    _LegacyPickler(body, protocol=2).dump({"w": _HugeTensor(numel)})
    data = struct.pack("<q", 4) + struct.pack("<4f", 1, 2, 3, 4)
    path.write_bytes(head + body.getvalue() + pickle.dumps(["0"], protocol=2) + data)
    return path
