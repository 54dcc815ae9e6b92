"""Real `ckpt serve` processes for the fault and load tests, and what the tests check about them.

A server runs in its own session (process group), so that a SIGKILL reaches the server and any worker process
it started at once, as when a container is killed. Memory is sampled from /proc for the server and all its
descendants. The checks look at the store both over HTTP and on disk, and return lists of problems (empty when
everything is fine), so that a failure names every broken artifact at once.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import torch

STARTUP_SECONDS = 60
MID = {"dim": 640, "depth": 3}  # the `mid-mlp` architecture: 3 x 640 x 640 float32, about 5 MB a checkpoint
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
RETRY_STATUSES = frozenset({503})

# Written by uvicorn or by our own handlers when a request ends in an unhandled exception (a 500).
SERVER_ERROR_MARKERS = ("Traceback (most recent call last)", "Exception in ASGI application")


def free_port() -> int:
    """A TCP port that was free on the loopback interface a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """One `ckpt serve` subprocess: its process, base URL, data directory and log file."""

    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def client(self, *, timeout: float = 120) -> httpx.Client:
        """An httpx client for this server; the caller closes it."""
        return httpx.Client(base_url=self.url, timeout=timeout)

    def log(self, start: int = 0, end: int | None = None) -> str:
        """What the server wrote to stdout and stderr, from byte `start` to `end` (default: so far)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(start)
                data = f.read() if end is None else f.read(max(0, end - start))
        except FileNotFoundError:
            return ""
        return data.decode(errors="replace")

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def server_errors(self, start: int = 0, end: int | None = None) -> list[str]:
        """Log excerpts around unhandled exceptions (each one is a 500 or a crashed task), in a byte range."""
        lines = self.log(start, end).splitlines()
        return [
            "\n".join(lines[i : i + 40])
            for i, line in enumerate(lines)
            if any(marker in line for marker in SERVER_ERROR_MARKERS)
        ]


def start_server(
    data_dir: Path,
    *,
    log_path: Path,
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> Server:
    """Start `ckpt serve` on a free loopback port and wait until /healthz answers.

    Args:
        data_dir: The artifact directory.
        log_path: Where the server's stdout and stderr go (appended).
        config: An optional TOML file of architectures.
        env: Extra environment variables (`CKPT_*` settings).
        port: A fixed port; default a free one.

    Returns:
        The running server.

    Raises:
        RuntimeError: The server exited or did not become healthy within a minute.
    """
    port = port or free_port()
    cmd = [sys.executable, "-m", "service.client.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir), "--log-level", "warning"]
    if config is not None:
        cmd += ["--config", str(config)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(proc=proc, url=f"http://127.0.0.1:{port}", data_dir=data_dir, log_path=log_path)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ckpt serve exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    kill_server(server)
    raise RuntimeError(f"ckpt serve did not become healthy within {STARTUP_SECONDS} s")


def kill_server(server: Server, *, group: bool = True, orphan_timeout: float = 30) -> list[int]:
    """SIGKILL the server and reap it.

    Args:
        server: The server.
        group: Kill its whole process group at once (a container being killed); otherwise the server process
            alone (`kill -9 PID`, the OOM killer), after which its worker processes must exit by themselves.
        orphan_timeout: How long the workers of a server killed alone may take to exit.

    Returns:
        The descendants still running `orphan_timeout` seconds after the server died (always empty for a
        group kill). They are killed before returning.
    """
    before = descendants(server.proc.pid) if server.proc.poll() is None else []
    try:
        if group:
            os.killpg(server.proc.pid, signal.SIGKILL)
        else:
            server.proc.kill()
    except ProcessLookupError:
        pass
    server.proc.wait()
    survivors: list[int] = []
    if not group:
        wait_until(lambda: not any(map(_running, before)), timeout=orphan_timeout)
        survivors = [pid for pid in before if _running(pid)]
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)  # whatever is left of the group
    except ProcessLookupError:
        pass
    return survivors


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


def stop_server(server: Server) -> None:
    """Stop the server gracefully (SIGINT), then kill whatever of its group is left."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    kill_server(server)


# ---- memory -------------------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """All living descendants of a process (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields we want follow the last ')'.
        fields = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def rss_anon_bytes(pids: Iterable[int]) -> int:
    """The sum of RssAnon (private, non-file memory) of some processes; vanished ones count 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def pss_anon_bytes(pids: Iterable[int]) -> int:
    """The sum of Pss_Anon of some processes: anonymous memory, with pages that forked processes share
    (copy-on-write, e.g. torch in a fork server and its workers) divided among them instead of counted in
    each, as RssAnon does."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss_Anon:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


@dataclass(frozen=True)
class MemoryUse:
    """Anonymous memory of a process tree, two ways (see `rss_anon_bytes` and `pss_anon_bytes`)."""

    rss_anon: int
    pss_anon: int
    processes: int


def tree_memory(pid: int) -> MemoryUse:
    """Anonymous memory of a process and all its descendants."""
    pids = [pid, *descendants(pid)]
    return MemoryUse(rss_anon_bytes(pids), pss_anon_bytes(pids), len(pids))


class MemorySampler:
    """Samples the anonymous memory of a process tree in a thread while the `with` block runs; keeps the
    peaks (of the RssAnon sum and of the Pss_Anon sum, each at its own moment)."""

    def __init__(self, pid: int, *, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss_anon = 0
        self.peak_pss_anon = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            use = tree_memory(self.pid)
            self.samples += 1
            self.peak_rss_anon = max(self.peak_rss_anon, use.rss_anon)
            self.peak_pss_anon = max(self.peak_pss_anon, use.pss_anon)
            self.peak_processes = max(self.peak_processes, use.processes)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()


# ---- requests -----------------------------------------------------------------------------------------------


@dataclass
class Retried:
    """The final response of a request retried on 503, and how many 503s came before it."""

    response: httpx.Response
    overloaded: int = 0


def send_with_retry(send: Callable[[], httpx.Response], *, attempts: int = 60, max_wait: float = 5) -> Retried:
    """Send a request, and send it again after each 503 (waiting its Retry-After, capped), a bounded number
    of times. A 503 without Retry-After is returned at once: that is a bug the caller should see.

    Args:
        send: Sends the request once (reopening any file it streams).
        attempts: The most requests sent.
        max_wait: The longest wait between two attempts, in seconds.

    Returns:
        The last response and the number of 503s before it.
    """
    overloaded = 0
    response = send()
    while response.status_code in RETRY_STATUSES and overloaded + 1 < attempts:
        retry_after = response.headers.get("retry-after")
        if retry_after is None:
            return Retried(response, overloaded)
        overloaded += 1
        time.sleep(min(max_wait, max(0.1, float(retry_after))))
        response = send()
    return Retried(response, overloaded)


def upload_file(
    client: httpx.Client, path: Path, *, name: str | None = None, raw: bool = False, attempts: int = 60
) -> Retried:
    """Upload a file (multipart, or a raw octet-stream body), streamed from disk, retried on 503."""

    def send() -> httpx.Response:
        with path.open("rb") as fh:
            params = {"name": name} if name else {}
            if raw:
                return client.post("/checkpoints", content=fh, params=params,
                                   headers={"Content-Type": "application/octet-stream"})
            return client.post("/checkpoints", files={"file": (path.name, fh)}, params=params)

    return send_with_retry(send, attempts=attempts)


def checkpoint_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """torch.save into memory."""
    buf = io.BytesIO()
    torch.save(dict(state_dict), buf)
    return buf.getvalue()


def random_checkpoint(seed: int, *, floats: int) -> bytes:
    """A valid checkpoint of about `4 * floats` bytes of random float32 values, different for every seed."""
    g = torch.Generator().manual_seed(seed)
    cols = 256
    rows = max(1, floats // cols)
    return checkpoint_bytes({"w": torch.randn(rows, cols, generator=g), "b": torch.randn(cols, generator=g)})


def mlp_original(seed: int, *, dim: int = MID["dim"], depth: int = MID["depth"]) -> dict[str, torch.Tensor]:
    """The state_dict of a "pretrained" MLPBN with non-trivial BatchNorm running stats."""
    from service.registry.builtins import MLPBN

    torch.manual_seed(seed)
    model = MLPBN(dim=dim, depth=depth)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return dict(model.state_dict())


def mlp_trained(original: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The recipe's trained file: DataParallel keys (`module.`), no BN stats, a head changed by training."""
    g = torch.Generator().manual_seed(seed)
    out = {f"module.{k}": v.clone() for k, v in original.items() if not k.endswith(BN_BUFFERS)}
    out["module.head.weight"] += torch.randn(out["module.head.weight"].shape, generator=g)
    return out


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def wait_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# ---- store checks -------------------------------------------------------------------------------------------


def list_artifacts(client: httpx.Client) -> list[dict[str, Any]]:
    """Every artifact the server lists, following the cursor."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor is not None:
            params["cursor"] = cursor
        r = client.get("/checkpoints", params=params)
        r.raise_for_status()
        page = r.json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def list_names(client: httpx.Client) -> dict[str, str]:
    r = client.get("/names")
    r.raise_for_status()
    return {item["name"]: item["id"] for item in r.json()}


def download_digest(client: httpx.Client, ref: str) -> tuple[int, str, int]:
    """Status, sha256 and size of GET /checkpoints/{ref}/file, streamed."""
    digest = hashlib.sha256()
    size = 0
    with client.stream("GET", f"/checkpoints/{ref}/file") as r:
        for chunk in r.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
        return r.status_code, digest.hexdigest(), size


def http_problems(client: httpx.Client, artifacts: Iterable[Mapping[str, Any]]) -> list[str]:
    """Artifacts whose download does not hash to their id or has another size, or whose manifest is missing."""
    problems: list[str] = []
    for art in artifacts:
        status, digest, size = download_digest(client, art["id"])
        if status != 200 or digest != art["id"] or size != art["size"]:
            problems.append(f"{art['id']}: download {status}, sha256 {digest}, {size} of {art['size']} bytes")
        r = client.get(f"/checkpoints/{art['id']}/manifest")
        if r.status_code != 200 or r.json()["key_count"] != art["key_count"]:
            problems.append(f"{art['id']}: manifest {r.status_code}")
    return problems


def tmp_entries(data_dir: Path) -> list[str]:
    """What is left in <data_dir>/tmp."""
    try:
        return sorted(os.listdir(data_dir / "tmp"))
    except FileNotFoundError:
        return []


@dataclass
class DiskState:
    """The published ids on disk and everything that does not belong to a complete artifact."""

    published: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def disk_state(data_dir: Path) -> DiskState:
    """Compare the index with the blobs (the store's fsck): every published artifact has its blob (of the
    recorded size) and a manifest of its key count, and no blob lacks its index row (a partial artifact, or an
    uncollected leftover)."""
    from service.store import ArtifactStore

    store = ArtifactStore(data_dir)
    try:
        report = store.fsck()
        state = DiskState(published=set(store.index.iter_ids()))
    finally:
        store.close()
    state.problems.extend(f"{i}: index row without blob" for i in report.missing_blobs)
    state.problems.extend(f"{i}: blob size differs from the index" for i in report.size_mismatches)
    state.problems.extend(f"{i}: bad manifest" for i in report.bad_manifests)
    state.problems.extend(f"{i}: blob without index row" for i in report.orphan_blobs)
    return state
