"""What the CLI prints when things go wrong: the fix, not just the failure (the real app in-process)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.client.cli import main
from service.config import Settings


def _run(client: TestClient, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["--retries", "1", *argv], http=client)
    out, err = capsys.readouterr()
    return code, out, err


def test_rm_of_a_named_checkpoint_suggests_force_or_name_rm(
    client: TestClient, capsys: pytest.CaptureFixture[str], recipe_files: dict[str, Path]
) -> None:
    assert _run(client, capsys, "push", str(recipe_files["original"]), "--name", "orig")[0] == 0
    code, _, err = _run(client, capsys, "rm", "orig")
    assert code == 1
    assert "409" in err
    assert "hint: `ckpt rm orig --force` deletes it and its names, or `ckpt name rm orig` removes a name" in err


def test_401_mentions_token_and_ckpt_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CKPT_TOKEN", raising=False)
    app = create_app(Settings(data_dir=tmp_path / "data", api_tokens="read:r0,write:w0"))
    with TestClient(app) as client:
        code, _, err = _run(client, capsys, "ls")
        assert code == 1 and "401" in err
        assert "hint: pass a token with --token TOKEN or set CKPT_TOKEN" in err
        code, _, err = _run(client, capsys, "--token", "r0", "name", "rm", "x")
        assert code == 1 and "403" in err and "needs a write token" in err


def test_shape_mismatch_prints_expected_and_got_and_skips_empty_sections(
    client: TestClient, capsys: pytest.CaptureFixture[str], recipe_files: dict[str, Path], tmp_path: Path
) -> None:
    bad = dict(torch.load(recipe_files["trained"], weights_only=True))
    bad["module.head.weight"] = torch.zeros(3, 16)
    bad["module.head.bias"] = torch.zeros(10, dtype=torch.float64)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    code, _, err = _run(client, capsys, "merge", str(recipe_files["original"]), str(path), "-a", "tiny-convnet")
    assert code == 1
    lines = err.splitlines()
    assert "mismatched keys (2):" in lines
    head_w = next(line for line in lines if line.strip().startswith("head.weight"))
    assert head_w.split()[1:3] == ["10x16", "3x16"]
    head_b = next(line for line in lines if line.strip().startswith("head.bias"))
    assert head_b.split()[1:] == ["(same)", "(same)", "float32", "float64"]
    assert "missing keys" not in err and "unexpected keys" not in err  # empty sections are skipped


def test_foreign_objects_are_inert_records_not_errors(
    client: TestClient, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # A training script's argparse.Namespace used to need CKPT_SAFE_GLOBALS; the placeholder unpickler records it.
    import argparse

    path = tmp_path / "ns.pth"
    torch.save({"w": torch.zeros(2), "args": argparse.Namespace(lr=0.1)}, path)
    code, out, err = _run(client, capsys, "push", str(path))
    assert code == 0, err
    ref = client.get("/checkpoints").json()["items"][0]["id"]
    assert client.get(f"/checkpoints/{ref}").json()["extras"] == {"args": "argparse.Namespace"}


def test_never_allowed_globals_say_so(client: TestClient) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (eval, ("1",))

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1), "x": Evil()}, buf)
    r = client.post("/checkpoints", files={"file": ("evil.pth", buf.getvalue())})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "'builtins.eval'" in detail and "can never be allowed" in detail


def test_unknown_dtype_lists_the_valid_ones(client: TestClient) -> None:
    r = client.post("/architectures", json={"name": "odd", "keys": {"w": {"shape": [2], "dtype": "float33"}}})
    assert r.status_code == 422
    assert "Unknown dtype 'float33' for 'w'; valid dtypes: " in r.json()["detail"]
    assert "float32" in r.json()["detail"] and "bfloat16" in r.json()["detail"]


@pytest.mark.parametrize("buffering", [-1, 1])
def test_a_closed_pipe_ends_quietly(
    client: TestClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, buffering: int
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has read what it wanted
    pipe = os.fdopen(write_end, "w", buffering=buffering)
    monkeypatch.setattr(sys, "stdout", pipe)
    try:
        code = main(["arch", "show", "tiny-convnet"], http=client)
    finally:
        monkeypatch.undo()
        with contextlib.suppress(OSError):
            pipe.close()
    err = capsys.readouterr().err
    assert code == 141
    assert err == ""  # no "error: [Errno 32] Broken pipe"


def test_diff_values_prints_a_per_module_table_in_text_mode(
    client: TestClient, capsys: pytest.CaptureFixture[str], recipe_files: dict[str, Path]
) -> None:
    argv = ["diff", str(recipe_files["original"]), str(recipe_files["trained"]), "-n", "--values"]
    code, out, err = _run(client, capsys, *argv)
    assert code == 0, err
    code, raw, _ = _run(client, capsys, *argv, "--json")
    head = json.loads(raw)["changes"]["modules"]["head"]
    assert "value changes (modules to depth 1):" in out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("head "))
    assert row == ["head", "2/2", f"{head['rel_change']:.3g}", f"{head['max_abs']:.3g}"]
    assert not any(line.strip().startswith("features ") for line in out.splitlines())  # frozen: unchanged
    assert "changed: 2 of" in out
