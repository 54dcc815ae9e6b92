"""Tiny transformers models and their sharded checkpoints, written by transformers' and huggingface_hub's own code.

transformers 5 writes safetensors only (``save_pretrained(..., safe_serialization=False)`` is ignored), so the
sharded ``pytorch_model-0000x-of-0000y.bin`` files with their ``pytorch_model.bin.index.json`` come from
huggingface_hub's ``save_torch_state_dict(..., safe_serialization=False)``, the code transformers 4 used.

Needs the `corpus` extra (installed by the test command); a test module importing this one is skipped without it,
saying so, like tests/corpus.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.corpus.generate import prepare_torchvision

_EXTRA = "the corpus extra is not installed: pip install -c constraints.txt -e '.[corpus]'"
pytest.importorskip("huggingface_hub", reason=_EXTRA)
transformers = pytest.importorskip("transformers", reason=_EXTRA)
prepare_torchvision()  # transformers' models import torchvision, whose CUDA build needs two op schemas on CPU torch

from huggingface_hub import save_torch_state_dict, split_torch_state_dict_into_shards  # noqa: E402
from huggingface_hub.utils import logging as hub_logging  # noqa: E402

__all__ = ["SHARD_SIZE", "index_of", "load_pretrained", "save_sharded", "shard_files",
           "split_torch_state_dict_into_shards", "tiny_bert"]

# huggingface_hub logs a warning for pickled files: that is what these tests send on purpose.
hub_logging.set_verbosity_error()
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

SHARD_SIZE = "20KB"  # the tiny BERT below has ~94 KB of tensors: 5 shards


def tiny_bert(seed: int = 0) -> Any:
    """A 2-layer BERT with hidden size 32 (39 tensors, ~94 KB), its weights drawn from `seed`."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def save_sharded(model: Any, directory: Path, *, bin: bool = False, max_shard_size: str = SHARD_SIZE) -> Path:
    """Write `model` as transformers does: config.json, the shards, and their index; returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    if bin:
        model.config.save_pretrained(directory)
        save_torch_state_dict(model.state_dict(), directory, safe_serialization=False, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


def index_of(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The index file of a sharded directory and its JSON."""
    (path,) = directory.glob("*.index.json")
    return path, json.loads(path.read_text())


def shard_files(directory: Path) -> list[Path]:
    """The index and the shards it names, in file-name order."""
    path, index = index_of(directory)
    return [path, *(directory / name for name in sorted(set(index["weight_map"].values())))]


def load_pretrained(directory: Path) -> Any:
    """`BertModel.from_pretrained(directory)`, offline (it must find everything in the directory)."""
    return transformers.BertModel.from_pretrained(directory, local_files_only=True)
