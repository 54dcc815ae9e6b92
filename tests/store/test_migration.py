"""A data directory written by the store before the index (layout 1) is imported on the first start: once,
under a lock, and crash-safely."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from service.registry import ArchitectureRegistry
from service.store import ArtifactStore, Lineage
from tests.store.legacy_layout import LegacyArtifact, legacy_artifact, write_layout_v1

ROOT = Path(__file__).resolve().parents[2]
SPEC_KEYS = {"fc.weight": {"shape": [2, 3], "dtype": "float32"}, "fc.bias": {"shape": [2], "dtype": "float32"}}


def _created(i: int) -> str:
    return f"2025-01-01T00:00:{i // 1_000_000:02d}.{i % 1_000_000:06d}Z"


def _population(n: int) -> tuple[list[tuple[LegacyArtifact, bytes]], dict[str, str]]:
    """`n` artifacts: uploads with labels, every third one derived from the one before (lineage); names."""
    out: list[tuple[LegacyArtifact, bytes]] = []
    for i in range(n):
        sd = {"w": torch.full((2, 2), float(i)), "b": torch.zeros(2)}
        lineage = None
        if i % 3 == 2:
            lineage = Lineage(operation="strip", inputs={"checkpoint": out[-1][0].meta.id},
                              params={"prefixes": None}, report={"renamed": i})
        out.append(legacy_artifact(sd, created=_created(i), labels={"team": f"t{i % 4}", "i": str(i)},
                                   lineage=lineage, filename=f"f{i}.pth"))
    names = {f"n{i}": out[i][0].meta.id for i in range(0, n, 7)}
    return out, names


def _check_imported(store: ArtifactStore, artifacts: list[tuple[LegacyArtifact, bytes]],
                    names: dict[str, str]) -> None:
    page = store.list(limit=1000)
    assert page.total == len(artifacts)
    for artifact, data in artifacts:
        expected = artifact.meta
        got = store.metadata(expected.id)
        pointing = tuple(sorted(n for n, i in names.items() if i == expected.id))
        assert got == type(expected)(**{**expected.__dict__, "names": pointing})
        assert store.manifest(expected.id).to_dict() == artifact.manifest
        with store.open_blob(expected.id) as f:
            assert f.read() == data
    assert store.names() == dict(sorted(names.items()))
    # the filters find them through the index
    assert store.list(label="team=t1", limit=1000).total == sum(a.meta.labels["team"] == "t1" for a, _ in artifacts)
    assert store.list(operation="strip", limit=1000).total == sum(a.meta.lineage is not None for a, _ in artifacts)
    derived = [a.meta for a, _ in artifacts if a.meta.lineage is not None]
    if derived:
        assert store.made_from(derived[0].lineage.inputs["checkpoint"]) == [derived[0].id]  # type: ignore[union-attr]
    assert store.fsck(deep=True).ok


def test_a_layout_1_directory_is_imported_on_first_start(tmp_path: Path, database_url: str | None) -> None:
    root = tmp_path / "data"
    artifacts, names = _population(12)
    write_layout_v1(root, artifacts, names=names, specs={"head-only": SPEC_KEYS})

    store = ArtifactStore(root, database_url=database_url)
    _check_imported(store, artifacts, names)
    registry = ArchitectureRegistry(spec_store=store.index, include_builtins=False)
    arch = registry.get("head-only")
    assert arch.source == "spec" and arch.description == "spec head-only"
    assert {k: list(t.shape) for k, t in arch.spec.keys.items()} == {"fc.weight": [2, 3], "fc.bias": [2]}
    # the old files are archived, the marker says layout 2, and a second start imports nothing again
    assert sorted(p.name for p in (root / "legacy-v1").iterdir()) == ["architectures", "manifests", "meta", "names"]
    assert not (root / "meta").exists()
    assert json.loads((root / "ckpt-store.json").read_text())["layout_version"] == 2
    again = ArtifactStore(root, database_url=database_url)
    _check_imported(again, artifacts, names)
    # and the imported store works as any other
    again.set_name("n-new", artifacts[1][0].meta.id)
    again.delete(artifacts[3][0].meta.id, force=True)
    assert not ArtifactStore(root, database_url=database_url).exists(artifacts[3][0].meta.id)


_OPEN = """
import sys, time
from pathlib import Path
from service.store import ArtifactStore
from service.store.index import open_index
from service.store.index.legacy import import_legacy
print("ready", flush=True)
root, url = Path(sys.argv[1]), (sys.argv[2] or None)
until = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
while time.time() < until:
    pass
index = open_index(root, url)
index.migrate()
print("imported", import_legacy(root, index), flush=True)
ArtifactStore(root, database_url=url)
print("done", flush=True)
"""


def _opener(root: Path, database_url: str | None, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", _OPEN, str(root), database_url or "", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_starting_at_once_import_once(tmp_path: Path, database_url: str | None) -> None:
    root = tmp_path / "data"
    artifacts, names = _population(60)
    write_layout_v1(root, artifacts, names=names, specs={"head-only": SPEC_KEYS})
    start = str(time.time() + 3)  # both leave their busy wait at the same moment, after their imports
    procs = [_opener(root, database_url, start) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    counts = sorted(int(line.split()[1]) for out, _ in outputs for line in out.splitlines()
                    if line.startswith("imported"))
    assert counts == [0, len(artifacts)]
    _check_imported(ArtifactStore(root, database_url=database_url), artifacts, names)


KILL_ROUNDS = int(os.environ.get("CKPT_MIGRATION_KILL_ROUNDS", "3"))


def test_an_import_killed_at_random_moments_completes_on_the_next_start(
    tmp_path: Path, database_url: str | None
) -> None:
    artifacts, names = _population(900)
    rng = random.Random(int(os.environ.get("CKPT_MIGRATION_KILL_SEED", "18")))
    landed = 0
    for round_ in range(KILL_ROUNDS):
        root = tmp_path / f"data-{round_}"
        write_layout_v1(root, artifacts, names=names, specs={"head-only": SPEC_KEYS})
        if database_url is not None:  # a fresh index per round: the import must start from nothing each time
            _reset_postgres(database_url)
        proc = _opener(root, database_url)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)  # reaps it and closes its pipes
        if (root / "meta").exists():
            landed += 1  # killed before the import archived the old files
        store = ArtifactStore(root, database_url=database_url)  # the next start
        _check_imported(store, artifacts, names)
        assert ArchitectureRegistry(spec_store=store.index, include_builtins=False).get("head-only").source == "spec"
        assert not (root / "meta").exists()
        store.close()
    print(f"kills that landed before the import was archived: {landed} of {KILL_ROUNDS}")
    # sanity of the test itself: kills did land mid-import (not only before it started or after it ended)
    assert KILL_ROUNDS < 3 or landed > 0


def _reset_postgres(url: str) -> None:
    import sqlalchemy as sa

    from service.store.index.schema import metadata

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as conn:
        metadata.drop_all(conn)
    engine.dispose()


@pytest.mark.index("sqlite")
def test_a_store_written_by_a_newer_index_is_refused(tmp_path: Path) -> None:
    from service.errors import StoreError
    from service.store.index import open_index
    from service.store.index.schema import schema_migrations

    root = tmp_path / "data"
    ArtifactStore(root)
    index = open_index(root)
    with index.engine.begin() as conn:
        conn.execute(schema_migrations.insert().values(version=99, description="future", applied="x"))
    with pytest.raises(StoreError, match="schema version 99"):
        ArtifactStore(root)
