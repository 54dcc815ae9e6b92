"""Shared by the hostile-input tests: a refusal is a short problem+json that leaves nothing behind; fixtures."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from tests.api.test_real_server import start_server, stop_server

PROBLEM = "application/problem+json"


def assert_refused(response: httpx.Response, *, status: int | None = None, fragment: str | None = None) -> str:
    """A 4xx problem document with a short, useful `detail`; returns the detail."""
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if status is not None:
        assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith(PROBLEM), response.headers["content-type"]
    body = response.json()
    assert body["status"] == response.status_code
    detail = body["detail"]
    assert isinstance(detail, str) and 10 <= len(detail) <= 400, detail
    assert "Traceback" not in detail and "\n" not in detail
    if fragment is not None:
        assert fragment in detail, detail
    return detail


def assert_clean(http: httpx.Client, data_dir: Path, marker: Path | None = None, *, stored: int = 0) -> None:
    """No payload ran, nothing (beyond `stored` artifacts) was stored, no temp file is left, /healthz answers."""
    if marker is not None:
        assert not marker.exists(), "the payload ran"
    assert http.get("/checkpoints").json()["total"] == stored
    # Temp files of a refused request are removed before the response; a real server may still be finishing
    # the abort of a connection the client dropped, so allow it a moment.
    deadline = time.monotonic() + 5
    while (left := os.listdir(data_dir / "tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], left
    assert http.get("/healthz").status_code == 200


def upload(http: httpx.Client, path: Path, *, filename: str = "upload.pth") -> httpx.Response:
    with path.open("rb") as fh:
        return http.post("/checkpoints", files={"file": (filename, fh)})


def merge_with(http: httpx.Client, trained: Path, original: Path) -> httpx.Response:
    with trained.open("rb") as t, original.open("rb") as o:
        return http.post(
            "/merge",
            data={"architecture": "tiny-convnet"},
            files={"original_file": ("original.pth", o), "trained_file": ("trained.pth", t)},
        )


def diff_with(http: httpx.Client, a: Path, b: Path) -> httpx.Response:
    with a.open("rb") as fa, b.open("rb") as fb:
        return http.post("/diff", files={"a": ("a.pth", fa), "b": ("b.pth", fb)})


def refuse_everywhere(
    http: httpx.Client, data_dir: Path, path: Path, original: Path, *, marker: Path | None = None,
    fragment: str | None = None,
) -> list[str]:
    """Send one hostile file as an upload, as `trained_file` of a merge and as `a` of a diff; all refused."""
    details = []
    for send in (lambda: upload(http, path), lambda: merge_with(http, path, original),
                 lambda: diff_with(http, path, original)):
        details.append(assert_refused(send(), fragment=fragment))
        assert_clean(http, data_dir, marker)
    return details


# ---- fixtures (imported by the test_hostile_* modules: tests/hardening/conftest.py belongs to the fault tests) ----


@dataclass(frozen=True)
class RealServer:
    url: str
    data_dir: Path


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    """A real `ckpt serve` (sandbox on, default settings) for the tests of one module."""
    data_dir = tmp_path_factory.mktemp("hostile-server") / "data"
    proc, url = start_server(data_dir)
    try:
        yield RealServer(url, data_dir)
    finally:
        stop_server(proc)


@pytest.fixture
def real_http(real_server: RealServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=real_server.url, timeout=120) as http:
        yield http


@pytest.fixture
def data_dir(settings: Settings) -> Path:
    return settings.data_dir
