"""The client and the CLI with sharded checkpoints: a directory goes in as one checkpoint, shards come out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient

from service.client import CheckpointClient, checkpoint_files
from service.client.cli import main
from service.client.errors import ClientError
from tests.client.conftest import RequestLog
from tests.sharded import load_pretrained, save_sharded, shard_files, tiny_bert


@pytest.fixture(scope="module")
def bert() -> Any:
    return tiny_bert(seed=5)


@pytest.fixture(scope="module")
def trainer_dir(bert: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a Trainer leaves in checkpoint-500/: sharded weights next to config, tokenizer and trainer state."""
    d = save_sharded(bert, tmp_path_factory.mktemp("run") / "checkpoint-500")
    (d / "tokenizer.json").write_text("{}")
    (d / "trainer_state.json").write_text("{}")
    torch.save({"state": {}}, d / "optimizer.pt")
    (d / "training_args.bin").write_bytes(b"not weights")
    return d


def test_checkpoint_files_picks_the_weights(trainer_dir: Path, tmp_path: Path) -> None:
    files = checkpoint_files(trainer_dir)
    assert files == shard_files(trainer_dir)
    # Without an index: the safetensors files; without those, the .bin files but training_args.bin.
    loose = tmp_path / "loose"
    loose.mkdir()
    for p in files[1:3]:
        shutil.copy(p, loose)
    (loose / "config.json").write_text("{}")
    (loose / "training_args.bin").write_bytes(b"x")
    assert [p.name for p in checkpoint_files(loose)] == [p.name for p in files[1:3]]
    bins = tmp_path / "bins"
    bins.mkdir()
    (bins / "training_args.bin").write_bytes(b"x")
    (bins / "pytorch_model.bin").write_bytes(b"x")
    assert [p.name for p in checkpoint_files(bins)] == ["pytorch_model.bin"]
    # An index naming a shard that is not there, and a directory with no weights, fail before sending.
    broken = tmp_path / "broken"
    shutil.copytree(trainer_dir, broken)
    (broken / files[2].name).unlink()
    with pytest.raises(ClientError, match=files[2].name):
        checkpoint_files(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClientError, match="no checkpoint"):
        checkpoint_files(tmp_path / "empty")


def test_push_a_directory_is_one_request_with_one_progress(
    ckpt: CheckpointClient, client: TestClient, request_log: RequestLog, bert: Any, trainer_dir: Path
) -> None:
    seen: list[tuple[int, int | None]] = []
    result = ckpt.push(trainer_dir, name="bert-run", labels={"run": "500"}, progress=lambda d, t: seen.append((d, t)))
    assert result.uploaded and result.created
    art = result.artifact
    assert (art.format, art.key_count, art.names, art.labels) == ("safetensors", 39, ["bert-run"], {"run": "500"})
    assert art.lineage is not None and art.lineage.operation == "combine"
    assert not request_log.calls("HEAD")  # no dedup check for a directory
    assert len(request_log.calls("POST", "/checkpoints")) == 1
    total = sum(p.stat().st_size for p in shard_files(trainer_dir))  # weights only, no config or optimizer
    assert {t for _, t in seen} == {total}
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == total
    pulled = safetensors.torch.load(client.get(f"/checkpoints/{art.id}/file").content)
    assert all(torch.equal(pulled[k], v) for k, v in bert.state_dict().items())


def test_push_a_bin_directory_and_a_single_file_directory(ckpt: CheckpointClient, bert: Any, tmp_path: Path) -> None:
    art = ckpt.push(save_sharded(bert, tmp_path / "bin", bin=True)).artifact
    assert (art.format, art.key_count) == ("pth-zip", 39)
    single = tmp_path / "single"
    single.mkdir()
    safetensors.torch.save_file({"w": torch.ones(2)}, single / "model.safetensors")
    (single / "config.json").write_text("{}")
    art = ckpt.push(single).artifact
    assert art.lineage is None and art.filename == "model.safetensors"  # one file: an ordinary upload


def test_merge_and_diff_take_a_directory(
    ckpt: CheckpointClient, request_log: RequestLog, bert: Any, trainer_dir: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "base.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in bert.state_dict().items()}, reference)
    ckpt.push(reference, name="bert-base")
    ckpt.register_architecture("tiny-bert", from_checkpoint="bert-base")
    request_log.clear()
    result = ckpt.merge("bert-base", trainer_dir, architecture="tiny-bert")
    assert result.report["verification"]["ok"] and result.report["filled"] == []
    assert not request_log.calls("HEAD")
    diff = ckpt.diff(trainer_dir, "bert-base")
    assert diff.summary["unchanged"] == 39 and diff.summary["changed"] == 0
    assert diff.summary["only_in_a"] == diff.summary["only_in_b"] == 0


def test_pull_shards_writes_what_from_pretrained_loads(ckpt: CheckpointClient, bert: Any, tmp_path: Path) -> None:
    art = ckpt.push(save_sharded(bert, tmp_path / "in", bin=True)).artifact
    out = tmp_path / "out"
    seen: list[int] = []
    result = ckpt.pull_shards(art.id, out, max_shard_size="30KB", progress=lambda d, t: seen.append(d))
    assert result.files[0].name == "model.safetensors.index.json" and len(result.files) >= 4
    assert seen[-1] == result.size == sum(p.stat().st_size for p in result.files[1:])
    index = json.loads(result.files[0].read_text())
    assert set(index) == {"metadata", "weight_map"}  # transformers' layout, nothing else
    assert not list(out.glob(".*.part"))
    bert.config.save_pretrained(out)
    loaded = load_pretrained(out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in bert.state_dict().items())


def test_cli_push_merge_and_pull_shards(
    client: TestClient, bert: Any, trainer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def ckpt(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv), http=client)
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = ckpt("push", str(trainer_dir), "--name", "run")
    assert code == 0, err
    shards = len(shard_files(trainer_dir)) - 1
    assert f"combined from {shards} shards, checked against model.safetensors.index.json" in out
    code, out, err = ckpt("arch", "register", "tiny-bert", "--from-checkpoint", "run")
    assert code == 0, err
    code, out, err = ckpt("merge", "run", str(trainer_dir), "-a", "tiny-bert")
    assert code == 0, err
    assert "verification: ok (strict)" in out and "filled from the original: 0 keys" in out
    code, out, err = ckpt("pull", "run", "--shards", str(tmp_path / "out"), "--max-shard-size", "40KB")
    assert code == 0, err
    assert f"to {tmp_path / 'out'}" in out
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    code, _, err = ckpt("pull", "run", "--shards", str(tmp_path / "out"), "-o", str(tmp_path / "x"))
    assert code == 2 and "no -o or --format" in err
