"""Several processes on one root."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.store import ArtifactStore
from service.store._fs import locked_work_dir, remove_if_unlocked
from tests.store._workers import context, ingest_after_barrier
from tests.store.conftest import tmp_entries

N = 4


def run_ingests(root: Path, paths: list[Path], database_url: str | None) -> list[tuple[str, bool]]:
    ctx = context()
    barrier = ctx.Barrier(len(paths))
    results = ctx.Queue()
    procs = [ctx.Process(target=ingest_after_barrier, args=(str(root), str(p), barrier, results, database_url),
                         daemon=True)
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


def test_same_bytes_from_several_processes_give_one_artifact(tmp_path: Path, ckpt: Callable[..., Path],
                                                             database_url: str | None) -> None:
    root = tmp_path / "store"
    path = ckpt(0)
    out = run_ingests(root, [path] * N, database_url)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert {i for i, _ in out} == {digest}
    assert sorted(created for _, created in out) == [False] * (N - 1) + [True]
    store = ArtifactStore(root, database_url=database_url)
    assert store.list().total == 1
    assert store.verify(digest).ok
    assert tmp_entries(store) == []


def test_different_bytes_from_several_processes_all_land(tmp_path: Path, ckpt: Callable[..., Path],
                                                         database_url: str | None) -> None:
    root = tmp_path / "store"
    paths = [ckpt(i) for i in range(N)]
    out = run_ingests(root, paths, database_url)
    assert all(created for _, created in out)
    store = ArtifactStore(root, database_url=database_url)
    assert sorted(m.id for m in store.list().items) == sorted(hashlib.sha256(p.read_bytes()).hexdigest()
                                                              for p in paths)
    assert all(store.verify(i).ok for i, _ in out)
    assert tmp_entries(store) == []


def test_a_work_dir_removed_by_a_collector_before_it_is_locked_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interleaving of a concurrent collect_garbage(grace_seconds=0): it runs, for real, right after the
    # first mkdir and before the creator opens and locks the directory.
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    real_mkdir = os.mkdir
    collected: list[str] = []

    def mkdir_then_collect(path: Any, mode: int = 0o777, **kwargs: Any) -> None:
        real_mkdir(path, mode, **kwargs)
        if not collected:
            assert remove_if_unlocked(Path(path))
            collected.append(str(path))

    monkeypatch.setattr(os, "mkdir", mkdir_then_collect)
    with locked_work_dir(tmp_dir, "work-") as work:
        assert work.is_dir()
        assert str(work) != collected[0]
        assert not remove_if_unlocked(work)  # now locked: a collector leaves it alone
    assert collected and os.listdir(tmp_dir) == []
