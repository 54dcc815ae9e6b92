"""The artifact store: a content-addressed directory of checkpoints, safe with several processes on one root.

The layout and the on-disk format are described in docs/artifact-store.md.
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
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import torch

from service.core.expansion import expansion_budget
from service.core.formats import writer_for
from service.core.load import load_checkpoint
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
    ArtifactInUse,
    ArtifactNotFound,
    DigestMismatch,
    InvalidCheckpoint,
    InvalidReference,
    InvalidRequest,
    NameNotFound,
    StoreError,
    quote_keys,
)
from service.format_names import OutputFormat
from service.store._fs import (
    CHUNK,
    file_lock,
    fsync_dir,
    is_no_space,
    locked_work_dir,
    publish_bytes,
    remove_if_unlocked,
    storage_full,
    unlink_quietly,
)
from service.store.conversions import ConversionCache, ConvertedBlob
from service.store.ids import is_id, is_id_prefix, validate_id, validate_name, validate_new_name
from service.store.inspection import inspect_checkpoint
from service.store.types import (
    LINEAGE_OPERATIONS,
    ArtifactMeta,
    IngestResult,
    Inspection,
    Inspector,
    Lineage,
    Page,
    VerifyBlobResult,
)
from service.store.upload import Chunk, PendingUpload

log = logging.getLogger("ckpt.store")
_MARKER = "ckpt-store.json"
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_MAX_LABELS = 64
_MAX_LABEL_VALUE = 256
_MAX_FILENAME = 1024
_MAX_LIMIT = 1000
# The manifest cache holds at most this many tensor entries (a few hundred bytes each) and manifests.
_MANIFEST_CACHE_KEYS = 400_000
_MANIFEST_CACHE_ITEMS = 256
_LOADED_CACHE_ITEMS = 4
_LOADED_CACHE_KEYS = 200_000


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
    bad = [k for k in out if not isinstance(k, str) or _LABEL_KEY.fullmatch(k) is None]
    if bad:
        raise InvalidRequest(f"invalid label keys (need {_LABEL_KEY.pattern}): {quote_keys(map(str, bad))}")
    bad = [k for k, v in out.items() if not isinstance(v, str) or len(v) > _MAX_LABEL_VALUE]
    if bad:
        raise InvalidRequest(f"label values must be strings of at most {_MAX_LABEL_VALUE} characters: "
                             f"{quote_keys(bad)}")
    return out


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


class ArtifactStore:
    """A content-addressed directory of checkpoints: the id of an artifact is the sha256 of its bytes.

    Publication order is blob, then manifest, then metadata; the metadata file is the publication point, so
    a reader never sees an artifact whose bytes or manifest are incomplete. A stored blob is read-only and
    never rewritten or truncated (another process may have it mmapped). Several processes may share one
    root: writers of one artifact serialise on a flock (striped by the id's first byte), temp files are
    flock'ed by their writer, and every publication step is a link or a rename.
    """

    LAYOUT_VERSION = 1

    def __init__(
        self,
        root: Path,
        *,
        inspector: Inspector | None = None,
        tmp_grace_seconds: float = 3600,
        conversion_cache_bytes: int = 8 << 30,
        conversion_cache_max_age_seconds: float = 7 * 86400,
        limits: ArchiveLimits | None = None,
    ) -> None:
        """Open (and create if needed) a store.

        Args:
            root: The store directory.
            inspector: Parses an upload into an `Inspection`; defaults to `inspect_checkpoint`, in-process, with
                `limits`.
            tmp_grace_seconds: Age after which unlocked temp files and orphan blobs are garbage.
            conversion_cache_bytes: Size bound of the conversion cache (`convert`), kept by `collect_garbage`.
            conversion_cache_max_age_seconds: Conversions unused this long are removed by `collect_garbage`.
            limits: The parse limits of the default inspector and of every load of a stored blob
                (`CKPT_MAX_KEYS`, archive limits); their expansion bound also holds every safetensors file the
                store writes (`store_state_dict`, `convert`).

        Raises:
            StoreError: The directory holds a store of a newer layout version, or its marker is unreadable.
        """
        self.root = Path(root)
        self.limits = limits if limits is not None else ArchiveLimits()
        self._inspector: Inspector = (
            inspector if inspector is not None else functools.partial(inspect_checkpoint, limits=self.limits)
        )
        # Parsed manifests by id. An artifact's manifest never changes (it describes immutable bytes), so a
        # cached one stays right; a diff of two 20k-key checkpoints then parses no JSON at all.
        self._manifest_cache: OrderedDict[str, Manifest] = OrderedDict()
        self._manifest_cache_keys = 0
        self._manifest_cache_lock = threading.Lock()
        # Recent memory-mapped loads by (id, safe globals); see `load`.
        self._loaded_cache: OrderedDict[tuple[str, tuple[str, ...], str | None], LoadedCheckpoint] = OrderedDict()
        self.tmp_grace_seconds = float(tmp_grace_seconds)
        self._blobs = self.root / "blobs"
        self._manifests = self.root / "manifests"
        self._meta = self.root / "meta"
        self._names = self.root / "names"
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._check_marker()
            for d in (self._blobs, self._manifests, self._meta, self._names, self._tmp, self._locks):
                d.mkdir(exist_ok=True)
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

    # ---- layout -------------------------------------------------------------------------------------------

    def _check_marker(self) -> None:
        marker = self.root / _MARKER
        if not marker.exists():
            data = {"kind": "ckpt-service artifact store", "layout_version": self.LAYOUT_VERSION}
            tmp = self.root / "tmp"
            tmp.mkdir(exist_ok=True)
            publish_bytes(tmp, marker, _dump(data), mode=0o444, replace=False)  # link: a racing creator wins
        try:
            version = json.loads(marker.read_bytes())["layout_version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"unreadable store marker {_MARKER!r}") from exc
        if not isinstance(version, int) or version > self.LAYOUT_VERSION:
            raise StoreError(
                f"the store at {str(self.root)!r} has layout version {version!r}; this service supports "
                f"up to {self.LAYOUT_VERSION}"
            )

    # Paths: only ever built from a validated id or name.
    def _blob(self, artifact_id: str) -> Path:
        return self._blobs / artifact_id[:2] / artifact_id

    def _manifest_file(self, artifact_id: str) -> Path:
        return self._manifests / artifact_id[:2] / f"{artifact_id}.json"

    def _meta_file(self, artifact_id: str) -> Path:
        return self._meta / artifact_id[:2] / f"{artifact_id}.json"

    def _name_file(self, name: str) -> Path:
        return self._names / name

    def _id_lock(self, artifact_id: str) -> AbstractContextManager[None]:
        # Striped by the first byte: bounded lock files, and writers of one id always meet on the same lock.
        return file_lock(self._locks / f"{artifact_id[:2]}.lock")

    def _names_lock(self) -> AbstractContextManager[None]:
        return file_lock(self._locks / "names.lock")

    # ---- reading ------------------------------------------------------------------------------------------

    def _read_meta(self, artifact_id: str) -> ArtifactMeta | None:
        try:
            raw = self._meta_file(artifact_id).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return ArtifactMeta.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"corrupt metadata for artifact {artifact_id}") from exc

    def _require_meta(self, artifact_id: str) -> ArtifactMeta:
        meta = self._read_meta(validate_id(artifact_id))
        if meta is None:
            raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id)
        return meta

    def _read_names(self) -> dict[str, str]:
        out: dict[str, str] = {}
        try:
            entries = list(os.scandir(self._names))
        except FileNotFoundError:
            return out
        for entry in entries:
            try:
                validate_name(entry.name)
            except InvalidReference:
                continue  # a stray file: never a name we wrote
            try:
                target = Path(entry.path).read_text().strip()
            except FileNotFoundError:
                continue
            if is_id(target):
                out[entry.name] = target
        return out

    def _with_names(self, meta: ArtifactMeta, names: Mapping[str, str] | None = None) -> ArtifactMeta:
        names = self._read_names() if names is None else names
        own = tuple(sorted(n for n, i in names.items() if i == meta.id))
        return replace(meta, names=own)

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
        try:
            entries = os.listdir(self._meta / prefix[:2])
        except FileNotFoundError:
            entries = []
        found = sorted(
            stem for stem, ext in map(os.path.splitext, entries) if ext == ".json" and is_id(stem)
            and stem.startswith(prefix)
        )
        if not found:
            raise ArtifactNotFound(f"no artifact id starts with {prefix!r}, and no name {prefix!r}", ref=prefix)
        if len(found) > 1:
            shown = ", ".join(f[:16] for f in found[:10])
            raise AmbiguousReference(
                f"{len(found)} artifact ids start with {prefix!r} ({shown}); give more digits", ref=prefix,
                candidates=found[:100],
            )
        return found[0]

    def hex_names(self) -> builtins.list[str]:
        """Names made only of 8 or more hex digits (allowed before short ids; they still win over a prefix).

        Returns:
            Those names, sorted.
        """
        return sorted(n for n in self._read_names() if is_id_prefix(n))

    def exists(self, artifact_id: str) -> bool:
        """Tell whether an artifact is published.

        Args:
            artifact_id: A 64-hex id.

        Returns:
            True when its metadata (the publication point) exists.

        Raises:
            InvalidReference: Not a well-formed id.
        """
        return self._meta_file(validate_id(artifact_id)).exists()

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
        return self._with_names(self._require_meta(artifact_id))

    def manifest(self, artifact_id: str) -> Manifest:
        """Read the manifest kept beside the blob (the blob is not opened).

        Args:
            artifact_id: A 64-hex id.

        Returns:
            The manifest computed at ingest. One written with an older fingerprint version is brought up to date
            on first use (`_upgrade_manifest`), so that it compares right with manifests written now.

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact.
        """
        # Existence only: the metadata may carry a large lineage report that is not needed here.
        if not self.exists(artifact_id):
            raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id)
        with self._manifest_cache_lock:
            cached = self._manifest_cache.get(artifact_id)
            if cached is not None:
                self._manifest_cache.move_to_end(artifact_id)
        if cached is None:
            try:
                cached = Manifest.from_dict(json.loads(self._manifest_file(artifact_id).read_bytes()))
            except FileNotFoundError as exc:
                raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id) from exc
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(f"corrupt manifest for artifact {artifact_id}") from exc
            if cached.fingerprint_version < CURRENT_FINGERPRINT_VERSION:
                cached = self._upgrade_manifest(artifact_id, cached)
            self._cache_manifest(artifact_id, cached)
        # A copy of the entry table: callers may change theirs without touching the cache.
        return Manifest(dict(cached.entries), cached.schema_fingerprint, cached.fingerprint_version)

    def _upgrade_manifest(self, artifact_id: str, manifest: Manifest) -> Manifest:
        # Version 1 hashed a quantized tensor's int_repr only; every other tensor hashes the same in version 2, so
        # only quantized entries are recomputed (from the blob) and only then is the file rewritten.
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
        with self._id_lock(artifact_id):
            if self._read_meta(artifact_id) is not None:  # not deleted meanwhile
                publish_bytes(self._tmp, self._manifest_file(artifact_id), _dump(upgraded.to_dict()), mode=0o444,
                              replace=True)
        log.info("recomputed %d quantized fingerprints of artifact %s", len(stale), artifact_id)
        return upgraded

    def _cache_manifest(self, artifact_id: str, manifest: Manifest) -> None:
        with self._manifest_cache_lock:
            old = self._manifest_cache.pop(artifact_id, None)
            if old is not None:
                self._manifest_cache_keys -= len(old.entries)
            self._manifest_cache[artifact_id] = manifest
            self._manifest_cache_keys += len(manifest.entries)
            cache = self._manifest_cache
            while len(cache) > 1 and (self._manifest_cache_keys > _MANIFEST_CACHE_KEYS
                                      or len(cache) > _MANIFEST_CACHE_ITEMS):
                _, evicted = cache.popitem(last=False)
                self._manifest_cache_keys -= len(evicted.entries)

    def _forget_manifest(self, artifact_id: str) -> None:
        with self._manifest_cache_lock:
            # a deleted blob stays mapped (and its disk space taken) while a cached load holds it
            for key in [k for k in self._loaded_cache if k[0] == artifact_id]:
                del self._loaded_cache[key]
            old = self._manifest_cache.pop(artifact_id, None)
            if old is not None:
                self._manifest_cache_keys -= len(old.entries)

    def blob_path(self, artifact_id: str) -> Path:
        """The path of an artifact's bytes, for mmap loading. The file is read-only; never write to it.

        Args:
            artifact_id: A 64-hex id.

        Returns:
            The blob path.

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact.
        """
        self._require_meta(artifact_id)
        return self._blob(artifact_id)

    def open_blob(self, artifact_id: str) -> BinaryIO:
        """Open an artifact's bytes for streaming. The caller closes the file.

        Args:
            artifact_id: A 64-hex id.

        Returns:
            A binary file opened for reading.

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact (also when it is deleted concurrently).
        """
        path = self.blob_path(artifact_id)
        try:
            return open(path, "rb")
        except FileNotFoundError as exc:
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
        path = self._blob(artifact_id)
        use_mmap = mmap  # a format that cannot be mapped (legacy .pth) loads unmapped, and is not cached
        if not path.exists():
            raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id)
        chosen = container_key if container_key is not None else meta.container_key
        key = (artifact_id, tuple(safe_globals), chosen)
        with self._manifest_cache_lock:
            hit = self._loaded_cache.get(key) if use_mmap else None
            if hit is not None:
                self._loaded_cache.move_to_end(key)
        if hit is not None:
            return replace(hit, state_dict=_shallow_copy(hit.state_dict))
        loaded = load_checkpoint(
            path, mmap=use_mmap, container_key=chosen, safe_globals=safe_globals, limits=self.limits
        )
        if loaded.mmapped:
            # torch.load costs ~100 us a tensor, and the original of a merge is loaded again for every trained
            # checkpoint merged into it. A mapped load holds no tensor memory of its own (the pages are the
            # blob's page cache), and the blob never changes, so recent ones are kept, bounded by tensor count.
            with self._manifest_cache_lock:
                self._loaded_cache[key] = loaded
                cache = self._loaded_cache
                while len(cache) > 1 and (len(cache) > _LOADED_CACHE_ITEMS
                                          or sum(len(c.state_dict) for c in cache.values()) > _LOADED_CACHE_KEYS):
                    cache.popitem(last=False)
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

    def verify(self, artifact_id: str) -> VerifyBlobResult:
        """Re-hash a blob to detect corruption on disk.

        Args:
            artifact_id: A 64-hex id.

        Returns:
            Whether the bytes still hash to the id and have the recorded size, with the actual digest.

        Raises:
            InvalidReference: Not a well-formed id.
            ArtifactNotFound: No such artifact.
        """
        meta = self._require_meta(artifact_id)
        digest = hashlib.sha256()
        size = 0
        with self.open_blob(artifact_id) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        actual = digest.hexdigest()
        return VerifyBlobResult(id=artifact_id, ok=actual == artifact_id and size == meta.size,
                                actual_sha256=actual, expected_size=meta.size, actual_size=size)

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
        names = self._read_names()
        wanted_id: str | None = None
        if name is not None:
            wanted_id = names.get(validate_name(name))
            if wanted_id is None:
                return Page(items=[], next_cursor=None, total=0)
        label_key, label_value = _label_filter(label) if label is not None else ("", None)
        matches: builtins.list[ArtifactMeta] = []
        for meta in self._iter_meta(wanted_id):
            if label is not None and (
                label_key not in meta.labels
                or (label_value is not None and meta.labels[label_key] != label_value)
            ):
                continue
            if operation is not None and (meta.lineage is None or meta.lineage.operation != operation):
                continue
            if format is not None and meta.format != format:
                continue
            matches.append(meta)
        matches.sort(key=lambda m: (m.created, m.id), reverse=True)
        start = 0
        if after is not None:
            start = next((i for i, m in enumerate(matches) if (m.created, m.id) < after), len(matches))
        page = matches[start:start + limit]
        more = start + limit < len(matches)
        return Page(
            items=[self._with_names(m, names) for m in page],
            next_cursor=_encode_cursor(page[-1]) if more and page else None,
            total=len(matches),
        )

    def _iter_meta(self, only: str | None = None) -> Iterator[ArtifactMeta]:
        if only is not None:
            meta = self._read_meta(only)
            if meta is not None:
                yield meta
            return
        for shard in sorted(os.scandir(self._meta), key=lambda e: e.name):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for entry in sorted(os.scandir(shard.path), key=lambda e: e.name):
                stem, ext = os.path.splitext(entry.name)
                if ext != ".json" or not is_id(stem):
                    continue
                meta = self._read_meta(stem)  # None: deleted meanwhile
                if meta is not None:
                    yield meta

    # ---- writing ------------------------------------------------------------------------------------------

    def open_upload(self, *, max_bytes: int | None = None) -> PendingUpload:
        """Start a streaming upload into a flock'ed temp file inside the root.

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
            The artifact and whether it was created. For bytes already stored nothing is rewritten, and
            the new filename, labels and lineage are ignored.

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
            existing = self._read_meta(artifact_id)
            if existing is not None:
                return IngestResult(self._with_names(existing), created=False)
            if inspection is None:
                inspection = self._inspector(upload.path)
            return self._publish(artifact_id, upload.path, upload.fd, upload.size, inspection,
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
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                existing = self._read_meta(artifact_id)
                if existing is not None:
                    return IngestResult(self._with_names(existing), created=False)
                if manifest is not None:
                    # safetensors has no place for `_metadata`; torch.save keeps it
                    has_md = writer.holds_module_metadata and has_metadata(state_dict)
                    inspection = Inspection(format=writer.name, container_key=None, extras={}, has_metadata=has_md,
                                            manifest=manifest)
                else:
                    inspection = self._inspector(path)
                return self._publish(artifact_id, path, fd, size, inspection, filename=filename_,
                                     labels=labels_, lineage=lineage_)
            finally:
                os.close(fd)

    def _publish(
        self,
        artifact_id: str,
        src: Path,
        src_fd: int,
        size: int,
        inspection: Inspection,
        *,
        filename: str | None,
        labels: dict[str, str],
        lineage: Lineage | None,
    ) -> IngestResult:
        blob = self._blob(artifact_id)
        manifest_file = self._manifest_file(artifact_id)
        meta_file = self._meta_file(artifact_id)
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
            extras=dict(inspection.extras),
            labels=labels,
            lineage=lineage,
            candidates=dict(inspection.candidates),
        )
        record = meta.to_dict()
        del record["names"]  # names live under names/ and are joined in on read
        meta_bytes = _dump(record)
        manifest_bytes = _dump(inspection.manifest.to_dict())
        with self._id_lock(artifact_id):
            existing = self._read_meta(artifact_id)
            if existing is not None:  # another process published the same bytes first
                return IngestResult(self._with_names(existing), created=False)
            wrote_blob = False
            try:
                for d in (blob.parent, manifest_file.parent, meta_file.parent):
                    d.mkdir(exist_ok=True)
                os.fchmod(src_fd, 0o444)  # read-only before it gets its public name
                os.fsync(src_fd)
                try:
                    os.link(src, blob)  # never clobbers
                except FileExistsError:
                    # No metadata under our lock: a leftover of a crash or of an interrupted delete. Our bytes
                    # are durable and hash to the id, so they take its place (a rename leaves readers intact).
                    os.replace(src, blob)
                wrote_blob = True
                fsync_dir(blob.parent)
                publish_bytes(self._tmp, manifest_file, manifest_bytes, mode=0o444, replace=True)
                # the publication point: from here on the artifact exists
                publish_bytes(self._tmp, meta_file, meta_bytes, mode=0o444, replace=False)
            except BaseException as exc:
                if wrote_blob:
                    unlink_quietly(blob)
                    unlink_quietly(manifest_file)
                if isinstance(exc, OSError) and is_no_space(exc):
                    raise storage_full(exc) from exc
                raise
        self._cache_manifest(artifact_id, Manifest(dict(inspection.manifest.entries),
                                                   inspection.manifest.schema_fingerprint))
        return IngestResult(self._with_names(meta), created=True)

    def delete(self, artifact_id: str, *, force: bool = False) -> builtins.list[str]:
        """Delete an artifact: metadata first (unpublish), then manifest and blob (unlinked, never truncated).

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
        with ExitStack() as stack:
            stack.enter_context(self._id_lock(artifact_id))  # lock order: id stripe, then names
            stack.enter_context(self._names_lock())
            if not self._meta_file(artifact_id).exists():
                raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id)
            pointing = sorted(n for n, i in self._read_names().items() if i == artifact_id)
            if pointing and not force:
                raise ArtifactInUse(f"names point to artifact {artifact_id}: {quote_keys(pointing)}",
                                    names=pointing)
            for n in pointing:
                unlink_quietly(self._name_file(n))
            if pointing:
                fsync_dir(self._names)
            unlink_quietly(self._meta_file(artifact_id))
            fsync_dir(self._meta_file(artifact_id).parent)
            self._forget_manifest(artifact_id)
            unlink_quietly(self._manifest_file(artifact_id))
            unlink_quietly(self._blob(artifact_id))
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
            StorageFull: No space for the name file.
        """
        self.check_settable_name(name)
        validate_id(artifact_id)
        with self._names_lock():
            if not self.exists(artifact_id):
                raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id)
            publish_bytes(self._tmp, self._name_file(name), f"{artifact_id}\n".encode(), mode=0o644,
                          replace=True)

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
        if not self._name_file(name).exists():
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
        validate_name(name)
        try:
            target = self._name_file(name).read_text().strip()
        except FileNotFoundError as exc:
            raise NameNotFound(f"no name {name!r}", name=name) from exc
        if not is_id(target):
            raise StoreError(f"corrupt name file for {name!r}")
        return target

    def delete_name(self, name: str) -> None:
        """Remove a name; the artifact stays.

        Args:
            name: A valid name.

        Raises:
            InvalidReference: Not a valid name.
            NameNotFound: No such name.
        """
        validate_name(name)
        with self._names_lock():
            try:
                os.unlink(self._name_file(name))
            except FileNotFoundError as exc:
                raise NameNotFound(f"no name {name!r}", name=name) from exc
            fsync_dir(self._names)

    def names(self) -> dict[str, str]:
        """All names.

        Returns:
            name -> artifact id, sorted by name.
        """
        return dict(sorted(self._read_names().items()))

    # ---- maintenance --------------------------------------------------------------------------------------

    def collect_garbage(self, *, grace_seconds: float | None = None) -> int:
        """Remove crash leftovers: unlocked temp files and orphan blobs/manifests older than the grace period.

        A live upload (its writer holds the flock) is never removed, whatever its age. The conversion cache
        is trimmed too: conversions of deleted artifacts, unused past their maximum age, and the least recently
        used past its size bound.

        Args:
            grace_seconds: Minimum age (by mtime); defaults to the store's `tmp_grace_seconds`.

        Returns:
            How many files or directories were removed.
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
        for kind_dir, suffix in ((self._blobs, ""), (self._manifests, ".json")):
            for shard in list(os.scandir(kind_dir)):
                if not shard.is_dir(follow_symlinks=False):
                    continue
                for entry in list(os.scandir(shard.path)):
                    stem = entry.name[: len(entry.name) - len(suffix)] if suffix else entry.name
                    if not entry.name.endswith(suffix) or not is_id(stem) or stem[:2] != shard.name:
                        continue
                    if self._meta_file(stem).exists():
                        continue
                    with self._id_lock(stem):  # a publish in progress holds it and finishes first
                        try:
                            if self._meta_file(stem).exists() or os.lstat(entry.path).st_mtime > cutoff:
                                continue
                            os.unlink(entry.path)
                            removed += 1
                        except FileNotFoundError:
                            continue
        removed += self.conversions.trim(exists=self.exists)
        return removed

