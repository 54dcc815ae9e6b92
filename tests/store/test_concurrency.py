"""Several processes on one root."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from service.store import ArtifactStore
from tests.store._workers import context, ingest_after_barrier
from tests.store.conftest import tmp_entries

N = 4


def run_ingests(root: Path, paths: list[Path]) -> list[tuple[str, bool]]:
    ctx = context()
    barrier = ctx.Barrier(len(paths))
    results = ctx.Queue()
    procs = [ctx.Process(target=ingest_after_barrier, args=(str(root), str(p), barrier, results), daemon=True)
             for p in paths]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    results.close()
    results.join_thread()
    return out


def test_same_bytes_from_several_processes_give_one_artifact(tmp_path: Path,
                                                             ckpt: Callable[..., Path]) -> None:
    root = tmp_path / "store"
    path = ckpt(0)
    out = run_ingests(root, [path] * N)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert {i for i, _ in out} == {digest}
    assert sorted(created for _, created in out) == [False] * (N - 1) + [True]
    store = ArtifactStore(root)
    assert store.list().total == 1
    assert store.verify(digest).ok
    assert tmp_entries(store) == []


def test_different_bytes_from_several_processes_all_land(tmp_path: Path, ckpt: Callable[..., Path]) -> None:
    root = tmp_path / "store"
    paths = [ckpt(i) for i in range(N)]
    out = run_ingests(root, paths)
    assert all(created for _, created in out)
    store = ArtifactStore(root)
    assert sorted(m.id for m in store.list().items) == sorted(hashlib.sha256(p.read_bytes()).hexdigest()
                                                              for p in paths)
    assert all(store.verify(i).ok for i, _ in out)
    assert tmp_entries(store) == []
