"""A real `ckpt serve` on a free loopback port, a >100 MB multipart upload, and the recipe end to end over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from service.registry.builtins import MLPBN

BIG = {"dim": 2048, "depth": 7}  # 7 x 2048 x 2048 float32 = 117 MB of weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    data_dir: Path, *, config: Path | None = None, env: dict[str, str] | None = None, port: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "service.client.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        "warning",
    ]
    if config is not None:
        cmd += ["--config", str(config)]
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ckpt serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("ckpt serve did not become healthy within 60 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def big_server(tmp_path: Path) -> Iterator[str]:
    cfg = tmp_path / "ckpt.toml"
    cfg.write_text(
        '[architectures.big-mlp]\nfactory = "service.registry.builtins:mlp_bn"\n'
        f"kwargs = {{ dim = {BIG['dim']}, depth = {BIG['depth']} }}\n"
    )
    proc, url = start_server(tmp_path / "data", config=cfg)
    try:
        yield url
    finally:
        stop_server(proc)


def _big_pair(tmp_path: Path) -> tuple[Path, Path, nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    original = MLPBN(**BIG)
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(100)
    orig_path = tmp_path / "original.pth"
    torch.save(original.state_dict(), orig_path)
    trained = {
        f"module.{k}": v.clone()
        for k, v in original.state_dict().items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }
    trained["module.head.weight"] += 1.0
    trained_path = tmp_path / "trained.pth"
    torch.save(trained, trained_path)
    return orig_path, trained_path, original, trained


def test_recipe_over_http_with_big_upload(big_server: str, tmp_path: Path) -> None:
    orig_path, trained_path, original, trained = _big_pair(tmp_path)
    assert orig_path.stat().st_size > 100_000_000
    with httpx.Client(base_url=big_server, timeout=300) as http:
        # 1. upload the original (real multipart, streamed from the file)
        with orig_path.open("rb") as fh:
            r = http.post("/checkpoints", files={"file": ("original.pth", fh)})
        assert r.status_code == 201, r.text
        orig_id = r.json()["id"]
        # 2. name it
        assert http.put("/names/big-orig", json={"id": orig_id}).status_code == 200
        assert http.head(f"/checkpoints/{orig_id}").status_code == 200
        # 3. merge a trained file with module. prefixes and no BN stats
        with trained_path.open("rb") as fh:
            r = http.post(
                "/merge",
                data={"architecture": "big-mlp", "original": "big-orig", "name": "big-final"},
                files={"trained_file": ("trained.pth", fh)},
            )
        assert r.status_code == 201, r.text
        report = r.json()["report"]
        assert report["verification"]["ok"]
        assert len(report["filled"]) == 3 * BIG["depth"]
        # 4. download the result
        out = tmp_path / "final.pth"
        with http.stream("GET", r.json()["download_url"]) as resp, out.open("wb") as fh:
            assert resp.status_code == 200
            for chunk in resp.iter_bytes():
                fh.write(chunk)
    # 5. torch.load it and load_state_dict(strict=True) into a fresh model
    final = torch.load(out)
    fresh = MLPBN(**BIG)
    fresh.load_state_dict(final, strict=True)
    ref = original.state_dict()
    assert torch.equal(final["head.weight"], trained["module.head.weight"])
    assert torch.equal(final["blocks.0.1.running_var"], ref["blocks.0.1.running_var"])
    assert torch.equal(final["blocks.3.0.weight"], ref["blocks.3.0.weight"])
