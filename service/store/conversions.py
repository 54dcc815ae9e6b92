"""The conversion cache: an artifact's bytes in another format, kept beside the store and never listed.

A download with `?format=` is a read: it must not add an artifact. The converted bytes live under
`<root>/cache/conversions/<id[:2]>/<id>.<format>` with a record `<id>.<format>.json` that holds their sha256
and size (the download's ETag and `X-Checkpoint-Id`), so a repeated request reads one small JSON file and does
no conversion work. Entries are disposable: garbage collection drops the least recently used ones past a size
bound, ones older than a maximum age, and ones whose artifact is gone.

Writes follow the store's rules: temp file in the store's `tmp/` (flock'ed, so crash leftovers are collected)
→ fsync → rename, then the record, published the same way; the record is the publication point.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.format_names import OUTPUT_FORMATS
from service.store._fs import (
    file_lock,
    fsync_dir,
    is_no_space,
    locked_work_dir,
    publish_bytes,
    storage_full,
    unlink_quietly,
)
from service.store.ids import is_id, validate_id

__all__ = ["ConversionCache", "ConvertedBlob"]

# An entry used this recently is never evicted: a download may be between finding it and opening it.
_IN_USE_SECONDS = 60.0


@dataclass(frozen=True)
class ConvertedBlob:
    """One cached conversion: where its bytes are and what they hash to."""

    source: str  # the artifact id it was converted from
    format: str  # one of OUTPUT_FORMATS
    sha256: str
    size: int
    path: Path


class ConversionCache:
    """Converted bytes by (artifact id, format), bounded by `max_bytes` and `max_age_seconds`.

    `conversions` counts the conversions this object ran (a cache hit runs none), for operators and tests.
    """

    def __init__(self, root: Path, *, tmp_dir: Path, max_bytes: int, max_age_seconds: float) -> None:
        """Open (and create) the cache directory.

        Args:
            root: The cache directory (`<store>/cache/conversions`).
            tmp_dir: The store's temp directory, on the same filesystem, swept by the store's GC.
            max_bytes: Size bound; GC evicts least recently used entries past it.
            max_age_seconds: Entries unused for longer are evicted.
        """
        self.root = Path(root)
        self._tmp = Path(tmp_dir)
        self._locks = self.root / "locks"
        self.max_bytes = int(max_bytes)
        self.max_age_seconds = float(max_age_seconds)
        self.conversions = 0
        self._count_lock = threading.Lock()
        self._locks.mkdir(parents=True, exist_ok=True)

    def _paths(self, artifact_id: str, fmt: str) -> tuple[Path, Path]:
        validate_id(artifact_id)
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        base = self.root / artifact_id[:2] / f"{artifact_id}.{fmt}"
        return base, base.with_name(base.name + ".json")

    def get(self, artifact_id: str, fmt: str) -> ConvertedBlob | None:
        """The cached conversion, marked as used now, or None."""
        blob, record = self._paths(artifact_id, fmt)
        try:
            data = json.loads(record.read_bytes())
            sha256, size = str(data["sha256"]), int(data["size"])
            if not is_id(sha256) or os.stat(blob).st_size != size:
                return None
            os.utime(record)  # the record's mtime is the entry's last use (LRU)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return ConvertedBlob(artifact_id, fmt, sha256, size, blob)

    def get_or_convert(
        self, artifact_id: str, fmt: str, convert: Callable[[Path], tuple[str, int]]
    ) -> ConvertedBlob:
        """The cached conversion, or run `convert(path)` once (across threads and processes) and cache it.

        Args:
            artifact_id: The source artifact's id.
            fmt: The target format.
            convert: Writes the converted bytes to the given path (fsynced) and returns their sha256 and size.

        Returns:
            The cached entry.

        Raises:
            StorageFull: No space for the converted bytes.
        """
        hit = self.get(artifact_id, fmt)
        if hit is not None:
            return hit
        blob, record = self._paths(artifact_id, fmt)
        # One converter per entry: the others wait here and then find it.
        with file_lock(self._locks / f"{artifact_id[:2]}.lock"):
            hit = self.get(artifact_id, fmt)
            if hit is not None:
                return hit
            with locked_work_dir(self._tmp, "conv-") as work:
                out = work / f"converted.{fmt}"
                try:
                    sha256, size = convert(out)
                    with self._count_lock:
                        self.conversions += 1
                    blob.parent.mkdir(exist_ok=True)
                    os.chmod(out, 0o444)
                    os.replace(out, blob)
                    fsync_dir(blob.parent)
                    body = json.dumps({"source": artifact_id, "format": fmt, "sha256": sha256, "size": size})
                    publish_bytes(self._tmp, record, body.encode(), mode=0o444, replace=True)
                except OSError as exc:
                    if is_no_space(exc):
                        raise storage_full(exc) from exc
                    raise
        self.trim()
        return ConvertedBlob(artifact_id, fmt, sha256, size, blob)

    def forget(self, artifact_id: str) -> None:
        """Drop every conversion of an artifact (it was deleted)."""
        for fmt in OUTPUT_FORMATS:
            blob, record = self._paths(artifact_id, fmt)
            unlink_quietly(record)  # unpublish first
            unlink_quietly(blob)

    def entries(self) -> list[tuple[float, int, Path, Path, str]]:
        """(last use, size, record, blob, source id) of every published entry."""
        out: list[tuple[float, int, Path, Path, str]] = []
        for shard in self._shards():
            for entry in list(os.scandir(shard)):
                if not entry.name.endswith(".json"):
                    continue
                stem = entry.name[: -len(".json")]
                source, _, fmt = stem.partition(".")
                if not is_id(source) or fmt not in OUTPUT_FORMATS:
                    continue
                blob = Path(shard) / stem
                try:
                    used = entry.stat(follow_symlinks=False).st_mtime
                    size = os.stat(blob, follow_symlinks=False).st_size
                except FileNotFoundError:
                    size = 0
                    used = 0.0
                out.append((used, size, Path(entry.path), blob, source))
        return out

    def _shards(self) -> list[str]:
        try:
            return [e.path for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False) and len(e.name) == 2]
        except FileNotFoundError:
            return []

    def trim(self, *, exists: Callable[[str], bool] | None = None) -> int:
        """Evict entries: those whose artifact is gone, unused past the maximum age, then LRU past the bound.

        Entries used in the last minute stay, whatever the bound (a download may be about to open one).

        Args:
            exists: Tells whether a source artifact still exists; None keeps every source.

        Returns:
            How many entries were removed.
        """
        now = time.time()
        removed = 0
        live: list[tuple[float, int, Path, Path, str]] = []
        for used, size, record, blob, source in self.entries():
            gone = exists is not None and not exists(source)
            if gone or now - used > self.max_age_seconds:
                self._evict(record, blob)
                removed += 1
            else:
                live.append((used, size, record, blob, source))
        total = sum(e[1] for e in live)
        for used, size, record, blob, _ in sorted(live):  # oldest use first
            if total <= self.max_bytes:
                break
            if now - used <= _IN_USE_SECONDS:
                continue
            self._evict(record, blob)
            total -= size
            removed += 1
        removed += self._sweep_orphans(now)
        return removed

    def _evict(self, record: Path, blob: Path) -> None:
        unlink_quietly(record)
        unlink_quietly(blob)

    def _sweep_orphans(self, now: float) -> int:
        # A blob whose record never got published (a crash between the two renames).
        removed = 0
        for shard in self._shards():
            with file_lock(self._locks / f"{Path(shard).name}.lock"):  # no converter is between its renames
                for entry in list(os.scandir(shard)):
                    if entry.name.endswith(".json") or os.path.exists(entry.path + ".json"):
                        continue
                    try:
                        if now - entry.stat(follow_symlinks=False).st_mtime <= _IN_USE_SECONDS:
                            continue
                    except FileNotFoundError:
                        continue
                    unlink_quietly(Path(entry.path))
                    removed += 1
        return removed

    @property
    def total_bytes(self) -> int:
        """Bytes held by published entries."""
        return sum(e[1] for e in self.entries())
