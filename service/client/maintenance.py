"""`ckpt backup` and `ckpt restore`: run on the service's machine, against its data directory and index.

Like `ckpt serve` they open the store themselves (settings from CKPT_* variables, flags override), so they import
the service (and torch) only when they run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_maintenance_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    for name, func, text in (
        ("backup", run_backup, "copy a consistent snapshot of the store (index + blobs) into an empty DIR"),
        ("restore", run_restore, "restore a backup DIR into an empty store"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ". Runs where the data is; "
                           "settings from CKPT_* variables, flags override.")
        p.add_argument("directory", metavar="DIR")
        p.add_argument("--data-dir", help="the store's data directory (default ./data, CKPT_DATA_DIR)")
        p.add_argument("--database-url", help="the index (default: SQLite in the data directory, CKPT_DATABASE_URL)")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        p.set_defaults(func=func)


def _open_store(args: argparse.Namespace) -> Any:
    from service.config import Settings
    from service.store import ArtifactStore
    from service.store.blobs import open_blob_store

    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides["data_dir"] = Path(args.data_dir)
    if args.database_url:
        overrides["database_url"] = args.database_url
    settings = Settings(**overrides)
    blobs = open_blob_store(settings.storage_url, settings.data_dir, cache_dir=settings.s3_cache_dir,
                            cache_bytes=settings.s3_cache_bytes)
    return ArtifactStore(settings.data_dir, database_url=settings.database_url, blobs=blobs)


def _report(args: argparse.Namespace, verb: str, report: Any) -> None:
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return
    print(f"{verb} {report.artifacts} artifacts, {report.names} names, {report.specs} architecture specs, "
          f"{report.blob_bytes} bytes of blobs ({report.directory})")
    if report.skipped:
        print(f"left out (deleted during the backup): {', '.join(report.skipped)}")


def _run(args: argparse.Namespace, verb: str) -> int:
    from service.errors import CheckpointServiceError
    from service.store.backup import backup_store, restore_store

    try:
        store = _open_store(args)
        try:
            action = backup_store if verb == "backed up" else restore_store
            _report(args, verb, action(store, Path(args.directory)))
        finally:
            store.close()
    except CheckpointServiceError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    return 0


def run_backup(args: argparse.Namespace) -> int:
    return _run(args, "backed up")


def run_restore(args: argparse.Namespace) -> int:
    return _run(args, "restored")
