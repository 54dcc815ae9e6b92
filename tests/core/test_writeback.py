"""Background flushes: every step of bytes, at most one in flight, each on its own file description."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from service.core import writeback


def _until(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_flushes_start_every_step_and_never_pile_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    started: list[int] = []

    def slow_sync(fd: int) -> None:
        started.append(fd)
        release.wait(10)
        os.close(fd)

    monkeypatch.setattr(writeback, "_sync_and_close", slow_sync)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        wb = writeback.Writeback(fd, step=100)
        wb.wrote(99)
        assert started == []
        wb.wrote(1)  # a step: one flush starts
        assert _until(lambda: len(started) == 1) and started[0] != fd  # its own descriptor, not the writer's
        wb.wrote(500)  # more steps while it runs: no second one
        time.sleep(0.05)
        assert len(started) == 1
        wb.flush(force=True)  # the writer's last bytes: started even so
        assert _until(lambda: len(started) == 2)
        release.set()
        wb.wait()
        wb.wrote(100)
        wb.wait()
        assert len(started) == 3
    finally:
        release.set()
        os.close(fd)


def test_a_real_flush_closes_its_descriptor(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    before = len(os.listdir("/proc/self/fd"))
    try:
        os.write(fd, b"x" * 4096)
        wb = writeback.Writeback(fd, step=1)
        wb.wrote(4096)
        wb.wait()
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        os.close(fd)
