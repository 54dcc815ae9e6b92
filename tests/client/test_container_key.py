"""`container_key` through the client: push, strip, diff and merge pick a state_dict inside a training file."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from service.client import CheckpointClient
from service.client.client import sha256_file
from service.client.errors import UnprocessableError
from tests.client.conftest import RequestLog
from tests.factories import make_original, make_trained


@pytest.fixture
def training_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A training checkpoint: the pretrained weights under ``state_dict``, the fine-tune (DataParallel keys, no
    BatchNorm stats) under ``state_dict_ema``, and training state around them."""
    original = make_original()
    live = original.state_dict()
    ema = make_trained(original).state_dict()
    path = tmp_path / "last.pth.tar"
    torch.save({"epoch": 3, "state_dict": live, "state_dict_ema": ema, "args": argparse.Namespace(lr=0.1)}, path)
    return path, live, ema


def _pulled(ckpt: CheckpointClient, ref: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = ckpt.pull(ref, tmp_path / f"{ref[:16]}.pth").path
    return torch.load(out, weights_only=True)  # type: ignore[no-any-return]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_push_with_a_container_key_answers_with_the_extracted_state_dict(
        ckpt: CheckpointClient, training_file: tuple[Path, dict, dict], tmp_path: Path) -> None:
    path, live, ema = training_file

    pushed = ckpt.push(path, name="ema", container_key="state_dict_ema")

    art = pushed.artifact
    assert pushed.uploaded and pushed.created
    assert art.lineage is not None and art.lineage.operation == "extract"
    assert art.lineage.params == {"container_key": "state_dict_ema"}
    assert art.lineage.inputs == {"checkpoint": sha256_file(path)}
    assert art.names == ["ema"] and art.key_count == len(ema)
    assert _same(_pulled(ckpt, art.id, tmp_path), ema)
    raw = ckpt.get(sha256_file(path))
    assert raw.size == path.stat().st_size and raw.candidates == {"state_dict": len(live), "state_dict_ema": len(ema)}


def test_push_with_a_container_key_sends_the_file_even_when_the_service_has_it(
        ckpt: CheckpointClient, training_file: tuple[Path, dict, dict], request_log: RequestLog) -> None:
    path, live, _ = training_file
    plain = ckpt.push(path)
    assert plain.artifact.container_key == "state_dict" and plain.artifact.key_count == len(live)
    request_log.clear()

    derived = ckpt.push(path, container_key="state_dict_ema")
    again = ckpt.push(path, container_key="state_dict_ema")

    assert derived.uploaded and derived.created and derived.artifact.id != plain.artifact.id
    assert again.uploaded and not again.created and again.artifact.id == derived.artifact.id
    assert len(request_log.calls("POST", "/checkpoints")) == 2
    assert not request_log.calls("HEAD")


def test_push_with_a_missing_container_key_names_the_keys(
        ckpt: CheckpointClient, training_file: tuple[Path, dict, dict]) -> None:
    path, _, _ = training_file

    with pytest.raises(UnprocessableError) as info:
        ckpt.push(path, container_key="model.ema")

    assert info.value.problem["available_keys"] == ["args", "epoch", "state_dict", "state_dict_ema"]
    assert ckpt.list_checkpoints().total == 0  # nothing stored


def test_strip_with_a_container_key(ckpt: CheckpointClient, training_file: tuple[Path, dict, dict],
                                    tmp_path: Path) -> None:
    path, _, ema = training_file
    raw = ckpt.push(path).artifact

    stripped = ckpt.strip(raw.id, container_key="state_dict_ema")

    assert stripped.report["applied"] == {"module.": len(ema)}
    result = _pulled(ckpt, stripped.id, tmp_path)
    assert list(result) == [k.removeprefix("module.") for k in ema]
    lineage = ckpt.get(stripped.id).lineage
    assert lineage is not None and lineage.params["container_key"] == "state_dict_ema"


def test_diff_with_container_keys_by_ref_and_as_files(
        ckpt: CheckpointClient, training_file: tuple[Path, dict, dict], tmp_path: Path,
        request_log: RequestLog) -> None:
    path, live, ema = training_file
    raw = ckpt.push(path).artifact.id

    same = ckpt.diff(raw, raw)
    by_ref = ckpt.diff(raw, raw, b_container_key="state_dict_ema", normalize_prefixes=True)
    request_log.clear()
    other = tmp_path / "other.pth.tar"
    torch.save({"weights": dict(live), "state_dict_ema": ema}, other)  # not stored: both go as files
    as_files = ckpt.diff(other, path, a_container_key="weights", b_container_key="state_dict_ema")

    assert same.summary["unchanged"] == len(live) and same.summary["changed"] == 0
    assert by_ref.summary["only_in_a"] == len(live) - len(ema)  # the BatchNorm stats the fine-tune dropped
    assert by_ref.summary["changed"] > 0
    assert [r.method for r in request_log.requests][-1] == "POST"
    assert as_files.summary["only_in_a"] == len(live) and as_files.summary["only_in_b"] == len(ema)
    assert ckpt.list_checkpoints().total == 1  # a diff stores nothing


def test_merge_with_a_trained_container_key(ckpt: CheckpointClient, recipe_files: dict[str, Path],
                                            training_file: tuple[Path, dict, dict], tmp_path: Path) -> None:
    path, _, ema = training_file

    result = ckpt.merge(recipe_files["original"], path, architecture="tiny-convnet",
                        trained_container_key="state_dict_ema", output=tmp_path / "final.pth")

    assert result.report["verification"]["ok"] is True
    final = torch.load(tmp_path / "final.pth", weights_only=True)
    assert torch.equal(final["head.weight"], ema["module.head.weight"])
    lineage = ckpt.get(result.id).lineage
    assert lineage is not None and lineage.params["container_keys"] == {"trained": "state_dict_ema"}
    with pytest.raises(UnprocessableError):
        ckpt.merge(recipe_files["original"], path, architecture="tiny-convnet", trained_container_key="nope")
