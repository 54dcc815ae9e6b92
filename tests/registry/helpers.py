"""Real modules and fake installed distributions in tmp_path, for the registry tests. Nothing is installed."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import pytest


def write_module(root: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    """Write a uniquely named module under `root`, put `root` on sys.path, and return the module name."""
    name = f"ckpt_test_models_{uuid.uuid4().hex[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(root))
    return name


def write_distribution(
    root: Path, monkeypatch: pytest.MonkeyPatch, name: str, entry_points: dict[str, str],
    *, group: str = "ckpt_service.architectures",
) -> None:
    """A fake distribution on sys.path: `<name>-0.1.dist-info` with METADATA and entry_points.txt."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = [f"[{group}]", *(f"{ep} = {value}" for ep, value in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(root))


def write_config(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path
