"""`MetadataIndex`: artifacts, names, labels, lineage, manifests and architecture specs in SQL.

One SQL layer (SQLAlchemy 2 Core) for both backends: SQLite, embedded in the data directory (WAL, write
transactions taken with ``BEGIN IMMEDIATE``), and PostgreSQL through psycopg 3 with a connection pool. Every change
is one transaction; the row of an artifact is its publication point.
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
import os
import secrets
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url

from service.errors import (
    ArtifactInUse,
    ArtifactNotFound,
    InvalidRequest,
    InvalidSettings,
    StorageFull,
    StoreError,
    quote_keys,
)
from service.store._fs import file_lock
from service.store.index.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    architectures,
    artifacts,
    blob_leases,
    labels,
    leases,
    lineage_inputs,
    manifests,
    names,
    schema_migrations,
    store_state,
)
from service.store.types import ArtifactMeta, LabelChanges, Lineage

log = logging.getLogger("ckpt.store.index")

SQLITE_FILE = "index.sqlite3"
# pg_advisory_lock(class, key): the class keeps our keys apart from any other user of the database.
_PG_LOCK_CLASS = 0x636B7074  # "ckpt"
_PG_MIGRATION_KEY = 0
_PG_MAINTENANCE_KEY = 1
_PG_GC_KEY = 2
_BATCH = 500  # ids per IN (...) list


def now() -> str:
    """The current time as the index stores it: ISO-8601 UTC with microseconds, sortable as text."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dump_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _chunks(items: Sequence[str], size: int = _BATCH) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def redact(url: str) -> str:
    """A database URL without its password, for logs and reports."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a malformed URL is reported by whoever parses it
        return "<unparseable database URL>"


@dataclass(frozen=True)
class ListFilters:
    """What `MetadataIndex.list` filters on (each None: no filter)."""

    artifact_id: str | None = None
    label_key: str | None = None
    label_value: str | None = None
    operation: str | None = None
    format: str | None = None


def _engine_url(url: str) -> sa.URL:
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return parsed
    raise InvalidSettings(
        f"CKPT_DATABASE_URL: unsupported database {parsed.drivername!r}; use sqlite:///PATH or postgresql://...",
        setting="CKPT_DATABASE_URL",
    )


def _dispose_after_fork(ref: weakref.ref[sa.Engine]) -> None:
    engine = ref()
    if engine is not None:
        engine.dispose(close=False)  # the parent's connections stay the parent's


class MetadataIndex:
    """The metadata of a store, in SQLite or PostgreSQL. Safe to share between threads and processes."""

    def __init__(self, url: str, *, lock_dir: Path | None = None) -> None:
        """Connect (lazily) to the database; `migrate` creates or upgrades its tables.

        Args:
            url: ``sqlite:///PATH`` or ``postgresql://USER@HOST:PORT/DB``.
            lock_dir: Where SQLite's cross-process locks live (flock files); defaults to the database's directory.

        Raises:
            InvalidSettings: The URL names an unsupported database or is malformed.
        """
        try:
            engine_url = _engine_url(url)
        except sa.exc.ArgumentError as exc:
            raise InvalidSettings(f"CKPT_DATABASE_URL: {exc}", setting="CKPT_DATABASE_URL") from exc
        self.url = engine_url.render_as_string(hide_password=False)
        self.dialect = "postgresql" if engine_url.drivername.startswith("postgresql") else "sqlite"
        if self.dialect == "sqlite":
            database = engine_url.database
            if not database or database == ":memory:":
                raise InvalidSettings("CKPT_DATABASE_URL: SQLite needs a file path", setting="CKPT_DATABASE_URL")
            self.path: Path | None = Path(database)
            self._lock_dir = Path(lock_dir) if lock_dir is not None else self.path.parent
            self._lock_dir.mkdir(parents=True, exist_ok=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(
                engine_url,
                connect_args={"timeout": 60, "check_same_thread": False},
                pool_size=8,
                max_overflow=16,
            )
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        else:
            self.path = None
            self._lock_dir = Path(lock_dir) if lock_dir is not None else Path(".")
            # Two connections per publication at most (its artifact lock and its write): a pool of 10 + 20.
            self.engine = sa.create_engine(engine_url, pool_size=10, max_overflow=20, pool_pre_ping=True)
        os.register_at_fork(after_in_child=functools.partial(_dispose_after_fork, weakref.ref(self.engine)))
        # A store that is dropped without close() still closes its connections (not at some later GC of the pool).
        weakref.finalize(self, self.engine.dispose)

    def close(self) -> None:
        """Close the pooled connections."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"MetadataIndex({redact(self.url)!r})"

    # ---- transactions and locks --------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        # One snapshot for every statement of the block (SQLite: a read transaction; PostgreSQL: repeatable read).
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        try:
            with self.engine.connect() as conn:
                if self.dialect == "sqlite":
                    conn = conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin():
                    yield conn
        except sa.exc.OperationalError as exc:
            if _is_full(exc):
                raise StorageFull(f"no space left for the index ({self.dialect}): the change was not made") from exc
            raise

    @contextmanager
    def _pg_lock(self, key: int) -> Iterator[None]:
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(sa.select(sa.func.pg_advisory_lock(_PG_LOCK_CLASS, key)))
            try:
                yield
            finally:
                conn.execute(sa.select(sa.func.pg_advisory_unlock(_PG_LOCK_CLASS, key)))

    def artifact_lock(self, artifact_id: str) -> AbstractContextManager[None]:
        """Serialise the writers of one artifact id, across processes and (PostgreSQL) machines.

        Publication (blob, then row), deletion (row, then blob) and orphan collection of one id take it, so that a
        row never outlives its blob. Striped by the id's first byte: a bounded number of locks.
        """
        if self.dialect == "postgresql":
            return self._pg_lock(0x100 + int(artifact_id[:2], 16))
        return file_lock(self._lock_dir / f"{artifact_id[:2]}.lock")

    def gc_lock(self) -> AbstractContextManager[None]:
        """One retention GC at a time across processes and replicas (the others wait, then find little to do)."""
        if self.dialect == "postgresql":
            return self._pg_lock(_PG_GC_KEY)
        return file_lock(self._lock_dir / "gc.lock")

    def maintenance_lock(self) -> AbstractContextManager[None]:
        """One holder at a time across processes: the import of an old data directory, restores."""
        if self.dialect == "postgresql":
            return self._pg_lock(_PG_MAINTENANCE_KEY)
        return file_lock(self._lock_dir / "maintenance.lock")

    # ---- schema ------------------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Create the tables, or bring them up to `SCHEMA_VERSION`, once across racing processes.

        Returns:
            The schema version now in force.

        Raises:
            StoreError: The database was written by a newer version of the service.
        """
        lock: AbstractContextManager[None] = (
            self._pg_lock(_PG_MIGRATION_KEY) if self.dialect == "postgresql"
            else file_lock(self._lock_dir / "migrate.lock")
        )
        with lock, self._write() as conn:
            schema_migrations.create(conn, checkfirst=True)
            done = set(conn.execute(sa.select(schema_migrations.c.version)).scalars())
            newest = max(done, default=0)
            if newest > SCHEMA_VERSION:
                raise StoreError(f"the index has schema version {newest}; this service supports up to {SCHEMA_VERSION}")
            for step in MIGRATIONS:
                if step.version in done:
                    continue
                step.apply(conn)
                conn.execute(schema_migrations.insert().values(
                    version=step.version, description=step.description, applied=now()))
                log.info("index schema migrated to version %d: %s", step.version, step.description)
        return SCHEMA_VERSION

    def schema_version(self) -> int:
        """The newest migration applied (0 for an empty database)."""
        with self._read() as conn:
            if not sa.inspect(conn).has_table("schema_migrations"):
                return 0
            return int(conn.execute(sa.select(sa.func.max(schema_migrations.c.version))).scalar() or 0)

    def ping(self) -> None:
        """One round trip to the database (readiness). Raises what the driver raises."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # ---- state -------------------------------------------------------------------------------------------

    def get_state(self, key: str) -> str | None:
        with self._read() as conn:
            value = conn.execute(sa.select(store_state.c.value).where(store_state.c.key == key)).scalar()
        return None if value is None else str(value)

    def set_state(self, key: str, value: str) -> None:
        with self._write() as conn:
            self._upsert(conn, store_state, {"key": key, "value": value}, ["key"])

    # ---- artifacts ---------------------------------------------------------------------------------------

    def _insert_ignore(self, table: sa.Table, conflict: list[str]) -> Any:
        if self.dialect == "postgresql":
            return pg_dialect.insert(table).on_conflict_do_nothing(index_elements=conflict)
        return sqlite_dialect.insert(table).on_conflict_do_nothing(index_elements=conflict)

    def _upsert(self, conn: sa.Connection, table: sa.Table, row: Mapping[str, Any], conflict: list[str]) -> None:
        stmt: Any = (pg_dialect.insert(table) if self.dialect == "postgresql" else sqlite_dialect.insert(table))
        stmt = stmt.values(**row)
        stmt = stmt.on_conflict_do_update(
            index_elements=conflict, set_={k: stmt.excluded[k] for k in row if k not in conflict}
        )
        conn.execute(stmt)

    def insert(self, meta: ArtifactMeta, manifest: Mapping[str, Any]) -> bool:
        """Publish an artifact: its row, labels, lineage inputs and manifest, in one transaction.

        Returns:
            False when the id was already published (nothing is changed then).
        """
        with self._write() as conn:
            return self._insert(conn, meta, manifest)

    def _insert(self, conn: sa.Connection, meta: ArtifactMeta, manifest: Mapping[str, Any]) -> bool:
        row = _artifact_row(meta)
        # RETURNING, not rowcount: drivers differ in what rowcount says for an INSERT ... ON CONFLICT.
        inserted = conn.execute(self._insert_ignore(artifacts, ["id"]).values(**row).returning(artifacts.c.id))
        if inserted.first() is None:
            return False
        if meta.labels:
            conn.execute(labels.insert(), [{"artifact_id": meta.id, "key": k, "value": v, "created": meta.created}
                                           for k, v in meta.labels.items()])
        if meta.lineage is not None and meta.lineage.inputs:
            conn.execute(lineage_inputs.insert(), [{"artifact_id": meta.id, "role": r, "input_id": i}
                                                   for r, i in meta.lineage.inputs.items()])
        conn.execute(manifests.insert().values(
            artifact_id=meta.id, fingerprint_version=int(manifest.get("fingerprint_version", 1)),
            body=dump_json(manifest)))
        return True

    def insert_many(self, items: Iterable[tuple[ArtifactMeta, Mapping[str, Any]]]) -> int:
        """Publish several artifacts in one transaction, skipping ids already published (the legacy import).

        Returns:
            How many were new.
        """
        with self._write() as conn:
            return sum(self._insert(conn, meta, manifest) for meta, manifest in items)

    def exists(self, artifact_id: str) -> bool:
        with self._read() as conn:
            found = conn.execute(sa.select(artifacts.c.id).where(artifacts.c.id == artifact_id)).first()
        return found is not None

    def existing(self, ids: Iterable[str]) -> set[str]:
        """The subset of `ids` that are published."""
        wanted = sorted(set(ids))
        out: set[str] = set()
        with self._read() as conn:
            for chunk in _chunks(wanted):
                out.update(conn.execute(sa.select(artifacts.c.id).where(artifacts.c.id.in_(chunk))).scalars())
        return out

    def get(self, artifact_id: str) -> ArtifactMeta | None:
        """One artifact with its labels and names, or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(artifacts).where(artifacts.c.id == artifact_id)).mappings().first()
            if row is None:
                return None
            return self._hydrate(conn, [row])[0]

    def size_of(self, artifact_id: str) -> int | None:
        with self._read() as conn:
            size = conn.execute(sa.select(artifacts.c.size).where(artifacts.c.id == artifact_id)).scalar()
        return None if size is None else int(size)

    def _hydrate(self, conn: sa.Connection, rows: Sequence[sa.RowMapping]) -> list[ArtifactMeta]:
        ids = [str(r["id"]) for r in rows]
        by_labels: dict[str, dict[str, str]] = {i: {} for i in ids}
        by_names: dict[str, list[str]] = {i: [] for i in ids}
        for chunk in _chunks(ids):
            for aid, key, value in conn.execute(
                sa.select(labels.c.artifact_id, labels.c.key, labels.c.value).where(labels.c.artifact_id.in_(chunk))
            ):
                by_labels[aid][key] = value
            for name, aid in conn.execute(
                sa.select(names.c.name, names.c.artifact_id).where(names.c.artifact_id.in_(chunk))
            ):
                by_names[aid].append(name)
        return [_meta_of(r, by_labels[str(r["id"])], tuple(sorted(by_names[str(r["id"])]))) for r in rows]

    def delete(self, artifact_id: str, *, force: bool) -> list[str]:
        """Unpublish an artifact (its labels, lineage inputs and manifest go with it).

        Returns:
            The names removed with it (sorted).

        Raises:
            ArtifactNotFound: No such artifact.
            ArtifactInUse: Names point to it and `force` is False.
        """
        with self._write() as conn:
            row = sa.select(artifacts.c.id).where(artifacts.c.id == artifact_id)
            if self.dialect == "postgresql":
                # The row lock makes a concurrent name insert wait for us, then fail its foreign key check.
                row = row.with_for_update()
            if conn.execute(row).first() is None:
                raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id)
            pointing = sorted(conn.execute(sa.select(names.c.name).where(names.c.artifact_id == artifact_id)).scalars())
            if pointing and not force:
                raise ArtifactInUse(f"names point to artifact {artifact_id}: {quote_keys(pointing)}", names=pointing)
            if pointing:
                conn.execute(names.delete().where(names.c.artifact_id == artifact_id))
            try:
                # SQLite enforces ON DELETE CASCADE only with PRAGMA foreign_keys (set on connect); say it anyway.
                for table in (labels, lineage_inputs, manifests, leases):
                    conn.execute(table.delete().where(table.c.artifact_id == artifact_id))
                conn.execute(artifacts.delete().where(artifacts.c.id == artifact_id))
            except sa.exc.IntegrityError as exc:  # a name was set meanwhile (PostgreSQL)
                raise ArtifactInUse(f"a name was pointed at artifact {artifact_id} meanwhile", names=pointing) from exc
        return pointing

    def ids_with_prefix(self, prefix: str, *, limit: int = 101) -> list[str]:
        """Ids that start with a lowercase hex prefix, sorted (a range scan of the primary key)."""
        upper = prefix + "g"  # 'g' sorts after every hex digit
        with self._read() as conn:
            return list(conn.execute(
                sa.select(artifacts.c.id).where(artifacts.c.id >= prefix, artifacts.c.id < upper)
                .order_by(artifacts.c.id).limit(limit)
            ).scalars())

    def list(
        self, filters: ListFilters, *, limit: int, after: tuple[str, str] | None
    ) -> tuple[list[ArtifactMeta], int, bool]:
        """A page of artifacts, newest first (created, then id, descending), after a cursor position.

        Returns:
            The items, the total count of matches over all pages, and whether more follow this page.
        """
        conditions: list[Any] = []
        if filters.artifact_id is not None:
            conditions.append(artifacts.c.id == filters.artifact_id)
        if filters.operation is not None:
            conditions.append(artifacts.c.operation == filters.operation)
        if filters.format is not None:
            conditions.append(artifacts.c.format == filters.format)
        source: Any = artifacts
        order = (artifacts.c.created, artifacts.c.id)
        counted: Any = artifacts
        if filters.label_key is not None:
            # Walk the label's index in (created, id) order instead of the artifacts' (see schema.labels).
            label = [labels.c.key == filters.label_key]
            if filters.label_value is not None:
                label.append(labels.c.value == filters.label_value)
            counted = labels.join(artifacts, artifacts.c.id == labels.c.artifact_id) if conditions else labels
            source = labels.join(artifacts, artifacts.c.id == labels.c.artifact_id)
            order = (labels.c.created, labels.c.artifact_id)
            conditions = label + conditions
        page_conditions = list(conditions)
        if after is not None:
            page_conditions.append(sa.tuple_(*order) < sa.tuple_(*after))  # keyset: strictly after the cursor
        with self._read() as conn:
            rows = conn.execute(
                sa.select(artifacts).select_from(source).where(*page_conditions)
                .order_by(order[0].desc(), order[1].desc()).limit(limit + 1)
            ).mappings().all()
            total = int(conn.execute(sa.select(sa.func.count()).select_from(counted).where(*conditions)).scalar()
                        or 0)
            more = len(rows) > limit
            return self._hydrate(conn, rows[:limit]), total, more

    def count(self) -> int:
        with self._read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(artifacts)).scalar() or 0)

    def iter_ids(self) -> Iterator[str]:
        """Every published id, in id order, read in batches (fsck, backup)."""
        last = ""
        while True:
            with self._read() as conn:
                batch = list(conn.execute(
                    sa.select(artifacts.c.id).where(artifacts.c.id > last).order_by(artifacts.c.id).limit(_BATCH * 4)
                ).scalars())
            yield from batch
            if len(batch) < _BATCH * 4:
                return
            last = batch[-1]

    def made_from(self, artifact_id: str) -> builtins.list[str]:
        """The artifacts whose lineage names `artifact_id` as an input, sorted."""
        with self._read() as conn:
            return sorted(set(conn.execute(
                sa.select(lineage_inputs.c.artifact_id).where(lineage_inputs.c.input_id == artifact_id)
            ).scalars()))

    def unreferenced(self, *, created_before: str, limit: int = 1000) -> builtins.list[str]:
        """What GC may remove: artifacts older than `created_before` that no name points to and that are no
        input of a published artifact's lineage; oldest first."""
        named = sa.select(names.c.artifact_id).where(names.c.artifact_id == artifacts.c.id)
        used = sa.select(lineage_inputs.c.input_id).where(lineage_inputs.c.input_id == artifacts.c.id)
        with self._read() as conn:
            return list(conn.execute(
                sa.select(artifacts.c.id).where(artifacts.c.created < created_before, ~named.exists(), ~used.exists())
                .order_by(artifacts.c.created, artifacts.c.id).limit(limit)
            ).scalars())

    # ---- labels, leases and retention (issue 19) ---------------------------------------------------------

    def update_labels(
        self, artifact_id: str, set_: Mapping[str, str], remove: Iterable[str] = ()
    ) -> tuple[ArtifactMeta, LabelChanges]:
        """Set and delete labels of a published artifact in one transaction; a new value wins over the old one.

        Returns:
            The artifact as it is now, and which keys were added, changed and removed.

        Raises:
            ArtifactNotFound: No such artifact (also when it is deleted concurrently).
        """
        with self._write() as conn:
            row = conn.execute(sa.select(artifacts.c.created).where(artifacts.c.id == artifact_id)).first()
            if row is None:
                raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id)
            old = {str(k): str(v) for k, v in conn.execute(
                sa.select(labels.c.key, labels.c.value).where(labels.c.artifact_id == artifact_id))}
            gone = sorted(k for k in set(remove) if k in old and k not in set_)
            changes = LabelChanges(
                added=sorted(k for k in set_ if k not in old),
                changed=sorted(k for k, v in set_.items() if k in old and old[k] != v),
                removed=gone,
            )
            if gone:
                conn.execute(labels.delete().where(labels.c.artifact_id == artifact_id, labels.c.key.in_(gone)))
            for key in changes.added + changes.changed:
                self._upsert(conn, labels, {"artifact_id": artifact_id, "key": key, "value": set_[key],
                                            "created": row[0]}, ["artifact_id", "key"])
            current = conn.execute(sa.select(artifacts).where(artifacts.c.id == artifact_id)).mappings().one()
            return self._hydrate(conn, [current])[0], changes

    def lease(self, holder: str, ids: Iterable[str], *, expires: str) -> None:
        """Mark artifacts as in use by `holder` until `expires` (or `release`): retention GC skips them.

        Raises:
            ArtifactNotFound: One of them is not published (GC deleted it first); no lease is taken then.
        """
        wanted = sorted(set(ids))
        try:
            with self._write() as conn:
                for artifact_id in wanted:
                    self._upsert(conn, leases, {"holder": holder, "artifact_id": artifact_id, "expires": expires},
                                 ["holder", "artifact_id"])
        except sa.exc.IntegrityError as exc:  # the foreign key: an artifact is gone
            missing = sorted(set(wanted) - self.existing(wanted)) or wanted
            raise ArtifactNotFound(f"no artifact {missing[0]}", ref=missing[0]) from exc

    def release(self, holder: str) -> None:
        """Drop `holder`'s leases, and every expired one."""
        with self._write() as conn:
            conn.execute(leases.delete().where(sa.or_(leases.c.holder == holder, leases.c.expires <= now())))

    def retention_candidates(self, policy: RetentionPolicy) -> builtins.list[tuple[str, int, str]]:
        """What the retention policy drops: (id, size, created) of every artifact outside the kept set, oldest first.

        Kept: named artifacts, leased ones, those created at or after `policy.created_before`, the newest
        `policy.keep_last` per (key, value) of each key in `policy.label_keys`, and, transitively, every lineage
        input of a kept artifact (a recursive CTE over `lineage_inputs`, on both backends).
        """
        roots: builtins.list[Any] = [
            sa.select(names.c.artifact_id.label("id")),
            sa.select(leases.c.artifact_id.label("id")).where(leases.c.expires > now()),
            sa.select(artifacts.c.id.label("id")).where(artifacts.c.created >= policy.created_before),
        ]
        if policy.keep_last > 0 and policy.label_keys:
            rank = sa.func.row_number().over(
                partition_by=(labels.c.key, labels.c.value),
                order_by=(labels.c.created.desc(), labels.c.artifact_id.desc()),
            ).label("rank")
            ranked = sa.select(labels.c.artifact_id, rank).where(labels.c.key.in_(policy.label_keys)).subquery()
            roots.append(sa.select(ranked.c.artifact_id.label("id")).where(ranked.c.rank <= policy.keep_last))
        # UNION, not UNION ALL: a shared input is walked once, and the walk ends on a cycle too.
        kept = roots[0].cte("kept", recursive=True)
        kept = kept.union(
            *roots[1:],
            sa.select(lineage_inputs.c.input_id.label("id")).join(kept, lineage_inputs.c.artifact_id == kept.c.id),
        )
        query = (
            sa.select(artifacts.c.id, artifacts.c.size, artifacts.c.created)
            .where(~sa.exists(sa.select(kept.c.id).where(kept.c.id == artifacts.c.id)))
            .order_by(artifacts.c.created, artifacts.c.id)
        )
        with self._read() as conn:
            return [(str(i), int(size), str(created)) for i, size, created in conn.execute(query)]

    def delete_collectable(self, artifact_id: str, *, created_before: str) -> bool:
        """Delete an artifact's rows unless it is still held (retention GC), re-checked in this transaction.

        Held: a name points to it or to anything made from it (transitively), a live lease holds one of those,
        or one of those was created at or after `created_before` (made since the policy's query, say).

        Returns:
            True when it was deleted; False when it is held or gone.
        """
        with self._write() as conn:
            row = sa.select(artifacts.c.id).where(artifacts.c.id == artifact_id)
            if self.dialect == "postgresql":
                # A lease or a name being inserted holds a key-share lock on this row: we wait for it, then see it.
                row = row.with_for_update()
            if conn.execute(row).first() is None:
                return False
            below = sa.select(artifacts.c.id.label("id")).where(artifacts.c.id == artifact_id)
            made = below.cte("made", recursive=True)
            made = made.union(
                sa.select(lineage_inputs.c.artifact_id.label("id")).join(made, lineage_inputs.c.input_id == made.c.id)
            )
            held = sa.select(made.c.id).where(sa.or_(
                sa.exists(sa.select(names.c.name).where(names.c.artifact_id == made.c.id)),
                sa.exists(sa.select(leases.c.holder).where(leases.c.artifact_id == made.c.id,
                                                           leases.c.expires > now())),
                sa.exists(sa.select(artifacts.c.id).where(artifacts.c.id == made.c.id,
                                                          artifacts.c.created >= created_before)),
            )).limit(1)
            if conn.execute(held).first() is not None:
                return False
            for table in (labels, lineage_inputs, manifests, leases):
                conn.execute(table.delete().where(table.c.artifact_id == artifact_id))
            conn.execute(artifacts.delete().where(artifacts.c.id == artifact_id))
            return True

    # ---- manifests ---------------------------------------------------------------------------------------

    def manifest(self, artifact_id: str) -> dict[str, Any] | None:
        """The stored manifest document, or None."""
        with self._read() as conn:
            body = conn.execute(sa.select(manifests.c.body).where(manifests.c.artifact_id == artifact_id)).scalar()
        if body is None:
            return None
        data = json.loads(body)
        if not isinstance(data, dict):
            raise StoreError(f"corrupt manifest for artifact {artifact_id}")
        return data

    def update_manifest(self, artifact_id: str, manifest: Mapping[str, Any]) -> bool:
        """Replace a manifest (a fingerprint upgrade); False when the artifact is gone."""
        with self._write() as conn:
            result = conn.execute(manifests.update().where(manifests.c.artifact_id == artifact_id).values(
                fingerprint_version=int(manifest.get("fingerprint_version", 1)), body=dump_json(manifest)))
            return bool(result.rowcount)

    # ---- names -------------------------------------------------------------------------------------------

    def get_name(self, name: str) -> str | None:
        with self._read() as conn:
            target = conn.execute(sa.select(names.c.artifact_id).where(names.c.name == name)).scalar()
        return None if target is None else str(target)

    def set_name(self, name: str, artifact_id: str) -> None:
        """Create or move a name atomically.

        Raises:
            ArtifactNotFound: No such artifact (also when it is deleted concurrently).
        """
        try:
            with self._write() as conn:
                if conn.execute(sa.select(artifacts.c.id).where(artifacts.c.id == artifact_id)).first() is None:
                    raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id)
                self._upsert(conn, names, {"name": name, "artifact_id": artifact_id, "updated": now()}, ["name"])
        except sa.exc.IntegrityError as exc:  # the artifact was deleted between the check and the upsert
            raise ArtifactNotFound(f"no artifact {artifact_id}", ref=artifact_id) from exc

    def set_names(self, pairs: Mapping[str, str]) -> None:
        """Set several names in one transaction, skipping those whose artifact is missing (the legacy import)."""
        with self._write() as conn:
            present: set[str] = set()
            for chunk in _chunks(sorted(set(pairs.values()))):
                present.update(conn.execute(sa.select(artifacts.c.id).where(artifacts.c.id.in_(chunk))).scalars())
            for name, artifact_id in sorted(pairs.items()):
                if artifact_id in present:
                    self._upsert(conn, names, {"name": name, "artifact_id": artifact_id, "updated": now()}, ["name"])

    def delete_name(self, name: str) -> bool:
        """Remove a name; False when there was none."""
        with self._write() as conn:
            return bool(conn.execute(names.delete().where(names.c.name == name)).rowcount)

    def names(self) -> dict[str, str]:
        """Every name -> artifact id, sorted by name."""
        with self._read() as conn:
            return {str(n): str(i) for n, i in conn.execute(
                sa.select(names.c.name, names.c.artifact_id).order_by(names.c.name))}

    # ---- architecture specs (the registry's SpecStore) ---------------------------------------------------

    def spec_revisions(self) -> dict[str, str]:
        """Every stored spec's name -> revision."""
        with self._read() as conn:
            return {str(n): str(r) for n, r in conn.execute(sa.select(architectures.c.name, architectures.c.revision))}

    def spec_revision(self, name: str) -> str | None:
        with self._read() as conn:
            rev = conn.execute(sa.select(architectures.c.revision).where(architectures.c.name == name)).scalar()
        return None if rev is None else str(rev)

    def read_spec(self, name: str) -> tuple[str, dict[str, Any]] | None:
        """A spec's revision and document, or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(architectures.c.revision, architectures.c.body)
                               .where(architectures.c.name == name)).first()
        if row is None:
            return None
        return str(row[0]), json.loads(row[1])

    def insert_spec(self, name: str, document: Mapping[str, Any]) -> bool:
        """Store a spec unless the name is taken; False when it was."""
        with self._write() as conn:
            inserted = conn.execute(self._insert_ignore(architectures, ["name"]).values(
                name=name, revision=secrets.token_hex(8), created=now(), body=dump_json(document),
            ).returning(architectures.c.name))
            return inserted.first() is not None

    def delete_spec(self, name: str) -> bool:
        """Remove a spec; False when there was none."""
        with self._write() as conn:
            return bool(conn.execute(architectures.delete().where(architectures.c.name == name)).rowcount)

    # ---- leases on blobs being written --------------------------------------------------------------------

    def add_blob_lease(self, digest: str, *, seconds: float) -> str:
        """Lease a blob about to be written for `seconds` (orphan GC skips it meanwhile). Returns the lease's token."""
        token = secrets.token_hex(16)
        with self._write() as conn:
            conn.execute(blob_leases.insert().values(digest=digest, token=token, expires=time.time() + seconds))
        return token

    def drop_blob_lease(self, digest: str, token: str) -> None:
        """End a lease (at publication, or when the write failed); ending a missing one is a no-op."""
        with self._write() as conn:
            conn.execute(blob_leases.delete().where(blob_leases.c.digest == digest, blob_leases.c.token == token))

    def blob_leased(self, digests: Iterable[str]) -> set[str]:
        """The subset of `digests` with a lease that has not expired."""
        wanted = sorted(set(digests))
        out: set[str] = set()
        current = time.time()
        with self._read() as conn:
            for chunk in _chunks(wanted):
                query = sa.select(blob_leases.c.digest).where(
                    blob_leases.c.digest.in_(chunk), blob_leases.c.expires > current
                )
                out.update(conn.execute(query).scalars())
        return out

    def drop_expired_blob_leases(self) -> int:
        """Remove the leases of writers that died (expired). Returns how many."""
        with self._write() as conn:
            return int(conn.execute(blob_leases.delete().where(blob_leases.c.expires <= time.time())).rowcount)

    # ---- dump and load (backup, restore) -----------------------------------------------------------------

    def dump(self) -> Iterator[dict[str, Any]]:
        """Every row of every table as JSON-able records, from one consistent snapshot."""
        with self._read() as conn:
            for table in (artifacts, labels, lineage_inputs, manifests, names, architectures):
                for row in conn.execute(sa.select(table)).mappings():
                    yield {"table": table.name, "row": dict(row)}

    def load(self, records: Iterable[dict[str, Any]]) -> int:
        """Insert dumped records into an empty index, in one transaction. Returns how many."""
        tables = {t.name: t for t in (artifacts, labels, lineage_inputs, manifests, names, architectures)}
        count = 0
        with self._write() as conn:
            if conn.execute(sa.select(sa.func.count()).select_from(artifacts)).scalar():
                raise StoreError("the index is not empty; restore only into an empty store")
            for record in records:
                conn.execute(tables[record["table"]].insert().values(**record["row"]))
                count += 1
        return count


def _is_full(exc: sa.exc.OperationalError) -> bool:
    # SQLite: SQLITE_FULL ("database or disk is full"); PostgreSQL: disk_full (SQLSTATE 53100).
    return "database or disk is full" in str(exc.orig) or getattr(exc.orig, "sqlstate", None) == "53100"


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling off: SQLAlchemy's "begin" event below emits BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a commit is durable when it returns, as the blob is
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    # Writers take the write lock up front: a deferred transaction that later writes can fail with "database is
    # locked" without waiting (the busy timeout does not apply to a lock upgrade).
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


@dataclass(frozen=True)
class RetentionPolicy:
    """What retention GC keeps besides named and leased artifacts (see `MetadataIndex.retention_candidates`)."""

    created_before: str  # only artifacts created before this (index time format) may go
    keep_last: int = 0
    label_keys: tuple[str, ...] = ()


def _text(value: str | None, what: str) -> str | None:
    # Both databases hold UTF-8 text only: a lone surrogate (from a file name or a pickle's keys) is refused here,
    # before anything is written, instead of failing inside the driver.
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(f"{what} is not valid Unicode text (it holds a lone surrogate)") from exc
    return value


def _artifact_row(meta: ArtifactMeta) -> dict[str, Any]:
    for key, value in meta.labels.items():
        _text(value, f"the value of label {key!r}")
    return {
        "id": meta.id,
        "created": meta.created,
        "size": meta.size,
        "format": meta.format,
        "operation": meta.lineage.operation if meta.lineage is not None else None,
        "filename": _text(meta.filename, "filename"),
        "container_key": _text(meta.container_key, "container_key"),
        "key_count": meta.key_count,
        "tensor_bytes": meta.tensor_bytes,
        "schema_fingerprint": meta.schema_fingerprint,
        "has_metadata": meta.has_metadata,
        "extras": dump_json(meta.extras),
        "candidates": dump_json(meta.candidates),
        "lineage": dump_json(meta.lineage.to_dict()) if meta.lineage is not None else None,
    }


def _meta_of(row: sa.RowMapping, labels_: dict[str, str], names_: tuple[str, ...]) -> ArtifactMeta:
    lineage = row["lineage"]
    return ArtifactMeta(
        id=str(row["id"]),
        size=int(row["size"]),
        created=str(row["created"]),
        filename=row["filename"],
        format=str(row["format"]),
        container_key=row["container_key"],
        key_count=int(row["key_count"]),
        tensor_bytes=int(row["tensor_bytes"]),
        schema_fingerprint=str(row["schema_fingerprint"]),
        has_metadata=bool(row["has_metadata"]),
        extras=json.loads(row["extras"]),
        labels=dict(sorted(labels_.items())),
        lineage=Lineage.from_dict(json.loads(lineage)) if lineage is not None else None,
        names=names_,
        candidates=json.loads(row["candidates"]),
    )
