"""Small uploads per second through haproxy, with one replica and with two.

    .venv/bin/python -m bench.scale                       # 1 and 2 replicas, 8 clients, 20 s each
    .venv/bin/python -m bench.scale --replicas 1 2 3 --clients 12 --seconds 30

Each client thread pushes distinct small checkpoints (a few KB, made before the clock starts) with
`CheckpointClient.push` (a HEAD, then the upload with its digest: every push stores a new artifact) through
haproxy (scripts/services/haproxy.sh) in front of N `ckpt serve` replicas (tests/scale/cluster.py) that share one
store, each with the default settings (two parser workers, two heavy slots). Reported: uploads per second and the
latency percentiles, per replica count; the machine's cores, since the clients, haproxy and every replica (with its
parser workers) share them. Run by hand; asserts nothing about time.
Settings in the environment (CKPT_*, AWS_*) reach the replicas, so the same run works on other backends.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from service.client import CheckpointClient, RetryPolicy
from tests.scale.cluster import Haproxy, Replica, free_port


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


def measure(replicas: int, files: list[Path], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    base = work / f"replicas-{replicas}"
    base.mkdir()
    env = {"CKPT_DATA_DIR": str(base / "shared-data")}  # every other setting at its default
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-scale-") as tmp:
        work = Path(tmp)
        files = make_files(work / "files", args.files * len(args.replicas))
        size = files[0].stat().st_size
        results: dict[str, Any] = {
            "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "clients": args.clients, "seconds": args.seconds, "file_bytes": size, "runs": {},
        }
        print(f"{args.clients} clients, {size} B files, {args.seconds:.0f} s per run, {os.cpu_count()} cores")
        for i, n in enumerate(args.replicas):
            run = measure(n, files[i * args.files:(i + 1) * args.files], args, work)
            results["runs"][str(n)] = run
            print(f"{n} replica(s): {run['uploads_per_second']} uploads/s, p50 {run['p50_ms']} ms, "
                  f"p95 {run['p95_ms']} ms, {run['errors']} errors, sessions per replica "
                  f"{run['per_replica_sessions']}")
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
