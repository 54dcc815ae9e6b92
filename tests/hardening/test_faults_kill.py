"""SIGKILL of a real `ckpt serve` at random moments during uploads and merges, round after round.

Each round starts a server on the same data directory with CKPT_TMP_GRACE_SECONDS=0 (so that its start-up
collection removes every crash leftover), checks what the previous kill left, loads the server with uploads
and merges from several threads, and SIGKILLs it after a random delay: its process group, or the server
process alone, alternately (its worker processes must then exit by themselves). After each restart:
- every artifact the server acknowledged (2xx) is there, with the bytes that were sent: nothing is lost;
- every visible artifact downloads with bytes that hash to its id and has its manifest: nothing is partial;
- on disk no blob or manifest lacks its metadata, and tmp/ is empty: the leftovers were collected;
- acknowledged names point where they were set; names of requests cut by the kill are absent or valid.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from tests.hardening.servers import (
    Server,
    checkpoint_bytes,
    disk_state,
    http_problems,
    kill_server,
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
)

CI_ROUNDS = 5
LONG_ROUNDS = 60
CLIENTS = 3
SEED = 20240611
GC_NOW = {"CKPT_TMP_GRACE_SECONDS": "0"}


@dataclass
class Request:
    kind: str  # "upload", "raw-upload" or "merge"
    name: str
    sha256: str  # of the uploaded bytes (for a merge: of the trained file)
    id: str | None = None  # the artifact the server acknowledged


@dataclass
class Round:
    acked: list[Request] = field(default_factory=list)
    inflight: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    killed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _load(url: str, original: dict[str, torch.Tensor], round_: Round, prefix: str, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(10_000):
            roll = rng.random()
            name = f"{prefix}-{i}"
            if roll < 0.6:
                data = random_checkpoint(rng.getrandbits(48), floats=rng.randint(1 << 12, 3 << 19))
                req = Request("raw-upload" if roll < 0.2 else "upload", name, sha256_hex(data))
            else:
                data = checkpoint_bytes(mlp_trained(original, rng.getrandbits(48)))
                req = Request("merge", name, sha256_hex(data))
            try:
                response = send_with_retry(functools.partial(_send, client, req, data)).response
            except httpx.TransportError as exc:
                with round_.lock:
                    if round_.killed.is_set():
                        round_.inflight.append(req)
                    else:
                        round_.errors.append(f"{req.kind} {name}: {exc!r} before the kill")
                return
            with round_.lock:
                if response.status_code in (200, 201):
                    req.id = response.json()["id"]
                    round_.acked.append(req)
                else:
                    round_.errors.append(f"{req.kind} {name}: {response.status_code} {response.text[:300]}")
                    return


def _send(client: httpx.Client, req: Request, data: bytes) -> httpx.Response:
    if req.kind == "raw-upload":
        return client.post("/checkpoints", content=data, params={"name": req.name},
                           headers={"Content-Type": "application/octet-stream"})
    if req.kind == "upload":
        return client.post("/checkpoints", files={"file": ("c.pth", data)}, data={"name": req.name})
    return client.post("/merge", files={"trained_file": ("trained.pth", data)},
                       data={"architecture": "mid-mlp", "original": "orig", "name": req.name})


def _check_store(server: Server, acked: list[Request], inflight: list[Request], original_id: str,
                 verified: set[str]) -> list[str]:
    problems = [f"tmp/ not collected: {e}" for e in tmp_entries(server.data_dir)]
    disk = disk_state(server.data_dir)
    problems += disk.problems
    with server.client() as client:
        listed = {a["id"]: a for a in list_artifacts(client)}
        names = list_names(client)
        if set(listed) != disk.published:
            problems.append(f"listed {len(listed)} artifacts, {len(disk.published)} published on disk")
        problems += http_problems(client, [a for i, a in listed.items() if i not in verified])
        verified.update(listed)
        for req in acked:
            assert req.id is not None
            if req.id not in listed:
                problems.append(f"LOST: acknowledged {req.kind} {req.name} -> {req.id}")
                continue
            if names.get(req.name) != req.id:
                problems.append(f"name {req.name} -> {names.get(req.name)}, acknowledged {req.id}")
            if req.kind == "merge":
                inputs = (listed[req.id]["lineage"] or {}).get("inputs", {})
                if inputs != {"original": original_id, "trained": req.sha256}:
                    problems.append(f"merge {req.name}: lineage inputs {inputs}")
            elif req.id != req.sha256:
                problems.append(f"{req.kind} {req.name}: id {req.id} is not the sha256 {req.sha256} of the bytes")
        for req in inflight:
            target = names.get(req.name)
            if target is None:
                continue
            if target not in listed:
                problems.append(f"in-flight {req.kind} {req.name}: name points to a missing {target}")
            elif req.kind != "merge" and target != req.sha256:
                problems.append(f"in-flight {req.kind} {req.name}: name points to {target}, not {req.sha256}")
    return problems


def test_sigkill_during_uploads_and_merges(tmp_path: Path, mid_config: Path, long_run: bool,
                                          figures: dict[str, Any]) -> None:
    rounds = LONG_ROUNDS if long_run else CI_ROUNDS
    data_dir = tmp_path / "data"
    rng = random.Random(SEED)
    original = mlp_original(0)
    original_bytes = checkpoint_bytes(original)
    acked: list[Request] = []
    inflight: list[Request] = []
    verified: set[str] = set()
    leftovers = {"tmp": 0, "partial": 0}
    orphan_tracebacks = 0
    figures.update(rounds=rounds, clients=CLIENTS, seed=SEED, kills="process group and server alone, alternately")

    server = start_server(data_dir, log_path=tmp_path / "server-0.log", config=mid_config, env=GC_NOW)
    try:
        with server.client() as client:
            r = client.post("/checkpoints", files={"file": ("original.pth", original_bytes)}, data={"name": "orig"})
            assert r.status_code == 201, r.text
            original_id = r.json()["id"]
        for n in range(rounds):
            state = Round()
            threads = [
                threading.Thread(target=_load, args=(server.url, original, state, f"r{n}-c{c}",
                                                     rng.getrandbits(32)))
                for c in range(CLIENTS)
            ]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 2.5))
            with state.lock:
                state.killed.set()
            # Alternately the whole process group (a container killed) and the server process alone (kill -9,
            # the OOM killer): then its parser workers must not outlive it.
            alone = n % 2 == 1
            log_at_kill = server.log_size()
            orphans = kill_server(server, group=not alone)
            assert orphans == [], f"round {n}: workers {orphans} outlived their server"
            for t in threads:
                t.join(120)
                assert not t.is_alive()
            assert state.errors == [], f"round {n}: {state.errors}\n{server.log()[-4000:]}"
            assert server.server_errors(end=log_at_kill) == [], server.server_errors(end=log_at_kill)[0]
            # What workers of a server killed alone print while they find their parent gone (not a 500).
            orphan_tracebacks += len(server.server_errors(start=log_at_kill))
            acked += state.acked
            inflight += state.inflight
            leftovers["tmp"] += len(tmp_entries(data_dir))
            leftovers["partial"] += len(disk_state(data_dir).problems)

            server = start_server(data_dir, log_path=tmp_path / f"server-{n + 1}.log", config=mid_config,
                                  env=GC_NOW)
            problems = _check_store(server, acked, inflight, original_id, verified)
            assert problems == [], f"after kill {n + 1}: {problems}"
        with server.client() as client:
            artifacts = len(list_artifacts(client))
    finally:
        stop_server(server)
    figures.update(
        acknowledged_uploads=sum(r.kind != "merge" for r in acked),
        acknowledged_merges=sum(r.kind == "merge" for r in acked),
        cut_by_kill=len(inflight),
        tmp_leftovers_collected=leftovers["tmp"],
        partial_leftovers_collected=leftovers["partial"],
        orphan_worker_tracebacks=orphan_tracebacks,
        artifacts_verified=len(verified),
        artifacts_at_end=artifacts,
        lost=0,
    )
    assert acked, "no request was acknowledged in any round: the kills came too early to test anything"
