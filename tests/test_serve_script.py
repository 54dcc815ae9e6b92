"""scripts/serve.sh as a user types it: from another directory, with a relative --config whose factory lives in
the user's own module (python_path), and with only the runtime dependencies installed."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.api.test_real_server import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "scripts" / "serve.sh"

CONFIG = """python_path = ["models"]

[architectures.mine]
factory = "my_models:build"

[architectures.broken]
factory = "no_such_module_anywhere:build"
"""

MY_MODELS = """from service.registry.builtins import TinyConvNet


def build():
    return TinyConvNet()
"""


def _user_dir(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "my_models.py").write_text(MY_MODELS)
    (tmp_path / "arch.toml").write_text(CONFIG)
    return tmp_path


def test_serve_sh_resolves_config_from_the_callers_directory_and_reports_broken_architectures(
    tmp_path: Path,
) -> None:
    user = _user_dir(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("CKPT_CONFIG", "CKPT_DATA_DIR", "PYTHONPATH")}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(SERVE), "--config", "arch.toml", "--data-dir", "data", "--port", str(port)],
            cwd=user, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "serve.sh did not start"
                time.sleep(0.2)
        names = [a["name"] for a in httpx.get(f"{url}/architectures").json()["items"]]
        assert "mine" in names and "broken" not in names
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200
        body = ready.json()
        assert body["status"] == "degraded"
        check = body["checks"]["architectures"]
        assert check["status"] == "degraded" and "'broken' (config)" in check["detail"]
        assert "'mine'" not in check["detail"]
        assert (user / "data").is_dir()  # --data-dir is relative to the caller too
        # Item 12: the start-up lines reach the terminal through uvicorn's handler.
        started = log.read_text()
        assert f"data directory: {user / 'data'} (0 artifacts)" in started
        loaded = next(line for line in started.splitlines() if "architectures loaded (" in line)
        assert "mine, mlp-bn, tiny-convnet" in loaded
        assert "architectures that failed to load (1): 'broken' (config)" in started
        assert "auth: off" in started
        assert f"API docs: http://127.0.0.1:{port}/docs" in started
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("content", "message"), [(None, "config file not found: "),
                                                  ("[architectures\nbroken", "is not valid TOML")])
def test_serve_refuses_to_start_without_a_usable_config(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "arch.toml").write_text(content)
    env = {k: v for k, v in os.environ.items() if k != "CKPT_CONFIG"}
    done = subprocess.run([str(SERVE), "--config", "arch.toml", "--port", str(free_port())], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr
    assert str(tmp_path / "arch.toml") in done.stderr  # the resolved path, not the script's directory


def test_readyz_is_ok_when_every_architecture_loads_and_python_path_works_in_process(tmp_path: Path) -> None:
    user = _user_dir(tmp_path)
    (user / "ok.toml").write_text('python_path = ["models"]\n[architectures.mine]\nfactory = "my_models:build"\n')
    with TestClient(create_app(Settings(data_dir=tmp_path / "data", config=user / "ok.toml"))) as client:
        body = client.get("/readyz").json()
        assert body["status"] == "ok"
        assert body["checks"]["architectures"]["status"] == "ok"
    (user / "bad.toml").write_text('python_path = ["nowhere"]\n[architectures.mine]\nfactory = "my_models:build"\n')
    with TestClient(create_app(Settings(data_dir=tmp_path / "data2", config=user / "bad.toml"))) as client:
        check = client.get("/readyz").json()["checks"]["architectures"]
        assert check["status"] == "degraded" and "python_path entry 'nowhere' is not a directory" in check["detail"]


def test_serve_installs_only_the_runtime_dependencies() -> None:
    env = {**os.environ, "CKPT_BOOTSTRAP_PRINT": "1"}
    served = subprocess.run([str(SERVE), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert served.returncode == 0, served.stderr
    assert "bootstrap (runtime): python -m pip install -q -c constraints.txt -e .\n" in served.stdout
    assert "[dev]" not in served.stdout
    dev = subprocess.run([str(ROOT / "scripts" / "bootstrap.sh")], env=env, capture_output=True, text=True)
    assert dev.stdout.strip().endswith("-e .[dev]")
    # ...and the runtime dependencies hold none of the dev tools.
    runtime = [r for r in importlib.metadata.requires("ckpt-service") or [] if "extra ==" not in r]
    names = {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in runtime}
    assert "torch" in names and not names & {"pytest", "mypy", "ruff", "schemathesis", "pytest-cov"}


def test_startup_log_names_data_artifacts_architectures_auth_and_docs(
    tmp_path: Path, recipe_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_tokens="write:w0", port=8123)
    with TestClient(create_app(settings)) as client:
        with recipe_files["original"].open("rb") as fh:
            assert client.post("/checkpoints", files={"file": ("o.pth", fh)},
                               headers={"Authorization": "Bearer w0"}).status_code == 201
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ckpt.service"), TestClient(create_app(settings)):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "ckpt.service"]
    assert f"data directory: {settings.data_dir.resolve()} (1 artifacts)" in lines
    assert any(line.startswith("architectures loaded (") and "mlp-bn, tiny-convnet" in line for line in lines)
    assert "auth: on (Bearer tokens from CKPT_API_TOKENS)" in lines
    assert "API docs: http://127.0.0.1:8123/docs" in lines
