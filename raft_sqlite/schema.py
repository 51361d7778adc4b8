"""The schema, declared once with SQLAlchemy Core.

Two database files live in a node's ``data_dir``:

* ``raft.db`` (:data:`metadata`): node record, groups, log entries, segments, Raft metadata,
  snapshot manifests, backups, recovery events, settings.
* ``chunks.db`` (:data:`chunks_metadata`): snapshot chunk blobs. Kept apart so that writing a big
  snapshot never holds the write lock (or grows the WAL) of the file that log commits go to.

Tables are created and changed only by the alembic migrations in ``migrations/`` (package
``raft_sqlite.migrations``); this module is what those migrations and the code read. The table objects
are public so that users can query a store from a notebook with SQLAlchemy.
"""

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    CheckConstraint,
)
from sqlalchemy.types import TypeDecorator


class AnyValue(TypeDecorator):
    """A BLOB-affinity column that keeps a str or an int exactly as given (used for ``voted_for``)."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value

    def process_result_value(self, value, dialect):
        return value

#: Data format written into the node record. A store whose format is newer is refused.
FORMAT_VERSION = 1
#: alembic head revisions this code knows (checked against the migrations by the tests).
MAIN_HEAD = "0001_main"
CHUNKS_HEAD = "0001_chunks"
MAIN_DB = "raft.db"
CHUNKS_DB = "chunks.db"
#: log key = group_id * KEY_SPAN + index: one b-tree, no secondary index on the append path.
KEY_SHIFT = 40
KEY_SPAN = 1 << KEY_SHIFT

metadata = MetaData()
chunks_metadata = MetaData()

node = Table(
    "node", metadata,
    Column("id", Integer, primary_key=True),
    Column("node_id", Text, nullable=False),
    Column("cluster_id", Text, nullable=False),
    Column("format_version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("crc32", BigInteger, nullable=False),
    CheckConstraint("id = 1", name="single_node_row"),
)

settings = Table(
    "settings", metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
)

groups = Table(
    "groups", metadata,
    Column("group_id", Integer, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    # first index still in the log (compaction / snapshot install move it)
    Column("first_index", BigInteger, nullable=False, server_default="1"),
    # index/term of the newest DURABLE snapshot (0/0: none); kept with the manifest in one commit
    Column("snapshot_index", BigInteger, nullable=False, server_default="0"),
    Column("snapshot_term", BigInteger, nullable=False, server_default="0"),
    # set only inside the transaction of truncate_after: entries above it may be deleted
    Column("truncate_permit", BigInteger, nullable=True),
    Column("recovered_partially", Integer, nullable=False, server_default="0"),
)

log_entries = Table(
    "log_entries", metadata,
    Column("key", Integer, primary_key=True),  # rowid alias: group_id << 40 | idx
    Column("group_id", Integer, nullable=False),
    Column("idx", BigInteger, nullable=False),
    Column("term", BigInteger, nullable=False),
    Column("kind", Integer, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("crc32", BigInteger, nullable=False),
    Column("segment", Integer, nullable=False),
    CheckConstraint(f"key = group_id * {KEY_SPAN} + idx AND idx >= 1", name="log_key"),
)

log_segments = Table(
    "log_segments", metadata,
    Column("segment_id", Integer, primary_key=True),
    Column("group_id", Integer, nullable=False),
    Column("first_index", BigInteger, nullable=False),
    Column("last_index", BigInteger, nullable=True),  # NULL while the segment is open
    Column("entry_count", BigInteger, nullable=True),
    Column("bytes", BigInteger, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("sealed_at", Float, nullable=True),
    # sidecar checksum: CRC32 over the little-endian record CRCs of the segment, in index order
    Column("checksum", BigInteger, nullable=True),
    Index("log_segments_group", "group_id", "first_index"),
)

raft_meta = Table(
    "raft_meta", metadata,
    Column("group_id", Integer, primary_key=True),
    Column("current_term", BigInteger, nullable=False),
    Column("voted_for", AnyValue, nullable=True),  # str | int | NULL
    Column("commit_index", BigInteger, nullable=False),
    Column("crc32", BigInteger, nullable=False),
)

snapshots = Table(
    "snapshots", metadata,
    Column("snapshot_id", Integer, primary_key=True),
    Column("group_id", Integer, nullable=False),
    Column("idx", BigInteger, nullable=False),
    Column("term", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),  # FULL | DELTA
    Column("parent_id", Integer, nullable=True),
    Column("status", Text, nullable=False),  # WRITING | DURABLE
    Column("size", BigInteger, nullable=False, server_default="0"),
    Column("chunk_count", Integer, nullable=False, server_default="0"),
    Column("checksum", Text, nullable=True),  # sha256 hex of the snapshot bytes
    Column("structures", Text, nullable=True),  # JSON: per-structure entries
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
    Column("crc32", BigInteger, nullable=True),  # over the manifest fields
    CheckConstraint("kind IN ('FULL', 'DELTA')", name="snapshot_kind"),
    CheckConstraint("status IN ('WRITING', 'DURABLE')", name="snapshot_status"),
    Index("snapshots_group", "group_id", "status", "idx"),
)

backups = Table(
    "backups", metadata,
    Column("backup_id", Integer, primary_key=True),
    Column("path", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("duration", Float, nullable=False),
    Column("manifest_sha256", Text, nullable=False),
)

recovery_events = Table(
    "recovery_events", metadata,
    Column("event_id", Integer, primary_key=True),
    Column("at", Float, nullable=False),
    Column("kind", Text, nullable=False),  # open | node_replacement | quorum_loss_restore
    Column("policy", Text, nullable=True),
    Column("outcome", Text, nullable=False),
    Column("duration", Float, nullable=True),
    Column("details", Text, nullable=True),  # JSON
)

snapshot_chunks = Table(
    "snapshot_chunks", chunks_metadata,
    Column("key", Integer, primary_key=True),  # snapshot_id << 32 | seq
    Column("snapshot_id", Integer, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("crc32", BigInteger, nullable=False),
    CheckConstraint("key = snapshot_id * 4294967296 + seq", name="chunk_key"),
)

#: The database-level compaction guard (installed by migration 0001_main). A DELETE of a log entry
#: above the newest DURABLE snapshot's index is refused unless the group's ``truncate_permit`` (set by
#: ``truncate_after`` inside its own transaction) allows it, and never for a committed entry.
GUARD_TRIGGER = """
CREATE TRIGGER log_entries_guard_delete BEFORE DELETE ON log_entries
WHEN OLD.idx > COALESCE((SELECT max(s.idx) FROM snapshots s
                         WHERE s.group_id = OLD.group_id AND s.status = 'DURABLE'), 0)
 AND (OLD.idx <= COALESCE((SELECT g.truncate_permit FROM groups g WHERE g.group_id = OLD.group_id), 1 << 62)
      OR OLD.idx <= COALESCE((SELECT m.commit_index FROM raft_meta m WHERE m.group_id = OLD.group_id), 0))
BEGIN
  SELECT RAISE(ABORT, 'raft_sqlite: refusing to delete a log entry that no durable snapshot covers');
END
"""

GROUP_STATUS_VIEW = """
CREATE VIEW group_status AS
SELECT g.group_id, g.name, m.current_term, m.voted_for, m.commit_index, g.first_index,
       COALESCE((SELECT max(e.idx) FROM log_entries e
                 WHERE e.key BETWEEN g.group_id * 1099511627776 AND g.group_id * 1099511627776 + 1099511627775),
                g.first_index - 1) AS last_index,
       g.snapshot_index, g.snapshot_term, g.recovered_partially,
       (SELECT count(*) FROM log_segments s WHERE s.group_id = g.group_id) AS segments
FROM groups g LEFT JOIN raft_meta m ON m.group_id = g.group_id
"""
