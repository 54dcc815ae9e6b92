"""Reads cannot starve writes, and a request's time budget ends its heavy work with a 422."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.core.budget import job_scope
from service.core.diff import diff_values
from service.errors import Overloaded, TimeBudgetExceeded
from service.sandbox import ParserSandbox
from tests.hardening.test_sandbox import Background, busy_pid, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "ok.pth"
    torch.save(torch.nn.Linear(4, 3).state_dict(), path)
    return path


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "hang.pth"
    os.mkfifo(path)  # opening it blocks: a parse that never ends, without a mock
    return path


@pytest.fixture
def sandbox() -> Iterator[ParserSandbox]:
    sb = ParserSandbox(workers=1, read_workers=1, time_limit=60, wait_seconds=0, retry_after=3)
    yield sb
    sb.close()


class ReadJob(Background):
    def _run(self, sandbox: ParserSandbox, path: Path) -> None:
        with job_scope("read", None):
            super()._run(sandbox, path)


def test_a_parse_past_the_request_budget_is_cut_and_its_worker_replaced(
    sandbox: ParserSandbox, fifo: Path, checkpoint: Path
) -> None:
    with job_scope("write", 0.5), pytest.raises(TimeBudgetExceeded) as info:
        sandbox.inspect(fifo)  # the parser's own limit is 60 s: only the budget can end this
    assert info.value.extensions["budget_seconds"] == 0.5
    assert sandbox.pids == []  # the worker was killed, not reused
    assert sandbox.inspect(checkpoint).manifest.entries


def test_reads_have_parser_workers_of_their_own(sandbox: ParserSandbox, fifo: Path, checkpoint: Path) -> None:
    read = ReadJob(sandbox, fifo)
    pid = busy_pid(sandbox)
    with job_scope("read", None), pytest.raises(Overloaded, match="for reads"):
        sandbox.inspect(checkpoint)  # the one read worker is busy
    assert sandbox.inspect(checkpoint).manifest.entries  # a write still gets a worker at once
    os.kill(pid, 9)
    read.join()
    wait_for(lambda: pid not in sandbox.pids)


def test_value_diffs_stop_at_the_budget() -> None:
    a = {f"k{i}": torch.full((4,), float(i)) for i in range(10)}
    b = {k: v + 1 for k, v in a.items()}
    assert len(diff_values(a, b, keys=list(a))) == 10
    with job_scope("read", 0.0), pytest.raises(TimeBudgetExceeded):
        diff_values(a, b, keys=list(a))


def test_the_api_answers_422_past_the_budget(tmp_path: Path, checkpoint: Path) -> None:
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(4, 3).state_dict(), other)
    settings = Settings(data_dir=tmp_path / "data", heavy_time_budget_seconds=1e-9)
    with TestClient(create_app(settings)) as client:
        # A budget this small cannot even cover the upload's parse.
        r = client.post("/checkpoints", content=checkpoint.read_bytes(),
                        headers={"content-type": "application/octet-stream"})
        assert r.status_code == 422, r.text
        assert r.json()["title"] == "Time budget exceeded"
        assert client.get("/checkpoints").json()["total"] == 0
