"""Functions run in child processes by the concurrency and crash tests (importable by the forkserver)."""

from __future__ import annotations

import io
import multiprocessing as mp
import random
import time
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import torch

from service.errors import ArtifactNotFound, NameNotFound
from service.store import ArtifactStore

_CTX: Any = None


def context() -> Any:
    """A forkserver context with torch and the store preloaded: children start in milliseconds and never
    inherit the test process's threads or file descriptors."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["tests.store._workers"])
    return _CTX


def ingest_after_barrier(root: str, path: str, barrier: Barrier, results: Any, database_url: str | None) -> None:
    store = ArtifactStore(Path(root), database_url=database_url)
    barrier.wait()
    result = store.ingest_file(Path(path))
    results.put((result.artifact.id, result.created))


def _fresh_checkpoint(rng: random.Random) -> bytes:
    g = torch.Generator().manual_seed(rng.getrandbits(48))
    buf = io.BytesIO()
    rows = rng.randint(8, 64)
    torch.save({"w": torch.randn(rows, 16, generator=g), "b": torch.randn(16, generator=g)}, buf)
    return buf.getvalue()


def churn(root: str, sources: list[str], seed: int, started: Event, database_url: str | None) -> None:
    """Ingest, derive, name and delete forever, until killed."""
    torch.set_num_threads(1)  # several churners share two cores; idle OpenMP workers would spin
    rng = random.Random(seed)
    store = ArtifactStore(Path(root), database_url=database_url)
    started.set()
    while True:
        try:
            _churn_once(store, rng, sources, seed)
        except (ArtifactNotFound, NameNotFound):
            pass  # another churner deleted what this one just listed


def _churn_once(store: ArtifactStore, rng: random.Random, sources: list[str], seed: int) -> None:
    op = rng.random()
    if op < 0.35:
        data = _fresh_checkpoint(rng)
        step = rng.choice([512, 4096, 1 << 20])
        store.ingest((data[i:i + step] for i in range(0, len(data), step)), labels={"seed": str(seed)})
    elif op < 0.55:
        store.ingest_file(Path(rng.choice(sources)))
    elif op < 0.7:
        g = torch.Generator().manual_seed(rng.getrandbits(48))
        store.store_state_dict({"x": torch.randn(32, 8, generator=g)},
                               format=rng.choice(["pth", "safetensors"]))
    elif op < 0.85:
        page = store.list(limit=5)
        if page.items:
            store.set_name(f"n{rng.randint(0, 3)}", rng.choice(page.items).id)
    else:
        page = store.list(limit=20)
        if page.items:
            store.delete(rng.choice(page.items).id, force=True)
    if rng.random() < 0.1:
        store.collect_garbage(grace_seconds=0)  # a concurrent collector must not break a writer


def hold_upload(root: str, ready: Event, database_url: str | None) -> None:
    """Open an upload, write part of it and hang: the test kills this process."""
    store = ArtifactStore(Path(root), database_url=database_url)
    upload = store.open_upload()
    upload.write(b"partial upload")
    ready.set()
    while True:
        time.sleep(1)
