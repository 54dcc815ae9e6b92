"""Fixtures of the scale-out tests: what the replicas share, and a cluster of replicas behind haproxy."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._services import S3Service
from tests.conftest import create_database, drop_database
from tests.scale.cluster import Haproxy, Replica, free_port

# The counts of the end-to-end run, shown at the end of the session (also printed by the test itself).
FIGURES: dict[str, str] = {}

# Each replica keeps one parser worker of each kind: four replicas' worth of torch processes share 2 cores here.
REPLICA_ENV = {"CKPT_SANDBOX_WORKERS": "1", "CKPT_SANDBOX_READ_WORKERS": "1"}


@pytest.fixture
def shared_env(postgres_server: str, ceph_s3: S3Service, s3_bucket: str) -> Iterator[dict[str, str]]:
    """The settings every replica shares: a fresh PostgreSQL database (the index: artifacts, names, architecture
    specs), a fresh bucket on Ceph RGW (the blobs), and the secret that signs download URLs (a URL one replica
    signs opens on any other). Each replica keeps its own data directory (staging, the read-through cache)."""
    url = create_database(postgres_server)
    try:
        yield {
            **REPLICA_ENV,
            **ceph_s3.env(),
            "CKPT_DATABASE_URL": url,
            "CKPT_STORAGE_URL": f"s3://{s3_bucket}/scale",
            "CKPT_URL_SIGNING_SECRET": secrets.token_hex(32),
        }
    finally:
        drop_database(url)


class Cluster:
    """Replicas (not started until asked) and haproxy in front of the first `behind_proxy` of them."""

    def __init__(self, base: Path, env: dict[str, str]) -> None:
        self.base = base
        self.env = env
        self.replicas: list[Replica] = []
        self.haproxy: Haproxy | None = None

    def replica(self, name: str) -> Replica:
        replica = Replica(name, free_port(), self.base / name, self.env, self.base / f"{name}.log")
        self.replicas.append(replica)
        return replica

    def front(self, replicas: list[Replica]) -> Haproxy:
        self.haproxy = Haproxy(self.base / "haproxy", [r.backend for r in replicas])
        self.haproxy.wait_states({f"replica{i}": "UP" for i in range(1, len(replicas) + 1)})
        return self.haproxy

    def logs(self) -> str:
        """The tail of every replica's log and of haproxy's, for a failure message."""
        parts = []
        for path in [r.log_path for r in self.replicas] + [self.base / "haproxy" / "haproxy.log"]:
            if path.exists():
                parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
        return "\n".join(parts)

    def close(self) -> None:
        for replica in self.replicas:
            replica.stop()
        if self.haproxy is not None:
            self.haproxy.stop()


@pytest.fixture
def cluster(tmp_path: Path, shared_env: dict[str, str]) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", shared_env)
    c.base.mkdir()
    try:
        yield c
    finally:
        c.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for what, value in FIGURES.items():
        terminalreporter.write_line(f"scale-out: {what}: {value}")
