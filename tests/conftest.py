"""Fixtures shared by every layer: settings(tmp_path) -> app -> client, and real tiny checkpoint files.

The metadata index backend: a test that uses `index_backend` (tests/store and tests/api do, autouse) runs once per
backend named by ``CKPT_TEST_INDEX`` (``sqlite``, ``postgresql`` or ``both``, the default). PostgreSQL is a real
server (scripts/services/postgres.sh, started once per session); each test gets a fresh database made from a
migrated template, named by ``CKPT_DATABASE_URL`` (so `Settings()` and every server a test starts use it too).
A test marked ``@pytest.mark.index("sqlite")`` runs with that backend only.

The blob store backend comes with it: the parameter is an (index, blobs) pair, ``sqlite`` and ``postgresql`` with
the local directory, and ``postgresql+s3`` with `S3BlobStore` on a real Ceph RGW (tests/_services.py; a fresh
bucket per test, named by ``CKPT_STORAGE_URL`` with the ``AWS_*`` settings, so servers a test starts use it too).
``CKPT_TEST_BLOBS`` (``local``, ``s3`` or ``both``, the default) picks the blob backends; a test marked
``@pytest.mark.blobs("local")`` (it looks at files of the local layout) runs with that one only. In tests/api
the S3 pair runs for a representative subset of modules unless ``CKPT_TEST_S3_API=all`` (see `_API_S3_MODULES`).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.factories import make_original, make_trained

# Real backing services (Ceph RGW for the S3 blob store), started only by the tests that use them.
pytest_plugins = ["tests._services"]

_BACKENDS = ("sqlite", "postgresql")
_BLOBS = ("local", "s3")
# (index, blobs) pairs: the S3 store runs with PostgreSQL, the index a team's replicas share with it.
_PAIRS = (("sqlite", "local"), ("postgresql", "local"), ("postgresql", "s3"))
# The API suite's S3 runs cost about 8 minutes on a loaded 2-core machine for all of tests/api; by default they cover
# a representative subset (upload, download with Range, merge, diff, strip, names, delete, GC, fsck, conversions,
# short ids), tests/store runs fully. CKPT_TEST_S3_API=all runs every API test on S3 too.
_API_S3_MODULES = frozenset({
    "test_checkpoints", "test_operations", "test_s3_downloads", "test_admin", "test_download_url",
    "test_conversions", "test_short_ids", "test_real_server",
})
_ROOT = Path(__file__).resolve().parent.parent
_TEMPLATE = "ckpt_template"


def _wanted(variable: str, choices: tuple[str, ...]) -> list[str]:
    # CKPT_TEST_INDEX / CKPT_TEST_BLOBS: one of the choices, or "both" (the default).
    mode = os.environ.get(variable, "both").strip().lower()
    if mode == "both":
        return list(choices)
    if mode not in choices:
        raise pytest.UsageError(f"{variable} must be {', '.join(choices)} or both, not {mode!r}")
    return [mode]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "index_backend" not in metafunc.fixturenames:
        return
    index_marker = metafunc.definition.get_closest_marker("index")
    blobs_marker = metafunc.definition.get_closest_marker("blobs")
    module = metafunc.definition.path
    s3_skipped_here = (
        module.parent.name == "api" and module.stem not in _API_S3_MODULES
        and os.environ.get("CKPT_TEST_S3_API", "").strip().lower() != "all"
    )
    params = [
        index if blobs == "local" else f"{index}+{blobs}"
        for index, blobs in _PAIRS
        if index in _wanted("CKPT_TEST_INDEX", _BACKENDS) and blobs in _wanted("CKPT_TEST_BLOBS", _BLOBS)
        and (index_marker is None or index in index_marker.args)
        and (blobs_marker is None or blobs in blobs_marker.args)
        and not (blobs == "s3" and s3_skipped_here)
    ]
    metafunc.parametrize("index_backend", params, indirect=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _admin(server: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL server for the session (installed first if missing); yields its URL without a database."""
    from service.store.index import MetadataIndex

    # Under the system temp dir: as root the server runs as the user postgres, who must reach it.
    directory = Path(tempfile.mkdtemp(prefix="ckpt-pg-"))
    script = _ROOT / "scripts" / "services" / "postgres.sh"
    env = {**os.environ, "PGPORT": str(_free_port())}
    started = subprocess.run([str(script), "start", str(directory)], env=env, capture_output=True, text=True,
                             timeout=900)
    if started.returncode != 0:
        raise RuntimeError(f"PostgreSQL did not start: {started.stderr[-2000:]}")
    server = started.stdout.strip().splitlines()[-1]
    try:
        _admin(server, f"CREATE DATABASE {_TEMPLATE}")
        template = MetadataIndex(f"{server}/{_TEMPLATE}")
        template.migrate()
        template.close()  # a template may have no open connections
        yield server
    finally:
        subprocess.run([str(script), "stop", str(directory)], capture_output=True, timeout=120)
        subprocess.run(["rm", "-rf", str(directory)], capture_output=True, timeout=120)


@pytest.fixture
def index_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str | None]:
    """The database URL of this test's index: None for SQLite in the data directory, else a fresh PostgreSQL
    database (also exported as CKPT_DATABASE_URL)."""
    index, _, blobs = str(request.param).partition("+")
    if blobs == "s3":
        bucket: str = request.getfixturevalue("s3_bucket")
        service = request.getfixturevalue("ceph_s3")
        for key, value in service.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("CKPT_STORAGE_URL", f"s3://{bucket}/store")
    else:
        monkeypatch.delenv("CKPT_STORAGE_URL", raising=False)
    if index == "sqlite":
        monkeypatch.delenv("CKPT_DATABASE_URL", raising=False)
        yield None
        return
    url = create_database(request.getfixturevalue("postgres_server"))
    monkeypatch.setenv("CKPT_DATABASE_URL", url)
    try:
        yield url
    finally:
        drop_database(url)


def create_database(server: str) -> str:
    """A fresh PostgreSQL database on the session's server, made from the migrated template; its URL."""
    name = f"t_{secrets.token_hex(8)}"
    _admin(server, f"CREATE DATABASE {name} TEMPLATE {_TEMPLATE}")
    return f"{server}/{name}"


def drop_database(url: str) -> None:
    """Drop a test's PostgreSQL database (if it is still there), cutting its open connections."""
    server, _, name = url.rpartition("/")
    _admin(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str | None:
    """The index of this test: `index_backend`'s URL where the test runs per backend, else None (SQLite)."""
    if "index_backend" in request.fixturenames:
        url: str | None = request.getfixturevalue("index_backend")
        return url
    return None


@pytest.fixture
def storage_url(request: pytest.FixtureRequest) -> str | None:
    """The blob store of this test: None for the local directory, else `s3://BUCKET/store` (see `index_backend`)."""
    if "index_backend" in request.fixturenames:
        request.getfixturevalue("index_backend")
        return os.environ.get("CKPT_STORAGE_URL")
    return None


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None, storage_url: str | None) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=database_url, storage_url=storage_url)


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def recipe_files(tmp_path: Path) -> dict[str, Path]:
    """The recipe's two files: the pretrained original, and the trained DataParallel file without BN stats."""
    original = make_original()
    trained = make_trained(original)
    paths = {"original": tmp_path / "original.pth", "trained": tmp_path / "trained.pth"}
    torch.save(original.state_dict(), paths["original"])
    torch.save(trained.state_dict(), paths["trained"])
    return paths
