"""The artifact store: a facade over a blob store (bytes by digest) and a metadata index (SQL), with a staging area.

The layout and the backends are described in docs/artifact-store.md. The API and the operations talk to this
class only; which blob store and which index run behind it, they cannot tell.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import functools
import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import torch

from service.config import LABEL_KEY
from service.core.expansion import expansion_budget
from service.core.formats import writer_for
from service.core.load import load_checkpoint
from service.core.lru import LRUCache
from service.core.manifest import fingerprint_tensor, is_quantized_dtype
from service.core.pthzip import StorageRecords
from service.core.save import save_checkpoint_hashed
from service.core.statedict import has_metadata, metadata_of, with_metadata
from service.core.types import (
    CURRENT_FINGERPRINT_VERSION,
    ArchiveLimits,
    LoadedCheckpoint,
    Manifest,
)
from service.errors import (
    AmbiguousReference,
    ArtifactNotFound,
    DigestMismatch,
    InvalidCheckpoint,
    InvalidRequest,
    NameNotFound,
    StoreError,
    quote_keys,
)
from service.format_names import OutputFormat
from service.store._fs import (
    CHUNK,
    is_no_space,
    locked_work_dir,
    publish_bytes,
    remove_if_unlocked,
    storage_full,
)
from service.store.blobs.base import BlobStore
from service.store.blobs.local import LocalBlobStore
from service.store.conversions import ConversionCache, ConvertedBlob
from service.store.ids import is_id, is_id_prefix, validate_id, validate_name, validate_new_name
from service.store.index import ListFilters, MetadataIndex, open_index, redact
from service.store.index.legacy import has_legacy_files, import_legacy
from service.store.index.sql import RetentionPolicy
from service.store.inspection import inspect_checkpoint
from service.store.types import (
    LINEAGE_OPERATIONS,
    ArtifactMeta,
    IngestResult,
    Inspection,
    Inspector,
    LabelChanges,
    Lineage,
    Page,
    VerifyBlobResult,
)
from service.store.upload import Chunk, PendingUpload

log = logging.getLogger("ckpt.store")
_MARKER = "ckpt-store.json"
_LABEL_KEY = LABEL_KEY
_MAX_LABELS = 64
_MAX_LABEL_VALUE = 256
_MAX_FILENAME = 1024
_MAX_LIMIT = 1000
# The manifest cache holds at most this many tensor entries (a few hundred bytes each) and manifests.
_MANIFEST_CACHE_KEYS = 400_000
_MANIFEST_CACHE_ITEMS = 256
_LOADED_CACHE_ITEMS = 4
_LOADED_CACHE_KEYS = 200_000
_GC_BATCH = 1000


def _shallow_copy(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Each caller gets its own dict (and `_metadata`), so that no caller can change what the cache holds.
    return with_metadata(state_dict, metadata_of(state_dict), copy=True)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _dump(data: Mapping[str, Any]) -> bytes:
    try:
        return (json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"not JSON-serialisable: {exc}") from exc


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(labels or {})
    if len(out) > _MAX_LABELS:
        raise InvalidRequest(f"at most {_MAX_LABELS} labels")
    _check_label_keys(out)
    bad = [k for k, v in out.items() if not isinstance(v, str) or len(v) > _MAX_LABEL_VALUE]
    if bad:
        raise InvalidRequest(f"label values must be strings of at most {_MAX_LABEL_VALUE} characters: "
                             f"{quote_keys(bad)}")
    return out


def _check_label_keys(keys: Iterable[object]) -> None:
    bad = [k for k in keys if not isinstance(k, str) or _LABEL_KEY.fullmatch(k) is None]
    if bad:
        raise InvalidRequest(f"invalid label keys (need {_LABEL_KEY.pattern}): {quote_keys(map(str, bad))}")


def _check_filename(filename: str | None) -> str | None:
    if filename is None:
        return None
    if not isinstance(filename, str) or len(filename) > _MAX_FILENAME or any(ord(c) < 32 for c in filename):
        raise InvalidRequest("filename must be at most 1024 printable characters")
    return filename


def _check_lineage(lineage: Lineage | None) -> Lineage | None:
    if lineage is None:
        return None
    if lineage.operation not in LINEAGE_OPERATIONS:
        raise InvalidRequest(f"unknown lineage operation {lineage.operation!r}; "
                             f"expected one of {quote_keys(LINEAGE_OPERATIONS)}")
    for artifact_id in lineage.inputs.values():
        validate_id(artifact_id)
    _dump(lineage.to_dict())
    return lineage


def _encode_cursor(meta: ArtifactMeta) -> str:
    return base64.urlsafe_b64encode(f"{meta.created}|{meta.id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, artifact_id = raw.split("|")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest("invalid cursor") from exc
    if not is_id(artifact_id):
        raise InvalidRequest("invalid cursor")
    return created, artifact_id


def _label_filter(label: str) -> tuple[str, str | None]:
    key, sep, value = label.partition("=")
    return key, (value if sep else None)



def _brief(exc: Exception) -> str:
    """An exception as a probe shows it: its type, and the S3 error code where there is one (never a URL)."""
    response = getattr(exc, "response", None)  # botocore's ClientError: {"Error": {"Code": "NoSuchBucket", ...}}
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return f"{type(exc).__name__} {code}" if code else type(exc).__name__


@dataclass(frozen=True)
class StoreHealth:
    """The store's readiness: can it stage uploads, and do its index and its blob store answer."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class FsckReport:
    """What `ArtifactStore.fsck` found (and, with `repair`, what it repaired)."""

    checked: int  # published artifacts looked at
    missing_blobs: list[str] = field(default_factory=list)  # rows whose blob is gone
    size_mismatches: list[str] = field(default_factory=list)  # blob size differs from the recorded size
    digest_mismatches: list[str] = field(default_factory=list)  # blob bytes do not hash to the id (deep only)
    bad_manifests: list[str] = field(default_factory=list)  # manifest missing, unreadable, or not the row's keys
    orphan_blobs: list[str] = field(default_factory=list)  # blobs without a row (any age)
    repaired: list[str] = field(default_factory=list)  # "unpublished ID" / "removed orphan ID" lines
    names_removed: list[str] = field(default_factory=list)  # names that pointed at unpublished broken artifacts

    @property
    def ok(self) -> bool:
        """No problem found (orphan blobs younger than the grace period may be uploads in flight: reported only)."""
        return not (self.missing_blobs or self.size_mismatches or self.digest_mismatches or self.bad_manifests)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "missing_blobs": list(self.missing_blobs),
            "size_mismatches": list(self.size_mismatches),
            "digest_mismatches": list(self.digest_mismatches),
            "bad_manifests": list(self.bad_manifests),
            "orphan_blobs": list(self.orphan_blobs),
            "repaired": list(self.repaired),
            "names_removed": list(self.names_removed),
        }


@dataclass(frozen=True)
class RetainedItem:
    """An artifact the retention policy removed (or would remove)."""

    id: str
    size: int
    created: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "created": self.created}


@dataclass(frozen=True)
class RetentionReport:
    """The outcome of `ArtifactStore.retain`."""

    dry_run: bool
    enabled: bool  # False: no retention age is configured, nothing is ever removed
    reason: str | None  # why the removed artifacts go (the policy in words)
    removed: list[RetainedItem]
    skipped: list[str]  # candidates named or leased by the time they were deleted

    @property
    def bytes(self) -> int:
        return sum(r.size for r in self.removed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "enabled": self.enabled,
            "reason": self.reason,
            "removed": [r.to_dict() for r in self.removed],
            "count": len(self.removed),
            "bytes": self.bytes,
            "skipped": list(self.skipped),
        }


class ArtifactStore:
    """Checkpoints by the sha256 of their bytes: a `BlobStore` for the bytes, a `MetadataIndex` for the rest.

    Publication order is blob, then the index row; the row is the publication point, so a reader never sees an
    artifact whose bytes are incomplete. Deletion goes the other way (row, then blob). Writers of one id
    serialise on the index's artifact lock (a flock for SQLite, an advisory lock for PostgreSQL), which orphan
    collection takes too, so a row never outlives its blob. Uploads are staged in `<root>/tmp` (flock'ed temp
    files, swept by `collect_garbage`); the conversion cache lives in `<root>/cache`.
    """

    LAYOUT_VERSION = 2  # 1: metadata as JSON files (imported on open); 2: metadata in the index

    def __init__(
        self,
        root: Path,
        *,
        inspector: Inspector | None = None,
        tmp_grace_seconds: float = 3600,
        conversion_cache_bytes: int = 8 << 30,
        conversion_cache_max_age_seconds: float = 7 * 86400,
        limits: ArchiveLimits | None = None,
        database_url: str | None = None,
        blobs: BlobStore | None = None,
        index: MetadataIndex | None = None,
        retention_seconds: float | None = None,
        retention_keep_last: int = 0,
        retention_label_keys: Sequence[str] = (),
        lease_seconds: float = 6 * 3600,
    ) -> None:
        """Open (and create if needed) a store; a data directory of layout 1 is imported into the index first.

        Args:
            root: The local data directory: staging, caches, locks, and (by default) the blobs and the SQLite index.
            inspector: Parses an upload into an `Inspection`; defaults to `inspect_checkpoint`, in-process, with
                `limits`.
            tmp_grace_seconds: Age after which unlocked temp files and orphan blobs are garbage.
            conversion_cache_bytes: Size bound of the conversion cache (`convert`), kept by `collect_garbage`.
            conversion_cache_max_age_seconds: Conversions unused this long are removed by `collect_garbage`.
            limits: The parse limits of the default inspector and of every load of a stored blob
                (`CKPT_MAX_KEYS`, archive limits); their expansion bound also holds every safetensors file the
                store writes (`store_state_dict`, `convert`).
            database_url: The index (``postgresql://...`` or ``sqlite:///...``); None: SQLite in `root`.
            blobs: The blob store; None: `LocalBlobStore` in `<root>/blobs`.
            index: An index to use instead of opening `database_url` (it is migrated here).
            retention_seconds: The retention policy's age: `collect_garbage` (and `retain`) delete artifacts
                older than this that the policy does not keep (see `retain`); None keeps every artifact.
            retention_keep_last: The policy also keeps the newest this many artifacts per (key, value) of each of
                `retention_label_keys`.
            retention_label_keys: See `retention_keep_last`.
            lease_seconds: How long a lease (`lease`) protects artifacts if its holder never releases it (a crash).

        Raises:
            StoreError: The directory or the index holds a store of a newer version, or its marker is unreadable.
            InvalidSettings: `database_url` is not a supported database.
        """
        self.root = Path(root)
        self.limits = limits if limits is not None else ArchiveLimits()
        self._inspector: Inspector = (
            inspector if inspector is not None else functools.partial(inspect_checkpoint, limits=self.limits)
        )
        self.tmp_grace_seconds = float(tmp_grace_seconds)
        # A put holds its blob lease this long at most (a writer that died is forgotten then); at least an hour,
        # since a multipart upload of a large blob takes a while.
        self.blob_lease_seconds = max(self.tmp_grace_seconds, 3600.0)
        self.retention_seconds = retention_seconds
        self.retention_keep_last = int(retention_keep_last)
        self.retention_label_keys = tuple(retention_label_keys)
        self.lease_seconds = float(lease_seconds)
        # Parsed manifests by id. An artifact's manifest never changes (it describes immutable bytes), so a
        # cached one stays right; a diff of two 20k-key checkpoints then parses no JSON at all.
        self._manifests: LRUCache[str, Manifest] = LRUCache(
            max_items=_MANIFEST_CACHE_ITEMS, max_weight=_MANIFEST_CACHE_KEYS, weigh=lambda m: len(m.entries))
        # Recent memory-mapped loads by (id, safe globals, container key); see `load`.
        self._loaded: LRUCache[tuple[str, tuple[str, ...], str | None], LoadedCheckpoint] = LRUCache(
            max_items=_LOADED_CACHE_ITEMS, max_weight=_LOADED_CACHE_KEYS, weigh=lambda c: len(c.state_dict))
        self._tmp = self.root / "tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(exist_ok=True)
            (self.root / "locks").mkdir(exist_ok=True)
            self.blobs: BlobStore = blobs if blobs is not None else LocalBlobStore(self.root / "blobs",
                                                                                  tmp_dir=self._tmp)
            self.index = index if index is not None else open_index(self.root, database_url)
            self._open_layout()
            # Converted downloads: beside the artifacts, never listed, disposable.
            self.conversions = ConversionCache(
                self.root / "cache" / "conversions",
                tmp_dir=self._tmp,
                max_bytes=conversion_cache_bytes,
                max_age_seconds=conversion_cache_max_age_seconds,
            )
        except OSError as exc:
            if is_no_space(exc):
                raise storage_full(exc) from exc
            raise StoreError(f"cannot open the artifact store at {str(self.root)!r}: {exc.strerror}") from exc

    def close(self) -> None:
        """Release the index's connections (the store can still be used; they are opened again)."""
        self.index.close()

    # ---- layout -------------------------------------------------------------------------------------------

    def _read_marker(self) -> int | None:
        try:
            raw = (self.root / _MARKER).read_bytes()
        except FileNotFoundError:
            return None
        try:
            version = json.loads(raw)["layout_version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"unreadable store marker {_MARKER!r}") from exc
        if not isinstance(version, int) or version > self.LAYOUT_VERSION:
            raise StoreError(
                f"the store at {str(self.root)!r} has layout version {version!r}; this service supports "
                f"up to {self.LAYOUT_VERSION}"
            )
        return version

    def _open_layout(self) -> None:
        version = self._read_marker()
        self.index.migrate()
        if version is None or version < self.LAYOUT_VERSION or has_legacy_files(self.root):
            if has_legacy_files(self.root):
                import_legacy(self.root, self.index)
            data = _dump({"kind": "ckpt-service artifact store", "layout_version": self.LAYOUT_VERSION})
            # A fresh directory: link (a racing creator wins). An upgraded one: the rename replaces layout 1.
            publish_bytes(self._tmp, self.root / _MARKER, data, mode=0o444, replace=version is not None)

    # ---- reading ------------------------------------------------------------------------------------------

    def _require_meta(self, artifact_id: str) -> ArtifactMeta:
        meta = self.index.get(validate_id(artifact_id))
        if meta is None:
            raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id)
        return meta

    def resolve(self, ref: str) -> str:
        """Turn an id or a name into the id of an existing artifact.

        Args:
            ref: A 64-hex id, a name, or a unique prefix of at least 8 hex digits of an id. A name wins over a
                prefix (new names cannot look like one; older ones keep working).

        Returns:
            The artifact id.

        Raises:
            InvalidReference: `ref` is neither a well-formed id nor a valid name.
            ArtifactNotFound: No artifact with that id, or the name points to a deleted artifact.
            NameNotFound: No such name (and no artifact id starts with it).
            AmbiguousReference: The prefix starts several ids (`candidates`).
        """
        if is_id(ref):
            if not self.exists(ref):
                raise ArtifactNotFound(f"no artifact {ref}", ref=ref)
            return ref
        if is_id_prefix(ref):
            try:
                artifact_id = self.get_name(ref)
            except NameNotFound:
                return self._resolve_prefix(ref.lower())
        else:
            artifact_id = self.get_name(ref)
        if not self.exists(artifact_id):
            raise ArtifactNotFound(f"name {ref!r} points to a missing artifact {artifact_id}", ref=ref)
        return artifact_id


    def _resolve_prefix(self, prefix: str) -> str:
        found = self.index.ids_with_prefix(prefix, limit=101)
        if not found:
            raise ArtifactNotFound(f"no artifact id starts with {prefix!r}, and no name {prefix!r}", ref=prefix)
        if len(found) > 1:
            shown = ", ".join(f[:16] for f in found[:10])
            more = "" if len(found) <= 100 else "more than 100"
            raise AmbiguousReference(
                f"{more or len(found)} artifact ids start with {prefix!r} ({shown}); give more digits", ref=prefix,
                candidates=found[:100],
            )
        return found[0]

    def hex_names(self) -> builtins.list[str]:
        """Names made only of 8 or more hex digits (allowed before short ids; they still win over a prefix).

        Returns:
            Those names, sorted.
        """
        return sorted(n for n in self.index.names() if is_id_prefix(n))

    def exists(self, artifact_id: str) -> bool:
        """Tell whether an artifact is published.

        Args:
            artifact_id: A 64-hex id.

        Returns:
            True when its index row (the publication point) exists.

        Raises:
            InvalidReference: Not a well-formed id.
        """
        return self.index.exists(validate_id(artifact_id))

    def metadata(self, artifact_id: str) -> ArtifactMeta:
        """Read an artifact's metadata, with the names that point to it.

        Args:
            artifact_id: A 64-hex id.

        Returns:
            The metadata.

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact.
        """
        return self._require_meta(artifact_id)

    def made_from(self, artifact_id: str) -> builtins.list[str]:
        """The artifacts derived from this one (their lineage names it as an input), sorted.

        Raises:
            InvalidReference: Not a well-formed id.
        """
        return self.index.made_from(validate_id(artifact_id))

    def manifest(self, artifact_id: str) -> Manifest:
        """Read the manifest kept in the index (the blob is not opened).

        Args:
            artifact_id: A 64-hex id.

        Returns:
            The manifest computed at ingest. One written with an older fingerprint version is brought up to date
            on first use (`_upgrade_manifest`), so that it compares right with manifests written now.

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact.
        """
        validate_id(artifact_id)
        cached = self._manifests.get(artifact_id)
        if cached is not None and not self.index.exists(artifact_id):
            self._forget(artifact_id)  # deleted by another process
            cached = None
        if cached is None:
            data = self.index.manifest(artifact_id)
            if data is None:
                raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id)
            try:
                cached = Manifest.from_dict(data)
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"corrupt manifest for artifact {artifact_id}") from exc
            if cached.fingerprint_version < CURRENT_FINGERPRINT_VERSION:
                cached = self._upgrade_manifest(artifact_id, cached)
            self._manifests.put(artifact_id, cached)
        # A copy of the entry table: callers may change theirs without touching the cache.
        return Manifest(dict(cached.entries), cached.schema_fingerprint, cached.fingerprint_version)

    def _upgrade_manifest(self, artifact_id: str, manifest: Manifest) -> Manifest:
        # Version 1 hashed a quantized tensor's int_repr only; every other tensor hashes the same in version 2, so
        # only quantized entries are recomputed (from the blob) and only then is the manifest rewritten.
        stale = [k for k, e in manifest.entries.items() if is_quantized_dtype(e.dtype)]
        if not stale:
            return replace(manifest, fingerprint_version=CURRENT_FINGERPRINT_VERSION)
        try:
            state_dict = self.load(artifact_id).state_dict
        except InvalidCheckpoint as exc:  # e.g. it needs safe globals the store is not told about
            log.warning("cannot recompute the fingerprints of artifact %s: %s", artifact_id, exc.detail)
            return manifest
        entries = dict(manifest.entries)
        for key in stale:
            tensor = state_dict.get(key)
            if tensor is None:
                log.warning("artifact %s has no tensor %r to recompute its fingerprint", artifact_id, key)
                return manifest
            entries[key] = replace(entries[key], fingerprint=fingerprint_tensor(tensor))
        upgraded = Manifest(entries, manifest.schema_fingerprint, CURRENT_FINGERPRINT_VERSION)
        self.index.update_manifest(artifact_id, upgraded.to_dict())  # a no-op when deleted meanwhile
        log.info("recomputed %d quantized fingerprints of artifact %s", len(stale), artifact_id)
        return upgraded

    def _forget(self, artifact_id: str) -> None:
        # a deleted blob stays mapped (and its disk space taken) while a cached load holds it
        self._loaded.discard_where(lambda key: key[0] == artifact_id)
        self._manifests.discard(artifact_id)

    @contextmanager
    def local_path(self, artifact_id: str) -> Iterator[Path]:
        """Pin a local, read-only copy of an artifact's bytes while the context is held (for mmap, sendfile).

        Args:
            artifact_id: A 64-hex id.

        Yields:
            A path whose bytes stay unchanged until the context exits, even if the artifact is deleted meanwhile.

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact.
        """
        self._require_meta(artifact_id)
        with self.blobs.local_path(artifact_id) as path:
            yield path

    def blob_path(self, artifact_id: str) -> Path:
        """The path of an artifact's bytes in a local blob store. The file is read-only; never write to it.

        For tools and tests of the local layout; the service itself uses `local_path`, which works with every
        blob store and pins the bytes.

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact.
            StoreError: The blob store is not local.
        """
        self._require_meta(artifact_id)
        if not isinstance(self.blobs, LocalBlobStore):
            raise StoreError("the blob store is not local; use local_path()")
        return self.blobs.path(artifact_id)

    @property
    def blobs_are_local(self) -> bool:
        """Whether the bytes are files of this machine (sent as they are) or remote (streamed, or redirected to)."""
        return isinstance(self.blobs, LocalBlobStore)

    def presigned_url(self, artifact_id: str, *, expires: int, filename: str | None = None) -> str | None:
        """A URL on the blob store itself that GETs an artifact's bytes without credentials until it expires.

        Returns:
            The URL, or None when the blob store cannot sign one (the local directory).

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact.
        """
        self._require_meta(artifact_id)
        sign = getattr(self.blobs, "presigned_url", None)
        if sign is None:
            return None
        url: str = sign(artifact_id, expires=expires, filename=filename)
        return url

    def open_blob(self, artifact_id: str, *, start: int = 0, end: int | None = None) -> BinaryIO:
        """Open an artifact's bytes (or the range `[start, end)`) for streaming. The caller closes the file.

        Args:
            artifact_id: A 64-hex id.
            start: The first byte.
            end: One past the last byte; None: to the end.

        Returns:
            A binary file opened for reading.

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact (also when it is deleted concurrently).
        """
        self._require_meta(artifact_id)
        try:
            return self.blobs.open(artifact_id, start=start, end=end)
        except ArtifactNotFound as exc:
            raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id) from exc

    def load(
        self, artifact_id: str, *, mmap: bool = True, safe_globals: Sequence[str] = (),
        container_key: str | None = None,
    ) -> LoadedCheckpoint:
        """Load a stored checkpoint with the container key recorded at ingest, or another one.

        Args:
            artifact_id: A 64-hex id.
            mmap: Map tensors from the blob instead of reading them (ignored for the legacy format).
            safe_globals: Extra "module.qualname" globals the unpickler may accept for this load only.
            container_key: The state_dict to use inside the file; None uses the one recorded at ingest.

        Returns:
            The loaded checkpoint.

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact.
            InvalidCheckpoint: From the loader.
        """
        meta = self._require_meta(artifact_id)
        use_mmap = mmap  # a format that cannot be mapped (legacy .pth) loads unmapped, and is not cached
        chosen = container_key if container_key is not None else meta.container_key
        key = (artifact_id, tuple(safe_globals), chosen)
        hit = self._loaded.get(key) if use_mmap else None
        if hit is not None:
            return replace(hit, state_dict=_shallow_copy(hit.state_dict))
        # The mapping (and the storage records' own descriptor) keep the bytes after the pin is released.
        with self.blobs.local_path(artifact_id) as path:
            loaded = load_checkpoint(
                path, mmap=use_mmap, container_key=chosen, safe_globals=safe_globals, limits=self.limits
            )
        if loaded.mmapped:
            # torch.load costs ~100 us a tensor, and the original of a merge is loaded again for every trained
            # checkpoint merged into it. A mapped load holds no tensor memory of its own (the pages are the
            # blob's page cache), and the blob never changes, so recent ones are kept, bounded by tensor count.
            self._loaded.put(key, loaded)
            return replace(loaded, state_dict=_shallow_copy(loaded.state_dict))
        return loaded

    def convert(
        self, artifact_id: str, format: OutputFormat, *, safe_globals: Sequence[str] = ()
    ) -> ConvertedBlob:
        """An artifact's bytes in another format, from the conversion cache (converted on the first request).

        Nothing is added to the artifacts: the result is not listed, and GC may remove it (it is converted
        again when asked for). Its sha256 is kept with it, so a cache hit reads no tensor.

        Args:
            artifact_id: A 64-hex id.
            format: "pth" (torch zip) or "safetensors".
            safe_globals: Extra globals allowed while unpickling the source.

        Returns:
            The converted bytes' path, sha256 and size.

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact.
            InvalidRequest: The state_dict cannot be written in that format.
            UnconvertibleCheckpoint: safetensors cannot hold a key's dtype, or a key is ``__metadata__``.
            ExpansionLimitExceeded: The safetensors output would expand past the bound.
            StorageFull: No space for the converted bytes.
        """
        meta = self._require_meta(artifact_id)
        # The same expansion bound as every safetensors write, checked before anything is allocated.
        budget = expansion_budget([meta.size], self.limits) if writer_for(format).expands_views else None

        def write(path: Path) -> tuple[str, int]:
            loaded = self.load(artifact_id, safe_globals=safe_globals)
            sources = [loaded.records] if loaded.records is not None else []
            return save_checkpoint_hashed(loaded.state_dict, path, format=format, sources=sources,
                                          max_expanded_bytes=budget)

        return self.conversions.get_or_convert(artifact_id, format, write)

    def cached_conversion(self, artifact_id: str, format: OutputFormat) -> ConvertedBlob | None:
        """The conversion of an artifact to `format` if it is cached (a cheap read: no conversion runs)."""
        return self.conversions.get(validate_id(artifact_id), format)

    def verify(self, artifact_id: str) -> VerifyBlobResult:
        """Re-hash a blob to detect corruption.

        Args:
            artifact_id: A 64-hex id.

        Returns:
            Whether the bytes still hash to the id and have the recorded size, with the actual digest.

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact.
        """
        meta = self._require_meta(artifact_id)
        actual, size = self._hash_blob(artifact_id)
        return VerifyBlobResult(id=artifact_id, ok=actual == artifact_id and size == meta.size,
                                actual_sha256=actual, expected_size=meta.size, actual_size=size)

    def _hash_blob(self, artifact_id: str) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        with self.blobs.open(artifact_id) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size

    def list(
        self,
        *,
        name: str | None = None,
        label: str | None = None,
        operation: str | None = None,
        format: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """List artifacts, newest first, with a cursor that stays valid while artifacts come and go.

        Args:
            name: Only the artifact this name points to.
            label: "key=value", or "key" for any value.
            operation: Only derived artifacts made by this lineage operation.
            format: Only this checkpoint format ("pth-zip", "safetensors", ...).
            limit: Page size, 1 to 1000.
            cursor: `next_cursor` of the previous page.

        Returns:
            One page and the total count of matches.

        Raises:
            InvalidRequest: Bad limit or cursor.
            InvalidReference: `name` is not a valid name.
        """
        if not 1 <= limit <= _MAX_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {_MAX_LIMIT}")
        after = _decode_cursor(cursor) if cursor is not None else None
        wanted_id: str | None = None
        if name is not None:
            wanted_id = self.index.get_name(validate_name(name))
            if wanted_id is None:
                return Page(items=[], next_cursor=None, total=0)
        label_key, label_value = _label_filter(label) if label is not None else (None, None)
        filters = ListFilters(artifact_id=wanted_id, label_key=label_key, label_value=label_value,
                              operation=operation, format=format)
        items, total, more = self.index.list(filters, limit=limit, after=after)
        return Page(items=items, next_cursor=_encode_cursor(items[-1]) if more and items else None, total=total)

    # ---- writing ------------------------------------------------------------------------------------------

    def open_upload(self, *, max_bytes: int | None = None) -> PendingUpload:
        """Start a streaming upload into a flock'ed temp file in the staging area (`<root>/tmp`).

        Args:
            max_bytes: Reject the upload as soon as it grows past this size.

        Returns:
            The pending upload; write chunks to it, then `commit_upload` (or `abort`).

        Raises:
            StorageFull: No space for the temp file.
        """
        return PendingUpload(self._tmp, max_bytes=max_bytes)

    def commit_upload(
        self,
        upload: PendingUpload,
        *,
        expected_sha256: str | None = None,
        filename: str | None = None,
        labels: Mapping[str, str] | None = None,
        lineage: Lineage | None = None,
        inspection: Inspection | None = None,
    ) -> IngestResult:
        """Check, inspect and publish a finished upload. The temp file is gone afterwards, whatever happens.

        Args:
            upload: From `open_upload`, with all bytes written.
            expected_sha256: The digest the client declared, if any.
            filename: The client's file name (metadata only).
            labels: Key/value labels for a new artifact.
            lineage: How the artifact was derived, for results of operations.
            inspection: The result of `inspect_upload` on this upload, so that it is not parsed twice.

        Returns:
            The artifact and whether it was created. For bytes already stored nothing is rewritten, the new
            filename and lineage are ignored, and the labels are merged into the artifact's (`labels_changed`).

        Raises:
            DigestMismatch: The bytes do not hash to `expected_sha256`; nothing is kept.
            InvalidCheckpoint: From the inspector, unchanged; nothing is kept.
            StorageFull: The disk filled up; nothing is kept.
            InvalidRequest: Bad labels, filename or lineage.
        """
        if upload.path.parent != self._tmp:
            raise StoreError("the upload belongs to another store")
        with upload:  # aborted on every path: after a publish only the temp name goes, the blob stays
            labels_ = _check_labels(labels)
            filename_ = _check_filename(filename)
            lineage_ = _check_lineage(lineage)
            artifact_id = upload.finish()
            if expected_sha256 is not None:
                self.check_digest(upload, expected_sha256)
            existing = self.index.get(artifact_id)
            if existing is not None:
                return self._existing(existing, labels_)
            if inspection is None:
                inspection = self._inspector(upload.path)
            return self._publish(artifact_id, upload.path, upload.size, inspection,
                                 filename=filename_, labels=labels_, lineage=lineage_)

    def inspect_upload(self, upload: PendingUpload, *, container_key: str | None = None) -> Inspection:
        """Finish an upload and parse it with the store's inspector, without publishing it.

        Args:
            upload: From `open_upload`, with all bytes written.
            container_key: The state_dict to use inside the file; None applies the default rule.

        Returns:
            The inspection, to pass to `commit_upload` later.

        Raises:
            InvalidCheckpoint: From the inspector; the upload stays open for the caller to abort.
        """
        upload.finish()
        if container_key is not None:
            return self._inspector(upload.path, container_key=container_key)
        return self._inspector(upload.path)

    def check_digest(self, upload: PendingUpload, expected_sha256: str) -> None:
        """Finish an upload and compare its sha256 with the digest the client declared.

        Args:
            upload: From `open_upload`, with all bytes written.
            expected_sha256: The declared digest.

        Raises:
            DigestMismatch: The bytes hash to something else.
        """
        actual = upload.finish()
        if expected_sha256.strip().lower() != actual:
            raise DigestMismatch(
                f"the upload hashes to {actual}, not to the declared {expected_sha256.strip()[:80]}",
                expected=expected_sha256.strip()[:80],
                actual=actual,
            )

    def ingest(
        self,
        chunks: Iterable[Chunk],
        *,
        expected_sha256: str | None = None,
        filename: str | None = None,
        labels: Mapping[str, str] | None = None,
        lineage: Lineage | None = None,
        max_bytes: int | None = None,
    ) -> IngestResult:
        """Stream chunks into the store and publish them (open_upload + write + commit_upload).

        Args:
            chunks: The bytes, in pieces.
            expected_sha256: As for `commit_upload`.
            filename: As for `commit_upload`.
            labels: As for `commit_upload`.
            lineage: As for `commit_upload`.
            max_bytes: As for `open_upload`.

        Returns:
            The artifact and whether it was created.

        Raises:
            PayloadTooLarge: Over `max_bytes`; the rest of `chunks` is not consumed.
            DigestMismatch, InvalidCheckpoint, StorageFull, InvalidRequest: As for `commit_upload`.
        """
        with self.open_upload(max_bytes=max_bytes) as upload:
            for chunk in chunks:
                upload.write(chunk)
            return self.commit_upload(upload, expected_sha256=expected_sha256, filename=filename,
                                      labels=labels, lineage=lineage)

    def ingest_file(
        self,
        path: Path,
        *,
        expected_sha256: str | None = None,
        filename: str | None = None,
        labels: Mapping[str, str] | None = None,
        lineage: Lineage | None = None,
        max_bytes: int | None = None,
    ) -> IngestResult:
        """Ingest a file by streaming it in 1 MiB chunks.

        Args:
            path: The file to copy into the store.
            expected_sha256: As for `commit_upload`.
            filename: As for `commit_upload` (not derived from `path`).
            labels: As for `commit_upload`.
            lineage: As for `commit_upload`.
            max_bytes: As for `open_upload`.

        Returns:
            The artifact and whether it was created.

        Raises:
            PayloadTooLarge, DigestMismatch, InvalidCheckpoint, StorageFull, InvalidRequest: As for `ingest`.
        """
        with open(path, "rb") as f:
            return self.ingest(iter(lambda: f.read(CHUNK), b""), expected_sha256=expected_sha256,
                               filename=filename, labels=labels, lineage=lineage, max_bytes=max_bytes)


    def store_state_dict(
        self,
        state_dict: Mapping[str, torch.Tensor],
        *,
        format: OutputFormat = "pth",
        lineage: Lineage | None = None,
        labels: Mapping[str, str] | None = None,
        filename: str | None = None,
        manifest: Manifest | None = None,
        sources: Sequence[StorageRecords] = (),
        expanded_from: Sequence[str] | None = None,
    ) -> IngestResult:
        """Save a state_dict the service computed (a merge, strip or convert result) as an artifact.

        Args:
            state_dict: The tensors (mmapped inputs are streamed out, not copied).
            format: "pth" (torch zip) or "safetensors".
            lineage: How it was derived.
            labels: Key/value labels.
            filename: A suggested download name (metadata only).
            manifest: Its manifest, when the caller already built it; otherwise the saved file is inspected.
            sources: The storage records of the mapped loads the tensors come from (`LoadedCheckpoint.records`):
                those storages are copied file-to-file instead of through memory.
            expanded_from: The stored artifacts the tensors come from. A safetensors file holds every key's
                bytes on its own, so before anything is written its keys may expand to at most the
                `expansion_budget` of these artifacts' sizes (None: of nothing, so only the absolute cap).

        Returns:
            The artifact and whether it was created (the same state_dict gives the same id).

        Raises:
            StorageFull: The disk filled up; nothing is kept.
            InvalidRequest: Bad labels, filename or lineage.
            UnconvertibleCheckpoint: safetensors cannot hold a key's dtype, or a key is ``__metadata__``.
            ExpansionLimitExceeded: The safetensors output would expand past the bound.
        """
        labels_ = _check_labels(labels)
        filename_ = _check_filename(filename)
        lineage_ = _check_lineage(lineage)
        writer = writer_for(format)
        budget = None
        if writer.expands_views:
            sizes = [self.metadata(i).size for i in expanded_from] if expanded_from is not None else []
            budget = expansion_budget(sizes, self.limits) if sizes else self.limits.max_expanded_bytes
        with locked_work_dir(self._tmp, "work-") as work:
            path = work / f"checkpoint{writer.suffix}"
            try:
                # hashed while it is written: the file is not read a second time
                artifact_id, size = save_checkpoint_hashed(state_dict, path, format=format, sources=sources,
                                                           max_expanded_bytes=budget)
            except OSError as exc:
                if is_no_space(exc):
                    raise storage_full(exc) from exc
                raise
            existing = self.index.get(artifact_id)
            if existing is not None:
                return self._existing(existing, labels_)
            if manifest is not None:
                # safetensors has no place for `_metadata`; torch.save keeps it
                has_md = writer.holds_module_metadata and has_metadata(state_dict)
                inspection = Inspection(format=writer.name, container_key=None, extras={}, has_metadata=has_md,
                                        manifest=manifest)
            else:
                inspection = self._inspector(path)
            return self._publish(artifact_id, path, size, inspection, filename=filename_,
                                 labels=labels_, lineage=lineage_)


    def _publish(
        self,
        artifact_id: str,
        src: Path,
        size: int,
        inspection: Inspection,
        *,
        filename: str | None,
        labels: dict[str, str],
        lineage: Lineage | None,
    ) -> IngestResult:
        meta = ArtifactMeta(
            id=artifact_id,
            size=size,
            created=_now(),
            filename=filename,
            format=inspection.format,
            container_key=inspection.container_key,
            key_count=len(inspection.manifest.entries),
            tensor_bytes=inspection.manifest.tensor_bytes,
            schema_fingerprint=inspection.manifest.schema_fingerprint,
            has_metadata=inspection.has_metadata,
            extras=dict(sorted(inspection.extras.items())),
            labels=dict(sorted(labels.items())),
            lineage=lineage,
            candidates=dict(sorted(inspection.candidates.items())),
        )
        manifest = inspection.manifest.to_dict()
        _dump(manifest)  # JSON-serialisable, before anything is written
        created = False
        with self.index.artifact_lock(artifact_id):
            if not self.index.exists(artifact_id):  # else another process published the same bytes first
                # A lease, written before the put: orphan GC skips the digest while the bytes are in flight (a
                # multipart upload to an object store may take minutes), however the replicas share the blobs.
                lease = self.index.add_blob_lease(artifact_id, seconds=self.blob_lease_seconds)
                try:
                    self.blobs.put_file(artifact_id, src)
                    # the publication point: from here on the artifact exists
                    created = self.index.insert(meta, manifest)
                except BaseException:
                    # No row under our lock: the blob is ours to remove (a crash here leaves an orphan for GC).
                    if not self.index.exists(artifact_id):
                        self.blobs.delete(artifact_id)
                    raise
                finally:
                    self.index.drop_blob_lease(artifact_id, lease)
        if not created:
            return self._existing(self._require_meta(artifact_id), labels)
        self._manifests.put(artifact_id, Manifest(dict(inspection.manifest.entries),
                                                  inspection.manifest.schema_fingerprint))
        return IngestResult(meta, created=True)

    def _existing(self, meta: ArtifactMeta, labels: Mapping[str, str]) -> IngestResult:
        # The same bytes again: labels given with them are merged into the artifact's (a new value wins).
        if not labels:
            return IngestResult(meta, created=False)
        try:
            meta, changes = self.update_labels(meta.id, set_=labels)
        except ArtifactNotFound:  # deleted meanwhile: report what was there
            return IngestResult(meta, created=False)
        return IngestResult(meta, created=False, labels_changed=replace(changes, removed=[]))

    def update_labels(
        self, artifact_id: str, *, set_: Mapping[str, str] | None = None, remove: Iterable[str] = ()
    ) -> tuple[ArtifactMeta, LabelChanges]:
        """Set and delete labels of an artifact in one transaction (a key both set and removed is set).

        Args:
            artifact_id: A 64-hex id.
            set_: Keys to add or overwrite, validated as the labels of an upload.
            remove: Keys to delete (absent ones are ignored).

        Returns:
            The artifact as it is now, and which keys were added, changed and removed.

        Raises:
            InvalidReference: Not a well-formed id.
            InvalidRequest: A bad key or value, or more than the maximum number of labels afterwards.
            ArtifactNotFound: No such artifact.
        """
        validate_id(artifact_id)
        wanted = _check_labels(set_)
        gone = sorted(set(remove))
        _check_label_keys(gone)
        current = self._require_meta(artifact_id).labels
        after = (set(current) - set(gone)) | set(wanted)
        if len(after) > _MAX_LABELS:
            raise InvalidRequest(f"at most {_MAX_LABELS} labels (the artifact would have {len(after)})")
        return self.index.update_labels(artifact_id, wanted, gone)

    @contextmanager
    def lease(self, artifact_ids: Iterable[str]) -> Iterator[None]:
        """Hold artifacts in use while the context runs: retention GC never deletes a leased artifact.

        Taking the lease proves the artifacts still exist (GC deletes under the same row lock), so an operation
        that holds it over its inputs sees them until it has published its result. A holder that crashes leaves
        rows that expire after `lease_seconds`.

        Raises:
            ArtifactNotFound: One of them is gone; nothing is held.
        """
        ids = sorted({validate_id(i) for i in artifact_ids})
        if not ids:
            yield
            return
        holder = secrets.token_hex(16)
        expires = (datetime.now(UTC) + timedelta(seconds=self.lease_seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.index.lease(holder, ids, expires=expires)
        try:
            yield
        finally:
            self.index.release(holder)

    def delete(self, artifact_id: str, *, force: bool = False) -> builtins.list[str]:
        """Delete an artifact: its index row first (unpublish), then its blob (unlinked, never truncated).

        Args:
            artifact_id: A 64-hex id.
            force: Also delete the names that point to it.

        Returns:
            The names removed with it (sorted).

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact.
            ArtifactInUse: Names point to it and `force` is False.
        """
        validate_id(artifact_id)
        with self.index.artifact_lock(artifact_id):
            pointing = self.index.delete(artifact_id, force=force)
            self._forget(artifact_id)
            self.blobs.delete(artifact_id)
        self.conversions.forget(artifact_id)
        return pointing

    # ---- names --------------------------------------------------------------------------------------------

    def set_name(self, name: str, artifact_id: str) -> None:
        """Point a name at an artifact, creating or moving it atomically.

        Args:
            name: A valid name.
            artifact_id: An existing artifact's id.

        Raises:
            InvalidReference: Bad name or id.
            ArtifactNotFound: No such artifact.
        """
        self.check_settable_name(name)
        self.index.set_name(name, validate_id(artifact_id))

    def check_settable_name(self, name: str) -> str:
        """Check that `set_name` would accept `name` (call it before heavy work that ends in naming).

        Args:
            name: The name.

        Returns:
            The name, unchanged.

        Raises:
            InvalidReference: Not a valid name, or a new name made only of 8 or more hex digits.
        """
        validate_name(name)
        if self.index.get_name(name) is None:
            validate_new_name(name)  # an existing all-hex name may move; a new one could hide an id prefix
        return name

    def get_name(self, name: str) -> str:
        """Read the id a name points to.

        Args:
            name: A valid name.

        Returns:
            The artifact id (the artifact may have been deleted since, by force).

        Raises:
            InvalidReference: Not a valid name (or an id).
            NameNotFound: No such name.
        """
        target = self.index.get_name(validate_name(name))
        if target is None:
            raise NameNotFound(f"no name {name!r}", name=name)
        return target

    def delete_name(self, name: str) -> None:
        """Remove a name; the artifact stays.

        Args:
            name: A valid name.

        Raises:
            InvalidReference: Not a valid name.
            NameNotFound: No such name.
        """
        if not self.index.delete_name(validate_name(name)):
            raise NameNotFound(f"no name {name!r}", name=name)

    def names(self) -> dict[str, str]:
        """All names.

        Returns:
            name -> artifact id, sorted by name.
        """
        return self.index.names()

    # ---- maintenance --------------------------------------------------------------------------------------


    # ---- maintenance --------------------------------------------------------------------------------------

    def ready(self) -> StoreHealth:
        """The readiness probe: a temp file can be created in the staging area, the index answers (a round trip
        to the database) and so does the blob store (the directory, or a HEAD of the bucket)."""
        try:
            # In tmp/, where garbage collection finds it should the process die right here.
            fd, path = tempfile.mkstemp(dir=self._tmp, prefix="ready-")
            os.close(fd)
            os.unlink(path)
        except OSError as exc:
            return StoreHealth(False, f"the store is not writable: {type(exc).__name__}: {exc.strerror}")
        try:
            self.index.ping()
        except Exception as exc:  # any driver error means the same: the index does not answer
            return StoreHealth(False, f"the index ({self.index.dialect}) does not answer: {type(exc).__name__}")
        blobs = type(self.blobs).__name__
        try:
            answered = self.blobs.ping()
        except Exception as exc:  # any backend error means the same: the blobs cannot be read or written
            return StoreHealth(False, f"the blob store ({blobs}) does not answer: {_brief(exc)}")
        return StoreHealth(True, f"the store is writable; the index ({self.index.dialect}) and {answered} answer")

    def describe(self) -> dict[str, str]:
        """Where the data is, for logs and `ckpt` tools (never a password)."""
        return {"data_dir": str(self.root), "index": redact(self.index.url), "blobs": type(self.blobs).__name__}

    def collect_garbage(self, *, grace_seconds: float | None = None) -> int:
        """Remove crash leftovers, orphan blobs and (with a retention) unreferenced artifacts.

        GC has two parts. The blob listing: blobs without an index row older than the grace period (a crash
        between the two steps of a publication) go, each under the artifact lock. The index query: with
        `retention_seconds`, the retention policy runs (`retain`). Unlocked temp files in the staging area older
        than the grace period go too (a live upload's writer holds its flock, so it is never removed, whatever its
        age), and the conversion cache is trimmed: conversions of deleted artifacts, unused past their maximum age,
        the least recently used past its size bound.

        Args:
            grace_seconds: Minimum age (by mtime); defaults to the store's `tmp_grace_seconds`.

        Returns:
            How many files, directories and artifacts were removed.
        """
        grace = self.tmp_grace_seconds if grace_seconds is None else float(grace_seconds)
        cutoff = time.time() - grace
        removed = 0
        for entry in list(os.scandir(self._tmp)):
            try:
                if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            if remove_if_unlocked(Path(entry.path)):
                removed += 1
        removed += len(self._remove_orphans(cutoff))
        self.index.drop_expired_blob_leases()
        # Multipart uploads of writers that died (an object store's parts cost space and are invisible otherwise).
        abort_stale_uploads = getattr(self.blobs, "abort_stale_uploads", None)
        if abort_stale_uploads is not None:
            removed += int(abort_stale_uploads(older_than_seconds=grace))
        if self.retention_seconds is not None:
            removed += len(self.retain(dry_run=False).removed)
        removed += self.conversions.trim(exists=self.exists)
        return removed

    def _orphans(self, cutoff: float | None) -> Iterator[str]:
        # Blobs without a row, older than the cutoff (None: any age), checked against the index in batches.
        batch: dict[str, float] = {}

        def flush() -> Iterator[str]:
            # Published, or leased by a writer whose put is in flight: not an orphan (whatever its age).
            kept = self.index.existing(batch) | self.index.blob_leased(batch)
            yield from sorted(d for d, m in batch.items() if d not in kept and (cutoff is None or m <= cutoff))
            batch.clear()

        for info in self.blobs.iter_blobs():
            batch[info.digest] = info.modified
            if len(batch) >= _GC_BATCH:
                yield from flush()
        yield from flush()

    def _remove_orphans(self, cutoff: float) -> builtins.list[str]:
        removed = []
        for digest in builtins.list(self._orphans(cutoff)):
            with self.index.artifact_lock(digest):  # a publication in progress holds it and finishes first
                if self.index.exists(digest):
                    continue
                self.blobs.delete(digest)
                removed.append(digest)
        return removed

    def retention_policy(self) -> RetentionPolicy | None:
        """The configured policy as of now (its age cutoff moves with the clock); None: retention is off."""
        if self.retention_seconds is None:
            return None
        before = (datetime.now(UTC) - timedelta(seconds=self.retention_seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return RetentionPolicy(created_before=before, keep_last=self.retention_keep_last,
                               label_keys=self.retention_label_keys)

    def retain(self, *, dry_run: bool = True) -> RetentionReport:
        """Apply the retention policy: find (and unless `dry_run`, delete) the artifacts it does not keep.

        Kept: every named artifact; every artifact created within `retention_seconds`; the newest
        `retention_keep_last` per (key, value) of each key in `retention_label_keys`; every leased artifact (an
        operation or upload in flight, see `lease`); and, transitively, every lineage input of a kept artifact.
        The rest goes, each under its artifact lock, re-checked in the deleting transaction: an artifact that is
        named or leased after the query, or that something named, leased or new was made from, is skipped. One
        run at a time across processes and replicas (`gc_lock`).

        Returns:
            What went (or would go, for a dry run) and how many bytes.
        """
        policy = self.retention_policy()
        if policy is None:
            return RetentionReport(dry_run=dry_run, enabled=False, reason=None, removed=[], skipped=[])
        reason = (f"unnamed, created before {policy.created_before}, not among the newest {policy.keep_last} per "
                  f"label of {quote_keys(policy.label_keys) or 'no keys'}, in no kept artifact's lineage")
        with self.index.gc_lock():
            candidates = self.index.retention_candidates(policy)
            if dry_run:
                return RetentionReport(dry_run=True, enabled=True, reason=reason,
                                       removed=[RetainedItem(i, size, created) for i, size, created in candidates],
                                       skipped=[])
            removed: builtins.list[RetainedItem] = []
            skipped: builtins.list[str] = []
            for artifact_id, size, created in candidates:
                with self.index.artifact_lock(artifact_id):
                    if not self.index.delete_collectable(artifact_id, created_before=policy.created_before):
                        skipped.append(artifact_id)
                        continue
                    self._forget(artifact_id)
                    self.blobs.delete(artifact_id)
                self.conversions.forget(artifact_id)
                removed.append(RetainedItem(artifact_id, size, created))
        if removed:
            log.info("retention removed %d artifacts (%d bytes)", len(removed), sum(r.size for r in removed))
        return RetentionReport(dry_run=False, enabled=True, reason=reason, removed=removed, skipped=skipped)

    def fsck(self, *, repair: bool = False, deep: bool = False) -> FsckReport:
        """Check that the index and the blobs agree.

        Finds rows whose blob is missing or has another size than recorded, manifests that are unreadable or do
        not hold the row's key count, blobs without a row, and with `deep` blobs whose bytes do not hash to their
        id (reads every blob).

        Args:
            repair: Do what is safe: unpublish broken artifacts (missing, truncated or corrupt blob, bad manifest;
                the names pointing at them go too and are reported), and remove orphan blobs older than the grace
                period (younger ones may be publications in flight).
            deep: Re-hash every blob.

        Returns:
            The report.
        """
        report = FsckReport(checked=0)
        broken: set[str] = set()
        checked = 0
        for artifact_id in self.index.iter_ids():
            checked += 1
            meta = self.index.get(artifact_id)
            if meta is None:
                continue  # deleted meanwhile
            try:
                size = self.blobs.size(artifact_id)
            except ArtifactNotFound:
                report.missing_blobs.append(artifact_id)
                broken.add(artifact_id)
                continue
            if size != meta.size:
                report.size_mismatches.append(artifact_id)
                broken.add(artifact_id)
            elif deep and self._hash_blob(artifact_id)[0] != artifact_id:
                report.digest_mismatches.append(artifact_id)
                broken.add(artifact_id)
            data = self.index.manifest(artifact_id)
            try:
                manifest = Manifest.from_dict(data) if data is not None else None
            except (ValueError, KeyError, TypeError):
                manifest = None
            if manifest is None or len(manifest.entries) != meta.key_count:
                report.bad_manifests.append(artifact_id)
                broken.add(artifact_id)
        report.orphan_blobs.extend(self._orphans(None))
        if repair:
            for artifact_id in sorted(broken):
                try:
                    report.names_removed.extend(self.delete(artifact_id, force=True))
                except ArtifactNotFound:
                    continue
                report.repaired.append(f"unpublished {artifact_id}")
            cutoff = time.time() - self.tmp_grace_seconds
            report.repaired.extend(f"removed orphan {d}" for d in self._remove_orphans(cutoff))
        return replace(report, checked=checked)
