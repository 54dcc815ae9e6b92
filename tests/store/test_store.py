from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from service.core.load import load_checkpoint
from service.core.manifest import build_manifest
from service.errors import (
    ArtifactInUse,
    ArtifactNotFound,
    DigestMismatch,
    InvalidCheckpoint,
    InvalidRequest,
    NameNotFound,
    PayloadTooLarge,
    StoreError,
)
from service.registry.builtins import TinyConvNet
from service.store import ArtifactMeta, ArtifactStore, Lineage
from tests.factories import make_original, state_dict_of
from tests.store.conftest import blob_digests, put_raw_blob, random_state_dict, tmp_entries, tree


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- ingest ----------------------------------------------------------------------------------------------


def test_ingest_round_trip(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    path = ckpt(0)
    result = store.ingest_file(path, filename="../../etc/passwd", labels={"team": "vision"})
    meta = result.artifact
    assert result.created
    assert meta.id == sha256_of(path)
    assert meta.size == path.stat().st_size
    assert meta.format == "pth-zip"
    assert meta.container_key is None
    assert meta.filename == "../../etc/passwd"  # metadata only
    assert meta.labels == {"team": "vision"}
    assert meta.has_metadata
    with store.local_path(meta.id) as local:
        assert local.read_bytes() == path.read_bytes()
        assert stat.S_IMODE(local.stat().st_mode) == 0o444
    assert store.metadata(meta.id) == meta
    assert store.exists(meta.id)
    assert store.resolve(meta.id) == meta.id
    with store.open_blob(meta.id) as f:
        assert hashlib.sha256(f.read()).hexdigest() == meta.id
    assert store.verify(meta.id).ok
    assert tmp_entries(store) == []
    # the filename never became a path
    assert not (store.root.parent / "etc").exists()

    loaded = store.load(meta.id)
    model = TinyConvNet()
    model.load_state_dict(loaded.state_dict, strict=True)
    original = state_dict_of(make_original(0))
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in original.items())


def test_ingest_is_idempotent_and_rewrites_nothing(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    path = ckpt(0)
    first = store.ingest_file(path, labels={"a": "1"})
    before = tree(store.root)
    second = store.ingest(iter([path.read_bytes()]), filename="other.pth")
    assert not second.created
    assert second.artifact == first.artifact  # the second call's filename is ignored
    assert tree(store.root) == before  # same inodes, same mtimes, no new files
    assert store.list().total == 1
    # labels given with the same bytes are merged into the artifact's (tests/store/test_retention.py)
    third = store.ingest(iter([path.read_bytes()]), labels={"b": "2"})
    assert not third.created and third.artifact.labels == {"a": "1", "b": "2"}
    assert store.list().total == 1


def test_manifest_is_kept_and_matches_the_loaded_state_dict(store: ArtifactStore,
                                                            ckpt: Callable[..., Path]) -> None:
    path = ckpt(1)
    meta = store.ingest_file(path).artifact
    manifest = store.manifest(meta.id)
    expected = build_manifest(load_checkpoint(path).state_dict)
    assert manifest.to_dict() == expected.to_dict()
    assert manifest.to_dict() == build_manifest(store.load(meta.id).state_dict).to_dict()
    assert meta.key_count == len(manifest.entries)
    assert meta.tensor_bytes == manifest.tensor_bytes
    assert meta.schema_fingerprint == manifest.schema_fingerprint
    # the manifest is served from the index: it survives the blob becoming unreadable
    put_raw_blob(store, meta.id, b"damaged")
    store._manifests.discard(meta.id)
    assert store.manifest(meta.id).to_dict() == expected.to_dict()


def test_container_checkpoint_keeps_its_container_key(store: ArtifactStore,
                                                       ckpt: Callable[..., Path]) -> None:
    meta = store.ingest_file(ckpt(0, container=True)).artifact
    assert meta.container_key == "state_dict"
    assert meta.extras == {"epoch": "int"}
    loaded = store.load(meta.id)
    assert loaded.container_key == "state_dict"
    assert set(loaded.state_dict) == set(state_dict_of(make_original(0)))


def test_legacy_checkpoint_loads_without_mmap(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    meta = store.ingest_file(ckpt(0, legacy=True)).artifact
    assert meta.format == "pth-legacy"
    loaded = store.load(meta.id)  # mmap=True requested, silently not used for legacy files
    assert not loaded.mmapped
    TinyConvNet().load_state_dict(loaded.state_dict, strict=True)


def test_safetensors_ingest(store: ArtifactStore, tmp_path: Path) -> None:
    path = tmp_path / "w.bin"  # the name says nothing: the format comes from the content
    save_file(random_state_dict(3), str(path))
    meta = store.ingest_file(path).artifact
    assert meta.format == "safetensors"
    assert meta.key_count == 2
    assert torch.equal(store.load(meta.id).state_dict["w"], random_state_dict(3)["w"])


def test_metadata_round_trips_through_json(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    meta = store.ingest_file(ckpt(0, container=True), labels={"k": "v"}).artifact
    store.set_name("best", meta.id)
    meta = store.metadata(meta.id)
    data = json.loads(json.dumps(meta.to_dict()))
    assert ArtifactMeta.from_dict(data) == meta
    assert data["names"] == ["best"]


# ---- refusals --------------------------------------------------------------------------------------------


def test_digest_mismatch_keeps_nothing(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    path = ckpt(0)
    wrong = "f" * 64
    with pytest.raises(DigestMismatch) as info:
        store.ingest_file(path, expected_sha256=wrong)
    assert info.value.extensions == {"expected": wrong, "actual": sha256_of(path)}
    assert store.list().total == 0
    assert tmp_entries(store) == []
    assert blob_digests(store) == set()
    # the right digest (any case) is accepted
    assert store.ingest_file(path, expected_sha256=sha256_of(path).upper()).created


def test_size_limit_is_enforced_while_streaming(store: ArtifactStore) -> None:
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(100):
            sent.append(i)
            yield b"x" * 1000

    with pytest.raises(PayloadTooLarge) as info:
        store.ingest(chunks(), max_bytes=4500)
    assert sent == [0, 1, 2, 3, 4]  # the fifth chunk crosses the limit; the rest is never pulled
    assert info.value.extensions == {"limit": 4500}
    assert tmp_entries(store) == []


def test_size_limit_on_an_open_upload(store: ArtifactStore) -> None:
    upload = store.open_upload(max_bytes=10)
    upload.write(b"0123456789")  # exactly at the limit is fine
    assert upload.path.exists()
    with pytest.raises(PayloadTooLarge):
        upload.write(b"x")
    assert not upload.path.exists()
    assert tmp_entries(store) == []


def test_upload_context_manager_aborts_unless_committed(store: ArtifactStore,
                                                       ckpt: Callable[..., Path]) -> None:
    with store.open_upload() as upload:
        upload.write(b"partial")
        assert tmp_entries(store) == [upload.path.name]
    assert tmp_entries(store) == []
    with store.open_upload() as upload:
        upload.write(ckpt(0).read_bytes())
        result = store.commit_upload(upload, filename="a.pth")
    assert result.created and upload.closed
    assert upload.sha256 == result.artifact.id
    assert tmp_entries(store) == []


class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_nothing_is_kept(store: ArtifactStore, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _Boom(marker)}, path)
    raw = io.BytesIO()
    pickle.dump(_Boom(marker), raw)
    for data in (path.read_bytes(), raw.getvalue()):
        with pytest.raises(InvalidCheckpoint):
            store.ingest(iter([data]))
    assert not marker.exists()
    assert store.list().total == 0
    assert tmp_entries(store) == []
    assert blob_digests(store) == set()


def test_garbage_is_refused_with_the_loader_error(store: ArtifactStore) -> None:
    with pytest.raises(InvalidCheckpoint):
        store.ingest(iter([b"not a checkpoint at all"]))
    assert tmp_entries(store) == []


def test_bad_labels_filename_and_lineage(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    path = ckpt(0)
    for kwargs in (
        {"labels": {"a=b": "x"}},
        {"labels": {"k": "v" * 1000}},
        {"filename": "a\nb"},
        {"lineage": Lineage("explode", {"original": "0" * 64}, {}, {})},
        {"lineage": Lineage("merge", {"original": "0" * 64}, {"x": object()}, {})},
        {"filename": "a\udcff.pth"},  # no database holds a lone surrogate
        {"labels": {"k": "v\ud800"}},
    ):
        with pytest.raises(InvalidRequest):
            store.ingest_file(path, **kwargs)
    assert store.list().total == 0
    assert tmp_entries(store) == []
    assert list(store.blobs.iter_blobs()) == []


def test_newer_layout_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ArtifactStore(root)
    marker = json.loads((root / "ckpt-store.json").read_text())
    assert marker["layout_version"] == ArtifactStore.LAYOUT_VERSION == 2
    os.chmod(root / "ckpt-store.json", 0o644)
    (root / "ckpt-store.json").write_text(json.dumps({"layout_version": 3}))
    with pytest.raises(StoreError, match="layout version 3"):
        ArtifactStore(root)


# ---- derived artifacts and lineage -----------------------------------------------------------------------


def test_store_state_dict_is_deterministic_and_keeps_lineage(store: ArtifactStore,
                                                            ckpt: Callable[..., Path]) -> None:
    original = store.ingest_file(ckpt(0)).artifact
    trained = store.ingest_file(ckpt(1)).artifact
    sd = state_dict_of(make_original(2))
    lineage = Lineage("merge", {"original": original.id, "trained": trained.id}, {"drop_unexpected": False},
                      {"filled": ["features.1.running_mean"], "counts": {"trained": 3}})
    first = store.store_state_dict(sd, lineage=lineage, labels={"run": "7"}, filename="merged.pth")
    assert first.created
    assert first.artifact.lineage == lineage
    assert first.artifact.format == "pth-zip"
    assert store.metadata(first.artifact.id).lineage == lineage
    assert store.manifest(first.artifact.id).to_dict() == build_manifest(sd).to_dict()
    TinyConvNet().load_state_dict(store.load(first.artifact.id).state_dict, strict=True)

    again = store.store_state_dict(state_dict_of(make_original(2)), lineage=lineage)
    assert again.artifact.id == first.artifact.id and not again.created

    # with a manifest the saved file is not parsed again; the record is the same
    sd3 = state_dict_of(make_original(3))
    given = store.store_state_dict(sd3, manifest=build_manifest(sd3))
    assert store.manifest(given.artifact.id).to_dict() == build_manifest(sd3).to_dict()
    assert given.artifact.has_metadata
    assert store.verify(given.artifact.id).ok
    assert tmp_entries(store) == []


def test_store_state_dict_safetensors(store: ArtifactStore) -> None:
    sd = random_state_dict(5)
    lineage = Lineage("convert", {"source": "1" * 64}, {"format": "safetensors"})
    result = store.store_state_dict(sd, format="safetensors", lineage=lineage)
    assert result.artifact.format == "safetensors"
    assert torch.equal(store.load(result.artifact.id).state_dict["w"], sd["w"])
    assert store.list(operation="convert").total == 1


# ---- names and delete ------------------------------------------------------------------------------------


def test_names_round_trip_move_and_delete(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    a = store.ingest_file(ckpt(0)).artifact.id
    b = store.ingest_file(ckpt(1)).artifact.id
    store.set_name("best", a)
    store.set_name("latest", a)
    assert store.get_name("best") == a
    assert store.resolve("best") == a
    assert store.metadata(a).names == ("best", "latest")
    store.set_name("best", b)  # move
    assert store.names() == {"best": b, "latest": a}
    assert store.metadata(a).names == ("latest",)
    store.delete_name("latest")
    assert store.names() == {"best": b}
    with pytest.raises(NameNotFound):
        store.get_name("latest")
    with pytest.raises(NameNotFound):
        store.delete_name("latest")
    with pytest.raises(NameNotFound):
        store.resolve("latest")
    with pytest.raises(ArtifactNotFound):
        store.set_name("x", "2" * 64)
    assert tmp_entries(store) == []


def test_delete_refuses_while_named_and_force_removes_names(store: ArtifactStore,
                                                            ckpt: Callable[..., Path]) -> None:
    a = store.ingest_file(ckpt(0)).artifact.id
    b = store.ingest_file(ckpt(1)).artifact.id
    store.set_name("prod", a)
    store.set_name("canary", a)
    store.set_name("other", b)
    with pytest.raises(ArtifactInUse) as info:
        store.delete(a)
    assert info.value.extensions == {"names": ["canary", "prod"]}
    assert store.exists(a) and store.verify(a).ok
    assert store.delete(a, force=True) == ["canary", "prod"]
    assert not store.exists(a)
    assert store.names() == {"other": b}
    assert a not in blob_digests(store)
    assert not list((store.root / "manifests" / a[:2]).glob(a + "*"))
    calls: list[Callable[[str], object]] = [store.metadata, store.manifest, store.blob_path, store.open_blob,
                                            store.verify, store.delete, store.resolve]
    for call in calls:
        with pytest.raises(ArtifactNotFound):
            call(a)
    store.delete_name("other")
    assert store.delete(b) == []
    assert store.list().total == 0


def test_a_reader_keeps_its_blob_through_a_delete(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    path = ckpt(0)
    meta = store.ingest_file(path).artifact
    loaded = store.load(meta.id)  # mmapped
    with store.open_blob(meta.id) as f:
        store.delete(meta.id)
        assert hashlib.sha256(f.read()).hexdigest() == meta.id  # unlinked, not truncated
    assert torch.equal(loaded.state_dict["head.weight"], state_dict_of(make_original(0))["head.weight"])
    assert store.ingest_file(path).created  # and it can come back


# ---- list ------------------------------------------------------------------------------------------------


def test_list_filters_and_pages(store: ArtifactStore, ckpt: Callable[..., Path], tmp_path: Path) -> None:
    ids = [store.ingest_file(ckpt(i), labels={"team": "a" if i % 2 else "b", f"i{i}": ""}).artifact.id
           for i in range(5)]
    save_file(random_state_dict(0), str(tmp_path / "s"))
    st = store.ingest_file(tmp_path / "s").artifact.id
    lineage = Lineage("merge", {"original": ids[0], "trained": ids[1]})
    merged = store.store_state_dict(random_state_dict(1), lineage=lineage).artifact.id
    store.set_name("best", ids[2])
    newest_first = [*ids, st, merged][::-1]  # ingestion order, reversed

    assert [m.id for m in store.list(limit=100).items] == newest_first
    seen: list[str] = []
    cursor = None
    while True:
        page = store.list(limit=2, cursor=cursor)
        assert page.total == 7 and len(page.items) <= 2
        seen += [m.id for m in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == newest_first

    assert {m.id for m in store.list(label="team=a").items} == {ids[1], ids[3]}
    assert store.list(label="team").total == 5
    assert [m.id for m in store.list(label="i4").items] == [ids[4]]
    assert store.list(label="team=c").total == 0
    assert [m.id for m in store.list(name="best").items] == [ids[2]]
    assert store.list(name="best").items[0].names == ("best",)
    assert store.list(name="nothing").total == 0
    assert [m.id for m in store.list(operation="merge").items] == [merged]
    assert store.list(operation="strip").total == 0
    assert {m.id for m in store.list(format="safetensors").items} == {st}
    assert store.list(format="pth-zip").total == 6

    with pytest.raises(InvalidRequest):
        store.list(limit=0)
    with pytest.raises(InvalidRequest):
        store.list(cursor="not-a-cursor")


def test_list_cursor_is_stable_while_artifacts_come_and_go(store: ArtifactStore,
                                                           ckpt: Callable[..., Path]) -> None:
    ids = [store.ingest_file(ckpt(i)).artifact.id for i in range(6)]
    expected = [m.id for m in store.list(limit=100).items]
    first = store.list(limit=2)
    store.ingest_file(ckpt(6))  # newer than everything: must not shift the next pages
    store.delete(first.items[0].id)  # already seen: must not shift either
    rest: list[str] = []
    cursor = first.next_cursor
    while cursor is not None:
        page = store.list(limit=2, cursor=cursor)
        rest += [m.id for m in page.items]
        cursor = page.next_cursor
    assert [m.id for m in first.items] + rest == expected
    assert sorted(expected) == sorted(ids)


# ---- verify and GC ---------------------------------------------------------------------------------------


def test_verify_detects_a_corrupted_blob(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    meta = store.ingest_file(ckpt(0)).artifact
    with store.local_path(meta.id) as local:
        data = bytearray(local.read_bytes())
    data[len(data) // 2] ^= 0xFF
    put_raw_blob(store, meta.id, bytes(data))
    result = store.verify(meta.id)
    assert not result.ok
    assert result.actual_sha256 == hashlib.sha256(data).hexdigest() != meta.id
    assert result.to_dict()["ok"] is False


def test_gc_never_removes_a_live_upload(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    data = ckpt(0).read_bytes()
    upload = store.open_upload()
    upload.write(data[:100])
    os.utime(upload.path, (0, 0))  # looks ancient
    assert store.collect_garbage(grace_seconds=0) == 0
    assert upload.path.exists()
    upload.write(data[100:])
    assert store.commit_upload(upload).created
    with store.open_upload() as other:  # a second live upload
        other.write(b"x")
        assert store.collect_garbage(grace_seconds=0) == 0
    assert tmp_entries(store) == []


def test_gc_removes_old_leftovers_and_orphans(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    # The states a crash leaves behind: an unlocked temp file, a work dir, and a blob without an index row
    # (crash between blob and row).
    (store.root / "tmp" / "upload-dead").write_bytes(b"partial")
    (store.root / "tmp" / "work-dead").mkdir()
    (store.root / "tmp" / "work-dead" / ".tmp-x").write_bytes(b"partial")
    path = ckpt(0)
    orphan_id = sha256_of(path)
    put_raw_blob(store, orphan_id, path.read_bytes()[:50])  # even damaged
    kept = store.ingest_file(ckpt(1)).artifact.id

    assert store.collect_garbage() == 0  # all younger than the default grace of an hour
    assert store.collect_garbage(grace_seconds=0) == 3
    assert tmp_entries(store) == []
    assert orphan_id not in blob_digests(store)
    assert store.verify(kept).ok
    if not store.blobs_are_local:
        return  # an object is complete once it exists (puts are atomic, the digest checked before): no damage

    # an orphan does not block a later ingest of the same bytes: the new, complete bytes replace it
    put_raw_blob(store, orphan_id, b"junk")
    meta = store.ingest_file(path).artifact
    assert meta.id == orphan_id and store.verify(orphan_id).ok


def test_write_chunks_hashes_and_writes_like_single_writes(store: ArtifactStore) -> None:
    payload = os.urandom(3 << 20)
    pieces = [memoryview(payload)[i : i + (700 << 10)] for i in range(0, len(payload), 700 << 10)]
    with store.open_upload() as up:
        up.write_chunks([pieces[0], pieces[1]])  # over the parallel threshold: hashed in a helper thread
        up.write_chunks([p[:10] for p in pieces[2:3]])  # small: hashed inline
        up.write(bytes(pieces[2][10:]))
        for piece in pieces[3:]:
            up.write(piece)
        assert up.finish() == hashlib.sha256(payload).hexdigest()
        assert up.path.read_bytes() == payload


def test_caches_never_outlive_a_delete(store: ArtifactStore, ckpt: Callable[..., Path]) -> None:
    path = ckpt(seed=3)
    first = store.ingest_file(path).artifact.id
    manifest = store.manifest(first)
    loaded = store.load(first)
    store.delete(first)
    with pytest.raises(ArtifactNotFound):
        store.manifest(first)
    with pytest.raises(ArtifactNotFound):
        store.load(first)
    again = store.ingest_file(path).artifact.id  # same bytes, published anew
    assert again == first and store.manifest(again) == manifest
    assert set(store.load(again).state_dict) == set(loaded.state_dict)


@pytest.mark.blobs("local")  # the S3 client's pooled connections are descriptors too
def test_an_upload_is_flushed_in_the_background_and_leaks_no_descriptor(store: ArtifactStore) -> None:
    from service.core import writeback
    from service.store import upload as upload_module

    open_fds = len(os.listdir("/proc/self/fd"))
    buf = io.BytesIO()
    torch.save({"w": torch.randn(upload_module.FINISH_FLUSH_BYTES // 4)}, buf)
    payload = buf.getvalue()
    flushes: list[int] = []
    real = writeback._sync_and_close
    writeback._sync_and_close = lambda fd: (flushes.append(fd), real(fd))[1]  # type: ignore[assignment]
    try:
        for publish in (False, True):
            with store.open_upload() as up:
                up.write(payload)
                assert up.finish() == hashlib.sha256(payload).hexdigest()
                up._writeback.wait()  # an abort right after finish() must not disturb a flush either
                if publish:
                    store.commit_upload(up)
    finally:
        writeback._sync_and_close = real  # type: ignore[assignment]
    assert len(flushes) == 2  # one at finish() each: under the 64 MiB step nothing flushed earlier
    assert len(os.listdir("/proc/self/fd")) == open_fds
    assert store.verify(hashlib.sha256(payload).hexdigest()).ok
