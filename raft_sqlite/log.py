"""The Raft log of one group, on the store's record stream (:mod:`raft_sqlite.wal`)."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any

import apsw

from . import layout
from .args import int_arg
from .commit import deferred
from .entry import KINDS, EntryKind, LogEntry
from .errors import (
    CompactionError,
    CorruptionError,
    LogCompactedError,
    LogConflictError,
    LogGapError,
    LogUnavailableError,
)
from .groupstate import GroupState, write_group_row
from .kernel import Kernel

__all__ = ["KINDS", "EntryKind", "LogEntry", "PersistentRaftLog", "validate_entries"]

_MAX_INDEX, _MAX_TERM = layout.MAX_INDEX, layout.MAX_TERM


def _int(name: str, v: object) -> int:
    """An int argument of any size (a read position: out-of-log values get the contract's errors)."""
    return int_arg(name, v, None, None)


_INT_ONLY = {int}
_BYTES_ONLY = {bytes}
_KIND_ONLY = {EntryKind}
_LOGENTRY_ONLY = {LogEntry}


def _well_formed(entries: list[Any]) -> bool:
    """Fast check, at C speed for big batches: every item is a LogEntry of int index >= 1, int term >= 0,
    bytes data and an EntryKind, indexes contiguous and terms non-decreasing. False means "look closer"
    (the slow path then raises the precise error or normalises the input)."""
    if set(map(type, entries)) != _LOGENTRY_ONLY:
        return False
    idxs, terms, datas, kinds = zip(*entries)
    if (set(map(type, idxs)) != _INT_ONLY or set(map(type, terms)) != _INT_ONLY
            or set(map(type, datas)) != _BYTES_ONLY or set(map(type, kinds)) != _KIND_ONLY):
        return False
    first = idxs[0]
    if (first < 1 or terms[0] < 0 or idxs[-1] > _MAX_INDEX or terms[-1] > _MAX_TERM
            or idxs != tuple(range(first, first + len(idxs)))):
        return False
    return all(map(operator.le, terms, itertools.islice(terms, 1, None)))


def validate_entries(entries: Sequence[Any]) -> list[LogEntry]:
    """Type-check and normalise entries to a contiguous, term-monotone list of LogEntry (without
    looking at the log). Raises TypeError/ValueError, LogGapError or LogConflictError."""
    if isinstance(entries, (LogEntry, bytes, str)):
        raise TypeError("append() takes a sequence of LogEntry")
    if type(entries) is list and len(entries) > 8 and _well_formed(entries):
        return entries[:]  # a copy: the caller may reuse its list
    out = []
    prev = None
    for e in entries:
        if (type(e) is LogEntry and type(e[0]) is int and type(e[1]) is int and type(e[2]) is bytes
                and type(e[3]) is EntryKind and 1 <= e[0] <= _MAX_INDEX and 0 <= e[1] <= _MAX_TERM
                and (prev is None or (e[0] == prev[0] + 1 and e[1] >= prev[1]))):
            out.append(e)  # fast path: already a well-typed LogEntry that fits
            prev = e
            continue
        if type(e) is not LogEntry:
            if not isinstance(e, tuple):
                raise TypeError(f"log entries must be LogEntry, not {type(e).__name__}")
            e = LogEntry(*e)
        index, term, data, kind = e
        index, term = _int("index", index), _int("term", term)
        if not 1 <= index <= _MAX_INDEX:
            raise ValueError(f"log index must be in 1..{_MAX_INDEX}, got {index}")
        if not 0 <= term <= _MAX_TERM:
            raise ValueError(f"entry {index}: term must be in 0..{_MAX_TERM}, got {term}")
        if type(data) is not bytes:
            if not isinstance(data, (bytearray, memoryview)):
                raise TypeError(f"entry {index}: data must be bytes, not {type(data).__name__}")
            data = bytes(data)
        k = KINDS.get(kind) if not isinstance(kind, bool) else None
        if k is None:
            raise ValueError(f"entry {index}: unknown kind {kind!r}")
        if prev is not None:
            if index != prev.index + 1:
                raise LogGapError(f"entries are not contiguous: {index} follows {prev.index}")
            if term < prev.term:
                raise LogConflictError(f"entry {index}: term {term} is below the previous entry's {prev.term}")
        e = LogEntry(index, term, data, k)
        out.append(e)
        prev = e
    return out


class PersistentRaftLog:
    """The durable Raft log of one group: ``store.log(group)``.

    A new log has ``first_index == 1`` and ``last_index == 0``. After compaction or a snapshot install
    ``first_index`` is one above the snapshot's index; an empty log then has
    ``last_index == first_index - 1``. Every write is durable per the store's fsync mode when it
    returns (or when the enclosing ``store.transaction()`` exits).
    """

    def __init__(self, kernel: Kernel, name: str) -> None:
        self._kernel = kernel
        self.group = name

    def _g(self) -> GroupState:
        return self._kernel.group(self.group)

    @property
    def first_index(self) -> int:
        """Index of the first entry still held (``snapshot_index + 1`` after compaction)."""
        return self._g().first_index

    @property
    def last_index(self) -> int:
        """Index of the last entry (``first_index - 1`` when the log is empty)."""
        return self._g().last_index

    @property
    def last_term(self) -> int:
        """Term of the last entry (the snapshot's term when the log is empty, 0 at first)."""
        return self._g().last_term

    @property
    def snapshot_index(self) -> int:
        """Index of the newest DURABLE snapshot (0 if none)."""
        return self._g().snapshot_index

    def append(self, entries: Sequence[LogEntry]) -> int:
        """Append ``entries`` and return the new ``last_index``.

        Entries must be contiguous, start at ``last_index + 1`` and have non-decreasing terms not
        below the last entry's term. A gap raises :class:`LogGapError`; an index at or below
        ``last_index`` raises :class:`LogConflictError` (resolve with :meth:`truncate_after`); a term
        decrease raises :class:`LogConflictError`; wrong types raise TypeError/ValueError. Nothing is
        written on error. Concurrent appends (any groups, any threads) share one commit and one fsync.
        """
        es = validate_entries(entries)
        if not es:
            return self._kernel.pending_group(self.group).last_index
        first, term0, last = es[0].index, es[0].term, es[-1]
        name = self.group

        def check(g: GroupState) -> int:
            if first > g.last_index + 1:
                raise LogGapError(f"group {name!r}: append at {first} leaves a gap after last index {g.last_index}")
            if first <= g.last_index:
                raise LogConflictError(f"group {name!r}: append at {first} overlaps the log (last index "
                                       f"{g.last_index}); call truncate_after() to resolve conflicts")
            if term0 < g.last_term:
                raise LogConflictError(f"group {name!r}: entry {first} has term {term0}, below the last "
                                       f"entry's term {g.last_term}")
            g.last_index, g.last_term = last.index, last.term
            return last.index

        def write(conn: apsw.Connection, g: GroupState, _: object) -> None:
            self._kernel.append_records(conn, g, es)

        return self._kernel.run(name, check, deferred(write))

    def append_next(self, term: int, payloads: Sequence[bytes], kind: EntryKind = EntryKind.NORMAL) -> int:
        """Append ``payloads`` as new entries of ``term`` right after whatever the log ends with when the
        write is applied, and return the new ``last_index`` (the entries hold
        ``last_index - len(payloads) + 1 .. last_index``). This is the leader's path: many threads may
        propose at once without coordinating indexes, and their entries still share one commit and one
        fsync. Same durability and errors as :meth:`append` (a term below the last entry's term raises
        :class:`LogConflictError`)."""
        if (type(payloads) is list or type(payloads) is tuple) and len(payloads) == 1 \
                and type(payloads[0]) is bytes and type(term) is int and 0 <= term <= _MAX_TERM \
                and type(kind) is EntryKind:
            proto = [LogEntry(1, term, payloads[0], kind)]  # the common single entry: nothing to normalise
        else:
            proto = validate_entries([LogEntry(1 + i, term, p, kind) for i, p in enumerate(payloads)])
        if not proto:
            return self._kernel.pending_group(self.group).last_index
        term = proto[0].term
        name = self.group
        box: list[LogEntry] = []

        def check(g: GroupState) -> int:
            if term < g.last_term:
                raise LogConflictError(f"group {name!r}: term {term} is below the last entry's term {g.last_term}")
            base = g.last_index
            if base + len(proto) > _MAX_INDEX:
                raise ValueError(f"group {name!r}: appending {len(proto)} entries after {base} would pass the "
                                 f"highest index {_MAX_INDEX}")
            box[:] = [LogEntry(base + e.index, e.term, e.data, e.kind) for e in proto]
            g.last_index, g.last_term = base + len(proto), term
            return g.last_index

        def write(conn: apsw.Connection, g: GroupState, _: object) -> None:
            self._kernel.append_records(conn, g, box)

        return self._kernel.run(name, check, deferred(write))

    def get(self, index: int) -> LogEntry:
        """The entry at ``index`` (its CRC verified). Raises :class:`LogCompactedError` below
        ``first_index``, :class:`LogUnavailableError` above ``last_index``."""
        index = _int("index", index)
        g = self._check_range(index)
        e: LogEntry | None = self._kernel.read(lambda c: self._kernel.reader.get(c, g.gid, index))
        if e is None:
            self._check_range(index)
            raise LogUnavailableError(f"group {self.group!r}: entry {index} is gone (concurrently truncated)")
        return e

    def term(self, index: int) -> int:
        """The term of the entry at ``index``. ``term(snapshot_index)`` answers with the snapshot's term
        (``term(0) == 0`` on a log without snapshot); otherwise as :meth:`get`."""
        index = _int("index", index)
        g = self._g()
        if index == g.snapshot_index and index < g.first_index:
            return g.snapshot_term
        if index == g.last_index and index >= g.first_index:
            return g.last_term
        return self.get(index).term

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[LogEntry]:
        """Entries ``lo <= index < hi`` in order. With ``max_bytes``, stops before the payload total
        would exceed it, but returns at least one entry when ``lo < hi``. ``lo`` below ``first_index``
        raises :class:`LogCompactedError`; ``hi - 1`` above ``last_index`` raises
        :class:`LogUnavailableError`."""
        lo, hi = _int("lo", lo), _int("hi", hi)
        if max_bytes is not None:
            max_bytes = int_arg("max_bytes", max_bytes, 0, None)  # a read limit: any size >= 0
        if hi < lo:
            raise ValueError(f"entries(lo={lo}, hi={hi}): hi must be >= lo")
        g = self._g()
        if lo < g.first_index:
            raise LogCompactedError(f"group {self.group!r}: index {lo} is compacted (first index {g.first_index})")
        if hi - 1 > g.last_index:
            raise LogUnavailableError(f"group {self.group!r}: entries up to {hi - 1} requested, last index is "
                                      f"{g.last_index}")
        if lo == hi:
            return []
        out: list[LogEntry] = self._kernel.read(lambda c: self._kernel.reader.scan(c, g.gid, lo, hi, max_bytes))
        if not out or (out[-1].index < hi - 1 and (max_bytes is None)):
            self._check_range(lo)
            raise LogUnavailableError(f"group {self.group!r}: entries {lo}..{hi - 1} are gone (concurrently "
                                      "truncated or compacted)")
        return out

    def _check_range(self, index: int) -> GroupState:
        g = self._g()
        if index < g.first_index:
            raise LogCompactedError(f"group {self.group!r}: index {index} is compacted (first index "
                                    f"{g.first_index})")
        if index > g.last_index:
            raise LogUnavailableError(f"group {self.group!r}: index {index} is above the last index "
                                      f"{g.last_index}")
        return g

    def truncate_after(self, index: int) -> None:
        """Remove every entry ``> index`` (conflict resolution). Refuses with
        :class:`LogConflictError` to cut at or below the commit index, and with
        :class:`LogCompactedError` below the snapshot. A no-op when ``index >= last_index``. The segment
        that holds ``index`` becomes the open one again, and its records are checked before their state is
        rebuilt: if one was damaged since it was written, raises :class:`CorruptionError` naming it (nothing
        written)."""
        index = _int("index", index)
        name = self.group
        kernel = self._kernel

        def check(g: GroupState) -> bool:
            if index >= g.last_index:
                return False
            if index < g.commit:
                raise LogConflictError(f"group {name!r}: truncate_after({index}) would remove committed "
                                       f"entries (commit index {g.commit})")
            if index < g.first_index - 1:
                raise LogCompactedError(f"group {name!r}: truncate_after({index}) is below the first index "
                                        f"{g.first_index}")
            g.last_index = index
            if index == g.snapshot_index:
                g.last_term = g.snapshot_term
            return True

        def write(conn: apsw.Connection, g: GroupState, truncating: bool) -> None:
            if not truncating:
                return
            g.seg = kernel.writer.truncate_after(conn, g.gid, index)
            if index != g.snapshot_index:
                term = kernel.reader.term(conn, g.gid, index)
                if term is None:  # checked above: first_index <= index < last_index, so the record is there
                    raise CorruptionError(f"group {name!r}: entry {index} is missing")
                g.last_term = term

        kernel.run(name, check, write)

    def compact(self, up_to: int) -> None:
        """Discard entries ``<= up_to``: ``first_index`` becomes ``up_to + 1`` at once; records are
        physically deleted by whole sealed segments, one commit each, before this returns. While other
        writers use the store, it pauses between segments (8x each segment's commit, at most 0.1 s) so
        that their appends are not held behind its commits: on a busy store a big compaction takes
        several times as long (32 segments of 4,096 records: ~2 s instead of ~0.3 s), so call it off a
        latency-critical thread (README, "Background work and the log's tail"). Refuses with
        :class:`CompactionError` unless a DURABLE snapshot covers ``up_to`` (and ``up_to <= last_index``).
        Compacting below ``first_index`` is a no-op."""
        up_to = _int("up_to", up_to)
        name = self.group
        kernel = self._kernel

        def check(g: GroupState) -> bool:
            if up_to < g.first_index:
                return False
            if up_to > g.snapshot_index:
                raise CompactionError(f"group {name!r}: compact({up_to}) refused: the newest durable snapshot "
                                      f"covers only up to {g.snapshot_index}")
            if up_to > g.last_index:
                raise CompactionError(f"group {name!r}: compact({up_to}) is beyond the last index {g.last_index}")
            g.first_index = up_to + 1
            return True

        def write(conn: apsw.Connection, g: GroupState, moved: bool) -> None:
            if moved:
                write_group_row(conn, g)

        kernel.run(name, check, write)
        kernel.compact_segments(name)

    def __repr__(self) -> str:
        g = self._g()
        return f"<PersistentRaftLog {self.group!r} first={g.first_index} last={g.last_index}>"
