"""The metadata index: artifacts, names, labels, lineage, manifests and architecture specs, in SQL.

SQLite embedded in the data directory by default; PostgreSQL with ``CKPT_DATABASE_URL=postgresql://...``.
"""

from __future__ import annotations

from pathlib import Path

from service.store.index.schema import SCHEMA_VERSION
from service.store.index.sql import SQLITE_FILE, ListFilters, MetadataIndex, redact

__all__ = ["SCHEMA_VERSION", "SQLITE_FILE", "ListFilters", "MetadataIndex", "open_index", "redact"]


def open_index(root: Path, database_url: str | None = None) -> MetadataIndex:
    """The index of the store at `root`: `database_url`, or SQLite in `root` when None. Not migrated yet."""
    root = Path(root)
    url = database_url or f"sqlite:///{(root / SQLITE_FILE).resolve()}"
    return MetadataIndex(url, lock_dir=root / "locks")
