"""Backup and restore of a whole store: the index as portable JSON lines, and the blobs it references.

A backup directory holds ``index.jsonl`` (every row of the index, from one read snapshot), ``blobs/<id[:2]>/<id>``
and, written last, ``ckpt-backup.json`` (format, counts): a directory without it is an interrupted backup, and
restore refuses it. The dump is the same for SQLite and PostgreSQL, so a backup restores into either (how a team
moves from the embedded index to a server); docs/artifact-store.md says why this and not `VACUUM INTO`/`pg_dump`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import ArtifactNotFound, StoreError
from service.store.ids import is_id
from service.store.index.sql import now
from service.store.store import ArtifactStore

log = logging.getLogger("ckpt.store.backup")

BACKUP_FORMAT = 1
MANIFEST_FILE = "ckpt-backup.json"
INDEX_FILE = "index.jsonl"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class BackupReport:
    """What a backup or a restore copied."""

    directory: str
    artifacts: int
    names: int
    specs: int
    blob_bytes: int
    # artifacts deleted between the index snapshot and the copy of their blob: left out of the backup
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "artifacts": self.artifacts,
            "names": self.names,
            "specs": self.specs,
            "blob_bytes": self.blob_bytes,
            "skipped": list(self.skipped),
        }


def _blob_file(directory: Path, digest: str) -> Path:
    return directory / "blobs" / digest[:2] / digest


def backup_store(store: ArtifactStore, directory: Path) -> BackupReport:
    """Copy a consistent snapshot of the store into a new, empty directory.

    Args:
        store: The store to back up (it keeps serving meanwhile).
        directory: Where to write; must not exist or be empty.

    Returns:
        What was copied.

    Raises:
        StoreError: `directory` is not empty.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise StoreError(f"the backup directory {str(directory)!r} is not empty")
    records = list(store.index.dump())  # one snapshot; rows are small (manifests are the largest)
    ids = [r["row"]["id"] for r in records if r["table"] == "artifacts"]
    skipped: set[str] = set()
    blob_bytes = 0
    for digest in ids:
        target = _blob_file(directory, digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with store.blobs.open(digest) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
                out.flush()
                os.fsync(out.fileno())
                blob_bytes += out.tell()
        except ArtifactNotFound:
            skipped.add(digest)  # deleted since the snapshot
            target.unlink(missing_ok=True)
    kept = [r for r in records if _artifact_of(r) not in skipped]
    with open(directory / INDEX_FILE, "w", encoding="utf-8") as out:
        for record in kept:
            out.write(json.dumps(record, sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())
    report = BackupReport(
        directory=str(directory),
        artifacts=sum(r["table"] == "artifacts" for r in kept),
        names=sum(r["table"] == "names" for r in kept),
        specs=sum(r["table"] == "architectures" for r in kept),
        blob_bytes=blob_bytes,
        skipped=sorted(skipped),
    )
    summary = {"format": BACKUP_FORMAT, "created": now(), "index": store.index.dialect, **report.to_dict()}
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST_FILE)  # the backup is complete from here on
    return report


def _artifact_of(record: dict[str, Any]) -> str | None:
    row = record["row"]
    if record["table"] == "artifacts":
        return str(row["id"])
    if record["table"] == "architectures":
        return None
    return str(row["artifact_id"])


def _records(directory: Path) -> Iterator[dict[str, Any]]:
    with open(directory / INDEX_FILE, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def restore_store(store: ArtifactStore, directory: Path) -> BackupReport:
    """Restore a backup into an empty store: blobs first (each re-hashed on the way), then the index rows.

    Args:
        store: An empty store (no artifacts).
        directory: A complete backup (`backup_store`).

    Returns:
        What was restored.

    Raises:
        StoreError: The backup is incomplete or of an unknown format, a blob is missing or damaged, or the store
            is not empty.
    """
    directory = Path(directory)
    try:
        summary = json.loads((directory / MANIFEST_FILE).read_text())
    except FileNotFoundError as exc:
        raise StoreError(f"{str(directory)!r} holds no complete backup (no {MANIFEST_FILE})") from exc
    if summary.get("format") != BACKUP_FORMAT:
        raise StoreError(f"unknown backup format {summary.get('format')!r}")
    with store.index.maintenance_lock():
        if store.index.count():
            raise StoreError("the store is not empty; restore only into an empty store")
        blob_bytes = 0
        ids = [str(r["row"]["id"]) for r in _records(directory) if r["table"] == "artifacts"]
        for digest in ids:
            if not is_id(digest):
                raise StoreError(f"the backup names an invalid artifact id {digest[:80]!r}")
            try:
                with open(_blob_file(directory, digest), "rb") as src:
                    store.blobs.put_stream(digest, src)  # checks the sha256
                    blob_bytes += src.tell()
            except FileNotFoundError as exc:
                raise StoreError(f"the backup lacks the blob of artifact {digest}") from exc
        store.index.load(_records(directory))
    log.info("restored %d artifacts from %s", len(ids), directory)
    return BackupReport(
        directory=str(directory),
        artifacts=len(ids),
        names=int(summary.get("names", 0)),
        specs=int(summary.get("specs", 0)),
        blob_bytes=blob_bytes,
    )
