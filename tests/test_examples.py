"""The examples run as subprocesses against a real `ckpt serve`, as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.client import CheckpointClient, sha256_file
from tests.api.test_real_server import start_server, stop_server
from tests.factories import TinyConvNet

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_server(tmp_path_factory.mktemp("examples") / "data")
    try:
        yield url
    finally:
        stop_server(proc)


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=240, cwd=ROOT)


def test_train_and_merge_then_dashboard_diff(server: str, tmp_path: Path) -> None:
    done = _run("train_and_merge.py", "--url", server, "--workdir", str(tmp_path), "--name-prefix", "ex")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verification      ok" in done.stdout and "local strict load ok" in done.stdout
    assert "filled from orig. 6 keys" in done.stdout

    # What the example left behind is real: a final file that loads strictly, and the named artifact.
    final = tmp_path / "final.pth"
    TinyConvNet().load_state_dict(torch.load(final, weights_only=True), strict=True)
    with CheckpointClient(server) as ckpt:
        stored = ckpt.get("ex-final")
        assert stored.id == sha256_file(final)
        assert stored.lineage is not None and stored.lineage.operation == "merge"
        assert stored.lineage.inputs["original"] == ckpt.get("ex-pretrained").id

    shown = _run("dashboard_diff.py", "--url", server, "ex-pretrained", "ex-final")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[2] == "prefixes normalized: yes"
    assert "changed: head.bias, head.weight" in shown.stdout
    assert "frozen check" not in shown.stdout  # not asked for: a fine-tune's trained head is no warning
    everything = _run("dashboard_diff.py", "--url", server, "ex-pretrained", "ex-final", "--frozen", "true")
    assert "frozen check: CHANGED (8 tensors checked, 2 changed" in everything.stdout  # A's head too, as asked
    backbone = _run("dashboard_diff.py", "--url", server, "ex-pretrained", "ex-final",
                    "--frozen", "features.")
    assert backbone.returncode == 0, backbone.stderr
    assert "frozen check: ok (6 tensors checked, 0 changed" in backbone.stdout


def test_dashboard_diff_unknown_ref_fails(server: str) -> None:
    done = _run("dashboard_diff.py", "--url", server, "no-such-name", "other")
    assert done.returncode == 1 and "404" in done.stderr
