"""Settings that would fail open stop start-up instead, a world-reachable open service says so loudly, and
GET /readyz answers one schema: ok, degraded or unavailable per check, the worst one deciding."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.api.app import create_app
from service.config import Settings
from service.errors import InvalidSettings


@pytest.mark.parametrize("entry", ["reader:abc", "admn:abc", "ro:abc", "READONLY:abc", "read:"])
def test_a_token_entry_with_an_unknown_scope_stops_start_up(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(data_dir=tmp_path, api_tokens=f"write:fine,{entry}")
    message = str(info.value)
    assert "CKPT_API_TOKENS entry 2" in message
    assert "abc" not in message and "fine" not in message  # never a token in a log


def test_known_scopes_and_bare_tokens(tmp_path: Path) -> None:
    # Scopes in any case; "READ:abc" used to be a write token named "READ:abc".
    settings = Settings(data_dir=tmp_path, api_tokens="READ:abc,read:r, Write:w ,admin:a, bare, 12:34, x=y:z")
    assert settings.tokens() == {"abc": "read", "r": "read", "w": "write", "a": "admin", "bare": "write",
                                 "12:34": "write", "x=y:z": "write"}


def test_scopes_are_ordered_read_write_admin(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "d", api_tokens="read:r,write:w,admin:a", sandbox=False))
    with TestClient(app) as c:
        def put(token: str) -> int:
            return c.delete("/names/nothing", headers={"Authorization": f"Bearer {token}"}).status_code

        assert put("r") == 403
        assert put("w") == 404 and put("a") == 404  # past auth: the name does not exist


@pytest.mark.parametrize(
    "entry", ["no_such_module_xyz.Thing", "os.system", "not a dotted name", "collections.NoSuchClass"]
)
def test_a_malformed_safe_globals_entry_stops_start_up(tmp_path: Path, entry: str) -> None:
    with pytest.raises(InvalidSettings) as info:
        create_app(Settings(data_dir=tmp_path, safe_globals=["collections.OrderedDict", entry]))
    assert info.value.setting == "CKPT_SAFE_GLOBALS"
    assert "CKPT_SAFE_GLOBALS" in info.value.detail and repr(entry) in info.value.detail


def _serve(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "service.client.cli", "serve", "--port", "1", "--data-dir", str(tmp_path / "d")]
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_ckpt_serve_refuses_to_start_on_settings_that_fail_open(tmp_path: Path) -> None:
    tokens = _serve(tmp_path, {"CKPT_API_TOKENS": "reader:s3cret"})
    assert tokens.returncode == 2
    assert "CKPT_API_TOKENS" in tokens.stderr and "s3cret" not in tokens.stderr
    allowlist = _serve(tmp_path, {"CKPT_SAFE_GLOBALS": '["no_such_module_xyz.Thing"]'})
    assert allowlist.returncode == 2
    assert "CKPT_SAFE_GLOBALS" in allowlist.stderr and "no_such_module_xyz.Thing" in allowlist.stderr


def test_an_open_service_on_a_public_address_warns_and_is_degraded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, database_url: str | None, storage_url: str | None
) -> None:
    with caplog.at_level(logging.WARNING, logger="ckpt.service"):
        app = create_app(Settings(data_dir=tmp_path / "d", host="0.0.0.0", sandbox=False))
    assert any("CKPT_API_TOKENS is not set" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    with TestClient(app) as c:
        r = c.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "degraded"
    assert body["checks"]["auth"]["status"] == "degraded" and "0.0.0.0" in body["checks"]["auth"]["detail"]
    index = "postgresql" if database_url else "sqlite"
    blobs = f"the bucket {storage_url.removeprefix('s3://').split('/')[0]!r}" if storage_url else "the blob directory"
    assert body["checks"]["store"] == {
        "status": "ok", "detail": f"the store is writable; the index ({index}) and {blobs} answer"}


@pytest.mark.parametrize(("host", "tokens"), [("127.0.0.1", None), ("::1", None), ("0.0.0.0", "read:r")])
def test_loopback_or_tokens_is_not_degraded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, host: str, tokens: str | None
) -> None:
    with caplog.at_level(logging.WARNING, logger="ckpt.service"):
        app = create_app(Settings(data_dir=tmp_path / "d", host=host, api_tokens=tokens, sandbox=False))
    assert not any("CKPT_API_TOKENS is not set" in r.getMessage() for r in caplog.records)
    with TestClient(app) as c:
        body = c.get("/readyz").json()  # public: no token needed
    assert body["status"] == "ok" and body["checks"]["auth"]["status"] == "ok"


def test_an_architecture_that_failed_to_load_is_degraded_by_name(tmp_path: Path) -> None:
    config = tmp_path / "ckpt.toml"
    config.write_text('[architectures.broken]\nfactory = "no_such_module_xyz:make"\n')
    app = create_app(Settings(data_dir=tmp_path / "d", config=config, sandbox=False))
    with TestClient(app) as c:
        r = c.get("/readyz")
    assert r.status_code == 200
    check = r.json()["checks"]["architectures"]
    assert r.json()["status"] == "degraded" and check["status"] == "degraded" and "'broken'" in check["detail"]


def test_an_unwritable_store_is_unavailable(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "d", sandbox=False))
    with TestClient(app) as c:
        (tmp_path / "d" / "tmp").rename(tmp_path / "elsewhere")  # nothing can be created in tmp/ now
        (tmp_path / "d" / "tmp").write_text("not a directory")
        r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable" and r.json()["checks"]["store"]["status"] == "unavailable"
