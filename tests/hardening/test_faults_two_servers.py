"""Two `ckpt serve` processes on one data directory, hammered together.

Threads upload the same files and different files through both servers at once (the identical ones released
together by a barrier), set names from both, and merge the same inputs through both, while both servers
collect garbage every second with no grace period. Every request succeeds
(503s are retried after their Retry-After); identical bytes give one artifact, created exactly once; every
artifact verifies through either server; both servers list the same names, pointing where the last writer
of each name (the same id from everyone) put them.
"""

from __future__ import annotations

import functools
import random
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.hardening.servers import (
    Server,
    checkpoint_bytes,
    disk_state,
    http_problems,
    list_artifacts,
    list_names,
    mlp_original,
    mlp_trained,
    random_checkpoint,
    send_with_retry,
    sha256_hex,
    start_server,
    stop_server,
    tmp_entries,
    wait_until,
)

THREADS_PER_SERVER = 3
CI_SHARED, LONG_SHARED = 6, 30  # files every thread uploads
CI_OWN, LONG_OWN = 3, 15  # files only one thread uploads
# A heavy pool of one slot and no queue, so that the threads of one server do get 503s and retry them; and a
# garbage collection every second with no grace period in both servers, so that each one's collector runs
# over the other's live uploads (it must leave them alone: they are flock'ed).
ENV = {"CKPT_HEAVY_CONCURRENCY": "1", "CKPT_HEAVY_QUEUE": "0", "CKPT_RETRY_AFTER_SECONDS": "1",
       "CKPT_TMP_GRACE_SECONDS": "0", "CKPT_GC_INTERVAL_SECONDS": "1"}


@pytest.fixture
def servers(tmp_path: Path, mid_config: Path) -> Iterator[tuple[Server, Server]]:
    data_dir = tmp_path / "data"
    a = start_server(data_dir, log_path=tmp_path / "a.log", config=mid_config, env=ENV)
    try:
        b = start_server(data_dir, log_path=tmp_path / "b.log", config=mid_config, env=ENV)
    except BaseException:
        stop_server(a)
        raise
    try:
        yield a, b
    finally:
        stop_server(a)
        stop_server(b)
    for srv in (a, b):
        assert srv.server_errors() == [], srv.server_errors()[0]


def test_two_servers_on_one_data_dir(servers: tuple[Server, Server], long_run: bool,
                                     figures: dict[str, Any]) -> None:
    a, b = servers
    n_shared, n_own = (LONG_SHARED, LONG_OWN) if long_run else (CI_SHARED, CI_OWN)
    n_threads = 2 * THREADS_PER_SERVER
    shared = [random_checkpoint(i, floats=(1 << 16) * (1 + i % 8)) for i in range(n_shared)]
    own = {t: [random_checkpoint(10_000 + t * 100 + i, floats=1 << 17) for i in range(n_own)]
           for t in range(n_threads)}
    original = mlp_original(0)
    with a.client() as client:
        r = client.post("/checkpoints", files={"file": ("o.pth", checkpoint_bytes(original))},
                        data={"name": "orig"})
        assert r.status_code == 201, r.text
    trained = checkpoint_bytes(mlp_trained(original, 1))
    barrier = threading.Barrier(n_threads)
    lock = threading.Lock()
    results: list[tuple[str, int, str]] = []  # (what, status, id)
    merge_ids: list[str] = []
    failures: list[str] = []
    overloaded = Counter[str]()

    def worker(t: int) -> None:
        label, srv = (("a", a), ("b", b))[t % 2]
        rng = random.Random(t)
        with srv.client(timeout=120) as client:

            def record(what: str, r: httpx.Response, retried: int) -> None:
                with lock:
                    overloaded[label] += retried
                    if r.status_code in (200, 201):
                        results.append((what, r.status_code, r.json()["id"]))
                    else:
                        failures.append(f"{what} via {srv.url}: {r.status_code} {r.text[:300]}")

            for i, data in enumerate(shared):
                barrier.wait(120)  # every thread sends the same bytes at the same moment
                raw = rng.random() < 0.3
                res = send_with_retry(functools.partial(_upload, client, data, raw, f"shared-{i}"))
                record(f"shared-{i}", res.response, res.overloaded)
                mine = own[t][i] if i < len(own[t]) else None
                if mine is not None:
                    res = send_with_retry(functools.partial(_upload, client, mine, False, f"own-{t}-{i}"))
                    record(f"own-{t}-{i}", res.response, res.overloaded)
            barrier.wait(120)
            res = send_with_retry(lambda: client.post(
                "/merge", files={"trained_file": ("t.pth", trained)},
                data={"architecture": "mid-mlp", "original": "orig", "name": "merged"}))
            record("merge", res.response, res.overloaded)
            if res.response.status_code in (200, 201):
                with lock:
                    merge_ids.append(res.response.json()["id"])

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
        assert not th.is_alive()
    assert failures == []

    expected = {f"shared-{i}": sha256_hex(d) for i, d in enumerate(shared)}
    expected |= {f"own-{t}-{i}": sha256_hex(d) for t, files in own.items() for i, d in enumerate(files)}
    created = Counter[str]()
    for what, status, artifact_id in results:
        if what != "merge":
            assert artifact_id == expected[what], what
        created[what] += status == 201
    # Identical bytes: one artifact, created once, whichever server and thread got there first.
    assert {w: c for w, c in created.items() if c != 1} == {}
    assert len(set(merge_ids)) == 1 and len(merge_ids) == n_threads
    merge_id = merge_ids[0]

    assert wait_until(lambda: tmp_entries(a.data_dir) == [], timeout=30), tmp_entries(a.data_dir)
    assert disk_state(a.data_dir).problems == []
    with a.client() as ca, b.client() as cb:
        listed_a = {x["id"]: x for x in list_artifacts(ca)}
        listed_b = {x["id"]: x for x in list_artifacts(cb)}
        assert _without_urls(listed_a) == _without_urls(listed_b)
        # the original, every distinct upload, the trained file and one merge result
        assert set(listed_a) == {sha256_hex(checkpoint_bytes(original)), sha256_hex(trained), merge_id,
                                 *expected.values()}
        items = list(listed_a.values())
        assert http_problems(ca, items[::2]) == []
        assert http_problems(cb, items[1::2]) == []
        names_a, names_b = list_names(ca), list_names(cb)
        assert names_a == names_b
        assert names_a == {**expected, "orig": sha256_hex(checkpoint_bytes(original)), "merged": merge_id}
    figures.update(servers=2, threads=n_threads, requests=len(results), distinct_uploads=len(expected),
                   artifacts=len(listed_a), retried_503=dict(overloaded), lost=0)


def _without_urls(listed: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i: {k: v for k, v in a.items() if k != "download_url"} for i, a in listed.items()}


def _upload(client: httpx.Client, data: bytes, raw: bool, name: str) -> httpx.Response:
    if raw:
        return client.post("/checkpoints", content=data, params={"name": name},
                           headers={"Content-Type": "application/octet-stream"})
    return client.post("/checkpoints", files={"file": ("c.pth", data)}, data={"name": name})
