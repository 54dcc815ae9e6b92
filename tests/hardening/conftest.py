"""Options and fixtures of the fault and load tests (test_faults_*.py, test_load.py).

`--long` (only when pytest is given this directory or a file in it: pytest reads the options of a non-root
conftest that late) or `CKPT_LONG_TESTS=1` (from anywhere) runs the long variants, with more kill rounds and
bigger uploads; without either the CI variant runs. Each test records its figures with the `figures` fixture;
they are printed in the terminal summary, and written as JSON to `$CKPT_HARDENING_RESULTS` when that is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hardening.servers import MID

LONG_TIMEOUT_SECONDS = 3 * 3600
_HERE = Path(__file__).parent
_FIGURES: dict[str, dict[str, Any]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False,
                     help="run the long variants of the hardening tests (also: CKPT_LONG_TESTS=1)")


def is_long(config: pytest.Config) -> bool:
    return bool(config.getoption("long", default=False)) or os.environ.get("CKPT_LONG_TESTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not is_long(config):
        return
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT_SECONDS))


@pytest.fixture(scope="session")
def long_run(pytestconfig: pytest.Config) -> bool:
    """True for the long variant."""
    return is_long(pytestconfig)


@pytest.fixture
def figures(request: pytest.FixtureRequest, long_run: bool) -> Iterator[dict[str, Any]]:
    """A dict the test fills with its figures; kept per test for the summary."""
    data: dict[str, Any] = {"variant": "long" if long_run else "ci"}
    yield data
    _FIGURES[request.node.nodeid] = data


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("hardening figures")
    for nodeid, data in _FIGURES.items():
        terminalreporter.write_line(f"{nodeid}: {json.dumps(data, sort_keys=True)}")
    target = os.environ.get("CKPT_HARDENING_RESULTS")
    if target:
        Path(target).write_text(json.dumps(_FIGURES, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def mid_config(tmp_path: Path) -> Path:
    """A config with `mid-mlp`: an MLPBN whose checkpoints are a few MB, so uploads and merges take a while."""
    path = tmp_path / "ckpt.toml"
    path.write_text(
        '[architectures.mid-mlp]\nfactory = "service.registry.builtins:mlp_bn"\n'
        f"kwargs = {{ dim = {MID['dim']}, depth = {MID['depth']} }}\n"
    )
    return path
