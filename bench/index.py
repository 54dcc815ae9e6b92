"""The metadata index at scale: the queries the API runs, over N artifacts made through the store API.

    .venv/bin/python -m bench.index                 # 100,000 artifacts per backend (SQLite and PostgreSQL)
    .venv/bin/python -m bench.index --small         # 2,000 (what CI runs through bench/run.sh --small)
    .venv/bin/python -m bench.index --backend sqlite --count 20000

Every artifact is a real (tiny) checkpoint stored with `ArtifactStore.store_state_dict`: blob, index row, labels
(`team` of 10 values, a unique `run`), every 5th derived from the one before (lineage), every 100th named. Then
each query is timed (median of `--rounds`, milliseconds, in-process, warm): the first page of `list` (what
`GET /checkpoints` serves), a label filter, a name filter, name resolution, one artifact's lineage (its metadata
and what was made from it), GC's index query (unreferenced artifacts past retention), the retention policy's
query (every artifact past its age), and opening the store
(start-up: it must not read every artifact). PostgreSQL is a real server, started with
scripts/services/postgres.sh unless `--database-url` names one. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from service.core.manifest import build_manifest
from service.store import ArtifactStore, Lineage
from service.store.index.sql import RetentionPolicy

ROOT = Path(__file__).resolve().parent.parent
GOALS_MS = {"first_page": 50.0, "label_filter": 50.0, "name_filter": 50.0, "name_resolution": 5.0,
            "lineage": 50.0, "gc_query": 50.0, "retention_query": 2000.0}
LABELS = {
    "first_page": "first page (`list`, 50 items)",
    "label_filter": "label filter (`team=t3`, 50 items)",
    "name_filter": "name filter",
    "name_resolution": "name resolution (`resolve`)",
    "lineage": "one artifact's lineage (metadata + made from)",
    "gc_query": "GC's index query (1,000 unreferenced)",
    "retention_query": "retention policy (every artifact a candidate: names, lineage, keep-last 5 per `team`)",
    "open_store": "opening the store (start-up)",
}


def seed(store: ArtifactStore, count: int, *, progress: bool) -> dict[str, Any]:
    """Store `count` tiny artifacts through the store API; returns what the queries need."""
    started = time.perf_counter()
    previous = ""
    derived = ""
    for i in range(count):
        sd = {"w": torch.tensor([float(i)]), "b": torch.tensor([float(i % 7)])}
        lineage = (Lineage(operation="strip", inputs={"checkpoint": previous}, params={"prefixes": None})
                   if i % 5 == 4 else None)
        meta = store.store_state_dict(sd, manifest=build_manifest(sd), lineage=lineage,
                                      labels={"team": f"t{i % 10}", "run": str(i)}).artifact
        if lineage is not None:
            derived = meta.id
        if i % 100 == 0:
            store.set_name(f"model-{i}", meta.id)
        previous = meta.id
        if progress and i and i % 10_000 == 0:
            rate = i / (time.perf_counter() - started)
            print(f"  seeded {i} ({rate:.0f}/s)", file=sys.stderr, flush=True)
    return {"seconds": time.perf_counter() - started, "derived": derived, "input": previous}


def _median_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm (connections, caches of the database's pages)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def measure(root: Path, database_url: str | None, seeded: dict[str, Any], rounds: int) -> dict[str, float]:
    open_ms = _median_ms(lambda: ArtifactStore(root, database_url=database_url).close(), max(3, rounds // 4))
    store = ArtifactStore(root, database_url=database_url)
    derived = seeded["derived"]
    future = "9999-01-01T00:00:00.000000Z"
    policy = RetentionPolicy(created_before=future, keep_last=5, label_keys=("team",))  # the worst case: no age
    figures = {
        "first_page": _median_ms(lambda: store.list(limit=50), rounds),
        "label_filter": _median_ms(lambda: store.list(label="team=t3", limit=50), rounds),
        "name_filter": _median_ms(lambda: store.list(name="model-100", limit=50), rounds),
        "name_resolution": _median_ms(lambda: store.resolve("model-100"), rounds),
        "lineage": _median_ms(lambda: (store.metadata(derived).lineage, store.made_from(derived)), rounds),
        "gc_query": _median_ms(lambda: store.index.unreferenced(created_before=future, limit=1000), rounds),
        "retention_query": _median_ms(lambda: store.index.retention_candidates(policy), max(3, rounds // 10)),
        "open_store": open_ms,
    }
    # The pages must hold what they claim (a benchmark of an empty answer would be fast and wrong).
    assert len(store.list(label="team=t3", limit=50).items) == 50
    assert store.list(name="model-100").total == 1
    store.close()
    return figures


def _start_postgres(directory: Path) -> str:
    script = ROOT / "scripts" / "services" / "postgres.sh"
    with socket.socket() as probe:  # a free loopback port, unless PGPORT names one
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "PGPORT": os.environ.get("PGPORT", port)}
    out = subprocess.run([str(script), "start", str(directory)], env=env, check=True, capture_output=True,
                         text=True, timeout=900).stdout
    server = out.strip().splitlines()[-1]
    import psycopg

    name = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    return f"{server}/{name}"


def run_backend(backend: str, count: int, rounds: int, workdir: Path, database_url: str | None,
                progress: bool) -> dict[str, Any]:
    root = workdir / f"data-{backend}"
    pg_dir = Path(tempfile.mkdtemp(prefix="ckpt-bench-pg-"))  # reachable by the postgres user
    url = None
    try:
        if backend == "postgresql":
            url = database_url or _start_postgres(pg_dir)
        store = ArtifactStore(root, database_url=url)
        print(f"{backend}: seeding {count} artifacts through the store API", file=sys.stderr, flush=True)
        seeded = seed(store, count, progress=progress)
        store.close()
        figures = measure(root, url, seeded, rounds)
        return {"backend": backend, "count": count, "seed_seconds": round(seeded["seconds"], 1),
                "figures_ms": {k: round(v, 2) for k, v in figures.items()}}
    finally:
        if backend == "postgresql" and database_url is None:
            subprocess.run([str(ROOT / "scripts" / "services" / "postgres.sh"), "stop", str(pg_dir)],
                           capture_output=True, timeout=120)
        subprocess.run(["rm", "-rf", str(pg_dir)], capture_output=True, timeout=120)


def render(results: list[dict[str, Any]]) -> str:
    backends = [r["backend"] for r in results]
    lines = [
        f"Index benchmark, {datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, {os.cpu_count()} cores, "
        f"{results[0]['count']:,} artifacts per backend (median ms, in-process, warm).",
        "",
        "| query | goal | " + " | ".join(backends) + " |",
        "|---|---|" + "---|" * len(backends),
    ]
    for key, label in LABELS.items():
        goal = f"≤ {GOALS_MS[key]:g} ms" if key in GOALS_MS else "no full read"
        lines.append(f"| {label} | {goal} | " + " | ".join(f"{r['figures_ms'][key]:.2f}" for r in results) + " |")
    lines.append("| seeding (s, through the store API) | | " + " | ".join(str(r["seed_seconds"]) for r in results)
                 + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="2,000 artifacts (CI)")
    parser.add_argument("--count", type=int, help="artifacts per backend (default 100,000; --small: 2,000)")
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--database-url", help="an existing, empty PostgreSQL database instead of a throwaway server")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--workdir", help="where the data directories go (default: a temp dir, removed)")
    parser.add_argument("--output", help="write the Markdown table here (and the JSON beside it)")
    args = parser.parse_args(argv)
    count = args.count or (2_000 if args.small else 100_000)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-index-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = [run_backend(b, count, args.rounds, workdir, args.database_url, progress=not args.small)
                   for b in backends]
    table = render(results)
    print(table)
    if args.output:
        out = Path(args.output)
        out.write_text(table)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
