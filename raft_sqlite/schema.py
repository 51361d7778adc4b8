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

from .layout import CHUNKS_DB, CHUNKS_HEAD, FORMAT_VERSION, KEY_SHIFT, KEY_SPAN, MAIN_DB, MAIN_HEAD  # noqa: F401


class AnyValue(TypeDecorator):
    """A BLOB-affinity column that keeps a str or an int exactly as given (used for ``voted_for``)."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value

    def process_result_value(self, value, dialect):
        return value



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

# ---------------------------------------------------------------------------------------------- views
# Read-only views for ad-hoc inspection (``raft-sqlite sql``, notebooks), created by migration
# 0002_main_views. Times are UTC; ``*_age_s`` columns are seconds before the query ran. The views of
# backups and recovery events are named ``backup_history`` and ``recovery_log`` because the tables
# ``backups`` and ``recovery_events`` already own those names.
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_G_LO = f"g.group_id * {KEY_SPAN}"
_G_HI = f"(g.group_id + 1) * {KEY_SPAN}"

#: view name -> SELECT (``CREATE VIEW <name> AS <select>``), in creation order.
VIEWS: dict[str, str] = {
    # One row per group: Raft hard state, log bounds, entries held, payload bytes stored (sealed segments'
    # byte counts plus the open segment's rows: bounded cost), segments, ages of the oldest segment and of
    # the newest durable snapshot.
    "group_status": f"""
SELECT g.group_id, g.name, m.current_term, m.voted_for, m.commit_index, g.first_index,
       max(g.first_index - 1, COALESCE((SELECT max(e.idx) FROM log_entries e
                                        WHERE e.key >= {_G_LO} AND e.key < {_G_HI}), 0)) AS last_index,
       max(g.first_index - 1, COALESCE((SELECT max(e.idx) FROM log_entries e
                                        WHERE e.key >= {_G_LO} AND e.key < {_G_HI}), 0)) - g.first_index + 1
           AS entries,
       COALESCE((SELECT sum(s.bytes) FROM log_segments s
                 WHERE s.group_id = g.group_id AND s.last_index IS NOT NULL), 0)
       + COALESCE((SELECT sum(length(e.payload)) FROM log_entries e
                   WHERE e.key >= {_G_LO} + COALESCE((SELECT max(s.first_index) FROM log_segments s
                                                      WHERE s.group_id = g.group_id AND s.last_index IS NULL),
                                                     {KEY_SPAN})
                     AND e.key < {_G_HI}), 0) AS stored_bytes,
       g.snapshot_index, g.snapshot_term, g.recovered_partially,
       (SELECT count(*) FROM log_segments s WHERE s.group_id = g.group_id) AS segments,
       round({_NOW} - (SELECT min(s.created_at) FROM log_segments s WHERE s.group_id = g.group_id), 3)
           AS oldest_segment_age_s,
       round({_NOW} - (SELECT max(sn.finished_at) FROM snapshots sn
                       WHERE sn.group_id = g.group_id AND sn.status = 'DURABLE'), 3) AS newest_snapshot_age_s
FROM groups g LEFT JOIN raft_meta m ON m.group_id = g.group_id""",
    # One row per snapshot manifest with its chain: base_id is the FULL snapshot the chain starts from
    # (NULL: the chain is broken), chain_depth the number of DELTA links above it.
    "snapshot_chain": f"""
WITH RECURSIVE chain(snapshot_id, cur_id, cur_kind, cur_parent, depth) AS (
    SELECT snapshot_id, snapshot_id, kind, parent_id, 0 FROM snapshots
    UNION ALL
    SELECT c.snapshot_id, p.snapshot_id, p.kind, p.parent_id, c.depth + 1
    FROM chain c JOIN snapshots p ON p.snapshot_id = c.cur_parent
    WHERE c.cur_kind = 'DELTA' AND c.depth < 100000)
SELECT s.snapshot_id, g.name AS group_name, s.group_id, s.idx, s.term, s.kind, s.parent_id, s.status,
       s.size, s.chunk_count, b.cur_id AS base_id, b.depth AS chain_depth,
       s.idx = g.snapshot_index AND s.status = 'DURABLE' AS is_newest,
       datetime(s.created_at, 'unixepoch') AS created_utc,
       s.finished_at - s.created_at AS duration_s,
       round({_NOW} - s.finished_at, 3) AS age_s
FROM snapshots s JOIN groups g ON g.group_id = s.group_id
LEFT JOIN chain b ON b.snapshot_id = s.snapshot_id AND b.cur_kind = 'FULL'""",
    # One row per log segment; the open segment's counts are computed from its rows.
    "segments": f"""
SELECT s.segment_id, g.name AS group_name, s.group_id, s.first_index,
       COALESCE(s.last_index, (SELECT max(e.idx) FROM log_entries e
                               WHERE e.key >= {_G_LO} + s.first_index AND e.key < {_G_HI})) AS last_index,
       CASE WHEN s.last_index IS NULL THEN 'open' ELSE 'sealed' END AS state,
       COALESCE(s.entry_count, (SELECT count(*) FROM log_entries e
                                WHERE e.key >= {_G_LO} + s.first_index AND e.key < {_G_HI})) AS entry_count,
       COALESCE(s.bytes, (SELECT COALESCE(sum(length(e.payload)), 0) FROM log_entries e
                          WHERE e.key >= {_G_LO} + s.first_index AND e.key < {_G_HI})) AS bytes,
       datetime(s.created_at, 'unixepoch') AS created_utc, datetime(s.sealed_at, 'unixepoch') AS sealed_utc,
       round({_NOW} - s.created_at, 3) AS age_s,
       CASE WHEN s.checksum IS NULL THEN NULL ELSE printf('%08x', s.checksum) END AS checksum_hex,
       s.last_index IS NOT NULL AND s.last_index < g.first_index AS compactable
FROM log_segments s JOIN groups g ON g.group_id = s.group_id""",
    # The ``backups`` table with readable times and ages.
    "backup_history": f"""
SELECT backup_id, path, datetime(created_at, 'unixepoch') AS created_utc, size, duration AS duration_s,
       round({_NOW} - created_at, 3) AS age_s, manifest_sha256
FROM backups""",
    # The ``recovery_events`` table with the JSON details unpacked (NULL where details is not JSON).
    "recovery_log": """
SELECT event_id, datetime(at, 'unixepoch') AS at_utc, kind, policy, outcome,
       round(duration * 1000.0, 3) AS duration_ms,
       CASE WHEN json_valid(details) THEN json_extract(details, '$.groups') END AS groups,
       CASE WHEN json_valid(details) THEN json_extract(details, '$.entries_validated') END AS entries_validated,
       CASE WHEN json_valid(details) THEN json_extract(details, '$.bytes_validated') END AS bytes_validated,
       CASE WHEN json_valid(details) THEN json_extract(details, '$.segments_validated') END AS segments_validated,
       CASE WHEN json_valid(details) THEN json_extract(details, '$.snapshots_validated') END
           AS snapshots_validated,
       CASE WHEN json_valid(details) THEN json_array_length(details, '$.dropped') END AS dropped,
       CASE WHEN json_valid(details) THEN json_array_length(details, '$.problems') END AS problems,
       details
FROM recovery_events""",
}
