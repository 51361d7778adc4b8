"""The SQL objects (triggers and views) a store's ``raft.db`` declares, as text: installed by the
migrations, and checked against ``sqlite_master`` on every open and by ``raft-sqlite verify``
(:func:`raft_sqlite.validate.check_sql_objects`). Kept apart from :mod:`raft_sqlite.schema` so that
opening a store does not import SQLAlchemy.

Changing any text here changes what open expects: it needs a migration that installs the new text.
"""

from .layout import KEY_SPAN

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


#: Every trigger and view ``raft.db`` holds at the head revision: (type, name) -> ``CREATE`` statement.
#: A missing or altered one is corruption under STRICT; a trigger not listed here is unexpected.
DECLARED: dict[tuple[str, str], str] = {
    ("trigger", "log_entries_guard_delete"): GUARD_TRIGGER.strip(),
    **{("view", name): f"CREATE VIEW {name} AS {select}" for name, select in VIEWS.items()},
}


def normalized(sql: str | None) -> str:
    """``sql`` with runs of white space collapsed and a trailing ``;`` removed (how the text is compared
    with ``sqlite_master.sql``)."""
    return " ".join((sql or "").split()).rstrip(";").rstrip()
