"""Per-group status of a store, read from its ``raft.db``: the one reader behind ``raft-sqlite status``,
the Prometheus state metrics (:mod:`raft_sqlite.metrics`) and backup manifests (:mod:`raft_sqlite.backup`).

The stored state (Raft hard state, first index, snapshot index and term, the PARTIAL flag, the segment
count) comes from the ``group_status`` view (:data:`raft_sqlite.sqlobjects.VIEWS`). The view's row-derived
columns are not used: its ``last_index`` and ``entries`` take ``max(idx)`` over every record of the group
(the ``idx`` column has no index), a scan measured at ~85 ms per million entries, twice for both columns,
where ``max(key)`` on the rowid range costs one B-tree seek (<1 ms). Status is read on every Prometheus
scrape, so this module reads the log bounds and stored counts with bounded queries instead: the rowid
bounds, the ``log_segments`` aggregates, and the rows of the open segment only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import apsw

from .layout import KEY_SPAN


@dataclasses.dataclass(frozen=True)
class SnapshotHead:
    """The newest DURABLE snapshot of a group: highest index, then highest id (the one a restart
    installs). Values are as stored; a damaged row may hold other types than annotated."""

    snapshot_id: int
    index: int
    term: int
    kind: str
    size: int | None
    created_at: float
    finished_at: float | None


@dataclasses.dataclass(frozen=True)
class GroupStatus:
    """What ``raft.db`` holds about one Raft group (one row of :func:`read_group_status`)."""

    group_id: int
    name: str
    #: Raft hard state; None when the group has no ``raft_meta`` row
    current_term: int | None
    voted_for: str | int | None
    commit_index: int | None
    first_index: int
    #: highest index stored, ``first_index - 1`` for an empty log
    last_index: int
    snapshot_index: int
    snapshot_term: int
    recovered_partially: bool
    #: log segments, open and sealed
    segments: int
    sealed_segments: int
    #: records stored (sealed segments' counts plus the open segment's rows; includes compacted records
    #: awaiting whole-segment deletion) and their payload bytes
    stored_entries: int
    stored_bytes: int
    #: ``created_at`` of the oldest segment still stored (None: no segment)
    oldest_segment_created_at: float | None
    newest_snapshot: SnapshotHead | None

    @property
    def entries(self) -> int:
        """Entries in the log: ``last_index - first_index + 1``."""
        return self.last_index - self.first_index + 1


# The view supplies the stored columns only (see the module docstring for why not last_index/entries).
_HARD_STATE = ("SELECT group_id, name, current_term, voted_for, commit_index, first_index, snapshot_index, "
               "snapshot_term, recovered_partially, segments FROM group_status")


def _one(conn: apsw.Connection, sql: str, params: tuple[int, ...]) -> Any:
    """The single row of an aggregate query without GROUP BY (SQLite always returns exactly one).
    Its values are ``Any``: they are what the file holds, and a damaged row may hold any SQLite type."""
    row = conn.execute(sql, params).fetchone()
    assert row is not None, sql  # an aggregate without GROUP BY yields one row even over no rows
    return row


@contextmanager
def _read_transaction(conn: apsw.Connection) -> Iterator[None]:
    """One read transaction around the queries (a consistent view while a node writes), unless the
    caller already holds one."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def read_last_index(conn: apsw.Connection, group_id: int, first_index: int) -> int:
    """The last index of group ``group_id``'s log whose first index is ``first_index``: the highest
    record's index from the rowid range (one B-tree seek), ``first_index - 1`` when the log is empty."""
    base = group_id * KEY_SPAN
    maxidx: int = _one(conn, "SELECT max(key) - ? FROM log_entries WHERE key >= ? AND key < ?",
                       (base, base, base + KEY_SPAN))[0] or 0
    return max(first_index - 1, maxidx)


def newest_snapshot(conn: apsw.Connection, group_id: int) -> SnapshotHead | None:
    """The newest DURABLE snapshot of ``group_id`` (highest index, then highest id), or None."""
    row: tuple[Any, ...] | None = conn.execute("SELECT snapshot_id, idx, term, kind, size, created_at, finished_at FROM snapshots "
                       "WHERE group_id=? AND status='DURABLE' ORDER BY idx DESC, snapshot_id DESC LIMIT 1",
                       (group_id,)).fetchone()
    return None if row is None else SnapshotHead(*row)


def read_group_status(conn: apsw.Connection, group_id: int | None = None) -> list[GroupStatus]:
    """Status of every group in ``conn``'s ``raft.db`` (or only of ``group_id``), ordered by group id,
    read in one read transaction (the caller's if it holds one). Cost per group: a few indexed
    lookups plus one pass over the open segment's rows (bounded by the segment policy)."""
    out: list[GroupStatus] = []
    with _read_transaction(conn):
        sql = _HARD_STATE + (" WHERE group_id=?" if group_id is not None else "") + " ORDER BY group_id"
        # Any: the values are what the file holds (see _one)
        rows: list[tuple[Any, ...]] = conn.execute(sql, () if group_id is None else (group_id,)).fetchall()
        for gid, name, term, vote, commit, first, snap_idx, snap_term, partial, nseg in rows:
            base = gid * KEY_SPAN
            nsealed, oldest, sealed_bytes, sealed_entries = _one(
                conn, "SELECT count(last_index), min(created_at), COALESCE(sum(bytes), 0), "
                "COALESCE(sum(entry_count), 0) FROM log_segments WHERE group_id=?", (gid,))
            open_first = _one(conn, "SELECT max(first_index) FROM log_segments WHERE group_id=? AND "
                                    "last_index IS NULL", (gid,))[0]
            open_entries = open_bytes = 0
            if open_first is not None:
                open_entries, open_bytes = _one(
                    conn, "SELECT count(*), COALESCE(sum(length(payload)), 0) FROM log_entries WHERE key >= ? AND key < ?",
                    (base + open_first, base + KEY_SPAN))
            out.append(GroupStatus(
                group_id=gid, name=name, current_term=term, voted_for=vote, commit_index=commit,
                first_index=first, last_index=read_last_index(conn, gid, first), snapshot_index=snap_idx,
                snapshot_term=snap_term, recovered_partially=bool(partial), segments=nseg,
                sealed_segments=nsealed, stored_entries=sealed_entries + open_entries,
                stored_bytes=sealed_bytes + open_bytes, oldest_segment_created_at=oldest,
                newest_snapshot=newest_snapshot(conn, gid)))
    return out
