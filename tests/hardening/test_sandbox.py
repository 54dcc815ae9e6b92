"""The parser sandbox: same results as in-process parsing, and a hang, a crash or a memory bomb costs one worker
(replaced) and gives the caller a clear error; a saturated pool says 503 with Retry-After."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.errors import InvalidCheckpoint, Overloaded, UnsafeCheckpoint
from service.sandbox import ParserSandbox
from service.store import inspect_checkpoint
from tests.hardening.builders import make_legacy_huge_storage, make_payload
from tests.hardening.hostile_support import assert_clean

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "ok.pth"
    torch.manual_seed(0)
    torch.save({"state_dict": torch.nn.Linear(4, 3).state_dict(), "epoch": 3}, path)
    return path


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    # Opening a FIFO without a writer blocks: a parser that hangs, without any mock.
    path = tmp_path / "hang.pth"
    os.mkfifo(path)
    return path


@pytest.fixture
def sandbox() -> Iterator[ParserSandbox]:
    sb = ParserSandbox(workers=1, time_limit=60, wait_seconds=0, retry_after=3)
    yield sb
    sb.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


class Background:
    """Runs one `sandbox.inspect` in a thread and keeps what it raised."""

    def __init__(self, sandbox: ParserSandbox, path: Path) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(sandbox, path), daemon=True)
        self.thread.start()

    def _run(self, sandbox: ParserSandbox, path: Path) -> None:
        try:
            sandbox.inspect(path)
        except BaseException as exc:  # kept for the test to look at
            self.error = exc

    def join(self) -> BaseException | None:
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.error


def busy_pid(sandbox: ParserSandbox) -> int:
    wait_for(lambda: len(sandbox.pids) == 1)
    pid = sandbox.pids[0]
    # The job is in the worker once it blocks opening the FIFO (the kernel waits for a writer there).
    wait_for(lambda: Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner")
    return pid


def test_results_are_those_of_in_process_parsing(sandbox: ParserSandbox, checkpoint: Path, tmp_path: Path) -> None:
    assert sandbox.inspect(checkpoint) == inspect_checkpoint(checkpoint)

    evil = make_payload(tmp_path / "evil.pth", kind="eval", form="zip", marker=tmp_path / "MARKER")
    with pytest.raises(UnsafeCheckpoint) as info:
        sandbox.inspect(evil)
    assert info.value.unsafe_globals == ["builtins.eval"]
    assert not (tmp_path / "MARKER").exists()


def test_parsing_happens_in_another_process(sandbox: ParserSandbox, checkpoint: Path) -> None:
    sandbox.inspect(checkpoint)

    assert sandbox.pids and os.getpid() not in sandbox.pids
    first = sandbox.pids
    sandbox.inspect(checkpoint)
    assert sandbox.pids == first  # long-lived: torch is not imported per request


def test_a_hang_times_out_and_the_worker_is_replaced(fifo: Path, checkpoint: Path) -> None:
    sandbox = ParserSandbox(workers=1, time_limit=1, seconds_per_gb=0)
    try:
        with pytest.raises(InvalidCheckpoint, match="timed out") as info:
            sandbox.inspect(fifo)
        assert info.value.extensions["parser_failure"] == "timed_out"
        assert sandbox.pids == []
        assert sandbox.inspect(checkpoint).manifest.entries
    finally:
        sandbox.close()


def test_a_crash_is_reported_and_the_worker_is_replaced(
    sandbox: ParserSandbox, fifo: Path, checkpoint: Path
) -> None:
    job = Background(sandbox, fifo)
    pid = busy_pid(sandbox)

    os.kill(pid, signal.SIGKILL)  # what a segfault in native parsing code looks like from outside

    error = job.join()
    assert isinstance(error, InvalidCheckpoint) and "crashed" in error.detail and "SIGKILL" in error.detail
    assert error.extensions["parser_failure"] == "crashed"
    assert sandbox.inspect(checkpoint).manifest.entries
    assert sandbox.pids and pid not in sandbox.pids


def test_a_saturated_pool_is_overloaded(sandbox: ParserSandbox, fifo: Path, checkpoint: Path) -> None:
    job = Background(sandbox, fifo)
    pid = busy_pid(sandbox)

    with pytest.raises(Overloaded) as info:
        sandbox.inspect(checkpoint)
    assert info.value.retry_after == 3

    os.kill(pid, signal.SIGKILL)
    assert isinstance(job.join(), InvalidCheckpoint)
    assert sandbox.inspect(checkpoint).manifest.entries


def test_a_memory_bomb_runs_out_of_memory_in_the_worker(sandbox: ParserSandbox, tmp_path: Path) -> None:
    bomb = make_legacy_huge_storage(tmp_path / "bomb.pth")  # 344 bytes declaring an 8 GiB storage

    with pytest.raises(InvalidCheckpoint, match="out of memory") as info:
        sandbox.inspect(bomb)

    assert info.value.extensions["parser_failure"] == "out_of_memory"
    assert sandbox.pids == []  # a worker that hit its limit is not reused


def test_close_stops_the_workers(checkpoint: Path) -> None:
    sandbox = ParserSandbox(workers=2)
    sandbox.inspect(checkpoint)
    pids = sandbox.pids

    sandbox.close()

    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), timeout=10)
    with pytest.raises(Overloaded):
        sandbox.inspect(checkpoint)


def test_the_api_answers_503_when_the_parsers_are_busy(tmp_path: Path, fifo: Path, checkpoint: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", sandbox_workers=1, sandbox_wait_seconds=0,
                        retry_after_seconds=4)
    with TestClient(create_app(settings)) as client:
        # The store's inspector is the sandbox's bound method; occupy its one worker directly.
        sandbox = client.app.state.services.store._inspector.__self__  # type: ignore[attr-defined]
        assert isinstance(sandbox, ParserSandbox)
        job = Background(sandbox, fifo)
        pid = busy_pid(sandbox)

        r = client.post("/checkpoints", files={"file": ("ok.pth", checkpoint.read_bytes())})

        assert r.status_code == 503
        assert r.headers["content-type"].startswith("application/problem+json")
        assert "busy" in r.json()["detail"] and r.headers["Retry-After"] == "4"
        assert_clean(client, settings.data_dir)
        os.kill(pid, signal.SIGKILL)
        job.join()
        assert client.post("/checkpoints", files={"file": ("ok.pth", checkpoint.read_bytes())}).status_code == 201
