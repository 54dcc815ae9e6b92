"""Labels that stick (merged on dedup, updated in place) and the retention policy, on each index backend.

Artifacts are aged by rewriting their `created` in the index (what the policy reads), not by sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from service.errors import ArtifactNotFound, InvalidRequest
from service.store import ArtifactStore
from service.store.index.schema import artifacts, labels
from service.store.types import Lineage
from tests.store.conftest import random_state_dict

OLD = "2020-01-01T00:00:00.000000Z"


def age(store: ArtifactStore, artifact_id: str, created: str = OLD) -> None:
    with store.index.engine.begin() as conn:
        conn.execute(artifacts.update().where(artifacts.c.id == artifact_id).values(created=created))
        conn.execute(labels.update().where(labels.c.artifact_id == artifact_id).values(created=created))


def derived(store: ArtifactStore, seed: int, operation: str, inputs: dict[str, str], **kw: object) -> str:
    result = store.store_state_dict(random_state_dict(seed), lineage=Lineage(operation, inputs), **kw)  # type: ignore[arg-type]
    return result.artifact.id


def test_labels_given_with_existing_bytes_are_merged(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    first = store.ingest_file(ckpt(0), labels={"stage": "raw", "team": "a"})
    again = store.ingest_file(ckpt(0), labels={"stage": "pretrained", "run": "7", "team": "a"})
    assert again.created is False
    assert again.artifact.labels == {"run": "7", "stage": "pretrained", "team": "a"}
    assert again.labels_changed is not None
    assert (again.labels_changed.added, again.labels_changed.changed) == (["run"], ["stage"])
    assert store.list(label="stage=pretrained").items[0].id == first.artifact.id
    assert store.list(label="stage=raw").total == 0
    # a computed result that already exists merges its labels too
    sd = random_state_dict(3)
    store.store_state_dict(sd, labels={"a": "1"})
    same = store.store_state_dict(sd, labels={"b": "2"})
    assert same.created is False and same.artifact.labels == {"a": "1", "b": "2"}
    # no labels given: nothing reported
    assert store.ingest_file(ckpt(0)).labels_changed is None


def test_update_labels_sets_and_deletes(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    artifact_id = store.ingest_file(ckpt(0), labels={"old": "x", "keep": "y"}).artifact.id
    meta, changes = store.update_labels(artifact_id, set_={"new": "1", "keep": "z"}, remove=["old", "absent"])
    assert meta.labels == {"keep": "z", "new": "1"}
    assert changes.to_dict() == {"added": ["new"], "changed": ["keep"], "removed": ["old"]}
    assert store.metadata(artifact_id).labels == {"keep": "z", "new": "1"}
    assert store.list(label="old").total == 0 and store.list(label="keep=z").total == 1
    with pytest.raises(InvalidRequest, match="'bad key'"):
        store.update_labels(artifact_id, remove=["bad key"])
    with pytest.raises(InvalidRequest):
        store.update_labels(artifact_id, set_={"k": "v" * 300})
    assert store.metadata(artifact_id).labels == {"keep": "z", "new": "1"}
    with pytest.raises(ArtifactNotFound):
        store.update_labels("0" * 64, set_={"k": "v"})


def policy_store(tmp_path: Path, database_url: str | None) -> ArtifactStore:
    return ArtifactStore(tmp_path / "policy", database_url=database_url, retention_seconds=86400,
                         retention_keep_last=2, retention_label_keys=("stage",))


def test_retention_keeps_exactly_what_the_policy_says(tmp_path: Path, database_url: str | None) -> None:
    store = policy_store(tmp_path, database_url)
    ids: dict[str, str] = {}

    def put(name: str, seed: int, **kw: object) -> str:
        ids[name] = store.store_state_dict(random_state_dict(seed), **kw).artifact.id  # type: ignore[arg-type]
        return ids[name]

    # a lineage chain ending in a name: merge of a merge, and a strip of an input of the first merge
    put("base", 1)
    put("t1", 2)
    put("t2", 3)
    put("raw", 4)
    ids["stripped"] = derived(store, 5, "strip", {"input": ids["raw"]})
    ids["m1"] = derived(store, 6, "merge", {"original": ids["base"], "trained": ids["t1"]})
    ids["m2"] = derived(store, 7, "merge", {"original": ids["m1"], "trained": ids["stripped"]})
    store.set_name("release", ids["m2"])
    # an unnamed merge whose inputs are only its own
    put("lonely_in", 8)
    ids["lonely"] = derived(store, 9, "merge", {"original": ids["lonely_in"], "trained": ids["t2"]})
    # keep-last 2 per stage value; "run" is not a policy key
    for i in range(4):
        put(f"pre{i}", 20 + i, labels={"stage": "pretrained"})
    put("ft0", 30, labels={"stage": "finetuned"})
    put("run0", 31, labels={"run": "a"})
    put("fresh", 40)
    for name, artifact_id in ids.items():
        if name != "fresh":
            age(store, artifact_id, f"2020-01-01T00:00:{list(ids).index(name):02d}.000000Z")
    expected_gone = {ids[n] for n in ("t2", "lonely_in", "lonely", "pre0", "pre1", "run0")}
    report = store.retain(dry_run=True)
    assert {r.id for r in report.removed} == expected_gone
    assert report.bytes == sum(store.metadata(i).size for i in expected_gone)
    assert store.index.count() == len(ids)  # the dry run changed nothing
    applied = store.retain(dry_run=False)
    assert {r.id for r in applied.removed} == expected_gone and applied.bytes == report.bytes
    left = {m.id for m in store.list(limit=1000).items}
    assert left == set(ids.values()) - expected_gone
    for gone in expected_gone:
        assert not store.exists(gone)
        with pytest.raises(ArtifactNotFound):
            store.open_blob(gone)
    assert store.retain(dry_run=True).removed == []
    assert store.fsck().ok


def test_retention_off_removes_nothing(store: ArtifactStore) -> None:
    artifact_id = store.store_state_dict(random_state_dict(1)).artifact.id
    age(store, artifact_id)
    report = store.retain(dry_run=False)
    assert report.enabled is False and report.removed == [] and store.exists(artifact_id)


def test_a_leased_input_survives_gc_and_the_merge_succeeds(tmp_path: Path, database_url: str | None) -> None:
    store = policy_store(tmp_path, database_url)
    original = store.store_state_dict(random_state_dict(1)).artifact.id
    trained = store.store_state_dict(random_state_dict(2)).artifact.id
    age(store, original)
    age(store, trained)
    leased = threading.Event()
    collected = threading.Event()
    out: dict[str, str] = {}

    def merge() -> None:
        with store.lease([original, trained]):
            leased.set()
            collected.wait(60)
            loaded = store.load(original).state_dict
            out["id"] = store.store_state_dict(
                {k: v + 1 for k, v in loaded.items()}, lineage=Lineage("merge", {"original": original,
                                                                                 "trained": trained})).artifact.id

    worker = threading.Thread(target=merge)
    worker.start()
    assert leased.wait(60)
    report = store.retain(dry_run=False)
    collected.set()
    worker.join(60)
    assert report.removed == []
    assert store.exists(original) and store.exists(trained)
    assert store.metadata(out["id"]).lineage is not None
    # once released, the inputs stay because the (young) result's lineage holds them
    assert store.retain(dry_run=False).removed == []
    age(store, out["id"])
    assert {r.id for r in store.retain(dry_run=False).removed} == {original, trained, out["id"]}


def test_a_lease_on_a_deleted_artifact_is_refused(store: ArtifactStore) -> None:
    artifact_id = store.store_state_dict(random_state_dict(1)).artifact.id
    store.delete(artifact_id)
    with pytest.raises(ArtifactNotFound):
        with store.lease([artifact_id]):
            pass


def test_the_delete_rechecks_what_was_made_from_a_candidate(tmp_path: Path, database_url: str | None) -> None:
    """Between the policy's query and a delete, a name, a lease or a new artifact below a candidate holds it."""
    store = policy_store(tmp_path, database_url)
    base = store.store_state_dict(random_state_dict(1)).artifact.id
    mid = derived(store, 2, "strip", {"input": base})
    top = derived(store, 3, "merge", {"original": mid, "trained": mid})
    for artifact_id in (base, mid, top):
        age(store, artifact_id)
    policy = store.retention_policy()
    assert policy is not None
    assert {i for i, _, _ in store.index.retention_candidates(policy)} == {base, mid, top}
    store.set_name("late", top)  # named after the query, two steps below `base`
    assert not store.index.delete_collectable(base, created_before=policy.created_before)
    store.delete_name("late")
    with store.lease([top]):
        assert not store.index.delete_collectable(base, created_before=policy.created_before)
    young = derived(store, 4, "strip", {"input": top})  # made after the query
    assert not store.index.delete_collectable(base, created_before=policy.created_before)
    store.delete(young)
    assert store.index.delete_collectable(base, created_before=policy.created_before)
    assert not store.exists(base) and store.exists(mid)
