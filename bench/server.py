"""A real `ckpt serve` on a loopback port, and a sampler of its anonymous memory (children included)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`python -m service.client.cli serve` on a free port; `stop()` sends SIGINT like Ctrl-C."""

    def __init__(self, data_dir: Path, *, config: Path | None = None, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "service.client.cli", "serve", "--host", "127.0.0.1", "--port",
               str(self.port), "--data-dir", str(data_dir), "--log-level", "warning"]
        if config is not None:
            cmd += ["--config", str(config)]
        self._log = open(log, "ab") if log is not None else None  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ckpt serve exited with {self.proc.returncode} (log: {log})")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("ckpt serve did not become healthy within 90 s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a sandbox worker pool, if the server has one)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def rss_anon(pid: int) -> int:
    """Anonymous resident bytes of one process (page cache and file mappings do not count)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def tree_rss_anon(pid: int) -> int:
    return sum(rss_anon(p) for p in process_tree(pid))


class MemorySampler:
    """Samples the anonymous RSS of a process tree every `interval` seconds while in a `with` block.

    `growth` is the peak during the block minus the value sampled on entry.
    """

    def __init__(self, pid: int, *, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        tree = process_tree(self.pid)
        next_tree = time.monotonic() + 0.1
        while not self._stop.is_set():
            if time.monotonic() >= next_tree:  # children may come and go; re-list them now and then
                tree = process_tree(self.pid)
                next_tree = time.monotonic() + 0.1
            self.max_processes = max(self.max_processes, len(tree))
            self.peak = max(self.peak, sum(rss_anon(p) for p in tree))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self.baseline = tree_rss_anon(self.pid)
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, tree_rss_anon(self.pid))

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.baseline)
