"""The one walk over a group's stored log records, shared by open-time recovery
(:func:`raft_sqlite.recovery.recover_groups`) and ``raft-sqlite verify`` (:mod:`raft_sqlite.verify`).

Two ways of checking records, both with the record codec of :mod:`raft_sqlite.wal`:

* :func:`check_sealed_segment` / :func:`check_sealed_segments`: a sealed segment with a content digest as
  a whole, with one SQLite aggregate (the fast path: no Python loop per record);
* :class:`RecordScanner`: record by record over a key range, checking every record's CRC, the ``idx``
  column against the key, contiguity, terms never decreasing and the segment each record names, while
  folding each segment's running sidecar checksum, count and bytes. It *yields* :class:`Finding` objects
  and never formats a message: open-time recovery stops at the first finding it cares about (its
  messages and policy live in :mod:`raft_sqlite.recovery`), verify reports them all
  (:mod:`raft_sqlite.verify`).
"""

from __future__ import annotations

import array
import bisect
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, cast

import apsw

from .wal import (
    CONTENT_SQL,
    INT,
    SPAN,
    chain_crc,
    chain_crcs,
    content_digest,
    content_sql,
    crc_matches,
    record_crc,
    sidecar_checksum,
)

#: One aggregate per sealed segment (a rowid range): everything recovery must know about its records,
#: computed inside SQLite. ``?1`` = the group's key base, ``?2``/``?3`` = first/last index, ``?4`` = segment.
#: Keys are unique and bounded by the range, so the count proves every index present; the content digest
#: covers every term, kind and payload byte as text; a payload turned into TEXT with the same bytes is a change
#: it cannot see, hence the typeof(); ``IS NOT`` (not ``!=``) so that a NULL ``idx`` or ``segment`` counts (found
#: by review). Not seen, by design: a term, kind or CRC rewritten by SQL as a BLOB or TEXT spelling the same
#: digits (no damage of the file does that, and checking every column's type costs 40% more per record); the
#: first read of such a record fails its CRC check (``CorruptionError``), as the record walk would at open.
log = logging.getLogger("raft_sqlite.store")  # the store's logger (the open's checks run here)

SEGMENT_CHECK_SQL = (
    "SELECT count(*), sum(idx IS NOT key - ?1 OR typeof(payload) != 'blob'), 0, sum(length(payload)), "
    f"{CONTENT_SQL}, string_agg(crc32, ','), sum(segment IS NOT ?4) FROM log_entries "
    "WHERE key >= ?1 + ?2 AND key <= ?1 + ?3")

#: What :func:`check_sealed_segment` returns for a segment that checks out: (first term, last term, payload bytes)
SegmentCheck = tuple[int, int, int]
#: A sealed segment to check: (segment_id, first index, last index, entry count, bytes, sidecar checksum,
#: content digest), as read from ``log_segments``
SealedSegment = tuple[int, int, int, int, int, int, int | None]


def check_sealed_segment(conn: apsw.Connection, base: int, sid: int, lo: int, hi: int, count: int, nbytes: int,
                         checksum: int, content: int | None) -> SegmentCheck | None:
    """Check sealed segment ``sid`` = ``lo..hi`` (with its recorded entry count, bytes, sidecar checksum
    and content digest) with one SQLite aggregate: every index present with ``idx`` matching its key and
    naming the segment, every payload a BLOB, the byte count, the content digest (every term, kind and
    payload byte) and the sidecar checksum (every stored record CRC) as recorded. Returns ``(first_term,
    last_term, payload_bytes)`` if all of that holds, else None (the caller then checks record by record,
    to find the first bad index). Terms are non-decreasing within the segment because they were when it
    was written and the digest proves nothing changed since. A segment row whose columns are not the
    numbers they should be (damage: text or a blob) fails the check: the caller walks it record by record
    (the arithmetic below raised TypeError on them)."""
    if not all(v.__class__ in (int, float) for v in (lo, hi, count, nbytes, checksum)):
        return None
    n = hi - lo + 1
    try:
        row = conn.execute(SEGMENT_CHECK_SQL, (base, lo, hi, sid)).fetchone()
        first_term = conn.execute("SELECT term FROM log_entries WHERE key=?", (base + lo,)).fetchone()
        last_term = conn.execute("SELECT term FROM log_entries WHERE key=?", (base + hi,)).fetchone()
    except UnicodeDecodeError:  # a column turned into TEXT that is not UTF-8
        return None
    assert row is not None  # an aggregate without GROUP BY always yields one row
    cnt, bad_idx, not_blob, total, blob, crcs, other_seg = row
    if (cnt != n or count != n or bad_idx or not_blob or other_seg or total != nbytes or blob is None
            or content_digest(blob) != content or crcs is None or first_term is None or last_term is None):
        return None
    try:
        packed = array.array("I", map(int, crcs.split(",")))
    except (ValueError, OverflowError):  # a CRC column that is not a 32-bit integer
        return None
    if len(packed) != n:
        return None
    if sidecar_checksum(packed) != checksum:
        return None
    return first_term[0], last_term[0], total


#: Worker threads for the segment aggregates (SQLite runs them without the GIL); 1 disables threading.
CHECK_THREADS = min(4, os.cpu_count() or 1)


def check_sealed_segments(connect: Callable[[], apsw.Connection], base: int,
                          segments: Sequence[SealedSegment], *,
                          conn: apsw.Connection | None = None) -> dict[int, SegmentCheck | None]:
    """:func:`check_sealed_segment` for many segments ``(sid, lo, hi, count, nbytes, checksum, content)``
    of one group (key base ``base``): see :func:`check_segments`."""
    return check_segments(connect, [(base, seg) for seg in segments], conn=conn)


def check_segments(connect: Callable[[], apsw.Connection], items: Sequence[tuple[int, SealedSegment]], *,
                   conn: apsw.Connection | None = None) -> dict[int, SegmentCheck | None]:
    """:func:`check_sealed_segment` for many ``(key base, segment)`` pairs, of one group or of many (segment
    ids are unique in a store), on ``CHECK_THREADS`` threads, each with its own read connection from
    ``connect()`` (closed afterwards). Returns ``{sid: result}``. Few segments are checked on one thread:
    on ``conn`` if given (no connection opened: an open of many small groups would otherwise open and close
    one per group), else on one from ``connect()``."""
    def run(part: Sequence[tuple[int, SealedSegment]], c: apsw.Connection | None = None) -> dict[int, SegmentCheck | None]:
        own = c is None
        c = connect() if c is None else c
        try:
            return {seg[0]: check_sealed_segment(c, base, *seg) for base, seg in part}
        finally:
            if own:
                c.close()

    if not items:
        return {}
    threads = min(CHECK_THREADS, len(items) // 4)
    if threads <= 1:
        return run(items, conn)
    from concurrent.futures import (
        ThreadPoolExecutor,  # only for big logs: keeps it off the import of a small open
    )

    out: dict[int, SegmentCheck | None] = {}
    with ThreadPoolExecutor(threads, thread_name_prefix="raft_sqlite-check") as pool:
        for res in pool.map(run, [items[i::threads] for i in range(threads)]):
            out.update(res)
    return out


#: Every open segment a clean close described (``close_digests``, see :data:`raft_sqlite.schema.close_digests`)
#: for a range ``?2 <= segment_id < ?3`` of them, in ONE result row: the inner query computes over every record of
#: the segment's group from its first index on what :data:`SEGMENT_CHECK_SQL` computes, and keeps the segments
#: whose counts, key range (so every index is present), ``idx`` and ``segment`` columns, payload types and bytes
#: agree with the digest; the outer one concatenates, for those, ``"sid records checksum content first_term
#: last_term digest_length"`` (``info``, one per segment, ``,``-separated), the records' CRCs (``crcs``, ``;``
#: between segments) and the rendered contents (``contents``), in the same order (every aggregate of one query
#: steps over the same rows). One row, not one per segment: apsw takes the GIL back for every row, which made
#: two threads checking halves as slow as one checking all. The plan walks the digests in segment order and each
#: one's records in key order (no sort); that order only decides whether digests match, never whether a mismatch
#: is accepted. Python then compares the content digests and sidecar checksums (:func:`check_close_digests`).
CLOSE_CHECK_SQL = (
    # (every item of the three concatenations is non-NULL, so they stay in line: a NULL would be skipped by one
    # and not the others; a value that is not an integer, possibly text that is not UTF-8, must not fail the
    # whole row: "x", which fails that segment's parse)
    "SELECT string_agg(sid || ' ' || n || ' ' || length(content) || ' ' || nbytes || ' ' || checksum || ' ' "
    "|| content_crc || ' ' || t1, ','), string_agg(crcs, ';'), CAST(string_agg(content, '') AS BLOB) "
    "FROM (SELECT d.segment_id AS sid, iif(typeof(d.checksum) = 'integer', d.checksum, 'x') AS checksum, "
    "iif(typeof(d.content_crc) = 'integer', d.content_crc, 'x') AS content_crc, count(*) AS n, d.bytes AS nbytes, "
    f"coalesce({content_sql('e')}, x'') AS content, "
    "coalesce(string_agg(e.crc32, ','), 'x') AS crcs, iif(typeof(max(e.term)) = 'integer', max(e.term), 'x') AS t1 "
    "FROM close_digests d JOIN log_segments s ON s.segment_id = d.segment_id "
    "JOIN log_entries e ON e.key >= s.group_id * ?1 + s.first_index AND e.key < (s.group_id + 1) * ?1 "
    "WHERE s.last_index IS NULL AND d.segment_id >= ?2 AND d.segment_id < ?3 AND d.bytes <= ?4 * d.entry_count "
    "GROUP BY d.segment_id "
    # every field of the info item non-NULL and one CRC per record (a NULL would drop an item from one
    # concatenation and not from the others); n distinct keys from the first index up to first + n - 1: every
    # index present; the rest as SEGMENT_CHECK_SQL (a NULL term or kind renders no content: digest mismatch)
    "HAVING count(*) = d.entry_count AND d.checksum IS NOT NULL AND d.content_crc IS NOT NULL "
    "AND max(e.key) = s.group_id * ?1 + s.first_index + count(*) - 1 "
    "AND sum(e.idx IS NOT e.key - s.group_id * ?1 OR e.segment IS NOT d.segment_id OR typeof(e.payload) != 'blob') = 0 "
    "AND sum(length(e.payload)) = d.bytes)")

#: Records below which :func:`check_close_digests` adds no thread (a thread and its read connection cost ~1 ms)
CLOSE_CHECK_SLICE = 8192
#: Most rendered bytes one query of :func:`check_close_digests` concatenates (a segment over it is checked alone)
CLOSE_CHECK_MAX_BYTES = 64 << 20
#: Average payload bytes per record above which an open segment is not checked against its close digest but
#: from its records (:func:`check_open_segment`): concatenating big payloads in SQLite costs more than
#: computing their CRCs in C (found by review: open segments of 1 KiB records opened 10-25% slower)
CLOSE_CHECK_MAX_AVG = 512

#: What :func:`check_close_digests` returns for an open segment that matches its close digest: (records,
#: payload bytes, sidecar checksum, content digest, last term, first term): an :data:`OpenCheck` and its first term
ClosedCheck = tuple[int, int, int, int, int, int]


def _close_checks(conn: apsw.Connection, lo: int, hi: int) -> dict[int, ClosedCheck]:
    """:func:`check_close_digests` for the digests of segments ``lo <= id < hi``, on ``conn``."""
    out: dict[int, ClosedCheck] = {}
    try:
        row = conn.execute(CLOSE_CHECK_SQL, (SPAN, lo, hi, CLOSE_CHECK_MAX_AVG)).fetchone()
    except (UnicodeDecodeError, apsw.Error) as exc:  # text that is not UTF-8 (damage); a string over SQLite's
        # length limit (slices are cut far below it; found by review): these segments check record by record
        log.debug("close digests %d..%d not checked: %r", lo, hi, exc)
        return out
    assert row is not None  # an aggregate without GROUP BY always yields one row
    info, crcs, contents = row
    if info is None or crcs is None or contents is None:  # no segment agreed with its digest
        return out
    items = [item.split(" ") for item in info.split(",")]
    try:  # every CRC of the slice at once (one C-level parse, not one per segment)
        packed: array.array[int] | None = array.array("I", json.loads("[" + crcs.replace(";", ",") + "]"))
    except (ValueError, TypeError, OverflowError):  # (not after the typeof checks; kept as a second line)
        packed = None
    if packed is not None and len(packed) != sum(int(f[1]) for f in items):
        packed = None  # never slice CRCs that do not line up with their segments (found by review)
    per_segment = crcs.split(";") if packed is None else []
    view, at, off = memoryview(contents), 0, 0
    for k, fields in enumerate(items):
        sid, n, size = int(fields[0]), int(fields[1]), int(fields[2])  # id, count(*), length(): integers always
        seg_content, off = view[off:off + size], off + size
        if packed is not None:
            seg_crcs, at = packed[at:at + n], at + n
        else:  # parse each segment's list on its own, skip those that fail
            try:
                seg_crcs = array.array("I", map(int, per_segment[k].split(",")))
            except (ValueError, OverflowError):
                continue
            if len(seg_crcs) != n:
                continue
        try:
            nbytes, checksum, content, t1 = map(int, fields[3:])
        except ValueError:  # a digest or term column that is not an integer
            continue
        if content_digest(seg_content) == content and chain_crcs(0, seg_crcs) == checksum:
            # the digest proves every term as written (integers, non-decreasing: append refuses anything else);
            # the first one opens the rendered content ("<term> <kind>\n<payload>...")
            out[sid] = (n, nbytes, checksum, content, t1, int(bytes(seg_content[:24]).split(b" ", 1)[0]))
    return out


def check_close_digests(connect: Callable[[], apsw.Connection], conn: apsw.Connection) -> dict[int, ClosedCheck]:
    """Check every open segment that the last clean close described in ``close_digests`` against its digest:
    every record of its group from its first index on present, in order, with ``idx`` matching its key,
    naming the segment, a BLOB payload, and the record count, payload bytes, content digest (every term,
    kind and payload byte) and sidecar checksum (every stored record CRC) as the close recorded them (which
    is what :func:`check_sealed_segment` proves of a sealed segment). Returns ``{segment_id: (records,
    payload bytes, sidecar checksum, content digest, first term, last term)}`` for those that match; every
    other open segment (no digest, or one that disagrees) is for the caller to check record by record.
    Many records are checked in slices of about equal records on up to ``CHECK_THREADS`` read connections from
    ``connect()`` (closed afterwards), few on ``conn``."""
    # (segment_id is the INTEGER PRIMARY KEY: always an int; the counts are whatever the file holds)
    rows = cast("list[tuple[int, object, object]]", conn.execute(
        "SELECT segment_id, entry_count, bytes FROM close_digests WHERE bytes <= ? * entry_count "
        "ORDER BY segment_id", (CLOSE_CHECK_MAX_AVG,)).fetchall())
    if not rows:
        return {}
    # slices of about equal work (100 groups of 2,000 records are as much as 10,000 of 20), none over
    # CLOSE_CHECK_MAX_BYTES of rendered records (one string in SQLite, then in Python; a slice over SQLite's
    # length limit failed every open: found by review)
    work = [(n if isinstance(n, int) and n > 0 else 1, b if isinstance(b, int) and b > 0 else 0) for _s, n, b in rows]
    total = sum(n for n, _b in work)
    threads = max(1, min(CHECK_THREADS, len(rows), total // CLOSE_CHECK_SLICE))
    share = max(1, total // threads)
    cuts, records, rendered = [rows[0][0]], 0, 0
    for (sid, _n, _b), (n, b) in zip(rows, work):
        if records and (records + n > share or rendered + b + 24 * n > CLOSE_CHECK_MAX_BYTES):
            cuts.append(sid)
            records = rendered = 0
        records, rendered = records + n, rendered + b + 24 * n
    cuts.append(rows[-1][0] + 1)
    if threads == 1:
        out: dict[int, ClosedCheck] = {}
        for k in range(len(cuts) - 1):
            out.update(_close_checks(conn, cuts[k], cuts[k + 1]))
        return out

    def run(k: int) -> dict[int, ClosedCheck]:
        c = connect()
        try:
            return _close_checks(c, cuts[k], cuts[k + 1])
        finally:
            c.close()

    from concurrent.futures import ThreadPoolExecutor

    out = {}
    with ThreadPoolExecutor(threads, thread_name_prefix="raft_sqlite-check") as pool:
        for res in pool.map(run, range(len(cuts) - 1)):
            out.update(res)
    return out


_NO_SEGMENT = object()  # "no segment looked up yet" (None is a segment column value: a damaged one)

#: The kinds of :class:`Finding`, in the order they are yielded for one record.
FINDING_KINDS = ("index", "gap", "crc", "term", "not_own", "unknown_segment", "outside_segment")


class Finding(NamedTuple):
    """One thing wrong with one record, found by :meth:`RecordScanner.walk`. ``kind`` is one of:

    * ``"index"``: the ``idx`` column (``idx_col``) differs from the index its key says (``idx``);
    * ``"gap"``: the record at ``idx`` follows ``expected - 1``: ``expected .. idx - 1`` are missing;
    * ``"crc"``: the record fails its CRC (``ptype``: its payload's SQLite type, ``"blob"`` when intact);
    * ``"term"``: its ``term`` is below ``last_term``, the highest term before it;
    * ``"not_own"``: it names ``segment``, not ``own`` (the segment with the highest first index <= it);
    * ``"unknown_segment"``: it names ``segment``, which the group has no row for (yielded once per segment);
    * ``"outside_segment"``: it names ``segment``, whose range ``seg_range`` does not hold it.
    """

    kind: str
    idx: int  #: the record's index (from its key)
    expected: int | None  # the index the walk expected here (one above the previous), None at the start
    idx_col: int | None
    segment: int | None
    ptype: str
    term: int | None
    last_term: int
    own: int | None
    seg_range: tuple[int, int | None] | None


class RecordScanner:
    """Record-by-record walk over one group's log (one instance per group and pass; see the module
    docstring). Its state carries over from one :meth:`walk` to the next, and callers that account for
    a stretch of the log themselves (a segment checked by its aggregate) set it: ``prev`` (index of the
    last record accepted, None before any), ``last_term`` (the highest term so far) and ``running``
    (per segment ``[sidecar checksum, records, payload bytes]`` of the records accepted)."""

    #: CAST: a damaged row may hold TEXT (possibly not UTF-8) where a BLOB belongs; read its bytes anyway.
    #: The payload's type is read only when it is not a BLOB (NULL for a BLOB: no string per record).
    SELECT = (f"SELECT key - ?1, {INT('idx')}, {INT('term')}, {INT('kind')}, CAST(payload AS BLOB), "
              f"CASE typeof(payload) WHEN 'blob' THEN NULL ELSE typeof(payload) END, {INT('crc32')}, "
              f"{INT('segment')} FROM log_entries WHERE key >= ?1 + ?2 AND key <= ?1 + ?3 ORDER BY key")

    def __init__(self, conn: apsw.Connection, group_id: int, prev: int | None = None,
                 progress: Callable[[int], object] | None = None,
                 segments: Sequence[tuple[int, int, int | None]] | None = None) -> None:
        """``segments``: the group's ``(segment_id, first_index, last_index)`` rows in first-index order, if
        the caller read them already (an open reads every group's in one query); else read here."""
        self.conn, self.group_id, self.base = conn, group_id, group_id * SPAN
        self.prev = prev
        self.last_term = 0
        self.lowest: int | None = None  #: index of the first record walked
        self.rows = 0  #: records accepted (walked past without the caller stopping)
        self.nbytes = 0  #: their payload bytes
        self.running: dict[int | None, list[int]] = {}
        #: called with a number of records walked (every 2000 and at the end of each walk)
        self.progress = progress
        segs = segments if segments is not None else [(r[0], r[1], r[2]) for r in conn.execute(
            "SELECT segment_id, first_index, last_index FROM log_segments WHERE group_id=? ORDER BY first_index",
            (group_id,))]
        # which segment each record must name: the one with the highest first index at or below it
        self.starts: list[tuple[int, int]] = [(lo, sid) for sid, lo, _hi in segs]
        self.bounds: dict[int, tuple[int, int | None]] = {sid: (lo, hi) for sid, lo, hi in segs}

    def walk(self, lo: int, hi: int) -> Iterator[Finding]:
        """Walk the records ``lo .. hi`` (inclusive) in index order, yielding a :class:`Finding` for each
        problem. A record is *accepted* (counted, folded into its segment's running sidecar, ``prev`` and
        ``last_term`` advanced) once its findings have been yielded: a caller that stops at a finding
        (closing the generator) leaves the state at the record before."""
        gid, starts, bounds, running = self.group_id, self.starts, self.bounds, self.running
        k = max(0, bisect.bisect_right(starts, (lo, float("inf"))) - 1)
        own = starts[k][1] if starts else None
        next_lo = starts[k + 1][0] if k + 1 < len(starts) else None
        crc_of, progress = record_crc, self.progress
        # the per-record state lives in locals (this loop is on the open path) and is written back when the
        # walk ends or the caller stops it (the finally below runs on the generator's close too); the record
        # CRCs of the current segment are collected in an array and folded into its sidecar in one call
        prev, last_term, lowest, rows, nbytes = self.prev, self.last_term, self.lowest, 0, 0
        cur_seg: object = _NO_SEGMENT
        r = [0, 0, 0]
        pend: array.array[int] = array.array("I")
        pend_append, seg_bytes = pend.append, 0
        s_lo: int | None = None
        s_hi: int | None = None
        walked = 0
        try:
            for idx, idx_col, term, kind, payload, ptype, crc, seg in self.conn.execute(self.SELECT,
                                                                                        (self.base, lo, hi)):
                walked += 1
                if lowest is None:
                    lowest = idx
                if payload is None:
                    payload = b""
                expected = None if prev is None else prev + 1
                if idx_col != idx:
                    yield Finding("index", idx, expected, idx_col, seg, ptype or "blob", term, last_term, own, None)
                if idx != expected and expected is not None:
                    yield Finding("gap", idx, expected, idx_col, seg, ptype or "blob", term, last_term, own, None)
                if ptype is not None or not crc_matches(crc_of(gid, idx_col, term, kind, payload), crc):
                    yield Finding("crc", idx, expected, idx_col, seg, ptype or "blob", term, last_term, own, None)
                if term.__class__ is not int:  # only damage (NULL from INT()) makes it anything else
                    term = last_term
                if term < last_term:
                    yield Finding("term", idx, expected, idx_col, seg, ptype or "blob", term, last_term, own, None)
                while next_lo is not None and idx >= next_lo:
                    k += 1
                    own = starts[k][1]
                    next_lo = starts[k + 1][0] if k + 1 < len(starts) else None
                if seg != own:
                    yield Finding("not_own", idx, expected, idx_col, seg, ptype or "blob", term, last_term, own, None)
                if seg != cur_seg:
                    r[0] = chain_crcs(r[0], pend)
                    r[1] += len(pend)
                    r[2] += seg_bytes
                    del pend[:]
                    seg_bytes = 0
                    got = running.get(seg)
                    if got is None:
                        got = running[seg] = [0, 0, 0]
                        if seg not in bounds:
                            yield Finding("unknown_segment", idx, expected, idx_col, seg, ptype or "blob", term,
                                          last_term, own, None)
                    r, cur_seg = got, seg
                    s_lo, s_hi = bounds.get(seg, (None, None)) if seg is not None else (None, None)
                if s_lo is not None and (idx < s_lo or (s_hi is not None and idx > s_hi)):
                    yield Finding("outside_segment", idx, expected, idx_col, seg, ptype or "blob", term, last_term,
                                  own, (s_lo, s_hi))
                # accepted: nothing above made the caller stop
                try:
                    pend_append(crc)
                except (TypeError, OverflowError):
                    # a damaged CRC column (not a uint32; the record was reported above): fold what came before,
                    # then a stand-in for it, so that the segment's sidecar is checked (and mismatches) instead
                    # of the walk dying on the value (it raised struct.error before)
                    r[0] = chain_crcs(r[0], pend)
                    r[1] += len(pend)
                    r[2] += seg_bytes
                    del pend[:]
                    seg_bytes = 0
                    r[0] = chain_crc(r[0], crc & 0xFFFFFFFF if crc.__class__ is int else 0)
                    r[1] += 1
                seg_bytes += len(payload)
                rows += 1
                nbytes += len(payload)
                prev = idx
                if term > last_term:
                    last_term = term
                if progress is not None and walked % 2000 == 0:
                    progress(2000)
            if progress is not None and walked % 2000:
                progress(walked % 2000)
        finally:
            r[0] = chain_crcs(r[0], pend)
            r[1] += len(pend)
            r[2] += seg_bytes
            self.prev, self.last_term, self.lowest = prev, last_term, lowest
            self.rows += rows
            self.nbytes += nbytes

    def sidecar(self, sid: int) -> tuple[int, int, int]:
        """``(sidecar checksum, records, payload bytes)`` folded so far for segment ``sid`` (zeros if none)."""
        r = self.running.get(sid)
        return (r[0], r[1], r[2]) if r is not None else (0, 0, 0)
