"""Code-execution payloads (os.system, exec, eval, subprocess.Popen) in zip, legacy and raw-pickle form, and one
hidden among the tensors of a real state_dict: refused everywhere, and never run."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.hardening import hostile_support
from tests.hardening.builders import PAYLOAD_FORMS, PAYLOAD_KINDS, make_payload
from tests.hardening.hostile_support import RealServer, assert_clean, refuse_everywhere, upload

# Fixtures shared with the other test_hostile_* modules (the directory's conftest belongs to the fault tests).
data_dir, real_server, real_http = hostile_support.data_dir, hostile_support.real_server, hostile_support.real_http

pytestmark = pytest.mark.timeout(120)

# The global each payload imports, as torch and our opcode scan name it.
GLOBAL_OF = {
    "os.system": "posix.system",
    "exec": "builtins.exec",
    "eval": "builtins.eval",
    "subprocess.Popen": "subprocess.Popen",
}


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_the_payloads_are_live(tmp_path: Path, kind: str) -> None:
    # The control: a plain unpickler really runs each payload.
    marker = tmp_path / "MARKER"
    path = make_payload(tmp_path / "evil.pkl", kind=kind, form="raw-pickle", marker=marker)
    obj = pickle.loads(path.read_bytes())
    if kind == "subprocess.Popen":
        obj["payload"].wait(timeout=10)
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists()


@pytest.mark.parametrize("form", PAYLOAD_FORMS)
@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_payload_is_refused_everywhere(
    client: TestClient, data_dir: Path, recipe_files: dict[str, Path], tmp_path: Path, kind: str, form: str
) -> None:
    marker = tmp_path / "MARKER"
    path = make_payload(tmp_path / "evil.pth", kind=kind, form=form, marker=marker)

    r = upload(client, path)
    assert r.status_code == 422
    assert GLOBAL_OF[kind] in r.json()["unsafe_globals"]
    assert GLOBAL_OF[kind] in r.json()["detail"]
    details = refuse_everywhere(client, data_dir, path, recipe_files["original"], marker=marker)

    assert all(GLOBAL_OF[kind] in d for d in details)


@pytest.mark.parametrize("kind", PAYLOAD_KINDS)
def test_payload_is_refused_by_a_real_server(
    real_http: httpx.Client, real_server: RealServer, recipe_files: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    marker = tmp_path / "MARKER"
    path = make_payload(tmp_path / "evil.pth", kind=kind, form="hidden-in-state-dict", marker=marker)

    details = refuse_everywhere(real_http, real_server.data_dir, path, recipe_files["original"], marker=marker)

    assert all(GLOBAL_OF[kind] in d for d in details)
    assert_clean(real_http, real_server.data_dir, marker)
