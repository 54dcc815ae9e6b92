"""The BlobStore contract on every backend, and the S3 store's own guarantees, against a real Ceph RGW.

The contract tests take the `blobs` fixture, parametrized over the backends (adding one is one line in
`BACKENDS`). The S3 tests below them check what only an object store has: multipart uploads that leave nothing
behind when refused, the read-through cache (bound, LRU, pins across processes, crash leftovers, verification),
presigned URLs fetched with httpx, and the standard AWS settings.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.errors import ArtifactNotFound, DigestMismatch, InvalidReference, InvalidSettings, StoreError
from service.store.blobs import BlobStore
from service.store.blobs.cache import BlobCache
from service.store.blobs.s3 import MIB, S3BlobStore
from tests._services import S3Service

# A blob store alone: no metadata index involved, so one run (tests/store runs each test per index backend).
pytestmark = pytest.mark.index("sqlite")

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["s3"]
# The smallest part S3 allows, so that a few MiB already make a multipart upload.
SMALL_PART = 5 * MIB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(seed: int, size: int = 1000) -> tuple[str, bytes]:
    data = hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1)
    data = data[:size]
    return sha(data), data


def read_all(store: BlobStore, digest: str, **kw: Any) -> bytes:
    with store.open(digest, **kw) as f:
        return f.read()


@pytest.fixture
def make_s3(ceph_s3: S3Service, s3_bucket: str, tmp_path: Path) -> Callable[..., S3BlobStore]:
    """S3BlobStore on the test's bucket; keyword arguments override the defaults."""

    def make(prefix: str = "ckpt", **kw: Any) -> S3BlobStore:
        args: dict[str, Any] = {
            "cache_dir": tmp_path / "s3-cache",
            "cache_bytes": 1 << 30,
            "endpoint_url": ceph_s3.endpoint,
            "access_key_id": ceph_s3.access_key,
            "secret_access_key": ceph_s3.secret_key,
            "region": ceph_s3.region,
            "part_size": SMALL_PART,
            **kw,
        }
        return S3BlobStore(s3_bucket, prefix, **args)

    return make


@pytest.fixture
def s3_blobs(make_s3: Callable[..., S3BlobStore]) -> S3BlobStore:
    return make_s3()


@pytest.fixture(params=BACKENDS)
def blobs(request: pytest.FixtureRequest) -> BlobStore:
    store: BlobStore = request.getfixturevalue(f"{request.param}_blobs")
    return store


def uploads_left(ceph_s3: S3Service, bucket: str) -> list[str]:
    return [u["Key"] for u in ceph_s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


# -- the contract, on every backend ------------------------------------------------------------------------------


def test_is_a_blob_store(blobs: BlobStore) -> None:
    assert isinstance(blobs, BlobStore)


def test_put_file_then_every_read(blobs: BlobStore, tmp_path: Path) -> None:
    digest, data = blob(1, 5000)
    staged = tmp_path / "staged"
    staged.write_bytes(data)
    assert not blobs.exists(digest)
    blobs.put_file(digest, staged)
    assert staged.read_bytes() == data  # only read
    assert blobs.exists(digest)
    assert blobs.size(digest) == 5000
    assert read_all(blobs, digest) == data
    assert read_all(blobs, digest, start=100) == data[100:]
    assert read_all(blobs, digest, start=100, end=250) == data[100:250]
    assert read_all(blobs, digest, start=4990, end=6000) == data[4990:]  # an end past the blob clamps
    assert read_all(blobs, digest, start=5000) == b""
    assert read_all(blobs, digest, start=7000) == b""
    assert read_all(blobs, digest, start=10, end=10) == b""
    infos = list(blobs.iter_blobs())
    assert [(i.digest, i.size) for i in infos] == [(digest, 5000)]
    assert abs(infos[0].modified - time.time()) < 3600
    blobs.delete(digest)
    assert not blobs.exists(digest)
    assert list(blobs.iter_blobs()) == []
    blobs.delete(digest)  # a missing blob: no-op


def test_open_reads_in_pieces(blobs: BlobStore) -> None:
    digest, data = blob(2, 3 * MIB + 17)
    blobs.put_stream(digest, io.BytesIO(data))
    got = bytearray()
    with blobs.open(digest, start=1) as f:
        while piece := f.read(65536):
            got += piece
    assert bytes(got) == data[1:]


def test_put_stream_and_repeated_puts(blobs: BlobStore, tmp_path: Path) -> None:
    digest, data = blob(3, 2048)
    blobs.put_stream(digest, io.BytesIO(data))
    blobs.put_stream(digest, io.BytesIO(data))
    staged = tmp_path / "again"
    staged.write_bytes(data)
    blobs.put_file(digest, staged)
    assert read_all(blobs, digest) == data
    assert [i.digest for i in blobs.iter_blobs()] == [digest]


def test_empty_blob(blobs: BlobStore) -> None:
    digest = sha(b"")
    blobs.put_stream(digest, io.BytesIO(b""))
    assert blobs.size(digest) == 0
    assert read_all(blobs, digest) == b""
    with blobs.local_path(digest) as path:
        assert path.read_bytes() == b""


@pytest.mark.parametrize("size", [1000, 12 * MIB], ids=["single", "multipart"])
def test_put_stream_refuses_wrong_digest_and_stores_nothing(blobs: BlobStore, size: int) -> None:
    _, data = blob(4, size)
    claimed, _ = blob(5, size)
    with pytest.raises(DigestMismatch) as info:
        blobs.put_stream(claimed, io.BytesIO(data))
    assert info.value.extensions == {"expected": claimed, "actual": sha(data)}
    assert not blobs.exists(claimed)
    assert not blobs.exists(sha(data))
    assert list(blobs.iter_blobs()) == []


def test_put_stream_of_a_stored_digest_still_checks_the_bytes(blobs: BlobStore) -> None:
    digest, data = blob(6)
    blobs.put_stream(digest, io.BytesIO(data))
    with pytest.raises(DigestMismatch):
        blobs.put_stream(digest, io.BytesIO(data + b"x"))
    assert read_all(blobs, digest) == data


def test_missing_blob(blobs: BlobStore) -> None:
    digest, _ = blob(7)
    assert not blobs.exists(digest)
    for call in (
        lambda: blobs.size(digest),
        lambda: blobs.open(digest),
        lambda: blobs.open(digest, start=3, end=3),
        lambda: blobs.local_path(digest).__enter__(),
    ):
        with pytest.raises(ArtifactNotFound) as info:
            call()
        assert info.value.extensions == {"ref": digest}


@pytest.mark.parametrize("bad", ["abc", "A" * 64, "../" + "0" * 61, "g" * 64])
def test_only_digests_become_keys(blobs: BlobStore, bad: str) -> None:
    with pytest.raises(InvalidReference):
        blobs.exists(bad)
    with pytest.raises(InvalidReference):
        blobs.put_stream(bad, io.BytesIO(b""))


def test_local_path_is_mappable_and_survives_delete(blobs: BlobStore) -> None:
    digest, data = blob(8, 100_000)
    blobs.put_stream(digest, io.BytesIO(data))
    with blobs.local_path(digest) as path:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert m[:] == data
        blobs.delete(digest)
        assert not blobs.exists(digest)
        assert path.read_bytes() == data  # pinned: unchanged until the context exits


# -- S3 only -----------------------------------------------------------------------------------------------------


def test_large_file_goes_up_in_parallel_parts(
    make_s3: Callable[..., S3BlobStore], ceph_s3: S3Service, s3_bucket: str, tmp_path: Path
) -> None:
    store = make_s3(part_size=32 * MIB, concurrency=4)
    staged = tmp_path / "big"
    hasher = hashlib.sha256()
    with open(staged, "wb") as f:
        for i in range(100):  # 100 MiB: random megabytes, with holes (sparse) every tenth
            chunk = os.urandom(MIB) if i % 10 else b""
            if chunk:
                f.write(chunk)
            else:
                f.seek(MIB, os.SEEK_CUR)
                chunk = bytes(MIB)
            hasher.update(chunk)
        f.truncate(100 * MIB)
    digest = hasher.hexdigest()
    store.put_file(digest, staged)
    head = ceph_s3.client().head_object(Bucket=s3_bucket, Key=store.key(digest))
    assert head["ContentLength"] == 100 * MIB
    assert head["ETag"].strip('"').endswith("-4")  # four parts of 32 MiB (the last one 4 MiB)
    with store.open(digest) as f:
        got = hashlib.sha256()
        while piece := f.read(MIB):
            got.update(piece)
    assert got.hexdigest() == digest
    with open(staged, "rb") as f:
        f.seek(32 * MIB - 10)
        across = f.read(20)
    assert read_all(store, digest, start=32 * MIB - 10, end=32 * MIB + 10) == across  # a range across parts
    assert uploads_left(ceph_s3, s3_bucket) == []


def test_concurrent_puts_share_the_part_buffers_without_mixing_parts(
    make_s3: Callable[..., S3BlobStore], tmp_path: Path
) -> None:
    # Two buffers for two puts of seven parts each: every buffer is reused many times, by both puts.
    store = make_s3(part_size=SMALL_PART, concurrency=2)
    files = {}
    for n in range(2):
        digest, data = blob(100 + n, 6 * SMALL_PART + 12345)
        files[digest] = tmp_path / f"file-{n}"
        files[digest].write_bytes(data)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda item: store.put_file(*item), files.items()))
    for digest, path in files.items():
        assert sha(read_all(store, digest)) == digest == sha(path.read_bytes())
    assert store._part_buffers()._made == 2  # no more buffers than parts in flight, made once


def test_refused_multipart_leaves_no_upload(s3_blobs: S3BlobStore, ceph_s3: S3Service, s3_bucket: str) -> None:
    _, data = blob(9, 3 * SMALL_PART + 5)
    claimed = sha(b"something else")
    with pytest.raises(DigestMismatch):
        s3_blobs.put_stream(claimed, io.BytesIO(data))
    assert uploads_left(ceph_s3, s3_bucket) == []
    assert ceph_s3.client().list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0


def test_failing_source_aborts_the_upload(s3_blobs: S3BlobStore, ceph_s3: S3Service, s3_bucket: str) -> None:
    class Broken(io.RawIOBase):
        sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            if self.sent >= 2 * SMALL_PART:
                raise OSError("the client went away")
            n = min(len(buffer), 65536)
            buffer[:n] = b"x" * n
            self.sent += n
            return n

    with pytest.raises(OSError, match="went away"):
        s3_blobs.put_stream(sha(b"whatever"), io.BufferedReader(Broken()))
    assert uploads_left(ceph_s3, s3_bucket) == []


def test_stale_uploads_are_aborted(s3_blobs: S3BlobStore, ceph_s3: S3Service, s3_bucket: str) -> None:
    admin = ceph_s3.client()
    admin.create_multipart_upload(Bucket=s3_bucket, Key=s3_blobs.key(blob(10)[0]))
    admin.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/not-ours")
    assert s3_blobs.abort_stale_uploads(older_than_seconds=3600) == 0
    assert s3_blobs.abort_stale_uploads(older_than_seconds=-60) == 1
    assert uploads_left(ceph_s3, s3_bucket) == ["elsewhere/not-ours"]


def test_prefixes_and_foreign_keys(make_s3: Callable[..., S3BlobStore], ceph_s3: S3Service, s3_bucket: str) -> None:
    a, b, root = make_s3("team-a"), make_s3("team-b/nested/"), make_s3("")
    da, data_a = blob(11)
    db, data_b = blob(12)
    a.put_stream(da, io.BytesIO(data_a))
    b.put_stream(db, io.BytesIO(data_b))
    ceph_s3.client().put_object(Bucket=s3_bucket, Key=f"team-a/blobs/{db[:2]}/{db}.part", Body=b"x")
    ceph_s3.client().put_object(Bucket=s3_bucket, Key=f"team-a/blobs/zz/{da}", Body=b"x")
    assert a.key(da) == f"team-a/blobs/{da[:2]}/{da}"
    assert b.key(db) == f"team-b/nested/blobs/{db[:2]}/{db}"
    assert root.key(da) == f"blobs/{da[:2]}/{da}"
    assert [i.digest for i in a.iter_blobs()] == [da]
    assert [i.digest for i in b.iter_blobs()] == [db]
    assert not a.exists(db) and not b.exists(da)
    assert list(root.iter_blobs()) == []


def test_standard_aws_settings(
    ceph_s3: S3Service, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in ceph_s3.env().items():
        monkeypatch.setenv(name, value)
    store = S3BlobStore.from_url(f"s3://{s3_bucket}/from/env", cache_dir=tmp_path / "c", cache_bytes=MIB)
    digest, data = blob(13)
    store.put_stream(digest, io.BytesIO(data))
    assert (
        ceph_s3.client().get_object(Bucket=s3_bucket, Key=f"from/env/blobs/{digest[:2]}/{digest}")["Body"].read()
        == data
    )
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    wrong = S3BlobStore.from_url(f"s3://{s3_bucket}/from/env", cache_dir=tmp_path / "c", cache_bytes=MIB)
    with pytest.raises(Exception, match="SignatureDoesNotMatch|AccessDenied|403"):
        wrong.exists(digest)


@pytest.mark.parametrize("url", ["s3:/bucket", "http://bucket/x", "s3://", "s3://b/p?x=1", "bucket/prefix"])
def test_storage_url_must_be_s3(url: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidSettings):
        S3BlobStore.from_url(url, cache_dir=tmp_path, cache_bytes=MIB)


def test_part_size_below_the_s3_minimum_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidSettings):
        S3BlobStore("b", cache_dir=tmp_path, cache_bytes=MIB, part_size=MIB)


def test_presigned_url_fetches_without_credentials(make_s3: Callable[..., S3BlobStore], ceph_s3: S3Service) -> None:
    store = make_s3()
    digest, data = blob(14, 4096)
    store.put_stream(digest, io.BytesIO(data))
    url = store.presigned_url(digest, expires=60, filename="model ü.pth")
    assert "Credential=" in url and "X-Amz-Signature=" in url
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-disposition"] == "attachment; filename*=UTF-8''model%20%C3%BC.pth"
    tampered = url.replace(store.key(digest), store.key(blob(15)[0]))
    assert httpx.get(tampered).status_code == 403
    # The host clients reach may differ from the service's: the URL is signed for it.
    public = ceph_s3.endpoint.replace("127.0.0.1", "localhost")
    public_store = make_s3(public_endpoint=public)
    url = public_store.presigned_url(digest, expires=60)
    assert url.startswith(public + "/")
    assert httpx.get(url).content == data


# -- the read-through cache ----------------------------------------------------------------------------------------


def put_blobs(store: S3BlobStore, *seeds: int, size: int = MIB) -> list[str]:
    out = []
    for seed in seeds:
        digest, data = blob(seed, size)
        store.put_stream(digest, io.BytesIO(data))
        out.append(digest)
    return out


def cached(store: S3BlobStore) -> set[str]:
    return {path.name for _, _, path in store.cache.entries()}


def test_cache_is_read_through_and_lru_bounded(make_s3: Callable[..., S3BlobStore]) -> None:
    store = make_s3(cache_bytes=2 * MIB + MIB // 2)
    a, b, c = put_blobs(store, 20, 21, 22)
    with store.local_path(a) as path:
        assert path.read_bytes() == blob(20, MIB)[1]
        assert path.stat().st_mode & 0o222 == 0
    with store.local_path(b):
        pass
    assert cached(store) == {a, b}
    time.sleep(0.01)
    with store.local_path(a):  # a is now the most recently used
        pass
    with store.local_path(c):
        pass
    assert cached(store) == {a, c}  # b was least recently used
    assert store.cache.total_bytes <= store.cache.max_bytes


def test_cache_hit_sends_no_request(make_s3: Callable[..., S3BlobStore], ceph_s3: S3Service, s3_bucket: str) -> None:
    store = make_s3()
    (digest,) = put_blobs(store, 23)
    with store.local_path(digest):
        pass
    ceph_s3.client().delete_object(Bucket=s3_bucket, Key=store.key(digest))  # behind the store's back
    with store.local_path(digest) as path:  # bytes by digest never change: the verified copy serves
        assert path.read_bytes() == blob(23, MIB)[1]


PINNER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from service.store.blobs.s3 import S3BlobStore
    bucket, endpoint, access, secret, cache_dir, digest = sys.argv[1:]
    store = S3BlobStore(bucket, "ckpt", cache_dir=Path(cache_dir), cache_bytes=1, endpoint_url=endpoint,
                        access_key_id=access, secret_access_key=secret, region="us-east-1")
    with store.local_path(digest) as path:
        print(path, flush=True)
        sys.stdin.readline()
    """
)


@pytest.fixture
def pinner(ceph_s3: S3Service, s3_bucket: str, tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Pin a blob in the test's cache from another process, until the test ends."""
    procs: list[subprocess.Popen[str]] = []

    def pin(digest: str) -> Path:
        args = [s3_bucket, ceph_s3.endpoint, ceph_s3.access_key, ceph_s3.secret_key, str(tmp_path / "s3-cache")]
        proc = subprocess.Popen(
            [sys.executable, "-c", PINNER, *args, digest],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )
        procs.append(proc)
        assert proc.stdout is not None
        return Path(proc.stdout.readline().strip())

    yield pin
    for proc in procs:
        proc.communicate("\n", timeout=60)


def test_eviction_skips_an_entry_another_process_pins(
    make_s3: Callable[..., S3BlobStore], pinner: Callable[[str], Path]
) -> None:
    store = make_s3(cache_bytes=2 * MIB)
    a, b, c, d = put_blobs(store, 30, 31, 32, 33)
    path_a = pinner(a)  # another worker maps a (its own cache bound is 1 byte: it evicted all it could)
    assert path_a == store.cache.entry_path(a)
    with store.local_path(b):
        pass
    assert cached(store) == {a, b}
    with store.local_path(c):  # needs room: b goes, a is pinned and stays
        pass
    assert cached(store) == {a, c}
    assert path_a.read_bytes() == blob(30, MIB)[1]
    with store.local_path(c), store.local_path(d):  # a and c pinned: over the bound rather than failing
        assert cached(store) == {a, c, d}
    assert not store.cache.discard(a)  # still pinned by the other process
    assert store.cache.discard(d)


def test_pinned_entry_outlives_discard_and_delete(make_s3: Callable[..., S3BlobStore]) -> None:
    store = make_s3()
    (a,) = put_blobs(store, 34)
    with store.local_path(a) as path:
        assert not store.cache.discard(a)
        store.delete(a)
        assert path.exists()
    assert store.cache.discard(a)
    assert cached(store) == set()


def test_crash_leftovers_are_swept_and_live_downloads_kept(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    BlobCache(root, max_bytes=MIB)
    (root / "tmp" / "blob-crashed").write_bytes(b"x" * 100)
    live = root / "tmp" / "blob-live"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys; f=open(sys.argv[1],'wb'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); sys.stdin.readline()", str(live)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        BlobCache(root, max_bytes=MIB)  # a worker (re)starts
        assert sorted(os.listdir(root / "tmp")) == ["blob-live"]
    finally:
        holder.communicate("\n", timeout=30)
    BlobCache(root, max_bytes=MIB)
    assert os.listdir(root / "tmp") == []


def test_corrupt_object_is_never_cached(
    s3_blobs: S3BlobStore, ceph_s3: S3Service, s3_bucket: str, tmp_path: Path
) -> None:
    digest, data = blob(40)
    ceph_s3.client().put_object(Bucket=s3_bucket, Key=s3_blobs.key(digest), Body=data[:-1] + b"!")
    with pytest.raises(StoreError, match="corrupt"), s3_blobs.local_path(digest):
        pass
    assert cached(s3_blobs) == set()
    assert os.listdir(tmp_path / "s3-cache" / "tmp") == []


def test_concurrent_pins_download_once(s3_blobs: S3BlobStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    (digest,) = put_blobs(s3_blobs, 41, size=4 * MIB)
    fetches = 0
    original = s3_blobs._fetch

    def counting(d: str) -> tuple[int, Any]:
        nonlocal fetches
        fetches += 1
        return original(d)

    s3_blobs._fetch = counting  # type: ignore[method-assign]

    def use(_: int) -> str:
        with s3_blobs.local_path(digest) as path:
            return sha(path.read_bytes())

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(use, range(8))) == {digest}
    assert fetches == 1
