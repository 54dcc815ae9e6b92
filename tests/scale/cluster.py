"""Replicas of `ckpt serve` behind haproxy, as plain processes: the pieces of the scale-out tests and benchmark.

A `Replica` is one `ckpt serve` in its own process group (its parser workers included), so that `kill()` takes it
down the way a container or a machine goes: all at once, with SIGKILL, in the middle of whatever it was doing.
`Haproxy` drives scripts/services/haproxy.sh and reads haproxy's own view (server states, sessions in flight)
through its stats socket.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_SCRIPT = ROOT / "scripts" / "services" / "haproxy.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, check: object, timeout: float, interval: float = 0.2) -> None:
    """Poll `check()` until it is true; fail naming `what` after `timeout` seconds."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


@dataclass
class Replica:
    """One `ckpt serve` process on a loopback port, with its own data directory (staging, caches) and the shared
    settings in `env` (CKPT_DATABASE_URL, CKPT_STORAGE_URL, ... or a shared CKPT_DATA_DIR)."""

    name: str
    port: int
    data_dir: Path
    env: Mapping[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def backend(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, ready_timeout: float = 180) -> None:
        """Start the process and wait until `GET /readyz` answers 200."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        cmd = [sys.executable, "-m", "service.client.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning"]
        env = {"CKPT_DATA_DIR": str(self.data_dir), **os.environ, **self.env}
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_until(f"{self.name} ready at {self.url} (log {self.log_path})", self.ready, ready_timeout, 0.3)

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc and self.proc.returncode}; see {self.log_path}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole process group (the API and its parser workers) and reap it."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (uvicorn finishes what is in flight), then SIGKILL whatever is left of the group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@dataclass(frozen=True)
class Session:
    """A request haproxy has in flight, as `show sess` lists it."""

    server: str
    age_seconds: float


class Haproxy:
    """haproxy (scripts/services/haproxy.sh) in front of replicas; stopped by `stop()`."""

    def __init__(self, directory: Path, backends: list[str], *, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        args = [str(HAPROXY_SCRIPT), "start", str(directory), "--port", str(self.port)]
        for backend in backends:
            args += ["--backend", backend]
        done = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"haproxy did not start (exit {done.returncode}): {done.stderr[-3000:]}")
        self.url = done.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        subprocess.run([str(HAPROXY_SCRIPT), "stop", str(self.directory)], check=False, timeout=60)

    def command(self, line: str) -> str:
        """One command on the stats socket (`show stat`, `show sess`, ...); its answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.directory / "haproxy.sock"))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """Each replica's row of `show stat` (status, stot: sessions in all, scur: now, ...) by server name."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line.strip()]
        return {r["svname"]: r for r in rows if r["pxname"] == "replicas" and r["svname"] != "BACKEND"}

    def server_states(self) -> dict[str, str]:
        """Each replica's state as haproxy sees it: "UP", "DOWN", "UP 1/2" (rising), ..."""
        return {name: row["status"] for name, row in self.servers().items()}

    def sessions(self) -> list[Session]:
        """The requests in flight to a replica (the stats socket's own session is not one)."""
        out = []
        for line in self.command("show sess").splitlines():
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            server = fields.get("srv", "")
            if fields.get("be") == "replicas" and server and server.lower() != "<none>":
                out.append(Session(server, _seconds(fields.get("age", "0s"))))
        return out

    def wait_states(self, want: Mapping[str, str], timeout: float = 60) -> None:
        """Wait until each named replica is in the given state (haproxy checks every second, fall 2, rise 2)."""
        wait_until(f"haproxy sees {dict(want)}", lambda: all(
            self.server_states().get(k) == v for k, v in want.items()), timeout)


def _seconds(age: str) -> float:
    # haproxy's human durations: "850ms", "12s", "3m4s", "1h2m".
    total, number = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    i = 0
    while i < len(age):
        c = age[i]
        if c.isdigit():
            number += c
            i += 1
            continue
        unit = age[i:i + 2] if age[i:i + 2] in ("ms", "us") else c
        total += float(number or 0) * units.get(unit, 0.0)
        number = ""
        i += len(unit)
    return total
