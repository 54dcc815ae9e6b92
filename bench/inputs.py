"""Benchmark inputs, generated from options: the 1 GB pair, and the many-small-keys pairs."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from service.registry.builtins import MLPBN

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Pair:
    """An original checkpoint and its trained copy (`module.` prefixes, no BN running stats)."""

    original: Path
    trained: Path
    keys: int  # keys of the original (= of the merged result)
    trained_keys: int

    @property
    def size(self) -> int:
        return self.trained.stat().st_size


def _with_metadata(sd: OrderedDict[str, torch.Tensor], metadata: Any) -> OrderedDict[str, torch.Tensor]:
    sd._metadata = metadata  # type: ignore[attr-defined]
    return sd


def _trained_metadata(metadata: Any) -> OrderedDict[str, Any]:
    # What nn.DataParallel(model).state_dict() carries: the wrapper's own entry, then every module under it.
    out: OrderedDict[str, Any] = OrderedDict({"": {"version": 1}})
    for name, value in metadata.items():
        out[f"module.{name}" if name else "module"] = dict(value)
    return out


def _trained_copy(original: OrderedDict[str, torch.Tensor], changed: set[str]) -> OrderedDict[str, torch.Tensor]:
    trained: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in original.items():
        if key.rpartition(".")[2] in BN_STATS:
            continue  # track_running_stats=False during training
        if key in changed:
            value = value + 0.01 * torch.randn_like(value)
        trained[f"module.{key}"] = value  # nn.DataParallel
    return _with_metadata(trained, _trained_metadata(original._metadata))  # type: ignore[attr-defined]


def _stamp_ok(stamp: Path, config: dict[str, Any], *files: Path) -> bool:
    try:
        return json.loads(stamp.read_text()) == config and all(f.exists() for f in files)
    except (OSError, ValueError):
        return False


def make_mlp_pair(directory: Path, *, dim: int, depth: int, changed_blocks: int = 2, seed: int = 0) -> Pair:
    """`depth` x (Linear(dim, dim) + BatchNorm1d(dim)) + a head, as `MLPBN(dim, depth)`, with BN stats.

    The trained copy changes the head and the last `changed_blocks` Linear layers and keeps the rest
    bit-identical (a frozen backbone). Reused when `directory` already holds the same configuration.
    """
    directory.mkdir(parents=True, exist_ok=True)
    original_path, trained_path = directory / "original.pth", directory / "trained.pth"
    config = {"kind": "mlp", "dim": dim, "depth": depth, "changed_blocks": changed_blocks, "seed": seed}
    stamp = directory / "config.json"
    if not _stamp_ok(stamp, config, original_path, trained_path):
        gen = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            skeleton = MLPBN(dim=dim, depth=depth)
        original: OrderedDict[str, torch.Tensor] = OrderedDict()
        for key, meta in skeleton.state_dict().items():
            name = key.rpartition(".")[2]
            if name == "num_batches_tracked":
                value = torch.tensor(1000, dtype=torch.int64)
            elif name == "running_var":
                value = torch.rand(meta.shape, generator=gen) + 0.5
            else:
                value = torch.randn(meta.shape, generator=gen) / math.sqrt(meta.shape[-1])
            original[key] = value
        _with_metadata(original, skeleton.state_dict()._metadata)  # type: ignore[attr-defined]
        changed = {k for k in original if k.startswith("head.")}
        for i in range(depth - changed_blocks, depth):
            changed |= {f"blocks.{i}.0.weight", f"blocks.{i}.0.bias"}
        torch.save(original, original_path)
        torch.save(_trained_copy(original, changed), trained_path)
        stamp.write_text(json.dumps(config))
    keys = 7 * depth + 2
    return Pair(original_path, trained_path, keys=keys, trained_keys=4 * depth + 2)


def make_many_keys_pair(directory: Path, *, keys: int, width: int = 4, seed: int = 0) -> Pair:
    """A state_dict of about `keys` small tensors: blocks of Linear(width, width) + BatchNorm1d(width).

    Each block has 7 keys (4 without BN stats); the trained copy changes the last tenth of the blocks.
    """
    directory.mkdir(parents=True, exist_ok=True)
    original_path, trained_path = directory / "original.pth", directory / "trained.pth"
    blocks = max(1, math.ceil(keys / 7))
    config = {"kind": "many-keys", "blocks": blocks, "width": width, "seed": seed}
    stamp = directory / "config.json"
    if not _stamp_ok(stamp, config, original_path, trained_path):
        gen = torch.Generator().manual_seed(seed)
        original: OrderedDict[str, torch.Tensor] = OrderedDict()
        metadata: OrderedDict[str, Any] = OrderedDict({"": {"version": 1}, "layers": {"version": 1}})
        for i in range(blocks):
            p = f"layers.{i}"
            original[f"{p}.linear.weight"] = torch.randn(width, width, generator=gen)
            original[f"{p}.linear.bias"] = torch.randn(width, generator=gen)
            original[f"{p}.bn.weight"] = torch.rand(width, generator=gen)
            original[f"{p}.bn.bias"] = torch.randn(width, generator=gen)
            original[f"{p}.bn.running_mean"] = torch.randn(width, generator=gen)
            original[f"{p}.bn.running_var"] = torch.rand(width, generator=gen) + 0.5
            original[f"{p}.bn.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)
            metadata[p] = {"version": 1}
            metadata[f"{p}.linear"] = {"version": 1}
            metadata[f"{p}.bn"] = {"version": 2}
        _with_metadata(original, metadata)
        changed = {k for k in original if int(k.split(".")[1]) >= blocks - max(1, blocks // 10)}
        torch.save(original, original_path)
        torch.save(_trained_copy(original, changed), trained_path)
        stamp.write_text(json.dumps(config))
    return Pair(original_path, trained_path, keys=7 * blocks, trained_keys=4 * blocks)


def describe(pair: Pair) -> dict[str, Any]:
    data = asdict(pair)
    # File names only: the work directory is a temp path of the machine that ran the benchmark.
    data.update(original=f"{pair.original.parent.name}/{pair.original.name}",
                trained=f"{pair.trained.parent.name}/{pair.trained.name}",
                original_bytes=pair.original.stat().st_size, trained_bytes=pair.trained.stat().st_size)
    return data
