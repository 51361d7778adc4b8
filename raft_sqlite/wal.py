"""The append-only record stream in the ``log_entries`` table.

A record is one log entry: ``(group_id, idx, term, kind, payload)`` plus ``crc32`` computed over the
little-endian header ``<q group_id><q idx><q term><B kind>`` followed by the payload. Records are grouped
into *segments* (rotation units, per group): a new segment starts when the open one reaches
``max_entries``, ``max_bytes`` of payload, or ``max_age`` seconds. Sealing a segment writes its row in
``log_segments`` with counts, bytes and the sidecar checksum (CRC32 over the record CRCs packed as
little-endian uint32, in index order). Appends touch one b-tree page (the entry's): segment rows are
written only at rotation, truncation and compaction.

These classes run inside the store's write transaction (see :class:`raft_sqlite.store.NodeStore`); they
do not commit. Validation of Raft rules lives in :mod:`raft_sqlite.log`.
"""

from __future__ import annotations

import array
import itertools
import operator
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apsw

from . import layout
from .args import float_arg, int_arg
from .entry import KINDS, LogEntry
from .errors import CorruptionError

# ---------------------------------------------------------------------------------------------------
# The record codec: the one definition of a record's CRC, a sealed segment's sidecar checksum and its
# content digest, used by the writer, open-time recovery (recovery.py), verify and the CLI.
# ---------------------------------------------------------------------------------------------------

#: A record's CRC covers this little-endian header ``<q group_id><q idx><q term><B kind>``, then the payload.
RECORD_HEADER = struct.Struct("<qqqB")
#: The sidecar checksum folds each record CRC packed as a little-endian uint32.
_SIDECAR_ITEM = struct.Struct("<I")
#: SQL expression reading a record's payload only if it is a BLOB (NULL otherwise)
BLOB_PAYLOAD = "CASE typeof(payload) WHEN 'blob' THEN payload END"


def INT(col: str) -> str:
    """SQL reading integer column ``col`` only if it holds an integer (NULL otherwise). Corruption can turn
    any column into TEXT that is not even UTF-8, which apsw cannot hand to Python: reading through this
    guard turns such damage into a value that fails its CRC check instead of a UnicodeDecodeError."""
    return f"CASE typeof({col}) WHEN 'integer' THEN {col} END"

_PACK_HEADER = RECORD_HEADER.pack
_PACK_SIDECAR = _SIDECAR_ITEM.pack
_DATA = operator.itemgetter(2)
SPAN = layout.KEY_SPAN


def content_sql(alias: str = "") -> str:
    """:data:`CONTENT_SQL` over the columns of table alias ``alias`` (in a join; "": unqualified)."""
    p = f"{alias}." if alias else ""
    return f"CAST(string_agg({p}term || ' ' || {p}kind || char(10) || {p}payload, '') AS BLOB)"


#: A sealed segment's *content digest* (``log_segments.content_crc``) is the CRC32 of its records in
#: index order, each written as the ASCII text ``"<term> <kind>\n"`` followed by its payload. The writer
#: keeps it running from the bytes it was given (end to end, like the record CRCs); validation computes
#: it inside SQLite with this expression over a rowid range (one aggregate, no Python loop per record),
#: which is what makes opening and verifying millions of records fast.
CONTENT_SQL = content_sql()
_CONTENT_PREFIX: Callable[[tuple[int, int]], bytes] = b"%d %d\n".__mod__


def record_crc(group_id: int, idx: int, term: int, kind: int, payload: bytes) -> int:
    """CRC32 of one record (header + payload); -1 (never a CRC) when a field has the wrong type,
    which only corruption produces."""
    try:
        return zlib.crc32(payload, zlib.crc32(RECORD_HEADER.pack(group_id, idx, term, kind)))
    except (TypeError, struct.error, OverflowError):
        return -1


def crc_matches(computed: int, stored: object) -> bool:
    """True if a record's ``stored`` crc32 column verifies against ``computed`` (:func:`record_crc`). Never for
    the -1 that a field of the wrong type gives, even if the damaged column holds -1 too."""
    return computed >= 0 and computed == stored


def record_crcs(group_id: int, idxs: Sequence[int], terms: Sequence[int], kinds: Sequence[int],
                payloads: Sequence[bytes]) -> array.array[int]:
    """The CRCs of many well-typed records of one group (the writer's batch path: C-level loops, no
    Python loop per record), as an ``array('I')``."""
    crc32 = zlib.crc32
    heads = map(RECORD_HEADER.pack, itertools.repeat(group_id), idxs, terms, kinds)
    return array.array("I", map(crc32, payloads, map(crc32, heads)))


def chain_crc(crc: int, record_crc_value: int) -> int:
    """Fold one record CRC into a segment's sidecar checksum."""
    return zlib.crc32(_SIDECAR_ITEM.pack(record_crc_value), crc)


def chain_crcs(crc: int, crcs: array.array[int]) -> int:
    """Fold many record CRCs (an ``array('I')``, in index order) into a sidecar checksum at once."""
    if sys.byteorder != "little":
        crcs = array.array("I", crcs)
        crcs.byteswap()
    return zlib.crc32(crcs.tobytes(), crc)


def sidecar_checksum(crcs: Iterable[int]) -> int:
    """The sidecar checksum of a segment whose records have the CRCs ``crcs`` (in index order). Raises
    OverflowError or TypeError for a value that is not a 32-bit unsigned integer."""
    return chain_crcs(0, array.array("I", crcs))


def content_crc(crc: int, term: int, kind: int, payload: bytes) -> int:
    """Fold one record into a segment's running content digest (see :data:`CONTENT_SQL`)."""
    return zlib.crc32(payload, zlib.crc32(_CONTENT_PREFIX((term, kind)), crc))


def content_crc_batch(crc: int, terms: Sequence[int], kinds: Sequence[int], payloads: Sequence[bytes]) -> int:
    """Fold many records (in index order) into a running content digest at once."""
    if terms[0] == terms[-1] and kinds.count(0) == len(kinds):
        # one term, all NORMAL (the usual batch): every record has the same prefix, no formatting per entry
        prefix = _CONTENT_PREFIX((terms[0], 0))
        return zlib.crc32(prefix.join(payloads), zlib.crc32(prefix, crc))
    return zlib.crc32(b"".join(itertools.chain.from_iterable(zip(map(_CONTENT_PREFIX, zip(terms, kinds)),
                                                                 payloads))), crc)


def span_record_sql(alias: str = "") -> str:
    """:data:`SPAN_RECORD_SQL` over the columns of table alias ``alias`` (in a join; "": unqualified)."""
    p = f"{alias}." if alias else ""
    return (f"{p}key || ' ' || {p}segment || ' ' || {p}crc32 || ' ' || {p}term || ' ' || {p}kind || char(10) "
            f"|| {p}payload")


#: An open segment's *span digest* (what a clean close records in ``close_digests.span_crc``, with a trailer: see
#: :func:`close_span_digest`) is the CRC32 of its records in index order, each written as the ASCII text
#: ``"<key> <segment> <crc32> <term> <kind>\n"`` followed by its payload: every column of the record, so that one
#: SQLite string over many small groups' records (this expression over a key range) proves them all as written,
#: with no per-record list to parse (see :func:`raft_sqlite.logscan.check_close_digests`). The writer keeps it
#: running from what it inserts (:attr:`OpenSegment.span`).
SPAN_RECORD_SQL = span_record_sql()
_SPAN_PREFIX: Callable[[tuple[int, int, int, int, int]], bytes] = b"%d %d %d %d %d\n".__mod__
_SPAN_TRAILER: Callable[[tuple[int, ...]], bytes] = b"%d %d %d %d %d %d %d %d".__mod__
_INT_TEXT: Callable[[int], bytes] = b"%d".__mod__


def span_crc_batch(crc: int, keys: Iterable[int], segment_id: int, crcs: Iterable[int], terms: Sequence[int],
                   kinds: Sequence[int], payloads: Sequence[bytes]) -> tuple[int, int]:
    """Fold records (in index order) into a running span digest (see :data:`SPAN_RECORD_SQL`) at once: the new
    digest and the bytes the records rendered to. (C-level passes; one term and all NORMAL, the usual batch,
    formats two integers per record instead of five.)"""
    mid = b" %d " % segment_id
    if terms[0] == terms[-1] and kinds.count(0) == len(kinds):
        tails: Iterable[bytes] = itertools.repeat(b" %d 0\n" % terms[0])
    else:
        tails = map(b" %d %d\n".__mod__, zip(terms, kinds))
    text = b"".join(itertools.chain.from_iterable(zip(map(_INT_TEXT, keys), itertools.repeat(mid),
                                                      map(_INT_TEXT, crcs), tails, payloads)))
    return zlib.crc32(text, crc), len(text)


def span_trailer(segment_id: int, group_id: int, first_index: int, count: int, nbytes: int, checksum: int,
                 content: int, last_term: int) -> bytes:
    """What a close digest's span digest covers after the records: the segment's identity and the digest row's
    other fields, so that a span check proves them too (:func:`close_span_digest`): a segment row given another
    id (with its digest row) fails it, not only a damaged count or digest (found by review)."""
    return _SPAN_TRAILER((segment_id, group_id, first_index, count, nbytes, checksum, content, last_term))


def span_trailers(segment_ids: Iterable[int], group_ids: Iterable[int], first_indexes: Iterable[int],
                  counts: Iterable[int], nbytes: Iterable[int], checksums: Iterable[int], contents: Iterable[int],
                  last_terms: Iterable[int]) -> Iterator[bytes]:
    """:func:`span_trailer` of many segments (a C-level pass: a check of 10,000 groups' spans called it ~6 ms)."""
    return map(_SPAN_TRAILER, zip(segment_ids, group_ids, first_indexes, counts, nbytes, checksums, contents,
                                  last_terms))


def close_span_digest(seg: OpenSegment, group_id: int, last_term: int) -> int:
    """The span digest a clean close records for open segment ``seg`` of group ``group_id``: its running span
    digest continued over :func:`span_trailer`."""
    assert seg.span is not None
    return zlib.crc32(span_trailer(seg.segment_id, group_id, seg.first_index, seg.count, seg.nbytes, seg.checksum,
                                   seg.content, last_term), seg.span)


def content_digest(rendered: bytes | memoryview) -> int:
    """The content digest of records rendered by :data:`CONTENT_SQL` (a segment's whole text)."""
    return zlib.crc32(rendered)


#: What :func:`check_open_segment` returns for an open segment that checks out: (records, payload bytes,
#: sidecar checksum, content digest, last term, span digest and its bytes (:attr:`OpenSegment.span`), the last
#: two None where not computed)
OpenCheck = tuple[int, int, int, int, int, int | None, int | None]


def check_open_segment(conn: apsw.Connection, base: int, sid: int, lo: int, last_term: int) -> OpenCheck | None:
    """Check the open segment ``sid`` = ``lo..`` (every record of the group from ``lo`` on) in one query and
    C-level passes over its columns, without a Python loop per record: every index from ``lo`` present and
    in order with ``idx`` matching its key, each record naming ``sid``, a BLOB payload, integer columns,
    terms non-decreasing from ``last_term`` and every record CRC verified (:func:`record_crcs`). Returns
    ``(records, payload bytes, sidecar checksum, content digest, last term, span digest, its bytes)`` if all of that
    holds, else
    None: the caller then walks record by record (:class:`RecordScanner`), which finds and names the first
    problem. The open segment has no recorded digest to compare with (it is written at seal), so every
    record's own CRC is what proves it intact, as in the walk."""
    try:
        rows = conn.execute("SELECT key - ?1, idx, term, kind, payload, crc32, segment FROM log_entries "
                            "WHERE key >= ?1 + ?2 AND key < ?1 + ?3 ORDER BY key", (base, lo, SPAN)).fetchall()
    except UnicodeDecodeError:  # a column turned into TEXT that is not UTF-8
        return None
    if not rows:
        return 0, 0, 0, 0, last_term, 0, 0
    n = len(rows)
    keys, idxs, terms, kinds, payloads, crcs, segs = zip(*rows)
    if keys != tuple(range(lo, lo + n)) or idxs != keys or segs.count(sid) != n:
        return None
    if set(map(type, payloads)) != {bytes} or {*map(type, terms), *map(type, kinds), *map(type, crcs)} != {int}:
        return None
    if terms[0] < last_term or list(terms) != sorted(terms):
        return None
    try:
        stored = array.array("I", crcs)
        if stored != record_crcs(base // SPAN, idxs, terms, kinds, payloads):
            return None
    except (OverflowError, TypeError, struct.error):  # a value outside what the record format holds
        return None
    span, span_bytes = span_crc_batch(0, range(base + lo, base + lo + n), sid, crcs, terms, kinds, payloads)
    return (n, sum(map(len, payloads)), chain_crcs(0, stored), content_crc_batch(0, terms, kinds, payloads), terms[-1],
            span, span_bytes)


@dataclass
class SegmentPolicy:
    """When the open segment of a group is sealed and a new one started."""

    #: 4096: a segment is the unit of compaction, and deleting one holds the appends queued behind that
    #: commit (16,384 records of 100 B: ~21 ms, of which ~11 ms are the guard trigger's per-row check)
    max_entries: int = 4096
    max_bytes: int = 64 << 20
    max_age: float = 3600.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> SegmentPolicy:
        """Check the limits (also run at construction and by ``NodeStore.open``): ``max_entries`` an
        int in ``1..layout.MAX_INDEX``, ``max_bytes`` an int in ``1..layout.MAX_SIZE``, ``max_age`` a
        finite number of seconds >= 0 (0 seals a segment at every append). Raises TypeError or
        ValueError; returns self."""
        self.max_entries = int_arg("max_entries", self.max_entries, 1, layout.MAX_INDEX)
        self.max_bytes = int_arg("max_bytes", self.max_bytes, 1, layout.MAX_SIZE)
        self.max_age = float_arg("max_age", self.max_age, 0.0, 1e12)
        return self


class OpenSegment:
    """In-memory state of a group's open (unsealed) segment."""

    __slots__ = ("segment_id", "first_index", "count", "nbytes", "created_at", "checksum", "content", "span",
                 "span_bytes")

    def __init__(self, segment_id: int, first_index: int, count: int = 0, nbytes: int = 0, created_at: float = 0.0,
                 checksum: int = 0, content: int = 0, span: int | None = 0, span_bytes: int | None = 0) -> None:
        self.segment_id, self.first_index, self.count = segment_id, first_index, count
        self.nbytes, self.created_at, self.checksum = nbytes, created_at, checksum
        self.content = content  #: running content digest (see :data:`CONTENT_SQL`)
        #: running span digest (see :data:`SPAN_RECORD_SQL`) and the bytes its records rendered to, or None where
        #: unknown (every open path computes them today; with None the next close records no span digest, and the
        #: open after checks the segment one by one)
        self.span, self.span_bytes = span, span_bytes

    def copy(self) -> OpenSegment:
        """An independent copy (the store keeps one to roll back to when a transaction aborts)."""
        return OpenSegment(self.segment_id, self.first_index, self.count, self.nbytes, self.created_at,
                           self.checksum, self.content, self.span, self.span_bytes)

    def __repr__(self) -> str:
        return (f"OpenSegment(id={self.segment_id}, first={self.first_index}, count={self.count}, "
                f"bytes={self.nbytes})")


#: one ``log_entries`` row as inserted: (key, group_id, idx, term, kind, payload, crc32, segment)
RecordRow = tuple[int, int, int, int, int, bytes, int, int]


def cut_after(conn: apsw.Connection, group_id: int, keep_through: int, permit: int | None = None) -> None:
    """Delete the group's records ``> keep_through`` and reshape its segments (those holding only deleted
    records go, the one holding ``keep_through`` is open again), inside the caller's transaction. The
    database guard trigger refuses deleting an uncommitted record no durable snapshot covers unless the
    group's ``truncate_permit`` allows it: the permit is set to ``permit`` (default ``keep_through``) for
    the delete only and cleared again, so no other statement ever runs with it set. A snapshot install
    replacing the whole log passes ``keep_through=0`` and ``permit`` = the snapshot's index."""
    base = group_id * SPAN
    conn.execute("UPDATE groups SET truncate_permit=? WHERE group_id=?",
                 (keep_through if permit is None else permit, group_id))
    conn.execute("DELETE FROM log_entries WHERE key > ? AND key < ?", (base + keep_through, base + SPAN))
    conn.execute("UPDATE groups SET truncate_permit=NULL WHERE group_id=?", (group_id,))
    conn.execute("DELETE FROM log_segments WHERE group_id=? AND first_index > ?", (group_id, keep_through))
    conn.execute("UPDATE log_segments SET last_index=NULL, entry_count=NULL, bytes=NULL, sealed_at=NULL,"
                 " checksum=NULL, content_crc=NULL WHERE group_id=? AND last_index > ?", (group_id, keep_through))


class WalWriter:
    """Writes records and maintains segments for the store (one instance per store)."""

    INSERT = ("INSERT INTO log_entries(key, group_id, idx, term, kind, payload, crc32, segment) "
              "VALUES (?,?,?,?,?,?,?,?)")

    def __init__(self, policy: SegmentPolicy | None = None,
                 on_rotate: Callable[[int, int], object] | None = None) -> None:
        self.policy = policy or SegmentPolicy()
        self.on_rotate = on_rotate
        #: rows of deferred appends, inserted by :meth:`flush` (the store flushes before any other
        #: statement and at commit, so every batch's appends become one executemany)
        self.pending: list[RecordRow] = []
        #: called before this writer runs any statement itself (the store begins its transaction and
        #: flushes pending rows there)
        self.before_sql: Callable[[], object] | None = None

    def flush(self, conn: apsw.Connection) -> None:
        """Insert the pending rows."""
        rows = self.pending
        if rows:
            if len(rows) == 1:
                conn.execute(self.INSERT, rows[0])
            else:
                conn.executemany(self.INSERT, rows)
            rows.clear()

    def _sql(self) -> None:
        if self.before_sql is not None:
            self.before_sql()

    def _start(self, conn: apsw.Connection, group_id: int, first_index: int) -> OpenSegment:
        now = time.time()
        conn.execute("INSERT INTO log_segments(group_id, first_index, created_at) VALUES (?,?,?)",
                     (group_id, first_index, now))
        return OpenSegment(conn.last_insert_rowid(), first_index, 0, 0, now, 0, 0)

    def seal(self, conn: apsw.Connection, group_id: int, seg: OpenSegment) -> None:
        """Seal ``seg``: write its last index, counts, bytes, sidecar checksum and content digest."""
        conn.execute(
            "UPDATE log_segments SET last_index=?, entry_count=?, bytes=?, sealed_at=?, checksum=?, content_crc=? "
            "WHERE segment_id=?",
            (seg.first_index + seg.count - 1, seg.count, seg.nbytes, time.time(), seg.checksum, seg.content,
             seg.segment_id))
        if self.on_rotate is not None:
            self.on_rotate(group_id, seg.segment_id)

    def append(self, conn: apsw.Connection, group_id: int, seg: OpenSegment | None, entries: Sequence[LogEntry],
               defer: bool = False) -> OpenSegment:
        """Insert ``entries`` (validated LogEntry objects, contiguous) for ``group_id``; returns the
        open segment after the write (possibly a new one). With ``defer`` the rows are queued in
        :attr:`pending` when no segment work is needed."""
        p = self.policy
        if seg is None:
            self._sql()
            seg = self._start(conn, group_id, entries[0].index)
        now = time.time()
        nbytes = sum(map(len, map(_DATA, entries))) if len(entries) > 1 else len(entries[0][2])
        if (seg.count + len(entries) > p.max_entries or seg.nbytes + nbytes > p.max_bytes
                or (seg.count and now - seg.created_at >= p.max_age)):
            return self._append_rotating(conn, group_id, seg, entries, now)
        base = group_id * SPAN
        sid = seg.segment_id
        if len(entries) == 1:
            # the one-entry path, the most frequent: record_crc, chain_crc and content_crc inlined (the entry
            # is validated, so none of record_crc's type errors can happen here)
            i, t, d, k = entries[0]
            crc32 = zlib.crc32
            crc = crc32(d, crc32(_PACK_HEADER(group_id, i, t, k)))
            row = (base + i, group_id, i, t, k, d, crc, sid)
            if defer:
                self.pending.append(row)
            else:
                conn.execute(self.INSERT, row)
            seg.count += 1
            seg.nbytes += nbytes
            seg.checksum = crc32(_PACK_SIDECAR(crc), seg.checksum)
            seg.content = crc32(d, crc32(_CONTENT_PREFIX((t, k)), seg.content))
            if seg.span is not None and seg.span_bytes is not None:
                head = _SPAN_PREFIX((base + i, sid, crc, t, k))
                seg.span = crc32(d, crc32(head, seg.span))
                seg.span_bytes += len(head) + nbytes
            return seg
        # a batch: build the rows with map/zip (C-level loops), not a Python loop per entry
        idxs, terms, datas, kinds = zip(*entries)
        crcs = record_crcs(group_id, idxs, terms, kinds, datas)
        rows: list[RecordRow] = list(zip(range(base + idxs[0], base + idxs[0] + len(idxs)), itertools.repeat(group_id),
                                   idxs, terms, kinds, datas, crcs, itertools.repeat(sid)))
        if defer:
            self.pending.extend(rows)
        else:
            conn.executemany(self.INSERT, rows)
        seg.count += len(rows)
        seg.nbytes += nbytes
        seg.checksum = chain_crcs(seg.checksum, crcs)
        seg.content = content_crc_batch(seg.content, terms, kinds, datas)
        if seg.span is not None and seg.span_bytes is not None:
            seg.span, added = span_crc_batch(seg.span, range(base + idxs[0], base + idxs[0] + len(idxs)), sid, crcs,
                                             terms, kinds, datas)
            seg.span_bytes += added
        return seg

    def _append_rotating(self, conn: apsw.Connection, group_id: int, seg: OpenSegment, entries: Sequence[LogEntry],
                         now: float) -> OpenSegment:
        self._sql()
        p = self.policy
        base = group_id * SPAN
        rows: list[RecordRow] = []
        for e in entries:
            payload = e.data
            n = len(payload)
            if seg.count and (seg.count >= p.max_entries or seg.nbytes + n > p.max_bytes
                              or now - seg.created_at >= p.max_age):
                if rows:
                    conn.executemany(self.INSERT, rows)
                    rows = []
                self.seal(conn, group_id, seg)
                seg = self._start(conn, group_id, e.index)
            crc = record_crc(group_id, e.index, e.term, e.kind, payload)
            rows.append((base + e.index, group_id, e.index, e.term, e.kind, payload, crc, seg.segment_id))
            seg.count += 1
            seg.nbytes += n
            seg.checksum = chain_crc(seg.checksum, crc)
            seg.content = content_crc(seg.content, e.term, e.kind, payload)
            if seg.span is not None and seg.span_bytes is not None:
                head = _SPAN_PREFIX((base + e.index, seg.segment_id, crc, e.term, e.kind))
                seg.span = zlib.crc32(payload, zlib.crc32(head, seg.span))
                seg.span_bytes += len(head) + n
        conn.executemany(self.INSERT, rows)
        return seg

    def truncate_after(self, conn: apsw.Connection, group_id: int, index: int) -> OpenSegment | None:
        """Delete records ``> index`` and the segments that held only those; the segment holding
        ``index`` (if any) becomes the open one again. Returns the open segment."""
        cut_after(conn, group_id, index)
        return load_open_segment(conn, group_id)


def write_close_digests(conn: apsw.Connection, segments: Iterable[tuple[OpenSegment, int, int]]) -> int:
    """Record the counts, sidecar checksum, content digest, span digest (with its trailer: :func:`close_span_digest`)
    and last term of each open segment in ``segments`` (``(segment, its group's id, its group's last term)``)
    that holds records into ``close_digests`` (replacing every row there), inside the caller's transaction: what
    a clean close writes so that the next open checks each open segment with SQLite aggregates instead of every
    record's CRC in Python (:func:`raft_sqlite.logscan.check_close_digests`). ``segments`` are the groups'
    published open segments: a row that no longer matches the records when the next open reads it (a write
    committed after it, damage) only sends that segment to the record-by-record check. Returns the rows written."""
    rows = [(g.segment_id, g.count, g.nbytes, g.checksum, g.content,
             None if g.span is None or g.span_bytes is None else close_span_digest(g, gid, last_term),
             None if g.span is None else g.span_bytes, last_term) for g, gid, last_term in segments if g.count]
    conn.execute("DELETE FROM close_digests")
    if rows:
        conn.executemany("INSERT INTO close_digests(segment_id, entry_count, bytes, checksum, content_crc, span_crc, "
                         "span_bytes, last_term) VALUES (?,?,?,?,?,?,?,?)", rows)
    return len(rows)


#: The state of an open segment's records as a caller has just folded them: (records, payload bytes, sidecar
#: checksum, content digest or None, span digest or None, its bytes or None; the last three are read from the
#: records when the content digest is None)
Folded = tuple[int, int, int, int | None, int | None, int | None]


def load_open_segment(conn: apsw.Connection, group_id: int, *, check: bool = True) -> OpenSegment | None:
    """Rebuild the in-memory state of the group's open segment from its records (after truncation, and at
    open when a tail was dropped). Only the open segment is read: its size is bounded by the segment policy.
    ``check``: see :func:`open_segment_state`."""
    return open_segment_state(conn, group_id, conn.execute(
        "SELECT segment_id, first_index, created_at FROM log_segments "
        "WHERE group_id=? AND last_index IS NULL ORDER BY first_index DESC LIMIT 1", (group_id,)).fetchone(),
        check=check)


def open_segment_state(conn: apsw.Connection, group_id: int, row: Sequence[Any] | None,
                       folded: Folded | None = None, *, check: bool = False) -> OpenSegment | None:
    """:func:`load_open_segment` from the open segment's row ``(segment_id, first_index, created_at)`` (None:
    the group has none). ``folded``: its records' state if the caller has just checked every record from its
    first index on, in order and contiguous (the open's validation); they are then not read a second time
    (nor their content digest, when given). Otherwise the records are read and folded as stored: with
    ``check`` they are first checked as the open checks an open segment (:func:`check_open_segment`: every
    record CRC, contiguity, the segment each names, term order), and :class:`CorruptionError` names the first
    bad one. The state is what a seal or a clean close records as the truth about those records, so a caller
    that has not just validated them (a truncation reopening a sealed segment) must check: found by review, a
    truncation into a segment whose records had been damaged while the node ran folded the damage, and the
    close digest of that state then vouched for it. Open-time recovery has validated them (and keeps its own
    verdicts on damaged segment rows), so it folds without checking."""
    if row is None:
        return None
    seg = OpenSegment(row[0], row[1], 0, 0, row[2], 0)
    base = group_id * SPAN
    if folded is None and check:
        whole = check_open_segment(conn, base, seg.segment_id, seg.first_index, 0)
        if whole is None:
            raise CorruptionError(_first_problem(conn, group_id, seg))
        seg.count, seg.nbytes, seg.checksum, seg.content, _last_term, seg.span, seg.span_bytes = whole
        return seg
    if folded is not None:
        seg.count, seg.nbytes, seg.checksum, content, span, span_bytes = folded
        if content is not None:
            seg.content, seg.span, seg.span_bytes = content, span, span_bytes
            return seg
    else:
        for idx, n, crc in conn.execute(
                f"SELECT {INT('idx')}, length(payload), {INT('crc32')} FROM log_entries WHERE key >= ? AND key < ? "
                "ORDER BY key",
                (base + seg.first_index, base + SPAN)):
            if idx != seg.first_index + seg.count:
                raise CorruptionError(f"{layout.MAIN_DB}: group {group_id}: open segment {seg.segment_id} has a "
                                      f"gap at index {seg.first_index + seg.count} (found {idx})")
            seg.count += 1
            seg.nbytes += n
            seg.checksum = chain_crc(seg.checksum, crc)
    if seg.count:
        agg = conn.execute(f"SELECT {CONTENT_SQL}, CAST(string_agg({SPAN_RECORD_SQL}, '') AS BLOB) FROM log_entries "
                           "WHERE key >= ? AND key < ?", (base + seg.first_index, base + SPAN)).fetchone()
        assert agg is not None  # an aggregate without GROUP BY always yields one row
        seg.content = content_digest(agg[0] or b"")
        seg.span, seg.span_bytes = zlib.crc32(agg[1] or b""), len(agg[1] or b"")
    return seg


def _first_problem(conn: apsw.Connection, group_id: int, seg: OpenSegment) -> str:
    """What is wrong with the records of open segment ``seg`` (which failed :func:`check_open_segment`): the
    first gap, CRC mismatch, term decrease or record naming another segment, in index order."""
    where = f"{layout.MAIN_DB}: group {group_id}: open segment {seg.segment_id}"
    base, expect, last_term = group_id * SPAN, seg.first_index, 0
    for idx, idx_col, term, kind, payload, crc, segment in conn.execute(
            f"SELECT key - ?, {INT('idx')}, {INT('term')}, {INT('kind')}, {BLOB_PAYLOAD}, {INT('crc32')}, "
            f"{INT('segment')} FROM log_entries WHERE key >= ? AND key < ? ORDER BY key",
            (base, base + seg.first_index, base + SPAN)):
        if idx != expect or idx_col != idx:
            return f"{where} has a gap at index {expect} (found {idx_col})"
        if not crc_matches(record_crc(group_id, idx, term, kind, payload), crc):
            return f"{where}: CRC mismatch in log entry {idx}"
        if term < last_term:
            return f"{where}: term decreases at log entry {idx}"
        if segment != seg.segment_id:
            return f"{where}: log entry {idx} names segment {segment}"
        expect, last_term = idx + 1, term
    return f"{where} fails its check"  # (a value the record format cannot hold)


class WalReader:
    """Reads records back, verifying each record's CRC32 (a mismatch raises
    :class:`CorruptionError` naming file, group and index)."""

    # a payload that is not a BLOB (only corruption makes one) reads as NULL and fails its CRC check,
    # instead of being decoded as text
    SELECT_ONE = f"SELECT {INT('term')}, {INT('kind')}, {BLOB_PAYLOAD}, {INT('crc32')} FROM log_entries WHERE key=?"
    SELECT_RANGE = (f"SELECT {INT('idx')}, {INT('term')}, {INT('kind')}, {BLOB_PAYLOAD}, {INT('crc32')} "
                    "FROM log_entries WHERE key >= ? AND key < ? ORDER BY key")

    def get(self, conn: apsw.Connection, group_id: int, idx: int) -> LogEntry | None:
        """The entry at ``idx`` or None if there is no record."""
        row = conn.execute(self.SELECT_ONE, (group_id * SPAN + idx,)).fetchone()
        if row is None:
            return None
        term, kind, payload, crc = row
        if not crc_matches(record_crc(group_id, idx, term, kind, payload), crc):
            raise CorruptionError(f"{layout.MAIN_DB}: group {group_id}: CRC mismatch in log entry {idx}")
        return LogEntry(idx, term, payload, KINDS[kind])

    def term(self, conn: apsw.Connection, group_id: int, idx: int) -> int | None:
        """The term at ``idx`` (the record's CRC is verified), or None if there is no record."""
        e = self.get(conn, group_id, idx)
        return None if e is None else e.term

    def scan(self, conn: apsw.Connection, group_id: int, lo: int, hi: int,
             max_bytes: int | None = None) -> list[LogEntry]:
        """Entries ``lo <= idx < hi`` in order as a list, verifying each CRC; stops early (after at
        least one entry) once ``max_bytes`` of payload would be exceeded, or at the first missing index."""
        base = group_id * SPAN
        out: list[LogEntry] = []
        append = out.append
        total = 0
        expect = lo
        crc_of, kinds = record_crc, KINDS
        limit = max_bytes if max_bytes is not None else -1
        for idx, term, kind, payload, crc in conn.execute(self.SELECT_RANGE, (base + lo, base + hi)):
            if idx != expect:
                break
            if not crc_matches(crc_of(group_id, idx, term, kind, payload), crc):
                raise CorruptionError(f"{layout.MAIN_DB}: group {group_id}: CRC mismatch in log entry {idx}")
            if limit >= 0:
                total += len(payload)
                if total > limit and idx > lo:
                    break
            append(LogEntry(idx, term, payload, kinds[kind]))
            expect += 1
        return out


class WalCompactor:
    """Deletes whole sealed segments of a group whose every record is ``<= up_to``; the caller
    guarantees (and the database trigger enforces) that a DURABLE snapshot covers ``up_to``."""

    def removable(self, conn: apsw.Connection, group_id: int, up_to: int) -> list[tuple[int, int, int]]:
        """Sealed segments ``(segment_id, first_index, last_index)`` entirely at or below ``up_to``."""
        return [(r[0], r[1], r[2]) for r in conn.execute(
            "SELECT segment_id, first_index, last_index FROM log_segments WHERE group_id=? "
            "AND last_index IS NOT NULL AND last_index <= ? ORDER BY first_index", (group_id, up_to))]

    def remove(self, conn: apsw.Connection, group_id: int, segment: tuple[int, int, int]) -> int:
        """Delete one sealed segment's records and row; returns the number of records removed."""
        seg_id, first, last = segment
        base = group_id * SPAN
        conn.execute("DELETE FROM log_entries WHERE key >= ? AND key <= ?", (base + first, base + last))
        n = conn.changes()
        conn.execute("DELETE FROM log_segments WHERE segment_id=?", (seg_id,))
        return n
