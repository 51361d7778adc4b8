"""Per-group in-memory state and the rows that persist it (``groups``, ``raft_meta``).

The committer never mutates a published :class:`GroupState`: it works on copies and publishes them in
the :class:`GroupTable` only after a successful commit (copy-then-publish), so readers on other threads
always see a committed state without taking a lock.
"""

from __future__ import annotations

import operator
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import apsw

from .wal import SPAN, OpenSegment

#: A ``voted_for`` value as stored: a node id (str), an int id, or None (no vote in the term).
Vote = str | int | None


def meta_crc(group_id: int, term: int, voted_for: Vote, commit: int) -> int:
    """CRC32 stored with a ``raft_meta`` row (over group, term, typed vote and commit index)."""
    return zlib.crc32(f"{group_id}|{term}|{type(voted_for).__name__}:{voted_for}|{commit}".encode())


def group_crc(group_id: int, name: str, first_index: int, snapshot_index: int, snapshot_term: int,
              recovered_partially: bool | int) -> int:
    """CRC32 stored with a ``groups`` row (the transient ``truncate_permit`` is not covered)."""
    return zlib.crc32(f"{group_id}|{name}|{first_index}|{snapshot_index}|{snapshot_term}|"
                      f"{int(bool(recovered_partially))}".encode())


# (``%s`` formats as ``f"{x}"`` does, ``str(x)``, for every value SQLite can hold: int, float, str, bytes, None;
# "%" of a tuple was ~15% faster than str.format of the columns)
_GROUP_TEXT: Callable[[tuple[Any, ...]], str] = "%s|%s|%s|%s|%s|%s".__mod__
_META_TEXT: Callable[[tuple[Any, ...]], str] = "%s|%s|%s:%s|%s".__mod__


def group_crcs(group_ids: Iterable[int], names: Iterable[str], first_indexes: Iterable[int],
               snapshot_indexes: Iterable[int], snapshot_terms: Iterable[int],
               recovered_partially: Iterable[bool | int]) -> list[int]:
    """:func:`group_crc` of many rows at once (C-level passes: an open of 10,000 groups spent ~25 ms calling
    :func:`group_crc` and :func:`meta_crc`). Same text, so the same CRCs, for any value SQLite can hold (tested)."""
    return list(map(zlib.crc32, map(str.encode, map(_GROUP_TEXT, zip(group_ids, names, first_indexes, snapshot_indexes,
                                                                    snapshot_terms,
                                                                    map(int, map(bool, recovered_partially)))))))


def meta_crcs(group_ids: Iterable[int], terms: Iterable[int], votes: Iterable[Vote], commits: Iterable[int]) -> list[int]:
    """:func:`meta_crc` of many rows at once (see :func:`group_crcs`)."""
    votes = list(votes)
    return list(map(zlib.crc32, map(str.encode, map(_META_TEXT, zip(group_ids, terms,
                                                                   map(operator.attrgetter("__name__"), map(type, votes)),
                                                                   votes, commits)))))


class GroupState:
    """In-memory state of one group. Published objects are never mutated: the committer works on
    copies (:meth:`copy`) and publishes them after a successful commit."""

    __slots__ = ("gid", "name", "first_index", "last_index", "last_term", "snapshot_index", "snapshot_term",
                 "term", "vote", "commit", "seg", "recovered_partially", "removed")

    def __init__(self, gid: int, name: str, first_index: int = 1, last_index: int = 0, last_term: int = 0,
                 snapshot_index: int = 0, snapshot_term: int = 0, term: int = 0, vote: Vote = None,
                 commit: int = 0, seg: OpenSegment | None = None, recovered_partially: bool = False) -> None:
        self.gid, self.name = gid, name
        self.first_index, self.last_index, self.last_term = first_index, last_index, last_term
        self.snapshot_index, self.snapshot_term = snapshot_index, snapshot_term
        self.term, self.vote, self.commit = term, vote, commit
        self.seg, self.recovered_partially = seg, recovered_partially
        #: set (on the committer's private copy) by the op that removes the group: publishing it drops the
        #: group from the table, and a later op on the same name creates a new group
        self.removed = False

    def copy(self) -> GroupState:
        """A private copy the committer may change (the open segment is copied too)."""
        seg = self.seg
        return GroupState(self.gid, self.name, self.first_index, self.last_index, self.last_term,
                          self.snapshot_index, self.snapshot_term, self.term, self.vote, self.commit,
                          None if seg is None else seg.copy(), self.recovered_partially)


class GroupTable(dict[str, GroupState]):
    """The published :class:`GroupState` of every group, by name (a dict: lookups on the write path are
    C-level). Only the committer (and open-time recovery, before the store is shared) calls
    :meth:`publish`; every other user only reads."""

    def names(self) -> list[str]:
        """Group names, sorted."""
        return sorted(self)

    def states(self) -> list[GroupState]:
        """Every published state (a snapshot of the table)."""
        return list(self.values())

    def publish(self, states: Mapping[str, GroupState]) -> None:
        """Make ``states`` the published state of their groups (after their commit succeeded); a state
        marked :attr:`GroupState.removed` drops its group."""
        for name, g in states.items():
            if g.removed:
                self.pop(name, None)
            else:
                self[name] = g


def insert_group(conn: apsw.Connection, name: str) -> GroupState:
    """Insert the rows of a new group ``name`` (``groups`` and ``raft_meta``) inside the committer's
    transaction; returns its initial state."""
    conn.execute("INSERT INTO groups(name, created_at) VALUES (?,?)", (name, time.time()))
    gid = conn.last_insert_rowid()
    conn.execute("UPDATE groups SET crc32=? WHERE group_id=?", (group_crc(gid, name, 1, 0, 0, 0), gid))
    conn.execute("INSERT INTO raft_meta(group_id, current_term, voted_for, commit_index, crc32) "
                 "VALUES (?,?,?,?,?)", (gid, 0, None, 0, meta_crc(gid, 0, None, 0)))
    return GroupState(gid, name)


def write_group_row(conn: apsw.Connection, g: GroupState) -> None:
    """Persist the group row's durable fields (first index, snapshot point, partial flag) with their CRC."""
    conn.execute("UPDATE groups SET first_index=?, snapshot_index=?, snapshot_term=?, recovered_partially=?, "
                 "crc32=? WHERE group_id=?",
                 (g.first_index, g.snapshot_index, g.snapshot_term, int(bool(g.recovered_partially)),
                  group_crc(g.gid, g.name, g.first_index, g.snapshot_index, g.snapshot_term,
                            g.recovered_partially), g.gid))


def write_meta_row(conn: apsw.Connection, g: GroupState, changed: bool = True) -> None:
    """Persist the group's hard state (term, vote, commit index) with its CRC, if ``changed``."""
    if changed:
        conn.execute("UPDATE raft_meta SET current_term=?, voted_for=?, commit_index=?, crc32=? WHERE group_id=?",
                     (g.term, g.vote, g.commit, meta_crc(g.gid, g.term, g.vote, g.commit), g.gid))


def delete_group_rows(conn: apsw.Connection, gid: int) -> list[int]:
    """Delete every row of group ``gid`` from raft.db (log records, segments, hard state, snapshot manifests,
    the group row) inside the committer's transaction; returns the ids of the snapshots whose manifests
    were deleted (their chunks in chunks.db are the caller's to delete after the commit: until then, or
    after a crash in between, they are orphans that the next open removes).

    The log guard trigger refuses to delete an entry that no durable snapshot covers up to the commit
    index or the truncate permit: a permit of 0 and no hard state row make every entry deletable, in this
    transaction only (the group row goes with it)."""
    ids = [int(r[0]) for r in conn.execute("SELECT snapshot_id FROM snapshots WHERE group_id=?", (gid,))]
    conn.execute("UPDATE groups SET truncate_permit=0 WHERE group_id=?", (gid,))
    conn.execute("DELETE FROM raft_meta WHERE group_id=?", (gid,))
    conn.execute("DELETE FROM log_entries WHERE key >= ? AND key < ?", (gid * SPAN, (gid + 1) * SPAN))
    conn.execute("DELETE FROM log_segments WHERE group_id=?", (gid,))
    conn.execute("DELETE FROM snapshots WHERE group_id=?", (gid,))
    conn.execute("DELETE FROM groups WHERE group_id=?", (gid,))
    return ids
