"""Raft hard state of one group: current term, vote, commit index (``store.metadata(group)``)."""

from __future__ import annotations

import zlib
from typing import NamedTuple

from . import layout
from .args import int_arg, term_arg, text_arg
from .errors import MetadataError, RaftSqliteError


class HardState(NamedTuple):
    """The persisted Raft state of a group."""

    current_term: int
    voted_for: str | int | None
    commit_index: int


def meta_crc(group_id: int, term: int, voted_for, commit: int) -> int:
    """CRC32 stored with a ``raft_meta`` row (over group, term, typed vote and commit index)."""
    return zlib.crc32(f"{group_id}|{term}|{type(voted_for).__name__}:{voted_for}|{commit}".encode())


def group_crc(group_id: int, name: str, first_index: int, snapshot_index: int, snapshot_term: int,
              recovered_partially) -> int:
    """CRC32 stored with a ``groups`` row (the transient ``truncate_permit`` is not covered)."""
    return zlib.crc32(f"{group_id}|{name}|{first_index}|{snapshot_index}|{snapshot_term}|"
                      f"{int(bool(recovered_partially))}".encode())


def check_vote(v):
    """``v`` if it is a valid ``voted_for``: None, a str that encodes as UTF-8 (no lone surrogates), or
    an int in ``layout.MIN_INT_VOTE..layout.MAX_INT_VOTE`` (what SQLite stores as an INTEGER).
    TypeError for another type, ValueError for a value out of range."""
    if v is None:
        return v
    if type(v) is str:
        return text_arg("voted_for", v)
    if type(v) is int:
        return int_arg("voted_for", v, layout.MIN_INT_VOTE, layout.MAX_INT_VOTE)
    raise TypeError(f"voted_for must be a str, an int or None, not {type(v).__name__}")


def term_vote_changes(group: str, cur_term: int, cur_vote, term: int, vote) -> bool:
    """Raft's rules for moving the hard state from ``(cur_term, cur_vote)`` to ``(term, vote)`` (both
    already valid values): True if it is a change to write, False if it repeats what is stored; raises
    :class:`MetadataError` if the term would decrease or a vote cast in the term would change or be
    cleared (a node that voted twice in one term could elect two leaders). The one place these rules
    live: :meth:`RaftMetadataStore.set_term_and_vote` and writers that batch a term/vote change before
    committing it (the PySyncObj adapter) both call it."""
    if term < cur_term:
        raise MetadataError(f"group {group!r}: term may not decrease ({cur_term} -> {term})")
    if term == cur_term:
        if vote == cur_vote and type(vote) is type(cur_vote):
            return False
        if cur_vote is not None:
            raise MetadataError(f"group {group!r}: already voted for {cur_vote!r} in term {term}; "
                                f"cannot vote for {vote!r}")
    return True


class RaftMetadataStore:
    """``current_term`` (0 at first), ``voted_for`` (None) and ``commit_index`` (0) of one group.

    Rules (violations raise :class:`MetadataError` and write nothing): the term never decreases; a
    vote, once cast in a term, cannot change or be cleared in that term (repeating it is a no-op);
    the commit index never decreases and never exceeds the log's ``last_index``.
    """

    def __init__(self, store, name: str):
        self._store = store
        self.group = name

    def _g(self):
        if self._store._closed:
            raise RaftSqliteError("the store is closed")
        return self._store._groups[self.group]

    @property
    def current_term(self) -> int:
        """The latest term this node has seen (0 at first)."""
        return self._g().term

    @property
    def voted_for(self):
        """The candidate voted for in ``current_term``, or None."""
        return self._g().vote

    @property
    def commit_index(self) -> int:
        """The highest index known to be committed (0 at first)."""
        return self._g().commit

    @property
    def hard_state(self) -> HardState:
        """``HardState(current_term, voted_for, commit_index)`` read at one instant."""
        g = self._g()
        return HardState(g.term, g.vote, g.commit)

    @property
    def recovered_partially(self) -> bool:
        """True when a PARTIAL recovery dropped data of this group: the node may have lost committed
        entries or its vote, so it must rejoin as a catch-up follower (no votes, no candidacy) until it
        has caught up with a leader, then call :meth:`clear_recovered_partially`."""
        return bool(self._g().recovered_partially)

    def clear_recovered_partially(self) -> None:
        """Persistently clear :attr:`recovered_partially` (after catching up with a leader)."""
        name = self.group

        def check(g):
            changed = bool(g.recovered_partially)
            g.recovered_partially = False
            return changed

        def write(conn, g, changed):
            if changed:
                self._store._write_group(conn, g)

        self._store._run(name, check, write)

    def set_term_and_vote(self, term: int, voted_for=None) -> None:
        """Atomically persist ``term`` and ``voted_for``. A higher term replaces both (the vote may be
        None); the same term may only repeat the vote already cast, or cast the first one."""
        term = term_arg("term", term)
        voted_for = check_vote(voted_for)
        name = self.group

        def check(g):
            if not term_vote_changes(name, g.term, g.vote, term, voted_for):
                return False
            g.term, g.vote = term, voted_for
            return True

        self._store._run(name, check, self._store._write_meta)

    def set_commit_index(self, index: int) -> None:
        """Persist the commit index: never lower than the current one, never above ``last_index``."""
        index = int_arg("index", index, None, None)  # any int: out of range is a MetadataError below
        name = self.group

        def check(g):
            if index < g.commit:
                raise MetadataError(f"group {name!r}: commit index may not decrease ({g.commit} -> {index})")
            if index > g.last_index:
                raise MetadataError(f"group {name!r}: commit index {index} is beyond the last index "
                                    f"{g.last_index}")
            if index == g.commit:
                return False
            g.commit = index
            return True

        self._store._run(name, check, self._store._write_meta)

    def __repr__(self):
        return f"<RaftMetadataStore {self.group!r} {self.hard_state}>"
