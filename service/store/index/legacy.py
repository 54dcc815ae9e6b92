"""The import of a data directory of layout 1 (metadata as write-once JSON files) into the index.

Layout 1, as every version before the index wrote it: ``meta/<id[:2]>/<id>.json`` (the publication point),
``manifests/<id[:2]>/<id>.json``, ``names/<name>`` (the id and a newline) and ``architectures/<name>.json`` (the
registry's specs). Blobs stay where they are: `LocalBlobStore` keeps their layout.

The import runs on the first start, under the index's maintenance lock (two processes starting at once import
once), and is crash-safe: every step is idempotent (rows already present are skipped, names are upserted), and
the index records that the import is done only after the last row. The old files are then moved to
``legacy-v1/`` (kept for a downgrade or an audit; delete it when satisfied) and the marker says layout 2.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.store.ids import is_id
from service.store.index.sql import MetadataIndex
from service.store.types import ArtifactMeta

log = logging.getLogger("ckpt.store.migrate")

LEGACY_DIRS = ("meta", "manifests", "names", "architectures")
LEGACY_ARCHIVE = "legacy-v1"
DONE_KEY = "legacy_import"
_BATCH = 200
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def has_legacy_files(root: Path) -> bool:
    """Whether `root` still holds metadata of layout 1 (not yet moved to legacy-v1/)."""
    return any((root / d).is_dir() for d in LEGACY_DIRS)


def _metas(root: Path) -> Iterator[tuple[ArtifactMeta, dict[str, Any]]]:
    for meta_file in sorted((root / "meta").glob("*/*.json")):
        artifact_id = meta_file.stem
        if not is_id(artifact_id) or meta_file.parent.name != artifact_id[:2]:
            continue
        try:
            meta = ArtifactMeta.from_dict(json.loads(meta_file.read_bytes()))
            manifest = json.loads((root / "manifests" / artifact_id[:2] / f"{artifact_id}.json").read_bytes())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("not imported: artifact %s has unreadable metadata or manifest (%s)", artifact_id, exc)
            continue
        if meta.id != artifact_id or not isinstance(manifest, dict):
            log.error("not imported: %s holds the metadata of %r", meta_file, meta.id)
            continue
        yield meta, manifest


def _names(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    directory = root / "names"
    if not directory.is_dir():
        return out
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if not entry.name[:1].isalnum() or not set(entry.name) <= _NAME_CHARS:
            continue  # a temp or stray file: never a name the store wrote
        try:
            target = Path(entry.path).read_text().strip()
        except OSError:
            continue
        if is_id(target):
            out[entry.name] = target
    return out


def _specs(root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted((root / "architectures").glob("*.json")):
        name = path.name[: -len(".json")]
        if not name[:1].isalnum():
            continue  # temp files start with "."
        try:
            document = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            log.error("not imported: architecture spec %s is unreadable (%s)", path.name, exc)
            continue
        if isinstance(document, dict):
            yield name, document  # the registry validates it when it reads it, and reports a bad one


def import_legacy(root: Path, index: MetadataIndex) -> int:
    """Import the layout-1 metadata under `root` into `index`, once; then archive the old files.

    Returns:
        How many artifacts this call imported (0 when another process did, or when there was nothing).
    """
    with index.maintenance_lock():
        imported = 0
        if index.get_state(DONE_KEY) is None:
            batch: list[tuple[ArtifactMeta, dict[str, Any]]] = []
            for item in _metas(root):
                batch.append(item)
                if len(batch) >= _BATCH:
                    imported += index.insert_many(batch)
                    batch = []
            imported += index.insert_many(batch)
            index.set_names(_names(root))
            for name, document in _specs(root):
                index.insert_spec(name, document)
            index.set_state(DONE_KEY, "done")
            log.info("imported %d artifacts of a layout-1 data directory into the index", imported)
        archive = root / LEGACY_ARCHIVE
        for directory in LEGACY_DIRS:
            if (root / directory).is_dir():
                archive.mkdir(exist_ok=True)
                target = archive / directory
                if target.exists():  # a second import of a restored old layout: keep both
                    target = archive / f"{directory}-{os.getpid()}-{int(os.times().elapsed * 1000)}"
                os.rename(root / directory, target)
        return imported
