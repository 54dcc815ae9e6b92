"""Load against a real `ckpt serve` on this 2-core machine.

- 16 clients upload 16 different large checkpoints at once (threads with httpx, streamed from files). Each
  upload succeeds, or gets 503 with Retry-After and is sent again until it succeeds. The RssAnon of the server
  and its children, sampled through the run, stays bounded: uploads stream to disk, so it does not grow with
  16 x the upload size. CI: 16 x 20 MB; long variant: 16 x 100 MB.
- A flood of hostile uploads (pickles that run code, garbage, zip bombs, broken safetensors...) from several
  threads, while good uploads go on: every hostile one is refused with a 4xx, no code runs, nothing hostile
  is stored, and every good upload succeeds.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.core import hostile
from tests.hardening.servers import (
    MemorySampler,
    Server,
    disk_state,
    http_problems,
    list_artifacts,
    random_checkpoint,
    send_with_retry,
    sha256_file,
    sha256_hex,
    start_server,
    stop_server,
    tmp_entries,
    tree_memory,
    upload_file,
    wait_until,
)

CLIENTS = 16
CI_MB, LONG_MB = 20, 100
MEMORY_BOUND = 1536 << 20  # 1.5 GB for the server and its children, whatever the upload size
MB = 1 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = start_server(tmp_path / "data", log_path=tmp_path / "server.log")
    try:
        yield srv
    finally:
        stop_server(srv)
    assert srv.server_errors() == [], srv.server_errors()[0]


def _big_files(directory: Path, *, count: int, megabytes: int) -> list[Path]:
    # One random tensor shared by all files plus a per-file tensor: different bytes, cheap to write.
    base = torch.randn(megabytes * MB // 4)
    directory.mkdir()
    paths = []
    for i in range(count):
        path = directory / f"big-{i}.pth"
        torch.save({"w": base, "salt": torch.tensor([i])}, path)
        paths.append(path)
    return paths


def test_concurrent_large_uploads_keep_memory_bounded(server: Server, tmp_path: Path, long_run: bool,
                                                      figures: dict[str, Any]) -> None:
    megabytes = LONG_MB if long_run else CI_MB
    paths = _big_files(tmp_path / "big", count=CLIENTS, megabytes=megabytes)
    barrier = threading.Barrier(CLIENTS)
    results: dict[int, tuple[int, str, int]] = {}
    errors: list[str] = []

    def client_thread(i: int) -> None:
        with server.client(timeout=600) as client:
            barrier.wait(60)
            try:
                res = upload_file(client, paths[i], raw=i % 4 == 3, attempts=100)
            except Exception as exc:  # reported below with the others
                errors.append(f"client {i}: {exc!r}")
                return
            r = res.response
            results[i] = (r.status_code, r.json().get("id", r.text[:200]), res.overloaded)

    with server.client() as client:  # parser workers start with the first upload: not part of the growth
        warm = random_checkpoint(0, floats=1024)
        assert client.post("/checkpoints", files={"file": ("warm.pth", warm)}).status_code == 201
    baseline = tree_memory(server.pid)
    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(CLIENTS)]
    with MemorySampler(server.pid) as memory:
        for t in threads:
            t.start()
        for t in threads:
            t.join(1800)
            assert not t.is_alive()
    assert errors == []
    assert {i: r[0] for i, r in results.items()} == {i: 201 for i in range(CLIENTS)}, results
    assert {i: r[1] for i, r in results.items()} == {i: sha256_file(p) for i, p in enumerate(paths)}
    assert wait_until(lambda: tmp_entries(server.data_dir) == [], timeout=60), tmp_entries(server.data_dir)
    assert disk_state(server.data_dir).problems == []
    with server.client(timeout=600) as client:
        artifacts = list_artifacts(client)
        assert len(artifacts) == CLIENTS + 1
        assert http_problems(client, artifacts) == []
    total = sum(p.stat().st_size for p in paths)
    figures.update(clients=CLIENTS, upload_mb=megabytes, total_mb=round(total / MB),
                   retried_503=sum(r[2] for r in results.values()),
                   baseline_rss_anon_mb=round(baseline.rss_anon / MB),
                   peak_rss_anon_mb=round(memory.peak_rss_anon / MB),
                   baseline_pss_anon_mb=round(baseline.pss_anon / MB),
                   peak_pss_anon_mb=round(memory.peak_pss_anon / MB),
                   processes=memory.peak_processes, samples=memory.samples, lost=0)
    assert memory.samples > 10
    assert memory.peak_rss_anon < MEMORY_BOUND, f"peak RssAnon {memory.peak_rss_anon / MB:.0f} MB"
    # Streaming: what the uploads add is far below what they carry (all 16 in memory would be `total`).
    growth = memory.peak_pss_anon - baseline.pss_anon
    assert growth < max(total // 4, 256 * MB), f"grew by {growth / MB:.0f} MB"


def _hostile_files(directory: Path, marker: Path) -> list[Path]:
    directory.mkdir()
    builders: dict[str, Callable[[Path], Path]] = {
        "rce-zip.pth": lambda p: hostile.make_rce_zip(p, marker),
        "rce-legacy.pth": lambda p: hostile.make_rce_legacy(p, marker),
        "rce-raw.pkl": lambda p: hostile.make_rce_raw_pickle(p, marker),
        "garbage.pth": hostile.make_garbage,
        "text.pth": hostile.make_text,
        "empty.pth": hostile.make_empty,
        "truncated.pth": hostile.make_truncated,
        "bomb.pth": hostile.make_deflate_bomb,
        "duplicate.pth": hostile.make_duplicate_entries,
        "dotdot.pth": hostile.make_dotdot_entry,
        "overlapping.pth": hostile.make_overlapping_entries,
        "non-torch.zip": hostile.make_non_torch_zip,
        "torchscript.pt": hostile.make_torchscript,
        "st-offsets.safetensors": hostile.make_safetensors_offsets_beyond_file,
        "st-header.safetensors": hostile.make_safetensors_header_too_long,
        "st-overlap.safetensors": hostile.make_safetensors_overlapping,
        "st-dtype.safetensors": hostile.make_safetensors_bad_dtype,
    }
    return [build(directory / name) for name, build in builders.items()]


def test_hostile_flood_does_not_stop_good_uploads(server: Server, tmp_path: Path, long_run: bool,
                                                   figures: dict[str, Any]) -> None:
    marker = tmp_path / "code-ran"
    bad_files = _hostile_files(tmp_path / "hostile", marker)
    good_per_thread = 20 if long_run else 5
    good = {t: [random_checkpoint(1000 * t + i, floats=1 << 20) for i in range(good_per_thread)]
            for t in range(2)}
    stop = threading.Event()
    lock = threading.Lock()
    statuses = Counter[str]()
    failures: list[str] = []
    good_ids: list[str] = []

    def flooder(k: int) -> None:
        with server.client(timeout=300) as client:
            rounds = 0
            while not stop.is_set() or rounds == 0:
                for i, path in enumerate(bad_files):
                    res = upload_file(client, path, raw=(i + k) % 2 == 0, attempts=100)
                    code = res.response.status_code
                    with lock:
                        statuses[f"{code}"] += 1
                        if code not in (400, 413, 422):
                            failures.append(f"hostile {path.name}: {code} {res.response.text[:300]}")
                rounds += 1

    def good_uploader(t: int) -> None:
        with server.client(timeout=300) as client:
            for i, data in enumerate(good[t]):
                send = functools.partial(client.post, "/checkpoints", files={"file": ("good.pth", data)},
                                         data={"name": f"good-{t}-{i}"})
                res = send_with_retry(send, attempts=100)
                with lock:
                    if res.response.status_code == 201 and res.response.json()["id"] == sha256_hex(data):
                        good_ids.append(sha256_hex(data))
                    else:
                        failures.append(f"good {t}-{i}: {res.response.status_code} {res.response.text[:300]}")

    flooders = [threading.Thread(target=flooder, args=(k,)) for k in range(4)]
    uploaders = [threading.Thread(target=good_uploader, args=(t,)) for t in good]
    with MemorySampler(server.pid) as memory:
        for th in flooders:
            th.start()
        # The flood is on before the good uploads start, and goes on until they are done.
        assert wait_until(lambda: sum(statuses.values()) >= len(bad_files), timeout=300)
        for th in uploaders:
            th.start()
        for th in uploaders:
            th.join(1200)
        stop.set()
        for th in flooders:
            th.join(1200)
    assert failures == []
    assert not marker.exists(), "a hostile pickle ran code in the server"
    assert len(good_ids) == sum(map(len, good.values()))
    assert wait_until(lambda: tmp_entries(server.data_dir) == [], timeout=60), tmp_entries(server.data_dir)
    assert disk_state(server.data_dir).problems == []
    with server.client() as client:
        artifacts = list_artifacts(client)
        assert {a["id"] for a in artifacts} == set(good_ids)  # nothing hostile was stored
        assert http_problems(client, artifacts) == []
    figures.update(hostile_kinds=len(bad_files), hostile_requests=sum(statuses.values()),
                   hostile_statuses=dict(statuses), good_uploads=len(good_ids),
                   peak_rss_anon_mb=round(memory.peak_rss_anon / MB),
                   peak_pss_anon_mb=round(memory.peak_pss_anon / MB), lost=0)
