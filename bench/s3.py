"""The S3 blob store and merges by reference, against a real Ceph RGW: `python -m bench.s3 [--small]`.

Run by hand (not a CI gate). It starts its own single-node Ceph (scripts/services/ceph-s3.sh) on free loopback
ports, generates the benchmark's 1 GB pair (bench/inputs.py, reused from --workdir), and measures:

  S1  `S3BlobStore.put_file` of the 1 GB original ÷ in-process hashlib sha256 of the same file
  S2  anonymous memory added to this process (RssAnon, sampled every 5 ms, peak − baseline) while four 1 GB
      `put_file`s run at once (the same file under four digests: the memory is the store's, not the files')
  S3  `client.merge("s3://…/original.pth", "s3://…/trained.pth")` against a real `ckpt serve` that reads both
      objects itself ÷ the recipe script's work (bench/recipe_script.py, as bench/run.py runs it); "cold" rounds
      read both objects, "original imported" rounds only the trained one (a HEAD for the original)

Each figure is the median of its rounds; the ratios are taken between medians of the same run. Writes a JSON file
(default bench/S3-RESULTS.json; with --small $TMPDIR/ckpt-bench-s3-small.json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.inputs import Pair, describe, make_mlp_pair
from bench.run import FULL, SMALL, Config, machine_info, median, run_recipe, settle, sha256_in_process, stopwatch
from bench.server import MemorySampler, Server, free_port, rss_anon
from service.client import CheckpointClient
from service.store.blobs.s3 import S3BlobStore, make_s3_client

REPO = Path(__file__).resolve().parents[1]
CEPH = REPO / "scripts" / "services" / "ceph-s3.sh"
MB = 1 << 20
BUCKET = "bench"
TARGETS = {"S1": 1.5, "S2": 128 * MB, "S3": 0.25}


def log(msg: str) -> None:
    print(f"[bench-s3 {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def ceph(directory: Path) -> Iterator[dict[str, str]]:
    """A throwaway Ceph RGW; yields the standard AWS variables that point at it."""
    port = free_port()
    access, secret = "bench-" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    env = {**os.environ, "RGW_PORT": str(port), "MON_PORT": str(free_port()), "AK": access, "SK": secret}
    with stopwatch() as elapsed:
        proc = subprocess.run([str(CEPH), "start", str(directory)], env=env, capture_output=True, text=True,
                              check=False)
    if proc.returncode != 0:
        subprocess.run([str(CEPH), "stop", str(directory), "--purge"], check=False)
        raise RuntimeError(f"Ceph did not start:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    log(f"Ceph RGW up on 127.0.0.1:{port} in {elapsed():.1f} s")
    try:
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": access,
               "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}
    finally:
        subprocess.run([str(CEPH), "stop", str(directory), "--purge"], check=False)


class SelfMemory:
    """Peak RssAnon of this process during a `with` block, sampled every 5 ms; `growth` is peak − entry value."""

    def __init__(self) -> None:
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon(os.getpid()))
            self._stop.wait(0.005)

    def __enter__(self) -> SelfMemory:
        self.baseline = self.peak = rss_anon(os.getpid())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.baseline)


def fake_digest(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def bench_put(raw: dict[str, list[float]], store: S3BlobStore, path: Path, rounds: int) -> None:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    for i in range(rounds):
        settle()
        sha = sha256_in_process(path)
        with stopwatch() as elapsed:
            store.put_file(digest, path)
        put = elapsed()
        store.delete(digest)
        raw.setdefault("put_s", []).append(put)
        raw.setdefault("sha256_s", []).append(sha)
        log(f"put round {i + 1}: put_file {put:.2f} s, sha256 {sha:.2f} s ({put / sha:.2f}x)")


def bench_concurrent_puts(raw: dict[str, list[float]], store: S3BlobStore, path: Path, rounds: int) -> None:
    # The client and its connections exist before the baseline; the part buffers (made by the first multipart put
    # and kept) do not, so the figure includes them.
    small = path.with_name("warm-up.bin")
    small.write_bytes(b"x" * 1024)
    store.put_file(fake_digest("warm-up"), small)
    store.delete(fake_digest("warm-up"))
    for i in range(rounds):
        settle()
        digests = [fake_digest(f"{i}-{n}") for n in range(4)]
        with SelfMemory() as mem, stopwatch() as elapsed, ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda d: store.put_file(d, path), digests))
        for digest in digests:
            store.delete(digest)
        raw.setdefault("put4_growth_bytes", []).append(mem.growth)
        raw.setdefault("put4_s", []).append(elapsed())
        log(f"4 concurrent puts, round {i + 1}: {elapsed():.1f} s, +{mem.growth / MB:.0f} MB anonymous over "
            f"{mem.baseline / MB:.0f} MB")


def bench_merge_by_reference(raw: dict[str, list[float]], pair: Pair, cfg: Config, work: Path, rounds: int) -> None:
    s3 = make_s3_client()
    urls = {}
    for role, path in (("original", pair.original), ("trained", pair.trained)):
        s3.upload_file(str(path), BUCKET, f"refs/{path.name}")
        urls[role] = f"s3://{BUCKET}/refs/{path.name}"
    data_dir = work / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    config = work / "ckpt.toml"
    config.write_text(f'[architectures.bench-mlp]\nfactory = "service.registry.builtins:mlp_bn"\n'
                      f"kwargs = {{ dim = {cfg.dim}, depth = {cfg.depth} }}\n")
    os.environ["CKPT_IMPORT_ALLOWED"] = f"s3://{BUCKET}/refs/"  # the server inherits it, and the AWS_* variables
    server = Server(data_dir, config=config, log=work / "server.log")
    http = httpx.Client(base_url=server.url, timeout=httpx.Timeout(900.0, connect=10.0))
    try:
        client = CheckpointClient(http=http)
        # The parser sandbox starts its workers with the first upload: start them before anything is measured.
        tiny = work / "warm-up.pth"
        torch.save({"w": torch.zeros(4)}, tiny)
        client.delete(client.push(tiny).artifact.id)
        for i in range(rounds):
            # Cold: nothing stored, both objects read. Then the same with the original kept from the cold round.
            original_id = ""
            for kind in ("cold", "original_imported"):
                settle()
                with MemorySampler(server.pid) as mem, stopwatch() as elapsed:
                    out = client.merge(urls["original"], urls["trained"], architecture="bench-mlp")
                seconds = elapsed()
                assert out.report["verification"]["ok"] and out.created, out.report["verification"]
                lineage = out.artifact.lineage
                assert lineage is not None
                client.delete(out.id, force=True)
                client.delete(lineage.inputs["trained"], force=True)
                original_id = lineage.inputs["original"]
                raw.setdefault(f"merge_ref_{kind}_s", []).append(seconds)
                raw.setdefault(f"merge_ref_{kind}_mem_bytes", []).append(mem.growth)
                log(f"merge by reference, {kind}, round {i + 1}: {seconds:.2f} s, server +{mem.growth / MB:.0f} MB "
                    "anonymous")
            client.delete(original_id, force=True)
        # For comparison, the same merge with the trained file uploaded (bench/run.py's P1) against the original
        # imported above.
        client.import_url(urls["original"], name="bench-original")
        for i in range(rounds):
            settle()
            with stopwatch() as elapsed:
                out = client.merge("bench-original", pair.trained, architecture="bench-mlp")
            raw.setdefault("merge_upload_s", []).append(elapsed())
            lineage = out.artifact.lineage
            assert lineage is not None
            client.delete(out.id, force=True)
            client.delete(lineage.inputs["trained"], force=True)
            log(f"merge with the trained file uploaded, round {i + 1}: {raw['merge_upload_s'][-1]:.2f} s")
    finally:
        http.close()
        server.stop()
        os.environ.pop("CKPT_IMPORT_ALLOWED", None)


def report(res: dict[str, Any]) -> str:
    raw = res["raw"]
    med = {k: median(v) for k, v in raw.items()}
    size = res["inputs"]["original_bytes"] / MB
    recipe = med["recipe.work_s"]
    rows = [
        ("S1", f"S3BlobStore.put_file of {size:.0f} MB to Ceph RGW ÷ in-process sha256 of the file",
         med["put_s"] / med["sha256_s"], TARGETS["S1"], f"{med['put_s']:.2f} s ÷ {med['sha256_s']:.2f} s"),
        ("S2", f"anonymous memory added by four concurrent {size:.0f} MB put_file (peak − baseline)",
         max(raw["put4_growth_bytes"]) / MB, TARGETS["S2"] / MB,
         f"max over rounds; {med['put4_s']:.1f} s for all four"),
        ("S3", f"merge by reference of the {size:.0f} MB pair (both objects read by the service) ÷ the recipe "
         "script's work", med["merge_ref_cold_s"] / recipe, TARGETS["S3"],
         f"{med['merge_ref_cold_s']:.2f} s ÷ {recipe:.2f} s; server "
         f"+{max(raw['merge_ref_cold_mem_bytes']) / MB:.0f} MB anonymous"),
        ("S3b", "the same with the original imported before (a HEAD for it, the trained object read)",
         med["merge_ref_original_imported_s"] / recipe, TARGETS["S3"],
         f"{med['merge_ref_original_imported_s']:.2f} s; with the trained file uploaded instead (P1's path): "
         f"{med['merge_upload_s']:.2f} s ({med['merge_upload_s'] / recipe:.2f})"),
    ]
    lines = ["| | Figure | Measured | Target | Met |", "|---|---|---|---|---|"]
    for fid, what, value, target, note in rows:
        unit = " MB" if fid == "S2" else ""
        met = "yes" if value <= target else "**no**"
        lines.append(f"| {fid} | {what}<br><sub>{note}</sub> | {value:.2f}{unit} | ≤ {target:.2f}{unit} | {met} |")
    m = res["machine"]
    head = (f"{m['date']} · {m['nproc']} CPUs · {m['ram_gb']} GB RAM · Python {m['python']} · torch {m['torch']} · "
            f"configuration `{res['config']['name']}`, {res['rounds']} rounds")
    return head + "\n\n" + "\n".join(lines) + "\n"


def run(cfg: Config, work: Path, rounds: int) -> dict[str, Any]:
    res: dict[str, Any] = {"config": asdict(cfg), "machine": machine_info(), "rounds": rounds, "raw": {}}
    pair = make_mlp_pair(work / "inputs" / f"mlp-{cfg.dim}x{cfg.depth}", dim=cfg.dim, depth=cfg.depth)
    res["inputs"] = describe(pair)
    raw: dict[str, list[float]] = res["raw"]
    for i in range(rounds):
        settle()
        r = run_recipe(pair, work / "recipe-out.pth", cfg)
        raw.setdefault("recipe.work_s", []).append(r["work_s"])
        log(f"recipe round {i + 1}: work {r['work_s']:.2f} s, wall {r['wall_s']:.2f} s")
    (work / "recipe-out.pth").unlink(missing_ok=True)
    with ceph(work / "ceph") as aws:
        os.environ.update(aws)
        make_s3_client().create_bucket(Bucket=BUCKET)
        bench_put(raw, S3BlobStore(BUCKET, "put", cache_dir=work / "cache", cache_bytes=1 << 30), pair.original,
                  rounds)
        # A store of its own: the figure includes the part buffers that its first multipart put makes.
        bench_concurrent_puts(raw, S3BlobStore(BUCKET, "put4", cache_dir=work / "cache", cache_bytes=1 << 30),
                              pair.original, rounds)
        bench_merge_by_reference(raw, pair, cfg, work, rounds)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the small pair (16 x 512), for a quick check")
    parser.add_argument("--workdir", type=Path, help="inputs are kept and reused there (default: a temp directory)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, help="the JSON results (default bench/S3-RESULTS.json; with --small "
                        "$TMPDIR/ckpt-bench-s3-small.json)")
    args = parser.parse_args(argv)
    cfg = SMALL if args.small else FULL
    own_work = args.workdir is None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ckpt-bench-s3-"))
    work.mkdir(parents=True, exist_ok=True)
    output = args.output or (Path(tempfile.gettempdir()) / "ckpt-bench-s3-small.json" if args.small
                             else REPO / "bench" / "S3-RESULTS.json")
    start = time.perf_counter()
    try:
        res = run(cfg, work, args.rounds)
        output.write_text(json.dumps(res, indent=1) + "\n")
        print(report(res))
        log(f"done in {time.perf_counter() - start:.0f} s; raw figures in {output}")
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
