"""A full disk under a real `ckpt serve`: the data directory is a small tmpfs.

When an upload or a merge's output does not fit, the server answers 507 with a problem document that says
so, removes its temp files, and every earlier artifact stays intact and downloadable; once space is free
again the server works as before.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.hardening.servers import (
    Server,
    checkpoint_bytes,
    disk_state,
    download_digest,
    mlp_original,
    mlp_trained,
    random_checkpoint,
    sha256_hex,
    start_server,
    stop_server,
    tmp_entries,
    wait_until,
)

TMPFS_MB = 40


def _used_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a {TMPFS_MB} MB tmpfs for the data directory (needs root or "
                    f"CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def full_server(small_disk: Path, tmp_path: Path, mid_config: Path) -> Iterator[Server]:
    server = start_server(small_disk, log_path=tmp_path / "server.log", config=mid_config)
    try:
        yield server
    finally:
        stop_server(server)
    assert server.server_errors() == [], server.server_errors()[0]


def _assert_storage_full(r: httpx.Response) -> None:
    assert r.status_code == 507, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["status"] == 507
    assert problem["title"] == "Storage full"
    assert "no space left" in problem["detail"].lower()


def _assert_intact(client: httpx.Client, ids: list[str]) -> None:
    for artifact_id in ids:
        status, digest, _ = download_digest(client, artifact_id)
        assert (status, digest) == (200, artifact_id)


def test_upload_that_does_not_fit_gets_507_and_keeps_earlier_artifacts(full_server: Server,
                                                                      figures: dict[str, object]) -> None:
    data_dir = full_server.data_dir
    earlier = [random_checkpoint(seed, floats=n) for seed, n in ((1, 1 << 10), (2, 2 << 20))]  # 4 kB, 8 MB
    too_big = random_checkpoint(3, floats=12 << 20)  # 48 MB on a 40 MB disk
    with full_server.client() as client:
        ids = []
        for data in earlier:
            r = client.post("/checkpoints", files={"file": ("ok.pth", data)})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        used_before = _used_bytes(data_dir)
        for raw in (False, True):
            if raw:
                r = client.post("/checkpoints", content=too_big,
                                headers={"Content-Type": "application/octet-stream"})
            else:
                r = client.post("/checkpoints", files={"file": ("big.pth", too_big)})
            _assert_storage_full(r)
            assert wait_until(lambda: tmp_entries(data_dir) == [], timeout=30), tmp_entries(data_dir)
            assert _used_bytes(data_dir) <= used_before + (1 << 20)
            assert disk_state(data_dir).problems == []
            _assert_intact(client, ids)
            assert {a["id"] for a in client.get("/checkpoints").json()["items"]} == set(ids)
        # The space came back: the next upload that fits is stored.
        after = random_checkpoint(4, floats=1 << 20)
        r = client.post("/checkpoints", files={"file": ("after.pth", after)})
        assert r.status_code == 201 and r.json()["id"] == sha256_hex(after)
        assert client.get("/readyz").status_code == 200
    figures.update(tmpfs_mb=TMPFS_MB, refused_bytes=len(too_big), earlier_artifacts_intact=len(ids), lost=0)


def test_merge_whose_output_does_not_fit_gets_507_and_keeps_inputs(full_server: Server,
                                                                  figures: dict[str, object]) -> None:
    # Two 16 MB inputs fit on the 40 MB disk; their 16 MB merge result does not.
    data_dir = full_server.data_dir
    original = mlp_original(0, dim=1024, depth=4)
    files = {"orig": checkpoint_bytes(original), "trained": checkpoint_bytes(mlp_trained(original, 1))}
    with full_server.client() as client:
        r = client.post("/architectures", json={"name": "big-mlp", "from_checkpoint": _put(client, files)})
        assert r.status_code == 201, r.text
        used_before = _used_bytes(data_dir)
        for output_format in ("pth", "safetensors"):
            r = client.post("/merge", data={"architecture": "big-mlp", "original": "orig", "trained": "trained",
                                            "output_format": output_format, "name": "merged"})
            _assert_storage_full(r)
            assert wait_until(lambda: tmp_entries(data_dir) == [], timeout=30), tmp_entries(data_dir)
            assert _used_bytes(data_dir) <= used_before + (1 << 20)
            assert disk_state(data_dir).problems == []
            _assert_intact(client, [sha256_hex(b) for b in files.values()])
            assert "merged" not in {n["name"] for n in client.get("/names").json()}
            assert client.get("/checkpoints").json()["total"] == 2
    figures.update(tmpfs_mb=TMPFS_MB, input_bytes=sum(map(len, files.values())), lost=0)


def _put(client: httpx.Client, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        r = client.post("/checkpoints", files={"file": (f"{name}.pth", data)}, data={"name": name})
        assert r.status_code == 201, r.text
    return "orig"
