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
    CheckConstraint,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from .layout import CHUNKS_DB, CHUNKS_HEAD, FORMAT_VERSION, KEY_SHIFT, KEY_SPAN, MAIN_DB, MAIN_HEAD  # noqa: F401
from .sqlobjects import GROUP_STATUS_VIEW, GUARD_TRIGGER, VIEWS  # noqa: F401  (the migrations read them here)


class AnyValue(TypeDecorator[str | int]):
    """A BLOB-affinity column that keeps a str or an int exactly as given (used for ``voted_for``)."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: str | int | None, dialect: Dialect) -> str | int | None:
        return value

    def process_result_value(self, value: str | int | None, dialect: Dialect) -> str | int | None:
        return value  # as stored: a str or an int (the column's affinity keeps either type unchanged)



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
    # CRC32 over group_id, name, first_index, snapshot_index, snapshot_term, recovered_partially
    Column("crc32", BigInteger, nullable=False, server_default="0"),
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
    # content digest: CRC32 over "<term> <kind>\n" + payload of each record, in index order (see
    # raft_sqlite.wal.CONTENT_SQL); NULL while open, and for segments sealed before revision 0003
    Column("content_crc", BigInteger, nullable=True),
    Index("log_segments_group", "group_id", "first_index"),
)

#: What a clean close recorded about each group's open segment (one row per open segment holding records):
#: the same counts, sidecar checksum and content digest a seal writes into ``log_segments``. The next open
#: checks each open segment against its row with one SQLite aggregate (as it checks a sealed segment) instead
#: of every record's CRC in Python, then deletes every row in its own transaction: a row is only ever trusted
#: by the open right after the close that wrote it (a crash leaves none, and the records are then checked
#: one by one). A row that disagrees with the records (damage, or an old library appending since) only sends
#: that segment to the record-by-record check. Created by revision 0004. Revision 0005 added ``span_crc``,
#: ``span_bytes`` and ``last_term``: the segment's span digest over every column of its records, continued over
#: the row's other fields (:func:`raft_sqlite.wal.close_span_digest`), and the bytes its records render to, NULL
#: if the writer did not know them; with them the next open checks the open segments of many small groups in one
#: range scan (see :func:`raft_sqlite.logscan.check_close_digests`).
close_digests = Table(
    "close_digests", metadata,
    Column("segment_id", Integer, primary_key=True),
    Column("entry_count", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("checksum", BigInteger, nullable=False),
    Column("content_crc", BigInteger, nullable=False),
    Column("span_crc", BigInteger, nullable=True),
    Column("span_bytes", BigInteger, nullable=True),
    Column("last_term", BigInteger, nullable=True),
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
    # local: taken from this node's state machine (a WRITING one is an orphan after a crash, removed on
    # open); install: streamed from a leader (a WRITING one is resumable across restarts)
    Column("source", Text, nullable=False, server_default="local"),
    CheckConstraint("kind IN ('FULL', 'DELTA')", name="snapshot_kind"),
    CheckConstraint("source IN ('local', 'install')", name="snapshot_source"),
    CheckConstraint("status IN ('WRITING', 'DURABLE')", name="snapshot_status"),
    Index("snapshots_group", "group_id", "status", "idx"),
    # ids are never reused (chunk keys, chain links and caches name snapshots by id)
    sqlite_autoincrement=True,
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
