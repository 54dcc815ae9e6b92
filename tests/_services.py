"""Real backing services for the tests, started on first use and stopped at the end of the session.

`ceph_s3`: a single-node Ceph cluster with radosgw (scripts/services/ceph-s3.sh: one mon, one BlueStore OSD on a
sparse file, S3 on a free loopback port), about 6 s to start; the script installs Debian's packages the first time.
`s3_bucket`: a fresh bucket per test, emptied (objects and multipart uploads) and removed afterwards.

A service that cannot start fails the tests that need it: it is never skipped.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import botocore.config
import pytest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "services" / "ceph-s3.sh"
# The first start may install ceph-mon, ceph-osd and radosgw with apt-get (about 11 s here); within pytest-timeout's
# 300 s for the first test, so that this fixture's own message is the one shown.
START_TIMEOUT_SECONDS = 280
_TIMINGS: dict[str, float] = {}


@dataclass(frozen=True)
class S3Service:
    """A running S3 endpoint and the keys of its one user."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    log_dir: Path = field(default=Path("."))

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and the service) at this endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self) -> S3Client:
        """An admin's view of the endpoint (create buckets, list multipart uploads), independent of the store."""
        config = botocore.config.Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=config,
        )
        return client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ceph_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    """A real Ceph RGW for this test session (started on first use, stopped and purged at the end)."""
    cluster = tmp_path_factory.mktemp("ceph")
    access, secret = "ckpt-test-" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    rgw_port = _free_port()
    env = {**os.environ, "RGW_PORT": str(rgw_port), "MON_PORT": str(_free_port()), "AK": access, "SK": secret}
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [str(SCRIPT), "start", str(cluster)],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        subprocess.run([str(SCRIPT), "stop", str(cluster)], check=False)
        pytest.fail(f"Ceph did not start within {START_TIMEOUT_SECONDS} s: {exc.stdout!r} {exc.stderr!r}")
    if proc.returncode != 0:
        subprocess.run([str(SCRIPT), "stop", str(cluster)], check=False)
        pytest.fail(f"Ceph did not start (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    total = time.monotonic() - started
    # The script's step lines count from after the install: the rest of the time went to apt-get.
    steps = re.findall(r"^\[(\d+\.\d+)s\]", proc.stdout, flags=re.MULTILINE)
    cluster_seconds = float(steps[-1]) if steps else total
    _TIMINGS["ceph_s3: cluster start (s)"] = cluster_seconds
    if total - cluster_seconds > 2:
        _TIMINGS["ceph_s3: package install (s)"] = total - cluster_seconds
    try:
        yield S3Service(f"http://127.0.0.1:{rgw_port}", access, secret, log_dir=cluster / "log")
    finally:
        subprocess.run([str(SCRIPT), "stop", str(cluster), "--purge"], check=False)


def empty_bucket(client: S3Client, bucket: str) -> None:
    """Remove every object and abort every multipart upload of a bucket."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


@pytest.fixture
def s3_bucket(ceph_s3: S3Service) -> Iterator[str]:
    """A new, empty bucket on the session's Ceph RGW; emptied and removed after the test."""
    client = ceph_s3.client()
    name = f"test-{uuid.uuid4().hex[:24]}"
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        empty_bucket(client, name)
        client.delete_bucket(Bucket=name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for what, seconds in _TIMINGS.items():
        terminalreporter.write_line(f"{what}: {seconds:.1f}")
