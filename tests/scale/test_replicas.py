"""Scale-out end to end: replicas behind haproxy on one PostgreSQL index and one Ceph RGW bucket, each with its own
data directory (staging, read cache), one of them killed mid-run, nothing lost.

Four clients upload, merge, name and diff concurrently through haproxy with our client (its own retries on);
a fifth pushes a large file slowly, so that a request is certainly in flight on the replica that gets SIGKILL.
That replica is restarted on its port and haproxy takes it back. At the end a third replica, started afterwards
on the same database and bucket with a fresh data directory, must see every acknowledged artifact (its bytes
hash to its id) and every name pointing to a live artifact, as `tests/scale/workload.py` defines it.
"""

from __future__ import annotations

import hashlib
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from service.api.signing import DownloadSigner
from service.client import CheckpointClient
from tests._services import S3Service
from tests.factories import MLPBN, make_original, make_trained
from tests.scale.cluster import Haproxy, Replica, wait_until
from tests.scale.conftest import FIGURES, Cluster
from tests.scale.workload import Failed, Ledger, allowed_targets, sha256_of

CLIENTS = 4
AFTER_RESTART = 3  # iterations each client does once the killed replica is back, before it stops
MAX_ITERATIONS = 400  # a bound, should the restart never come
PAUSE_SECONDS = 0.3  # between a client's iterations: keeps the request count modest while the chaos takes time
TRAINED_FILES = 6  # per client; later iterations merge the same files again (the same artifacts, by content)
SPEC = "scale-convnet"  # a code-free architecture registered through one replica, used through all


def _checkpoints(directory: Path) -> tuple[list[Path], list[list[Path]], Path]:
    """Each client's original and trained files (the recipe's pair, distinct per client), and one large file."""
    directory.mkdir()
    originals, trained = [], []
    for i in range(CLIENTS):
        original = make_original(seed=10 + i)
        originals.append(directory / f"original-{i}.pth")
        torch.save(original.state_dict(), originals[-1])
        trained.append([])
        for k in range(TRAINED_FILES):
            trained[i].append(directory / f"trained-{i}-{k}.pth")
            torch.save(make_trained(original, seed=100 * i + k, steps=1).state_dict(), trained[i][-1])
    torch.manual_seed(0)
    big = directory / "big.pth"
    torch.save(MLPBN(dim=1024, depth=6).state_dict(), big)  # about 25 MB
    return originals, trained, big


def _guarded(ledger: Ledger, body: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            body()
        except Exception:  # noqa: BLE001 - reported through the ledger, which fails the test
            with ledger.lock:
                ledger.unexpected.append(traceback.format_exc())
    return run


def _client_loop(i: int, url: str, ledger: Ledger, original: Path, trained: list[Path],
                 may_stop: Callable[[], bool]) -> None:
    with ledger.client(url) as ckpt:
        original_id = None
        for _ in range(5):  # the original is needed for everything else: ask again until it is acknowledged
            try:
                with ledger.call("push", name=f"c{i}-original", target=sha256_of(original)) as stored:
                    original_id = ckpt.push(original, name=f"c{i}-original").artifact.id
                    stored(original_id)
                break
            except Failed:
                continue
        assert original_id is not None, f"client {i} could not push its original"
        for k in range(MAX_ITERATIONS):
            if may_stop():
                return
            merged_name, architecture = f"c{i}-merged-{k}", (SPEC if k % 2 else "tiny-convnet")
            try:
                if k % 2 == 0:
                    # The trained file goes up inside the merge: not retried; a failure is unacknowledged.
                    with ledger.call("merge with upload", name=merged_name) as stored:
                        merged = ckpt.merge(original_id, trained[k % TRAINED_FILES], architecture=architecture,
                                            name=merged_name)
                        stored(merged.id)
                else:
                    with ledger.call("push") as stored:
                        trained_id = ckpt.push(trained[k % TRAINED_FILES]).artifact.id
                        stored(trained_id)
                    # Both inputs by id: the client retries it.
                    with ledger.call("merge by id", name=merged_name) as stored:
                        merged = ckpt.merge(original_id, trained_id, architecture=architecture, name=merged_name)
                        stored(merged.id)
                with ledger.call("name", name=f"c{i}-latest", target=merged.id) as stored:
                    stored(ckpt.set_name(f"c{i}-latest", merged.id).id)
                with ledger.call("diff"):
                    diff = ckpt.diff(original_id, merged.id, normalize_prefixes=True)
                if not (diff.summary["changed"] > 0 and diff.summary["unchanged"] > 0):
                    with ledger.lock:
                        ledger.unexpected.append(f"diff of {original_id} and {merged.id}: {diff.summary}")
            except Failed:
                continue
            finally:
                time.sleep(PAUSE_SECONDS)


def _slow_push(url: str, ledger: Ledger, path: Path, started: threading.Event) -> None:
    def throttle(done: int, total: int | None) -> None:
        started.set()
        time.sleep(0.2)  # per MiB sent: about 5 s for the whole file, on every attempt

    with ledger.client(url) as ckpt:
        try:
            with ledger.call("push (slow, large)", name="big", target=sha256_of(path)) as stored:
                stored(ckpt.push(path, name="big", progress=throttle).artifact.id)
        except Failed:
            pass


def _signed_on_one_opens_on_the_other(replicas: list[Replica], artifact_id: str, secret: str) -> None:
    """A download URL signed by one replica (with the shared CKPT_URL_SIGNING_SECRET) opens on the other."""
    signed = httpx.post(f"{replicas[0].url}/checkpoints/{artifact_id}/download-url", timeout=30)
    assert signed.status_code == 200, signed.text
    body = signed.json()
    DownloadSigner(secret.encode()).check(artifact_id, body["format"], str(body["expires"]),
                                          httpx.URL(body["url"]).params["sig"])  # the configured secret signed it
    path = httpx.URL(body["url"]).raw_path.decode()  # /checkpoints/{id}/file?format=...&expires=...&sig=...
    other = httpx.get(f"{replicas[1].url}{path}", timeout=60)
    assert other.status_code == 200 and hashlib.sha256(other.content).hexdigest() == artifact_id
    forged = httpx.get(f"{replicas[1].url}{path[:-4]}{'0000' if path[-4:] != '0000' else '1111'}", timeout=60)
    assert forged.status_code == 403, forged.text


class Chaos:
    """Kills the replica that serves the oldest request in flight (the slow push), then restarts it."""

    def __init__(self, haproxy: Haproxy, replicas: list[Replica]) -> None:
        self.haproxy = haproxy
        self.replicas = replicas
        self.back = threading.Event()
        self.victim = ""
        self.in_flight = 0
        self.sessions_at_restart = 0
        self.down_seconds = 0.0

    def run(self, ledger: Ledger, slow: threading.Thread, slow_started: threading.Event) -> None:
        wait_until("eight acknowledged calls", lambda: ledger.totals()["acknowledged"] >= 8, 300)
        slow.start()
        wait_until("the slow push under way", slow_started.is_set, 120)
        wait_until("a request in flight for a second", lambda: any(
            s.age_seconds >= 1 for s in self.haproxy.sessions()), 60, 0.1)
        sessions = self.haproxy.sessions()
        self.victim = max(sessions, key=lambda s: s.age_seconds).server
        self.in_flight = sum(1 for s in sessions if s.server == self.victim)
        replica = self.replicas[int(self.victim.removeprefix("replica")) - 1]
        killed = time.monotonic()
        replica.kill()
        self.haproxy.wait_states({self.victim: "DOWN"}, timeout=30)
        replica.start()
        self.haproxy.wait_states({self.victim: "UP"}, timeout=60)
        self.down_seconds = time.monotonic() - killed
        self.sessions_at_restart = int(self.haproxy.servers()[self.victim]["stot"])
        self.back.set()


@pytest.mark.timeout(900)
def test_replicas_behind_haproxy_lose_nothing_when_one_is_killed(
    cluster: Cluster, tmp_path: Path, ceph_s3: S3Service, s3_bucket: str
) -> None:
    originals, trained, big = _checkpoints(tmp_path / "files")
    replicas = [cluster.replica("replica1"), cluster.replica("replica2")]
    for replica in replicas:
        replica.start()
    haproxy = cluster.front(replicas)
    ledger = Ledger()

    # An architecture registered through one replica is used by the next request on the other.
    with CheckpointClient(replicas[0].url) as first, CheckpointClient(replicas[1].url) as second:
        spec_source = first.push(originals[0]).artifact.id
        first.register_architecture(SPEC, from_checkpoint=spec_source)
        check = second.merge(spec_source, trained[0][0], architecture=SPEC)
        assert check.report["verification"]["ok"] is True
    _signed_on_one_opens_on_the_other(replicas, spec_source, cluster.env["CKPT_URL_SIGNING_SECRET"])

    chaos = Chaos(haproxy, replicas)
    after_restart = [0] * CLIENTS

    def stopper(i: int) -> Callable[[], bool]:
        def may_stop() -> bool:
            if chaos.back.is_set():
                after_restart[i] += 1
            return after_restart[i] > AFTER_RESTART
        return may_stop

    slow_started = threading.Event()
    slow = threading.Thread(target=_guarded(ledger, lambda: _slow_push(haproxy.url, ledger, big, slow_started)))
    threads = [threading.Thread(target=_guarded(ledger, lambda i=i: _client_loop(
        i, haproxy.url, ledger, originals[i], trained[i], stopper(i)))) for i in range(CLIENTS)]
    threads.append(threading.Thread(target=_guarded(ledger, lambda: chaos.run(ledger, slow, slow_started))))
    for t in threads:
        t.start()
    for t in [*threads, slow]:
        t.join(timeout=600)
        assert not t.is_alive(), "a client did not finish within 600 s\n" + cluster.logs()
    assert not ledger.unexpected, "\n".join(ledger.unexpected) + "\n" + cluster.logs()
    assert chaos.back.is_set() and chaos.in_flight >= 1
    totals = ledger.totals()
    # The kill was felt: a request in flight on the victim was retried by the client or failed (unacknowledged).
    assert totals["retries"] + totals["unacknowledged"] >= 1, totals
    assert min(after_restart) > AFTER_RESTART, f"clients stopped before the restart: {after_restart}"
    # The restarted replica took requests again.
    assert int(haproxy.servers()[chaos.victim]["stot"]) > chaos.sessions_at_restart

    # A third replica, started afterwards on the same index and bucket (a fresh data directory), sees everything
    # that was acknowledged.
    third = cluster.replica("replica3")
    third.start()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with CheckpointClient(third.url) as ckpt:
        stored = {a.id for a in ckpt.iter_checkpoints()}
        lost = ledger.artifacts - stored
        for artifact_id in sorted(stored):
            pulled = ckpt.pull(artifact_id, downloads / artifact_id)
            assert sha256_of(pulled.path) == artifact_id
        names = {n.name: n.id for n in ckpt.list_names()}
        assert ckpt.get_architecture(SPEC).name == SPEC
    # The bytes are in the bucket, not in a replica's data directory (scratch: staging and the read cache).
    pages = ceph_s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="scale/blobs/")
    in_bucket = {obj["Key"].rsplit("/", 1)[-1] for page in pages for obj in page.get("Contents", [])}
    assert stored <= in_bucket, sorted(stored - in_bucket)
    in_directories = [path for r in cluster.replicas for path in (r.data_dir / "blobs").glob("*/*")]
    assert not in_directories, in_directories
    dangling = {name: target for name, target in names.items() if target not in stored}
    wrong = {name: names.get(name) for name, events in ledger.names.items()
             if not allowed_targets(events).admits(names.get(name))}

    figures = {
        "requests": totals["requests"], "retries by the client": totals["retries"],
        "acknowledged calls": totals["acknowledged"], "unacknowledged calls": totals["unacknowledged"],
        "acknowledged artifacts": totals["artifacts"], "artifacts stored": len(stored), "names": len(names),
        "lost": len(lost), "requests in flight on the killed replica": chaos.in_flight,
        "killed replica out for (s)": round(chaos.down_seconds, 1),
    }
    FIGURES.update({k: str(v) for k, v in figures.items()})
    FIGURES["unacknowledged by kind"] = str(dict(ledger.unacknowledged))
    print("scale-out e2e:", figures, "unacknowledged by kind:", dict(ledger.unacknowledged))
    assert not lost, f"acknowledged artifacts missing: {sorted(lost)}"
    assert not dangling, f"names pointing to no artifact: {dangling}"
    assert not wrong, f"names not where an acknowledged call (or a later attempt) put them: {wrong}"
