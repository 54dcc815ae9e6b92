"""Small uploads per second through haproxy, with one replica and with two.

    .venv/bin/python -m bench.scale                       # 1 and 2 replicas, 8 clients, 20 s each
    .venv/bin/python -m bench.scale --replicas 1 2 3 --clients 12 --seconds 30
    .venv/bin/python -m bench.scale --backends real       # on PostgreSQL and Ceph RGW, started here

Each client thread pushes distinct small checkpoints (a few KB, made before the clock starts) with
`CheckpointClient.push` (a HEAD, then the upload with its digest: every push stores a new artifact) through
haproxy (scripts/services/haproxy.sh) in front of N `ckpt serve` replicas (tests/scale/cluster.py) that share one
store, each with the default settings (two parser workers, two heavy slots). The store is one data directory
(`--backends local`, the default), or with `--backends real` a PostgreSQL index and a Ceph RGW bucket, both started
here (scripts/services/postgres.sh, ceph-s3.sh), each replica with its own data directory for staging and cache.
Reported: uploads per second and the latency percentiles, per replica count; the machine's cores, since the
clients, haproxy, every replica (with its parser workers) and the backends share them. Run by hand; asserts
nothing about time. Settings in the environment (CKPT_*, AWS_*) reach the replicas, so the same run works on
other backends.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bench.index import _start_postgres
from bench.s3 import ceph
from service.client import CheckpointClient, RetryPolicy
from service.store.blobs.s3 import make_s3_client
from tests.scale.cluster import ROOT, Haproxy, Replica, free_port

POSTGRES = ROOT / "scripts" / "services" / "postgres.sh"


def make_files(directory: Path, count: int) -> list[Path]:
    """`count` distinct small .pth files (a 16x16 layer and a bias; about 3 KB each)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        buf = io.BytesIO()
        torch.save({"layer.weight": torch.randn(16, 16, generator=generator), "layer.bias": torch.full((16,), i)},
                   buf)
        path = directory / f"small-{i}.pth"
        path.write_bytes(buf.getvalue())
        files.append(path)
    return files


def run_load(url: str, files: list[Path], clients: int, seconds: float, *, warm_up: bool = False) -> dict[str, Any]:
    """Push files from `clients` threads for `seconds` (or until the files run out); each file is pushed once."""
    lock = threading.Lock()
    queue = list(files)
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def client() -> None:
        with CheckpointClient(url, retry=RetryPolicy(attempts=6, backoff=0.2)) as ckpt:
            while time.monotonic() < deadline:
                with lock:
                    if not queue:
                        return
                    path = queue.pop()
                started = time.perf_counter()
                try:
                    ckpt.push(path)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    if not queue and not warm_up:
        print(f"  warning: ran out of files after {elapsed:.1f} s; pass more --files")
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else 0.0

    return {"uploads": len(latencies), "errors": len(errors), "seconds": round(elapsed, 1),
            "uploads_per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": pct(0.50), "p95_ms": pct(0.95),
            "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else 0.0,
            "first_errors": errors[:3]}


@contextlib.contextmanager
def real_backends(work: Path) -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL and Ceph RGW with one bucket; yields the settings that point replicas at them."""
    pg_dir = Path(tempfile.mkdtemp(prefix="ckpt-bench-pg-"))  # reachable by the postgres user
    try:
        database_url = _start_postgres(pg_dir)
        with ceph(work / "ceph") as aws:
            make_s3_client(endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket="scale")
            yield {**aws, "CKPT_DATABASE_URL": database_url, "CKPT_STORAGE_URL": "s3://scale/bench"}
    finally:
        subprocess.run([str(POSTGRES), "stop", str(pg_dir)], capture_output=True, timeout=120, check=False)
        shutil.rmtree(pg_dir, ignore_errors=True)


def measure(replicas: int, files: list[Path], args: argparse.Namespace, work: Path,
            shared: dict[str, str] | None) -> dict[str, Any]:
    base = work / f"replicas-{replicas}"
    base.mkdir()
    # Every other setting at its default; without real backends the replicas share one data directory.
    env = shared if shared is not None else {"CKPT_DATA_DIR": str(base / "shared-data")}
    started = [Replica(f"replica{i}", free_port(), base / f"replica{i}", env, base / f"replica{i}.log")
               for i in range(1, replicas + 1)]
    haproxy = None
    try:
        for replica in started:
            replica.start()
        haproxy = Haproxy(base / "haproxy", [r.backend for r in started])
        haproxy.wait_states({f"replica{i}": "UP" for i in range(1, replicas + 1)})
        run_load(haproxy.url, files[:args.clients * 4], args.clients, 3, warm_up=True)  # imports, pools, caches
        result = run_load(haproxy.url, files[args.clients * 4:], args.clients, args.seconds)
        result["per_replica_sessions"] = {name: int(row["stot"]) for name, row in haproxy.servers().items()}
        return result
    finally:
        for replica in started:
            replica.stop()
        if haproxy is not None:
            haproxy.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--files", type=int, default=3000,
                        help="distinct files made first for each run (each pushed once, never in two runs)")
    parser.add_argument("--output", type=Path, help="also write the results here (JSON)")
    parser.add_argument("--backends", choices=["local", "real"], default="local",
                        help="local: one shared data directory; real: PostgreSQL and Ceph RGW, started here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-scale-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        shared = stack.enter_context(real_backends(work)) if args.backends == "real" else None
        files = make_files(work / "files", args.files * len(args.replicas))
        size = files[0].stat().st_size
        results: dict[str, Any] = {
            "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "clients": args.clients, "seconds": args.seconds, "file_bytes": size, "backends": args.backends,
            "runs": {},
        }
        print(f"{args.clients} clients, {size} B files, {args.seconds:.0f} s per run, {os.cpu_count()} cores, "
              f"backends: {args.backends}")
        for i, n in enumerate(args.replicas):
            run = measure(n, files[i * args.files:(i + 1) * args.files], args, work, shared)
            results["runs"][str(n)] = run
            print(f"{n} replica(s): {run['uploads_per_second']} uploads/s, p50 {run['p50_ms']} ms, "
                  f"p95 {run['p95_ms']} ms, {run['errors']} errors, sessions per replica "
                  f"{run['per_replica_sessions']}")
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
