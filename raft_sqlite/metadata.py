"""Raft hard state of one group: current term, vote, commit index (``store.metadata(group)``)."""

from __future__ import annotations

from typing import NamedTuple

import apsw

from . import layout
from .args import int_arg, term_arg, text_arg
from .errors import MetadataError
from .groupstate import GroupState, Vote, write_group_row, write_meta_row
from .groupstate import group_crc as group_crc  # re-exported: their old home
from .groupstate import meta_crc as meta_crc
from .kernel import Kernel


class HardState(NamedTuple):
    """The persisted Raft state of a group."""

    current_term: int
    voted_for: Vote
    commit_index: int


def check_vote(v: object) -> Vote:
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


def term_vote_changes(group: str, cur_term: int, cur_vote: Vote, term: int, vote: Vote) -> bool:
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

    def __init__(self, kernel: Kernel, name: str) -> None:
        self._kernel = kernel
        self.group = name

    def _g(self) -> GroupState:
        return self._kernel.group(self.group)

    @property
    def current_term(self) -> int:
        """The latest term this node has seen (0 at first)."""
        return self._g().term

    @property
    def voted_for(self) -> Vote:
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

        def check(g: GroupState) -> bool:
            changed = bool(g.recovered_partially)
            g.recovered_partially = False
            return changed

        def write(conn: apsw.Connection, g: GroupState, changed: bool) -> None:
            if changed:
                write_group_row(conn, g)

        self._kernel.run(name, check, write)

    def set_term_and_vote(self, term: int, voted_for: Vote = None) -> None:
        """Atomically persist ``term`` and ``voted_for``. A higher term replaces both (the vote may be
        None); the same term may only repeat the vote already cast, or cast the first one."""
        term = term_arg("term", term)
        voted_for = check_vote(voted_for)
        name = self.group

        def check(g: GroupState) -> bool:
            if not term_vote_changes(name, g.term, g.vote, term, voted_for):
                return False
            g.term, g.vote = term, voted_for
            return True

        self._kernel.run(name, check, write_meta_row)

    def set_commit_index(self, index: int) -> None:
        """Persist the commit index: never lower than the current one, never above ``last_index``."""
        index = int_arg("index", index, None, None)  # any int: out of range is a MetadataError below
        name = self.group

        def check(g: GroupState) -> bool:
            if index < g.commit:
                raise MetadataError(f"group {name!r}: commit index may not decrease ({g.commit} -> {index})")
            if index > g.last_index:
                raise MetadataError(f"group {name!r}: commit index {index} is beyond the last index "
                                    f"{g.last_index}")
            if index == g.commit:
                return False
            g.commit = index
            return True

        self._kernel.run(name, check, write_meta_row)

    def __repr__(self) -> str:
        return f"<RaftMetadataStore {self.group!r} {self.hard_state}>"
