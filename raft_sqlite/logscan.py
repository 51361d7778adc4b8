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
import itertools
import json
import logging
import operator
import os
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple, TypeVar, cast

import apsw

from .wal import (
    CONTENT_SQL,
    INT,
    SPAN,
    SPAN_RECORD_SQL,
    chain_crc,
    chain_crcs,
    content_digest,
    content_sql,
    crc_matches,
    record_crc,
    sidecar_checksum,
    span_record_sql,
    span_trailers,
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
T = TypeVar("T")

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
#: Page cache, in pages, of the read connections a check opens for its threads. A check reads each page once,
#: in order: a small cache recycles the same few page buffers, still in the CPU's caches, where the store's
#: 32 MiB one takes a fresh buffer for every page read (measured: the range scans of 200,000 records over
#: 10,000 groups on two threads, 95 ms with 32 MiB, 70-74 ms with 50-128 pages).
CHECK_CACHE_PAGES = 64


def _check_connection(connect: Callable[[], apsw.Connection]) -> apsw.Connection:
    """A connection from ``connect()`` for a check's thread, with the page cache :data:`CHECK_CACHE_PAGES`."""
    conn = connect()
    try:
        conn.execute(f"PRAGMA cache_size={CHECK_CACHE_PAGES}").fetchall()
    except BaseException:
        conn.close()
        raise
    return conn


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
        c = _check_connection(connect) if c is None else c
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
#: among the ids in the JSON list ``?2``, in ONE result row: the inner query computes over every record of the
#: segment's group from its first index on what :data:`SEGMENT_CHECK_SQL` computes, and keeps the segments
#: whose counts, key range (so every index is present), ``idx`` and ``segment`` columns, payload types and bytes
#: agree with the digest; the outer one concatenates, for those, ``"sid records length checksum content first_term
#: last_term"`` (``info``, one per segment, ``,``-separated), the records' CRCs (``crcs``, ``;`` between
#: segments) and the rendered contents (``contents``), in the same order (every aggregate of one query steps
#: over the same rows). One row, not one per segment: apsw takes the GIL back for every row, which made two
#: threads checking halves as slow as one checking all. The plan walks the digests in segment order and each
#: one's records in key order (no sort); that order only decides whether digests match, never whether a mismatch
#: is accepted. Python then compares the content digests and sidecar checksums (:func:`check_close_digests`).
#: The per-segment check: segments that are not one of a run of small groups (:data:`CLOSE_SPAN_SQL`), and
#: those of a run whose span check failed.
CLOSE_CHECK_SQL = (
    # (every item of the three concatenations is non-NULL, so they stay in line: a NULL would be skipped by one
    # and not the others; a value that is not an integer, possibly text that is not UTF-8, must not fail the
    # whole row: "x", which fails that segment's parse)
    "SELECT string_agg(sid || ' ' || n || ' ' || length(content) || ' ' || nbytes || ' ' || checksum || ' ' "
    "|| content_crc || ' ' || t1 || ' ' || length(span), ','), string_agg(crcs, ';'), "
    "CAST(string_agg(content, '') AS BLOB), CAST(string_agg(span, '') AS BLOB) "
    "FROM (SELECT d.segment_id AS sid, iif(typeof(d.checksum) = 'integer', d.checksum, 'x') AS checksum, "
    "iif(typeof(d.content_crc) = 'integer', d.content_crc, 'x') AS content_crc, count(*) AS n, d.bytes AS nbytes, "
    f"coalesce({content_sql('e')}, x'') AS content, "
    # (the records' span digest too, for the state the writer goes on from: without it the next close records
    # none, and every later open checks the segment one by one again; found by review)
    f"coalesce(CAST(string_agg({span_record_sql('e')}, '') AS BLOB), x'') AS span, "
    "coalesce(string_agg(e.crc32, ','), 'x') AS crcs, iif(typeof(max(e.term)) = 'integer', max(e.term), 'x') AS t1 "
    "FROM close_digests d JOIN log_segments s ON s.segment_id = d.segment_id "
    "JOIN log_entries e ON e.key >= s.group_id * ?1 + s.first_index AND e.key < (s.group_id + 1) * ?1 "
    "WHERE s.last_index IS NULL AND d.segment_id IN (SELECT value FROM json_each(?2)) AND d.bytes <= ?3 * d.entry_count "
    "GROUP BY d.segment_id "
    # every field of the info item non-NULL and one CRC per record (a NULL would drop an item from one
    # concatenation and not from the others); n distinct keys from the first index up to first + n - 1: every
    # index present; the rest as SEGMENT_CHECK_SQL (a NULL term or kind renders no content: digest mismatch)
    "HAVING count(*) = d.entry_count AND d.checksum IS NOT NULL AND d.content_crc IS NOT NULL "
    "AND max(e.key) = s.group_id * ?1 + s.first_index + count(*) - 1 "
    "AND sum(e.idx IS NOT e.key - s.group_id * ?1 OR e.segment IS NOT d.segment_id OR typeof(e.payload) != 'blob') = 0 "
    "AND sum(length(e.payload)) = d.bytes)")

#: A *span*: the open segments of consecutive small groups (each group's only segment row, open, starting at the
#: group's first index and described by its close digest), checked together in one range scan over their keys
#: ``?2 <= key < ?3``, as the sealed segments of one big group are (:data:`SEGMENT_CHECK_SQL`): every record's
#: ``idx`` matching its key and its payload a BLOB; the record count; and every record rendered with all its
#: columns (:data:`raft_sqlite.wal.SPAN_RECORD_SQL`), as one string. Python then cuts it where the digests say and
#: compares each part with its span digest (:func:`_span_checks`). Much cheaper than :data:`CLOSE_CHECK_SQL` over
#: many small groups: no join, no grouping, no list of CRCs to parse.
CLOSE_SPAN_SQL = (
    "SELECT count(*), sum(idx IS NOT (key & ?1) OR typeof(payload) != 'blob' OR typeof(segment) != 'integer' "
    f"OR typeof(term) != 'integer'), CAST(coalesce(string_agg({SPAN_RECORD_SQL}, ''), x'') AS BLOB) "
    "FROM log_entries WHERE key >= ?2 AND key < ?3")
#: The segment rows of every group ``?2 <= group_id < ?3`` in group order, as ONE row: a JSON list of a
#: :data:`SpanDigest` for each group that may be in a span, ``[group_id, 0]`` for every other (bare columns of a
#: one-row group are that row's). One row, not one per group: a thread fetching rows takes the GIL back for each,
#: and waits for it while another thread runs Python (measured: 10,000 rows took 40 s beside a busy thread).
CLOSE_SPAN_GROUPS_SQL = (
    "SELECT '[' || coalesce(string_agg(iif(ok, '[' || group_id || ',' || segment_id || ',' || first_index || ',' "
    "|| entry_count || ',' || bytes || ',' || checksum || ',' || content_crc || ',' || span_crc || ',' || span_bytes "
    "|| ',' || last_term || ',' || printf('%!.17g', created_at) || ',1]', '[' || group_id || ',0]'), ','), '') || ']' "
    "FROM (SELECT s.group_id, s.segment_id, s.first_index, d.entry_count, d.bytes, d.checksum, d.content_crc, "
    "d.span_crc, d.span_bytes, d.last_term, s.created_at, "
    "count(*) = 1 AND s.last_index IS NULL AND s.first_index IS g.first_index "
    "AND typeof(s.created_at) IN ('real', 'integer') AND typeof(s.first_index) = 'integer' "
    "AND typeof(d.entry_count) = 'integer' AND typeof(d.bytes) = 'integer' AND typeof(d.checksum) = 'integer' "
    "AND typeof(d.content_crc) = 'integer' AND typeof(d.span_crc) = 'integer' AND typeof(d.span_bytes) = 'integer' "
    "AND typeof(d.last_term) = 'integer' AND d.entry_count > 0 AND d.bytes <= ?1 * d.entry_count "
    "AND d.span_bytes > 0 AS ok FROM log_segments s JOIN groups g USING (group_id) "
    "LEFT JOIN close_digests d ON d.segment_id = s.segment_id WHERE s.group_id >= ?2 AND s.group_id < ?3 "
    "GROUP BY s.group_id ORDER BY s.group_id)")

#: Records below which :func:`check_close_digests` adds no part, and no thread (a thread and its read connection
#: cost ~1 ms)
CLOSE_CHECK_SLICE = 8192
#: Most parts :func:`check_close_digests` cuts the groups into (each costs a query or two)
CLOSE_CHECK_PARTS = 64
#: Most rendered bytes one query of :func:`check_close_digests` concatenates (a segment over it is checked alone)
CLOSE_CHECK_MAX_BYTES = 64 << 20
#: Average payload bytes per record above which an open segment is not checked against its close digest but
#: from its records (:func:`check_open_segment`): concatenating big payloads in SQLite costs more than
#: computing their CRCs in C (found by review: open segments of 1 KiB records opened 10-25% slower)
CLOSE_CHECK_MAX_AVG = 512
#: Fewest segments a span holds: shorter runs of small groups are checked per segment
CLOSE_SPAN_MIN = 16
#: Most rendered bytes one span check reads at once (several parts per thread let one thread's Python run while
#: another's SQL does, and keep SQLite's string from growing by large copies: 10,000 groups opened ~10% faster
#: with 2-4 MiB than with one part per thread)
CLOSE_SPAN_BYTES = 2 << 20

#: What :func:`check_close_digests` returns for an open segment that matches its close digest: (records,
#: payload bytes, sidecar checksum, content digest, last term, span digest, span bytes, first term): an
#: :data:`OpenCheck` and its first term (None when not read: a span's segment is its group's only one, at its
#: first index, where no earlier term bounds it)
ClosedCheck = tuple[int, int, int, int, int, int | None, int | None, int | None]
#: One group of a span: (group_id, segment_id, first index, records, bytes, checksum, content digest, span digest,
#: span bytes, last term, segment created_at, 1), all integers but created_at (the last field: whether the group
#: may be in a span; see :data:`CLOSE_SPAN_GROUPS_SQL`)
SpanDigest = tuple[int, int, int, int, int, int, int, int, int, int, float, int]
SPAN_FIELDS = 12


class CloseChecks(NamedTuple):
    """What :func:`check_close_digests` found."""

    #: the open segments that match their close digests: ``{segment_id: ClosedCheck}``
    closed: dict[int, ClosedCheck]
    #: the groups checked by spans: each has one segment row, open, starting at the group's first index (that
    #: segment matches its digest): ``{group_id: (segment_id, created_at)}``
    alone: dict[int, tuple[int, float]]


def _close_checks(conn: apsw.Connection, sids: Sequence[int]) -> dict[int, ClosedCheck]:
    """:func:`check_close_digests` for the digests of segments ``sids``, one by one, on ``conn``."""
    out: dict[int, ClosedCheck] = {}
    try:
        row = conn.execute(CLOSE_CHECK_SQL, (SPAN, json.dumps(list(sids)), CLOSE_CHECK_MAX_AVG)).fetchone()
    except (UnicodeDecodeError, apsw.Error) as exc:  # text that is not UTF-8 (damage); a string over SQLite's
        # length limit (slices are cut far below it; found by review): these segments check record by record
        log.debug("close digests of %d segment(s) not checked: %r", len(sids), exc)
        return out
    assert row is not None  # an aggregate without GROUP BY always yields one row
    info, crcs, contents, spans = row
    if info is None or crcs is None or contents is None or spans is None:  # no segment agreed with its digest
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
    span_view, span_off = memoryview(spans), 0
    for k, fields in enumerate(items):
        sid, n, size = int(fields[0]), int(fields[1]), int(fields[2])  # id, count(*), length(): integers always
        seg_content, off = view[off:off + size], off + size
        span_size = int(fields[7])  # length(): an integer always
        seg_span, span_off = span_view[span_off:span_off + span_size], span_off + span_size
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
            nbytes, checksum, content, t1 = map(int, fields[3:7])
        except ValueError:  # a digest or term column that is not an integer
            continue
        if content_digest(seg_content) == content and chain_crcs(0, seg_crcs) == checksum:
            # the digest proves every term as written (integers, non-decreasing: append refuses anything else);
            # the first one opens the rendered content ("<term> <kind>\n<payload>...")
            try:
                first_term = _first_term(seg_content)
            except ValueError:  # a first term that is no integer (damage the digest was made to match; review)
                continue
            out[sid] = (n, nbytes, checksum, content, t1, zlib.crc32(seg_span), span_size, first_term)
    return out


def _first_term(rendered: memoryview) -> int:
    """The term of the first record of rendered records (``"<term> <kind>\\n<payload>..."``)."""
    return int(bytes(rendered[:24]).split(b" ", 1)[0])


def _span_checks(conn: apsw.Connection, span: Sequence[SpanDigest]) -> dict[int, ClosedCheck] | None:
    """Check the open segments of the consecutive small groups ``span`` (in group order; see
    :data:`CLOSE_SPAN_SQL`) together, on ``conn``: all of them, or None (one or more do not match their digests,
    or the span holds records no digest accounts for); the caller then checks them one by one.

    What proves them: the range scan renders every record of the keys from the first group's first index to the
    last group's end with all its columns; its length is the sum of the digests' span bytes (so no other record
    is there), and each digest's part, cut where their span bytes say, continued over the digest row's other
    fields (:func:`raft_sqlite.wal.close_span_digest`), gives its span digest: every record's key, segment, CRC,
    term, kind and payload as written, and the row's counts, sidecar checksum, content digest and last term as
    the writer had them. Add every ``idx`` matching its key and every payload a BLOB. The per-segment steps are
    C-level ``map`` passes, not a Python loop (10,000 segments: the loop cost more than the scan)."""
    lo = span[0][0] * SPAN + span[0][2]
    hi = (span[-1][0] + 1) * SPAN
    if not 0 <= lo <= _MAX_KEY or hi > _MAX_KEY:  # (bounds SQLite cannot take: a damaged first index, or group
        # ids near 2**23; found by review)
        return None
    try:
        row = conn.execute(CLOSE_SPAN_SQL, (SPAN - 1, lo, hi)).fetchone()
    except (UnicodeDecodeError, apsw.Error) as exc:
        log.debug("span of %d close digest(s) not checked: %r", len(span), exc)
        return None
    assert row is not None  # an aggregate without GROUP BY always yields one row
    n, bad, contents = row
    gids, sids, firsts, counts, sizes, checksums, digests, spans, span_bytes, last_terms, _created, _ok = zip(*span)
    if bad or n != sum(counts) or len(contents) != sum(span_bytes):
        return None
    view = memoryview(contents)
    ends = list(itertools.accumulate(span_bytes))
    running = list(map(zlib.crc32, map(view.__getitem__, map(slice, [0, *ends[:-1]], ends))))
    trailers = span_trailers(sids, gids, firsts, counts, sizes, checksums, digests, last_terms)
    if list(map(zlib.crc32, trailers, running)) != list(spans):
        return None
    return dict(zip(sids, zip(counts, sizes, checksums, digests, last_terms, running, span_bytes,
                              itertools.repeat(None))))


def _spans(conn: apsw.Connection, lo: int, hi: int) -> tuple[list[list[SpanDigest]], set[int] | None]:
    """The runs of at least :data:`CLOSE_SPAN_MIN` consecutive small groups with ids ``lo <= id < hi`` whose open
    segments a span check covers (see :data:`CLOSE_SPAN_SQL`), and the segment ids they hold, or None if they
    are every group of the range that has a segment (then no other digest of the range can match)."""
    try:
        row = conn.execute(CLOSE_SPAN_GROUPS_SQL, (CLOSE_CHECK_MAX_AVG, lo, hi)).fetchone()
        assert row is not None  # an aggregate without GROUP BY always yields one row
        groups = cast("list[SpanDigest]", json.loads(row[0]))
    except (UnicodeDecodeError, ValueError, apsw.Error) as exc:  # a group id that is not an integer (damage):
        # no spans here (and a query SQLite refuses costs these groups the segment-by-segment check, no more)
        log.debug("no spans among groups %d..%d: %r", lo, hi, exc)
        return [], set()
    runs: list[list[SpanDigest]] = []
    others = False
    for fields, rows in itertools.groupby(groups, key=len):
        run = list(rows)
        if fields == SPAN_FIELDS and len(run) >= CLOSE_SPAN_MIN:
            runs.append(run)
        else:
            others = True
    if not others:
        return runs, None
    return runs, set(itertools.chain.from_iterable(map(operator.itemgetter(1), run) for run in runs))


def _cut(items: Sequence[T], sizes: Iterable[int], most: int | None = None) -> list[list[T]]:
    """``items`` in consecutive parts of at most ``most`` bytes (default :data:`CLOSE_CHECK_MAX_BYTES`; by
    ``sizes``; an item over it alone)."""
    most = CLOSE_CHECK_MAX_BYTES if most is None else most
    sizes = list(sizes)
    if sum(sizes) <= most:
        return [list(items)] if items else []
    parts: list[list[T]] = []
    part: list[T] = []
    total = 0
    for item, size in zip(items, sizes):
        if part and total + size > most:
            parts.append(part)
            part, total = [], 0
        part.append(item)
        total += size
    if part:
        parts.append(part)
    return parts


_MAX_KEY = (1 << 63) - 1

#: Most groups one part of a thread's range covers (the spans' list of groups is read as one string)
CLOSE_SPAN_GROUPS = 8192


def _check_range(conn: apsw.Connection, lo: int, hi: int) -> CloseChecks:
    """:func:`check_close_digests` for the open segments of the groups with ids ``lo <= id < hi``, on ``conn``, in
    parts of :data:`CLOSE_SPAN_GROUPS` groups (so that what is read at once stays bounded however many groups
    the node has)."""
    out = CloseChecks({}, {})
    at = lo
    while at < hi:
        nxt = conn.execute("SELECT group_id FROM groups WHERE group_id >= ? AND group_id < ? ORDER BY group_id "
                           "LIMIT 1 OFFSET ?", (at, hi, CLOSE_SPAN_GROUPS)).fetchone()
        end = hi if nxt is None or nxt[0].__class__ is not int or nxt[0] <= at else nxt[0]
        got = _check_part(conn, at, end)
        out.closed.update(got.closed)
        out.alone.update(got.alone)
        at = end
    return out


def _check_part(conn: apsw.Connection, lo: int, hi: int) -> CloseChecks:
    """:func:`_check_range` for the groups with ids ``lo <= id < hi``: runs of small groups by spans (a span that
    fails, segment by segment), every other digest segment by segment, in parts of at most
    :data:`CLOSE_CHECK_MAX_BYTES` rendered."""
    out = CloseChecks({}, {})
    runs, in_spans = _spans(conn, lo, hi)
    for run in runs:
        for span in _cut(run, map(operator.itemgetter(8), run), CLOSE_SPAN_BYTES):
            got = _span_checks(conn, span)
            if got is None:
                log.debug("span of %d close digest(s) failed; checking them one by one", len(span))
                out.closed.update(_close_checks(conn, [d[1] for d in span]))
            else:
                out.closed.update(got)
                out.alone.update(zip(map(operator.itemgetter(0), span),
                                     zip(map(operator.itemgetter(1), span), map(operator.itemgetter(10), span))))
    if in_spans is None:
        return out
    # the other digests of these groups' segments (a digest whose segment row is gone can match nothing)
    rest = [r for r in cast("list[tuple[int, object, object]]", conn.execute(
        "SELECT d.segment_id, d.entry_count, d.bytes FROM close_digests d JOIN log_segments s USING (segment_id) "
        "WHERE s.group_id >= ? AND s.group_id < ? AND d.bytes <= ? * d.entry_count ORDER BY d.segment_id",
        (lo, hi, CLOSE_CHECK_MAX_AVG)).fetchall()) if r[0] not in in_spans]
    sizes = [(b if isinstance(b, int) and b > 0 else 0) + 24 * (n if isinstance(n, int) and n > 0 else 1)
             for _s, n, b in rest]
    for part in _cut([r[0] for r in rest], sizes):
        out.closed.update(_close_checks(conn, part))
    return out


class CloseDigestCheck:
    """The check of every open segment that the last clean close described in ``close_digests`` against its
    digest, started at construction on threads of its own (the caller goes on meanwhile); :meth:`completed`
    yields what it found part by part as it goes (the caller's thread checking parts too meanwhile),
    :meth:`result` waits for all of it. Every record of each segment's group from its first index on present,
    in order, with ``idx`` matching its key, naming the segment, a BLOB payload, and the record count, payload
    bytes, content digest (every term, kind and payload byte) and sidecar checksum (every stored record CRC) as
    the close recorded them (which is what :func:`check_sealed_segment` proves of a sealed segment).

    The open segments of runs of small groups (each group's only segment) are checked by spans, one range
    scan each (:func:`_span_checks`); a span that fails, and every other digest, segment by segment
    (:data:`CLOSE_CHECK_SQL`). The groups are cut into parts (ranges of group ids, about
    :data:`CLOSE_CHECK_SLICE` records each, at most :data:`CLOSE_CHECK_PARTS`), which the check's threads take
    in turn, each with its own read connection from ``connect()`` (closed afterwards): a thread that drew cheap
    parts takes more, so none waits for another at the end (with one fixed range per thread, one finished ~40 ms
    after the other in an open of 10,000 groups).

    With many records, ``CHECK_THREADS`` take parts: ``CHECK_THREADS - 1`` threads of the check's own from the
    start, and the caller's thread from when it asks for the findings (:meth:`completed`) until no part is left.
    The caller has its own work to do first (an open reads and checks every group's rows): with a thread of
    the check for each core, that work and the check's threads shared the cores, and the open took as long as
    with the caller's work done after the whole check (measured on 2 cores, 10,000 groups). Few records are
    checked on one thread of the check's own. Each thread fetches few rows: a thread fetching rows takes the GIL
    back at each, and waits for it while another thread runs Python; so the connections are opened here, before
    the threads start (their pragmas are statements too)."""

    def __init__(self, connect: Callable[[], apsw.Connection], conn: apsw.Connection) -> None:
        """``conn``: a connection of the caller's thread (used here only, to plan the check)."""
        self._out = CloseChecks({}, {})
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._done: list[CloseChecks] = []  # each part's findings, in the order the parts finished
        self._ready = threading.Condition()
        self._parts: list[tuple[int, int]] = []
        self._next = 0  # the next part to take (under ``_ready``)
        self._helper: apsw.Connection | None = None  # the caller's thread's connection for taking parts
        # (total(), not sum(): a damaged count must not overflow the open; found by review)
        row = conn.execute("SELECT count(*), CAST(min(total(entry_count), 1e18) AS INTEGER) FROM close_digests").fetchone()
        assert row is not None  # an aggregate without GROUP BY always yields one row
        digests, records = row
        if not digests:
            return
        records = records if isinstance(records, int) else 0
        parts = max(1, min(CLOSE_CHECK_PARTS, digests, records // CLOSE_CHECK_SLICE))
        if digests // parts < CLOSE_SPAN_MIN:
            # no part shorter than a span (a run cut there is checked segment by segment: 100 groups of 2,000
            # records in 20 parts of 5 opened 3x slower than in 6 parts; found by the benchmark), but a part per
            # thread still when the groups are few
            parts = max(1, min(parts, max(digests // CLOSE_SPAN_MIN, min(CHECK_THREADS, digests))))
        cuts = [0]
        if parts > 1:
            # group ids cutting the digests in ``parts`` ranges of about as many each (groups without a digest, e.g.
            # empty ones, cost nothing: counting them let one part take every digest; found by review), each found
            # from the one before (one query per cut, each stepping over its range's rows only: counting with a
            # window function cost 3 ms for 10,000 groups, and equal ranges of ids put every group in one part
            # when the ids are sparse). A group id that is not an integer, damage, cuts nothing.
            step = max(1, digests // parts)  # (rounded down: the last part, which takes the rest, is the longest)
            for _ in range(parts - 1):
                at = conn.execute("SELECT s.group_id FROM close_digests d JOIN log_segments s USING (segment_id) "
                                  "WHERE s.group_id >= ? ORDER BY s.group_id LIMIT 1 OFFSET ?",
                                  (cuts[-1], step)).fetchone()
                if at is None or at[0].__class__ is not int or not cuts[-1] < at[0] < SPAN:
                    break
                cuts.append(at[0])
        cuts.append(SPAN)
        self._parts = list(zip(cuts, cuts[1:]))
        threads = min(CHECK_THREADS, len(self._parts))
        conns: list[apsw.Connection] = []
        try:
            for _ in range(threads):
                conns.append(_check_connection(connect))
            if threads > 1:
                self._helper = conns.pop()
            while conns:
                t = threading.Thread(target=self._run, args=(conns[0],), name=f"raft_sqlite-check_{len(self._threads)}",
                                     daemon=True)
                t.start()  # (from here on, the thread closes the connection)
                self._threads.append(t)
                conns.pop(0)
        except BaseException:
            for c in conns:
                c.close()
            self.result_or_none()  # the threads started take no more parts and finish what they took
            raise

    def _take(self) -> tuple[int, int] | None:
        """The next part to check, or None (every part taken, or the check failed)."""
        with self._ready:
            if self._next >= len(self._parts) or self._error is not None:
                return None
            self._next += 1
            return self._parts[self._next - 1]

    def _check(self, conn: apsw.Connection, lo: int, hi: int) -> None:
        got = _check_range(conn, lo, hi)
        with self._ready:
            self._out.closed.update(got.closed)
            self._out.alone.update(got.alone)
            self._done.append(got)
            self._ready.notify_all()

    def _failed(self, exc: BaseException) -> None:
        with self._ready:
            if self._error is None:
                self._error = exc  # raised again in the thread that asks for the result
            self._ready.notify_all()

    def _check_here(self, part: tuple[int, int]) -> None:
        """Check ``part`` on this (the caller's) thread. A failure fails the check: the part is lost, and the check
        must not pass without it (found by review); an interrupt also goes up at once (the caller then waits for
        the threads)."""
        assert self._helper is not None  # (a part is taken here only with it)
        try:
            self._check(self._helper, *part)
        except BaseException as exc:
            self._failed(exc)
            if not isinstance(exc, Exception):
                raise

    def _run(self, conn: apsw.Connection) -> None:
        try:
            while (part := self._take()) is not None:
                self._check(conn, *part)
        except BaseException as exc:
            self._failed(exc)
        finally:
            conn.close()

    def completed(self) -> Iterator[CloseChecks]:
        """What each part found (the same as :meth:`result`, cut by parts), as soon as the part is done, for the
        caller to use while the rest is checked; between them, this thread checks parts too while any is left.
        Raises what the check raised, once every part taken is done."""
        taken = 0
        while True:
            part = None
            with self._ready:
                if taken == len(self._done):
                    part = self._take() if self._helper is not None else None
                    if part is None:
                        while taken == len(self._done) and any(t.is_alive() for t in self._threads):
                            self._ready.wait(0.05)  # (a timeout: a thread that died without notifying ends the wait)
                new = self._done[taken:]
            if part is not None:
                self._check_here(part)
                continue
            taken += len(new)
            if not new:
                break
            yield from new
        self.result()  # (joins the threads; raises their error)

    def _stop(self) -> None:
        """Let no thread take another part (the check fails if one was left), and close this thread's connection
        (the caller's thread only)."""
        with self._ready:
            if self._next < len(self._parts) and self._error is None:
                self._error = RuntimeError("the check of the close digests was stopped before its end")
            self._next = len(self._parts)
        if self._helper is not None:
            self._helper.close()
            self._helper = None

    def result_or_none(self) -> CloseChecks | None:
        """Wait for the check; None if it failed or was not finished (its error dropped: for a caller that is
        failing already). No part is started after this is called. A KeyboardInterrupt while waiting is raised
        once the threads are done (none is left running; found by review: a second Ctrl-C was swallowed and left
        a thread behind)."""
        self._stop()
        interrupted: BaseException | None = None
        while any(t.is_alive() for t in self._threads):
            try:
                for t in self._threads:
                    t.join()
            except KeyboardInterrupt as exc:
                interrupted = exc
        if interrupted is not None:
            raise interrupted
        return self._out if self._error is None else None

    def result(self) -> CloseChecks:
        """Wait for the check: :class:`CloseChecks` (for the segments that match, ``{segment_id: (records,
        payload bytes, sidecar checksum, content digest, last term, span digest, span bytes, first term)}``;
        every other open segment, no digest or one that disagrees, is for the caller to check record by
        record). Raises what the check raised. This thread checks the parts no thread has taken yet."""
        try:
            while self._helper is not None and (part := self._take()) is not None:
                self._check_here(part)
            for t in self._threads:
                t.join()  # (they end when no part is left)
        except BaseException:
            self.result_or_none()  # (an interrupt: no thread left running, this thread's connection closed)
            raise
        self._stop()
        if self._error is not None:
            raise self._error
        return self._out


def check_close_digests(connect: Callable[[], apsw.Connection], conn: apsw.Connection) -> CloseChecks:
    """:class:`CloseDigestCheck`, waited for."""
    return CloseDigestCheck(connect, conn).result()


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
