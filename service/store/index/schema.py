"""The index's tables (SQLAlchemy Core, one definition for SQLite and PostgreSQL) and its schema migrations.

Migrations are a numbered list of Python steps recorded in `schema_migrations`, each run in the transaction that
records it, under the index's migration lock (docs/artifact-store.md says why this and not Alembic).
JSON documents (extras, lineage, manifests, specs) are stored as text: both backends hold them the same way, and
nothing queries inside them; what the queries filter on has its own column or table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

metadata = sa.MetaData()

# One row per published artifact: the row is the publication point (its blob is durable before it is inserted).
artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    # ISO-8601 UTC with microseconds and "Z": sorts as text, and the cursor of GET /checkpoints carries it.
    sa.Column("created", sa.String(32), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("format", sa.String(32), nullable=False),
    sa.Column("operation", sa.String(32), nullable=True),  # the lineage operation; NULL for uploads
    sa.Column("filename", sa.Text, nullable=True),
    sa.Column("container_key", sa.Text, nullable=True),
    sa.Column("key_count", sa.Integer, nullable=False),
    sa.Column("tensor_bytes", sa.BigInteger, nullable=False),
    sa.Column("schema_fingerprint", sa.String(128), nullable=False),
    sa.Column("has_metadata", sa.Boolean, nullable=False),
    sa.Column("extras", sa.Text, nullable=False),  # JSON object
    sa.Column("candidates", sa.Text, nullable=False),  # JSON object
    sa.Column("lineage", sa.Text, nullable=True),  # JSON object
    sa.Index("ix_artifacts_created", "created", "id"),
    sa.Index("ix_artifacts_format_created", "format", "created", "id"),
    sa.Index("ix_artifacts_operation_created", "operation", "created", "id"),
)

# A label filter pages through (key, value, created, artifact_id) in order and counts over it, so it costs the
# same whatever share of the artifacts match: `created` is the artifact's (immutable), copied here for that.
labels = sa.Table(
    "labels",
    metadata,
    sa.Column("artifact_id", sa.String(64), sa.ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
    sa.Column("created", sa.String(32), nullable=False),
    sa.Index("ix_labels_key_value_created", "key", "value", "created", "artifact_id"),
    sa.Index("ix_labels_key_created", "key", "created", "artifact_id"),
)

# Names point at artifacts; the foreign key refuses a name for a missing artifact, and the deletion of a named one.
names = sa.Table(
    "names",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("artifact_id", sa.String(64), sa.ForeignKey("artifacts.id"), nullable=False),
    sa.Column("updated", sa.String(32), nullable=False),
    sa.Index("ix_names_artifact", "artifact_id"),
)

manifests = sa.Table(
    "manifests",
    metadata,
    sa.Column("artifact_id", sa.String(64), sa.ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("fingerprint_version", sa.Integer, nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # Manifest.to_dict() as JSON
)

# The inputs of derived artifacts, so that "what was made from X" and GC's "is X still used" are index lookups.
# No foreign key on input_id: lineage is history, and an input may be deleted after its children were made.
lineage_inputs = sa.Table(
    "lineage_inputs",
    metadata,
    sa.Column("artifact_id", sa.String(64), sa.ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("role", sa.String(64), primary_key=True),
    sa.Column("input_id", sa.String(64), nullable=False),
    sa.Index("ix_lineage_inputs_input", "input_id"),
)

# Code-free architecture specs (the registry's `spec` source). `revision` changes with every write, so that a
# replica re-reads a spec only when it changed.
architectures = sa.Table(
    "architectures",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("revision", sa.String(32), nullable=False),
    sa.Column("created", sa.String(32), nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # the registry's spec document as JSON
)

# Small facts about the index itself, e.g. that a data directory of layout 1 was imported.
store_state = sa.Table(
    "store_state",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# Leases: an operation that resolved its inputs, or an upload about to reference an artifact, holds a row here
# until it finishes (or the row expires, for a crashed holder); retention GC never deletes a leased artifact. The
# foreign key makes taking a lease also prove that the artifact still exists (GC deletes under a row lock).
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("holder", sa.String(64), primary_key=True),
    sa.Column("artifact_id", sa.String(64), sa.ForeignKey("artifacts.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("expires", sa.String(32), nullable=False),
    sa.Index("ix_leases_artifact_expires", "artifact_id", "expires"),
)

# Leases on blobs being written: a row (with an expiry) is inserted before a put and deleted at publication, and
# orphan collection skips a leased digest, so a blob in flight to an object store is never collected.
blob_leases = sa.Table(
    "blob_leases",
    metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("token", sa.String(32), primary_key=True),  # one lease per writer (several may put one digest)
    sa.Column("expires", sa.Float, nullable=False),  # seconds since the epoch
    sa.Index("ix_blob_leases_expires", "expires"),
)

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("applied", sa.String(32), nullable=False),
)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[sa.Connection], None]


def _create_v1(conn: sa.Connection) -> None:
    tables = [artifacts, labels, names, manifests, lineage_inputs, architectures, store_state]
    metadata.create_all(conn, tables=tables, checkfirst=True)


def _create_v2(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[leases], checkfirst=True)


def _create_v3(conn: sa.Connection) -> None:
    metadata.create_all(conn, tables=[blob_leases], checkfirst=True)


# Append only: a released step never changes (a database records which ones it ran).
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "artifacts, labels, names, manifests, lineage inputs, architecture specs", _create_v1),
    Migration(2, "leases: artifacts in use by operations and uploads, skipped by retention GC", _create_v2),
    Migration(3, "blob leases: blobs being written, skipped by orphan GC", _create_v3),
)
SCHEMA_VERSION = MIGRATIONS[-1].version
