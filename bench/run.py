"""The benchmark: the recipe script and the service, side by side, in one run. `bench/run.sh [--small]`.

Everything is generated from options (see `Config`); nothing is downloaded. The service is a real
`ckpt serve` on loopback, driven through `service.client.CheckpointClient`. Each figure is the median of
several rounds; ratios are taken between medians measured in the same run. The results go to a Markdown
table (bench/RESULTS.md for the full configuration) and to a JSON file beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.inputs import Pair, describe, make_many_keys_pair, make_mlp_pair
from bench.report import write_report
from bench.server import MemorySampler, Server
from service.client import CheckpointClient

BENCH_DIR = Path(__file__).resolve().parent
MB = 1 << 20


@dataclass(frozen=True)
class Config:
    name: str
    dim: int  # the big pair: depth x (Linear(dim, dim) + BatchNorm1d(dim)) + a head
    depth: int
    keys: int  # the many-small-keys pair; the growth figure uses growth x keys
    growth: int
    recipe_rounds: int
    merge_rounds: int
    upload_rounds: int
    keys_rounds: int
    diff_rounds: int


FULL = Config("full", dim=4096, depth=16, keys=20_000, growth=4, recipe_rounds=3, merge_rounds=5,
              upload_rounds=5, keys_rounds=5, diff_rounds=30)
SMALL = Config("small", dim=512, depth=16, keys=2_000, growth=4, recipe_rounds=2, merge_rounds=3,
               upload_rounds=3, keys_rounds=3, diff_rounds=10)

TARGETS = {"P1": 0.25, "P2": 256 * MB, "P3": 0.020, "P4": 1.5, "P5_overhead": 20e-6, "P5_growth": 4.4}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


class RequestTimer:
    """httpx event hooks: the time from sending each request to receiving its response headers."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, float]] = []
        self._start: dict[int, float] = {}

    def on_request(self, request: httpx.Request) -> None:
        self._start[id(request)] = time.perf_counter()

    def on_response(self, response: httpx.Response) -> None:
        start = self._start.pop(id(response.request), None)
        if start is not None:
            self.records.append(
                (response.request.method, response.request.url.path, time.perf_counter() - start)
            )

    def last(self, method: str, path: str) -> float:
        for m, p, seconds in reversed(self.records):
            if m == method and p == path:
                return seconds
        raise LookupError(f"no {method} {path} recorded")


@contextlib.contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


# ---- the machine ------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "ram_gb": round(ram / 2**30, 1),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "kernel": platform.release(),
    }


# ---- the recipe script ------------------------------------------------------------------------------------


def run_recipe(pair: Pair, out: Path, cfg: Config) -> dict[str, float]:
    cmd = [sys.executable, str(BENCH_DIR / "recipe_script.py"), str(pair.original), str(pair.trained), str(out),
           "--dim", str(cfg.dim), "--depth", str(cfg.depth)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"the recipe script failed with {proc.returncode}")
    timings = json.loads(stdout.decode().strip().splitlines()[-1])
    return {**timings, "wall_s": wall, "max_rss_bytes": usage.ru_maxrss * 1024}


def sha256_in_process(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb") as f:
        hashlib.file_digest(f, "sha256")
    return time.perf_counter() - start


def drop_artifacts(client: CheckpointClient, *ids: str) -> None:
    for artifact_id in ids:
        with contextlib.suppress(Exception):
            client.delete(artifact_id, force=True)


def settle() -> None:
    # Each round starts without the previous round's dirty pages still being written back.
    os.sync()
    time.sleep(0.5)


# ---- the benchmark ----------------------------------------------------------------------------------------


@dataclass
class Results:
    config: dict[str, Any]
    machine: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.raw.setdefault(key, []).append(value)

    def med(self, key: str) -> float:
        return median(self.raw[key])


def bench_recipe(res: Results, pair: Pair, cfg: Config, work: Path) -> None:
    for i in range(cfg.recipe_rounds):
        settle()
        r = run_recipe(pair, work / "recipe-out.pth", cfg)
        log(f"recipe round {i + 1}: work {r['work_s']:.2f} s (load {r['load_s']:.2f}, merge+verify "
            f"{r['merge_verify_s']:.2f}, save {r['save_s']:.2f}), wall {r['wall_s']:.2f} s, "
            f"max RSS {r['max_rss_bytes'] / MB:.0f} MB")
        for k, v in r.items():
            res.add(f"recipe.{k}", v)
    (work / "recipe-out.pth").unlink(missing_ok=True)


def bench_merge_big(res: Results, client: CheckpointClient, server: Server, timer: RequestTimer,
                    pair: Pair, cfg: Config) -> None:
    for i in range(cfg.merge_rounds):
        settle()
        with MemorySampler(server.pid) as mem, stopwatch() as elapsed:
            out = client.merge("bench-original", pair.trained, architecture="bench-mlp")
        seconds = elapsed()
        assert out.report["verification"]["ok"], out.report["verification"]
        lineage = out.artifact.lineage
        assert lineage is not None
        post = timer.last("POST", "/merge")
        log(f"merge round {i + 1}: {seconds:.2f} s end to end (POST /merge {post:.2f} s), server anon memory "
            f"+{mem.growth / MB:.0f} MB over {mem.baseline / MB:.0f} MB ({mem.samples} samples, "
            f"{mem.max_processes} processes)")
        res.add("merge.end_to_end_s", seconds)
        res.add("merge.post_s", post)
        res.add("merge.mem_growth_bytes", mem.growth)
        res.add("merge.mem_baseline_bytes", mem.baseline)
        res.add("merge.processes", mem.max_processes)
        drop_artifacts(client, out.id, lineage.inputs["trained"])


def bench_upload(res: Results, client: CheckpointClient, server: Server, timer: RequestTimer, path: Path,
                 cfg: Config, *, keep: bool) -> str:
    artifact_id = ""
    for i in range(cfg.upload_rounds):
        settle()
        sha = sha256_in_process(path)
        with MemorySampler(server.pid) as mem, stopwatch() as elapsed:
            pushed = client.push(path)
        seconds = elapsed()
        assert pushed.uploaded
        post = timer.last("POST", "/checkpoints")
        artifact_id = pushed.artifact.id
        log(f"upload round {i + 1}: POST /checkpoints {post:.2f} s, push {seconds:.2f} s (with the client's "
            f"own sha256), in-process sha256 {sha:.2f} s, server anon memory +{mem.growth / MB:.0f} MB")
        res.add("upload.post_s", post)
        res.add("upload.push_s", seconds)
        res.add("upload.sha256_s", sha)
        res.add("upload.mem_growth_bytes", mem.growth)
        if not (keep and i == cfg.upload_rounds - 1):
            drop_artifacts(client, artifact_id)
    return artifact_id


def bench_diff(res: Results, client: CheckpointClient, http: httpx.Client, timer: RequestTimer, label: str,
               a: str, b: str, rounds: int) -> None:
    with stopwatch() as elapsed:
        client.diff(a, b, normalize_prefixes=True)  # the first request reads and normalizes the manifests
    res.add(f"diff.{label}.cold_s", elapsed())
    params = {"a": a, "b": b, "normalize_prefixes": "true"}
    for i in range(rounds):
        # The HTTP request itself, body read (what a dashboard pays): once with options not asked for before
        # (a limit of its own, 1001, 1002, ..., so the service renders it), once repeated (served from its
        # rendering), and the client call, which also validates the response into pydantic models.
        with stopwatch() as elapsed:
            response = http.get("/diff", params={**params, "limit": str(1001 + i)})
            response.raise_for_status()
            _ = response.content
        res.add(f"diff.{label}.http_s", elapsed())
        with stopwatch() as elapsed:
            response = http.get("/diff", params=params)
            response.raise_for_status()
            _ = response.content
        res.add(f"diff.{label}.repeat_s", elapsed())
        with stopwatch() as elapsed:
            out = client.diff(a, b, normalize_prefixes=True)
        res.add(f"diff.{label}.client_s", elapsed())
        res.add(f"diff.{label}.get_s", timer.last("GET", "/diff"))
    res.extra[f"diff.{label}.summary"] = dict(out.summary)
    log(f"diff {label}: first {res.med(f'diff.{label}.cold_s') * 1e3:.1f} ms, median GET "
        f"{res.med(f'diff.{label}.http_s') * 1e3:.1f} ms (repeated: {res.med(f'diff.{label}.repeat_s') * 1e3:.1f} "
        f"ms), {res.med(f'diff.{label}.client_s') * 1e3:.1f} ms "
        f"through the client, "
        f"{res.med(f'diff.{label}.get_s') * 1e3:.1f} ms to the response headers; summary {dict(out.summary)}")


def bench_keys_merge(res: Results, client: CheckpointClient, timer: RequestTimer, label: str, pair: Pair,
                     rounds: int) -> None:
    for _ in range(rounds):
        settle()
        with stopwatch() as elapsed:
            out = client.merge(f"bench-{label}-original", pair.trained, architecture=f"bench-{label}")
        assert out.report["verification"]["ok"], out.report["verification"]
        lineage = out.artifact.lineage
        assert lineage is not None
        res.add(f"keys.{label}.end_to_end_s", elapsed())
        res.add(f"keys.{label}.post_s", timer.last("POST", "/merge"))
        drop_artifacts(client, out.id, lineage.inputs["trained"])
    log(f"merge {label} ({pair.keys} keys): median {res.med(f'keys.{label}.end_to_end_s') * 1e3:.0f} ms end "
        f"to end, POST /merge {res.med(f'keys.{label}.post_s') * 1e3:.0f} ms")


def torch_floor(pair: Pair, out: Path, rounds: int) -> float:
    """What any merge of this pair costs in plain torch: load both (weights_only, mmap), save the result."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        o = torch.load(pair.original, weights_only=True, mmap=True)
        t = torch.load(pair.trained, weights_only=True, mmap=True)
        merged = {k.removeprefix("module."): v for k, v in t.items()}
        for k, v in o.items():
            merged.setdefault(k, v)
        torch.save(merged, out)
        times.append(time.perf_counter() - start)
        del o, t, merged
    out.unlink(missing_ok=True)
    return median(times)


def run(cfg: Config, work: Path, only: set[str]) -> Results:
    res = Results(config=asdict(cfg), machine=machine_info())
    log(f"configuration {cfg.name}; work directory {work}")
    big = make_mlp_pair(work / "inputs" / f"mlp-{cfg.dim}x{cfg.depth}", dim=cfg.dim, depth=cfg.depth)
    k1 = make_many_keys_pair(work / "inputs" / f"keys-{cfg.keys}", keys=cfg.keys)
    k4 = make_many_keys_pair(work / "inputs" / f"keys-{cfg.keys * cfg.growth}", keys=cfg.keys * cfg.growth)
    tiny = make_many_keys_pair(work / "inputs" / "keys-tiny", keys=7)
    res.inputs = {"big": describe(big), "keys": describe(k1), "keys_growth": describe(k4), "tiny": describe(tiny)}
    log(f"inputs ready: big pair {big.original.stat().st_size / MB:.0f} MB + {big.size / MB:.0f} MB, "
        f"{k1.keys} and {k4.keys} keys")

    if not only or "recipe" in only:
        bench_recipe(res, big, cfg, work)

    data_dir = work / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    config = work / "ckpt.toml"
    config.write_text(f'[architectures.bench-mlp]\nfactory = "service.registry.builtins:mlp_bn"\n'
                      f"kwargs = {{ dim = {cfg.dim}, depth = {cfg.depth} }}\n")
    server = Server(data_dir, config=config, log=work / "server.log")
    timer = RequestTimer()
    http = httpx.Client(base_url=server.url, timeout=httpx.Timeout(900.0, connect=10.0),
                        event_hooks={"request": [timer.on_request], "response": [timer.on_response]})
    try:
        client = CheckpointClient(http=http)
        client.push(big.original, name="bench-original")
        if not only or "merge" in only:
            bench_merge_big(res, client, server, timer, big, cfg)
        trained_id = ""
        if not only or "upload" in only or "diff" in only:
            trained_id = bench_upload(res, client, server, timer, big.trained, cfg, keep=True)
        if not only or "diff" in only or "keys" in only:
            for label, pair in (("keys", k1), ("keys4", k4), ("tiny", tiny)):
                client.push(pair.original, name=f"bench-{label}-original")
                client.register_architecture(f"bench-{label}", from_checkpoint=f"bench-{label}-original")
        if not only or "diff" in only:
            bench_diff(res, client, http, timer, "big", "bench-original", trained_id, cfg.diff_rounds)
            k1_trained = client.push(k1.trained).artifact.id
            bench_diff(res, client, http, timer, "keys", "bench-keys-original", k1_trained, cfg.diff_rounds)
            drop_artifacts(client, k1_trained)
        if not only or "keys" in only:
            for label, pair in (("tiny", tiny), ("keys", k1), ("keys4", k4)):
                # The first merge against an original loads it; later ones find it in the store's cache.
                with stopwatch() as elapsed:
                    first = client.merge(f"bench-{label}-original", pair.trained, architecture=f"bench-{label}")
                res.add(f"keys.{label}.first_s", elapsed())
                assert first.artifact.lineage is not None
                drop_artifacts(client, first.id, first.artifact.lineage.inputs["trained"])
                bench_keys_merge(res, client, timer, label, pair, cfg.keys_rounds)
            floor_dir = work / "floor"
            floor_dir.mkdir(exist_ok=True)
            for label, pair in (("tiny", tiny), ("keys", k1), ("keys4", k4)):
                res.add(f"floor.{label}_s", torch_floor(pair, floor_dir / "out.pth", min(3, cfg.keys_rounds)))
            log(f"torch floor (load both + save, in-process): {res.med('floor.keys_s') * 1e3:.0f} ms at "
                f"{k1.keys} keys, {res.med('floor.keys4_s') * 1e3:.0f} ms at {k4.keys} keys")
    finally:
        http.close()
        server.stop()
    res.extra["pairs"] = {"keys": k1.keys, "keys4": k4.keys, "tiny": tiny.keys}
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the CI configuration (about a minute)")
    parser.add_argument("--workdir", type=Path, help="inputs and the store (default: a temp directory); "
                        "inputs are reused when the configuration matches")
    parser.add_argument("--output", type=Path, help="the Markdown table (default: bench/RESULTS.md; with --small "
                        "$TMPDIR/ckpt-bench-RESULTS-small.md)")
    parser.add_argument("--rounds", type=int, help="override every round count")
    parser.add_argument("--only", default="", help="comma-separated subset: recipe,merge,upload,diff,keys")
    args = parser.parse_args(argv)
    cfg = SMALL if args.small else FULL
    if args.rounds:
        cfg = Config(**{**asdict(cfg), **{k: args.rounds for k in asdict(cfg) if k.endswith("_rounds")}})
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    own_work = args.workdir is None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.output is not None:
        output = args.output
    elif args.small:
        output = Path(tempfile.gettempdir()) / "ckpt-bench-RESULTS-small.md"  # CI: never the committed table
    else:
        output = BENCH_DIR / "RESULTS.md"
    start = time.perf_counter()
    try:
        res = run(cfg, work, only)
        text = write_report(res, output, targets=TARGETS, partial=bool(only))
        print(text)
        log(f"done in {time.perf_counter() - start:.0f} s; results in {output} (raw: {output.with_suffix('.json')})")
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
