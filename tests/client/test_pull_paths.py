"""ckpt pull: a trailing slash is a directory, a name names the file, the file gets the user's umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.client import CheckpointClient
from service.client.cli import main
from service.client.client import sha256_file


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_pull_into_a_new_directory_names_the_file_after_the_name(
    ckpt: CheckpointClient, recipe_files: dict[str, Path], tmp_path: Path, umask_022: None
) -> None:
    pushed = ckpt.push(recipe_files["original"], name="resnet-ft")
    out = ckpt.pull("resnet-ft", f"{tmp_path}/new/dir/")
    assert out.path == tmp_path / "new" / "dir" / "resnet-ft.pth"
    assert sha256_file(out.path) == pushed.artifact.id
    assert stat.S_IMODE(out.path.stat().st_mode) == 0o644
    st = ckpt.pull("resnet-ft", f"{tmp_path}/new/dir/", format="safetensors")
    assert st.path.name == "resnet-ft.safetensors"
    by_id = ckpt.pull(pushed.artifact.id[:12], tmp_path / "new")  # an existing directory, by short id
    assert by_id.path.name == f"{pushed.artifact.id[:16]}.pth"


def test_umask_is_respected(
    ckpt: CheckpointClient, recipe_files: dict[str, Path], tmp_path: Path
) -> None:
    ckpt.push(recipe_files["original"], name="m")
    old = os.umask(0o077)
    try:
        out = ckpt.pull("m", tmp_path / "private.pth")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.path.stat().st_mode) == 0o600


def test_cli_pull_with_trailing_slash_creates_the_directory(
    client: TestClient, recipe_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    umask_022: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert main(["push", str(recipe_files["original"]), "--name", "orig"], http=client) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["pull", "orig", "-o", "dir/"], http=client) == 0
    assert (tmp_path / "dir").is_dir()
    assert (tmp_path / "dir" / "orig.pth").is_file()
    assert stat.S_IMODE((tmp_path / "dir" / "orig.pth").stat().st_mode) == 0o644
    assert "wrote " in capsys.readouterr().out


def test_merge_output_directory_names_the_file_after_the_name(
    client: TestClient, recipe_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    code = main(["merge", str(recipe_files["original"]), str(recipe_files["trained"]), "-a", "tiny-convnet",
                 "--name", "final", "-o", f"{out}/"], http=client)
    assert code == 0
    assert f"wrote {out / 'final.pth'}  (sha256 verified)" in capsys.readouterr().out
