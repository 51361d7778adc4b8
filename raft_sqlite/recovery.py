"""Recovery on open: the recovery policy, the report, the recovery events, and open-time recovery itself
(validation of the local data *before* anything is replayed).

Policies are data (:data:`RECOVERY_POLICIES`), printed by ``raft-sqlite status`` and recorded with every
recovery event. ``NodeStore.open`` runs :func:`recover_sql_objects` and :func:`recover_groups` (which runs
:func:`recover_snapshots`) inside its open transaction; each problem is refused or repaired per the policy.

"Data shape" problems (each refused under STRICT): a gap in the log between ``first_index`` and
``last_index``; ``first_index > 1`` without a DURABLE snapshot at ``first_index - 1`` or above; a commit
index beyond the last index; a snapshot chain with a broken link; a schema newer than the code. Record-level
problems are found by the shared record scanner (:mod:`raft_sqlite.logscan`, also used by ``verify``).
"""

from __future__ import annotations

import enum
import json
import logging
import operator
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, cast

import apsw

from . import layout
from .dbrows import db_row, db_rows, db_scalar
from .errors import CorruptionError, RecoveryRefused
from .groupstate import GroupState, group_crc, group_crcs, meta_crc, meta_crcs
from .kernel import Kernel
from .logscan import (
    ClosedCheck,
    CloseDigestCheck,
    RecordScanner,
    SealedSegment,
    SegmentCheck,
    check_segments,
)
from .snapshot import SnapshotStore, manifest_fields_crc
from .sqlobjects import DECLARED, normalized
from .wal import (
    INT,
    SPAN,
    Folded,
    OpenCheck,
    OpenSegment,
    check_open_segment,
    cut_after,
    load_open_segment,
    open_segment_state,
)

log = logging.getLogger("raft_sqlite.recovery")

#: Event kinds a restore records in the restored store's ``recovery_events`` table.
NODE_REPLACEMENT = "node_replacement"
QUORUM_LOSS_RESTORE = "quorum_loss_restore"
RESTORE_EVENT_KINDS = (NODE_REPLACEMENT, QUORUM_LOSS_RESTORE)


class RecoveryPolicy(str, enum.Enum):
    """What ``NodeStore.open`` accepts when local data is corrupt or has an unexpected shape."""

    STRICT = "STRICT"
    TRUNCATE_TAIL = "TRUNCATE_TAIL"
    PARTIAL = "PARTIAL"


RECOVERY_POLICIES: dict[RecoveryPolicy, dict[str, str]] = {
    RecoveryPolicy.STRICT: {
        "accepts": "only data that validates completely and has the expected shape",
        "on_problem": "refuse to open (CorruptionError / RecoveryRefused naming file, group, index)",
        "raft_safety": "safe: nothing acknowledged is ever silently lost",
    },
    RecoveryPolicy.TRUNCATE_TAIL: {
        "accepts": "a corrupt or torn log tail above the commit index",
        "on_problem": "drop the tail from the first bad record on (logged at WARNING, recorded in the event); "
                      "anything at or below the commit index still refuses",
        "raft_safety": "safe for Raft: uncommitted entries may be dropped; the leader re-sends them",
    },
    RecoveryPolicy.PARTIAL: {
        "accepts": "corruption anywhere in the log or snapshots",
        "on_problem": "keep the longest valid log prefix and the newest valid snapshot chain, mark the group "
                      "recovered_partially",
        "raft_safety": "the node may have lost committed entries and votes: it must rejoin as a catch-up "
                       "follower (non-voting until caught up) and never stand for election before that",
    },
}


@dataclass
class RecoveryReport:
    """What one ``NodeStore.open`` validated, dropped and decided."""

    policy: str
    outcome: str = "clean"  # clean | truncated | partial | created
    duration: float = 0.0
    groups: int = 0
    entries_validated: int = 0
    bytes_validated: int = 0
    segments_validated: int = 0
    snapshots_validated: int = 0
    #: JSON-ready rows (to_json); their keys depend on what was dropped/repaired
    dropped: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: schema objects (triggers, views) recreated or dropped by a non-STRICT policy
    repaired: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic, repr=False)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("started")
        return json.dumps(d, sort_keys=True)

    def summary(self) -> str:
        return (f"recovery {self.outcome} policy={self.policy} groups={self.groups} "
                f"entries={self.entries_validated} bytes={self.bytes_validated} "
                f"segments={self.segments_validated} snapshots={self.snapshots_validated} "
                f"dropped={len(self.dropped)} in {self.duration * 1000:.1f} ms")


def read_restore_event(conn: apsw.Connection) -> dict[str, Any] | None:
    """The newest restore event (``node_replacement`` / ``quorum_loss_restore``) recorded in the raft.db
    behind ``conn``, as ``{"kind", "at", **details}``, or None if the store was never restored.
    (:attr:`NodeStore.restored_from <raft_sqlite.NodeStore.restored_from>` reads it; ``restore`` writes it.)"""
    row = conn.execute("SELECT event_id, kind, at, details FROM recovery_events WHERE kind IN (?, ?) "
                       "ORDER BY event_id DESC LIMIT 1", RESTORE_EVENT_KINDS).fetchone()
    if row is None:
        return None
    details = json.loads(str(row[3])) if row[3] else {}
    return {**details, "event_id": row[0], "kind": row[1], "at": row[2]}


class OpeningStore(Protocol):
    """What open-time recovery needs of the store being opened (``NodeStore`` provides it); the chunk
    database and its locks are the kernel's."""

    kernel: Kernel
    data_dir: str
    recovery_policy: RecoveryPolicy

    @property
    def path(self) -> str: ...


def check_sql_objects(conn: apsw.Connection) -> list[tuple[str, str, str]]:
    """Compare the triggers and views of the database on ``conn`` (a ``raft.db`` at the head revision)
    with their declared text (:data:`raft_sqlite.sqlobjects.DECLARED`), with one query of
    ``sqlite_master``. Returns ``[(type, name, what)]`` with ``what`` one of ``"missing"``,
    ``"altered"`` (its SQL differs from the declared text) or ``"unexpected"`` (a trigger nobody
    declared: it would run inside the store's own writes); empty when everything is as declared."""
    found = {(t, n): sql for t, n, sql in
             conn.execute("SELECT type, name, sql FROM sqlite_master WHERE type IN ('trigger', 'view')")}
    out = []
    for key, sql in DECLARED.items():
        if key not in found:
            out.append((*key, "missing"))
        elif normalized(found[key]) != normalized(sql):
            out.append((*key, "altered"))
    out.extend((t, n, "unexpected") for (t, n) in sorted(found) if t == "trigger" and (t, n) not in DECLARED)
    return out


def recover_sql_objects(store: OpeningStore, conn: apsw.Connection, report: RecoveryReport) -> None:
    """Open-time check of the declared triggers and views (inside the open transaction on ``conn``).
    STRICT refuses (:class:`CorruptionError` naming the object): a missing or altered compaction
    guard means ad-hoc SQL could have deleted log entries no snapshot covers. TRUNCATE_TAIL and PARTIAL
    recreate each missing or altered object from its declared text and drop unexpected triggers,
    loudly (WARNING, ``report.problems`` and ``report.repaired``); the log itself is validated as usual
    afterwards, so anything deleted while the guard was gone shows up as a gap or a missing tail."""
    for kind, name, what in check_sql_objects(conn):
        msg = f"{store.path}: {kind} {name!r} is {what}" + (
            " (its SQL differs from the declared text)" if what == "altered" else "")
        if store.recovery_policy is RecoveryPolicy.STRICT:
            report.problems.append(msg)
            raise CorruptionError(f"{msg} (recovery policy {store.recovery_policy.value})")
        conn.execute(f'DROP {kind.upper()} IF EXISTS "{name}"')
        if what != "unexpected":
            conn.execute(DECLARED[(kind, name)])
        report.problems.append(msg)
        report.repaired.append({"what": kind, "name": name, "was": what,
                                "action": "dropped" if what == "unexpected" else "recreated"})
        log.warning("%s; %s it", msg, "dropped" if what == "unexpected" else "recreated")


def _problem(store: OpeningStore, report: RecoveryReport, exc_type: type[Exception], msg: str, *,
             drop_ok: bool) -> None:
    """Record a problem; raise unless the policy allows dropping what it affects."""
    report.problems.append(msg)
    log.debug("%s: %s", store.data_dir, msg)
    if not drop_ok:
        raise exc_type(f"{msg} (recovery policy {store.recovery_policy.value})")


class _Preread:
    """What the open reads for every group at once, before validating them one by one."""

    def __init__(self, store: OpeningStore, conn: apsw.Connection, firsts: Mapping[int, object],
                 durable_of: dict[int, int], closed: dict[int, ClosedCheck]) -> None:
        """``firsts``: every group's first index (as stored: damage may make it anything), by group id;
        ``durable_of``: the newest durable snapshot's index by group id; ``closed``: the open segments that
        match what the last clean close recorded (:func:`check_close_digests`)."""
        self.durable_of, self.closed = durable_of, closed
        # Everything read per group is read for all groups at once (one query each, and the sealed segments'
        # aggregates in one parallel pass): an open of 10,000 small groups ran ~15 queries and opened and closed
        # a read connection per group (13 s, against 0.24 s for one group holding the same entries).
        segments_of: dict[int, list[tuple[int, int, int | None]]] = {}
        open_rows: dict[int, list[tuple[int, int, float]]] = {}  # the segments without a last index, per group
        # only the rows of existing groups, and created_at of open segments only (what a per-group read
        # looked at: damage elsewhere, e.g. text that is not UTF-8, must not fail the open now)
        for g, sid, lo, hi, created in conn.execute(
                "SELECT s.group_id, s.segment_id, s.first_index, s.last_index, "
                "CASE WHEN s.last_index IS NULL THEN s.created_at END FROM log_segments s JOIN groups g "
                "USING (group_id) ORDER BY s.group_id, s.first_index, s.segment_id"):
            segments_of.setdefault(g, []).append((sid, lo, hi))
            if hi is None:
                open_rows.setdefault(g, []).append((sid, lo, created))
        sealed_of: dict[int, list[SealedSegment]] = {}
        for g, *seg in conn.execute(
                "SELECT s.group_id, s.segment_id, s.first_index, s.last_index, s.entry_count, s.bytes, s.checksum, "
                "s.content_crc FROM log_segments s JOIN groups g USING (group_id) "
                "WHERE s.last_index IS NOT NULL AND s.last_index >= g.first_index "
                "ORDER BY s.group_id, s.first_index, s.segment_id"):
            sealed_of.setdefault(g, []).append(cast("SealedSegment", tuple(seg)))
        # the aggregates of every segment that may take the fast path, on parallel read connections when there
        # are many (they see the same committed log as ``conn``: nothing in log_entries has been written by this
        # open yet), else on ``conn`` itself
        self.checked = check_segments(lambda: store.kernel.connect(store.path, query_only=True),
                                      [(g * SPAN, row) for g, segs in sealed_of.items()
                                       for row in segs if row[6] is not None and _at_or_above(row[1], firsts.get(g))],
                                      conn=conn)
        self.segments_of, self.open_rows, self.sealed_of = segments_of, open_rows, sealed_of


def recover_groups(store: OpeningStore, conn: apsw.Connection, report: RecoveryReport,
                   wal_problems: Sequence[str] = ()) -> None:
    """Load every group's state into ``store.kernel.groups`` after validating it (inside the open
    transaction on ``conn``). Raises :class:`CorruptionError`/:class:`RecoveryRefused` per policy."""
    policy = store.recovery_policy
    wal_partial = False
    for msg in wal_problems:
        if policy is not RecoveryPolicy.PARTIAL:
            report.problems.append(msg)
            raise CorruptionError(f"{msg} (recovery policy {policy.value})")
        _problem(store, report, CorruptionError, msg, drop_ok=True)
        report.dropped.append({"group": "*", "what": "committed WAL frames SQLite would not use (damaged, truncated, lost or replaced WAL)", "reason": msg})
        report.outcome = "partial"
        wal_partial = True
    # the open segments a clean close described, checked against their digests (:func:`check_close_digests`) on
    # threads of their own while this one reads and checks every group's rows (started first: this thread's own
    # work, an open of 10,000 groups spent a third of its time on it, then runs beside it on the other core)
    closed = CloseDigestCheck(lambda: store.kernel.connect(store.path, query_only=True), conn)
    try:
        states = _recover_groups(store, conn, report, wal_partial, closed)
    finally:
        closed.result_or_none()  # never leave the check running past the open (its error, if any, was raised)
    store.kernel.groups.publish(states)


def _recover_groups(store: OpeningStore, conn: apsw.Connection, report: RecoveryReport, wal_partial: bool,
                    closed: CloseDigestCheck) -> dict[str, GroupState]:
    """:func:`recover_groups` while ``closed`` runs: every group's validated state, by name."""
    bad_snapshot_groups = recover_snapshots(store, conn, report)
    rows = db_rows(conn.execute("SELECT g.group_id, g.name, g.first_index, g.snapshot_index, g.snapshot_term, "
                                "g.recovered_partially, m.current_term, m.voted_for, m.commit_index, m.crc32, "
                                "g.crc32 FROM groups g LEFT JOIN raft_meta m USING (group_id) ORDER BY g.group_id"))
    durable_of: dict[int, int] = dict(cast("list[tuple[int, int]]", conn.execute(
        "SELECT group_id, max(idx) FROM snapshots WHERE status='DURABLE' GROUP BY group_id").fetchall()))
    # every row's CRCs (C-level passes) and whether it is quiet, in parts, handing the GIL over after each (a
    # C-level pass holds it throughout, and Python's switch interval lets this thread keep it 5 ms after another
    # asked: the check's thread, done with a statement, waited here ~25 ms in an open of 10,000 groups). The
    # groups whose rows hold nothing to report, by id: their states are built from what the check proves of their
    # logs as it goes (part by part), the rest through every check one by one below, in group order.
    group_ok: list[bool] = []
    meta_ok: list[bool] = []
    quiet: dict[int, int] = {}
    for start in range(0, len(rows), 512):
        chunk = rows[start:start + 512]
        cols = list(zip(*chunk))
        group_ok += map(operator.eq, group_crcs(*cols[:6]), cols[10])
        meta_ok += map(operator.eq, meta_crcs(cols[0], cols[6], cols[7], cols[8]), cols[9])
        if not wal_partial:
            quiet.update((row[0], k) for k, row in enumerate(chunk, start)
                         if group_ok[k] and meta_ok[k] and _quiet(row, durable_of, bad_snapshot_groups))
        time.sleep(0)
    # a quiet group whose log has the usual shape of a small group (its only segment row open, starting at its
    # first index, matching what the last clean close recorded: ``alone``, from the check by spans, and that
    # segment's ClosedCheck) and whose commit index is within its records: its state, built here, is exactly
    # what :func:`_check_group` would conclude, without its steps (no problem, nothing dropped or repaired,
    # nothing written; an open of 10,000 small groups spent half its Python time in them). Inline, not a call
    # per group: this loop is most of this thread's work in such an open.
    spanned: list[GroupState | None] = [None] * len(rows)  # by row position
    for part in closed.completed():
        found = part.closed
        for gid, (sid, created) in part.alone.items():
            at = quiet.get(gid)
            if at is None:
                continue
            done = found.get(sid)
            if done is None:
                continue
            row = rows[at]
            first, n = row[2], done[0]
            if first + n > row[8]:  # (the commit index within its records)
                spanned[at] = GroupState(
                    gid, row[1], first, first + n - 1, done[4], row[3], row[4], row[6], row[7], row[8],
                    OpenSegment(sid, first, n, done[1], created, done[2], done[3], done[5], done[6]), False)
                report.entries_validated += n
                report.bytes_validated += done[1]
    checks = closed.result()
    # the digests are consumed: a crash from now on must not leave them to be trusted later (the check read them
    # in its own read transaction)
    conn.execute("DELETE FROM close_digests")
    report.groups += len(rows)
    if None not in spanned:  # (the usual open after a clean close: every group built above)
        done_states = cast("list[GroupState]", spanned)
        return dict(zip(map(operator.attrgetter("name"), done_states), done_states))
    pre: _Preread | None = None  # read when a group needs more than its close digest (never, after a clean close)
    states: dict[str, GroupState] = {}
    for k, (row, state) in enumerate(zip(rows, spanned)):
        if state is not None:
            states[state.name] = state
            continue
        if pre is None:
            pre = _Preread(store, conn, {r[0]: r[2] for r in rows}, durable_of, checks.closed)
        states[row[1]] = _check_group(store, conn, report, pre, row, group_ok[k], meta_ok[k], bad_snapshot_groups,
                                      wal_partial)
    return states


def _check_group(store: OpeningStore, conn: apsw.Connection, report: RecoveryReport, pre: _Preread,
                 group_row: Sequence[Any], g_ok: bool, m_ok: bool, bad_snapshot_groups: set[int],
                 wal_partial: bool) -> GroupState:
    """Validate one group (its row ``group_row`` of :func:`recover_groups`' query; ``g_ok``/``m_ok``: whether its
    group and metadata rows passed their CRC checks) and its log, repair what the policy allows, and return
    its state; raises :class:`CorruptionError`/:class:`RecoveryRefused` per policy."""
    policy = store.recovery_policy
    path = store.path
    gid, name, first, snap_idx, snap_term, partial, term, vote, commit, _mcrc, _gcrc = group_row
    if not g_ok:
        # its first index and snapshot point cannot be trusted: no policy can repair that locally
        _problem(store, report, CorruptionError, f"{path}: group row {gid} ({name!r}) fails its CRC check",
                 drop_ok=False)
    if gid in bad_snapshot_groups:
        partial = 1
        report.outcome = "partial"
    where = f"{path}: group {name!r}"
    if term is None:
        raise CorruptionError(f"{where}: metadata row is missing")
    if not m_ok:
        _problem(store, report, CorruptionError, f"{where}: metadata (term/vote/commit) fails its CRC check",
                 drop_ok=policy is RecoveryPolicy.PARTIAL)
        # PARTIAL: keep the values but never trust the vote; the node must rejoin as catch-up follower
        vote, partial = None, 1
        report.dropped.append({"group": name, "what": "vote", "reason": "metadata CRC mismatch"})
    durable = pre.durable_of.get(gid) or 0
    if durable != snap_idx:
        _problem(store, report, RecoveryRefused,
                 f"{where}: snapshot index {snap_idx} in the group record disagrees with the newest durable "
                 f"snapshot {durable}", drop_ok=False)
    if first > 1 and snap_idx < first - 1:
        _problem(store, report, RecoveryRefused,
                 f"{where}: first index {first} is above 1 but no durable snapshot covers {first - 1}",
                 drop_ok=False)
    if wal_partial:
        partial = 1  # metadata may be stale: the node must not vote until it has caught up
    segs = pre.segments_of.get(gid, [])
    folded = _closed_alone(pre, segs, first, report)
    if folded is not None:
        last, last_term, bad_at = first + folded[0] - 1, folded[4], None
    else:
        try:
            last, last_term, bad_at, scanner = _scan(store, conn, report, gid, name, first, segs,
                                                     pre.sealed_of.get(gid, []), pre.checked, pre.closed)
        except TypeError as exc:  # a segment row's bounds of the wrong type (text, a blob): only damage
            _problem(store, report, CorruptionError, f"{where}: a segment row holds a damaged index ({exc}); "
                     "run `raft-sqlite verify`", drop_ok=False)
            raise  # (unreachable: drop_ok=False raises)
    if bad_at is not None:
        # bad_at: first index that is corrupt or missing; the valid prefix ends at bad_at - 1
        if policy is RecoveryPolicy.STRICT or (policy is RecoveryPolicy.TRUNCATE_TAIL and bad_at <= commit):
            raise CorruptionError(f"{report.problems[-1]} (recovery policy {policy.value})")
        new_last = bad_at - 1
        if new_last < commit:
            commit, partial = new_last, 1
        top = db_scalar(conn.execute("SELECT max(key) - ? FROM log_entries WHERE key >= ? AND key < ?",
                                     (gid * SPAN, gid * SPAN, (gid + 1) * SPAN)))
        _drop_tail(conn, gid, new_last, commit)
        report.dropped.append({"group": name, "what": "log tail", "from_index": bad_at, "to_index": top})
        log.warning("%s: dropped log entries %d..%s (%s)", where, bad_at, top, report.problems[-1])
        report.outcome = "partial" if partial else "truncated"
        last = new_last
        last_term = (db_row(conn.execute(f"SELECT {INT('term')} FROM log_entries WHERE key=?",
                                         (gid * SPAN + last,))) or (snap_term,))[0] if last >= first else snap_term
    if last < first - 1:
        last = first - 1
    if commit > last:
        _problem(store, report, RecoveryRefused, f"{where}: commit index {commit} is beyond the last index {last}",
                 drop_ok=policy is RecoveryPolicy.PARTIAL)
        commit, partial = last, 1
        report.outcome = "partial"
    if partial:
        conn.execute("UPDATE groups SET recovered_partially=1, crc32=? WHERE group_id=?",
                     (group_crc(gid, name, first, snap_idx, snap_term, 1), gid))
        conn.execute("UPDATE raft_meta SET voted_for=?, commit_index=?, crc32=? WHERE group_id=?",
                     (vote, commit, meta_crc(gid, term, vote, commit), gid))
    opens = pre.open_rows.get(gid, [])
    if bad_at is None and len(opens) < 2:  # the one open segment read above, or none (unchanged since)
        row = opens[0] if opens else None
        seg = open_segment_state(conn, gid, row, (*folded[:4], folded[5], folded[6]) if folded is not None else
                                 None if row is None else scanner.folded(row[0], row[1], first))
    else:  # a tail dropped (segments changed), or several open segments (only damage makes them)
        seg = load_open_segment(conn, gid, check=False)  # (validated above)
    return GroupState(gid, name, first, last, last_term if last >= first else snap_term, snap_idx, snap_term,
                      term, vote, commit, seg, bool(partial))


def _quiet(row: Sequence[Any], durable_of: Mapping[int, int], bad_snapshot_groups: set[int]) -> bool:
    """Whether a group's rows (``row``, whose CRCs passed) hold nothing to report, as far as they tell: metadata
    present, not recovered partially, its first, snapshot and commit indexes integers, its snapshot point agreeing
    with its newest durable snapshot and covering what its first index dropped. Its state is then built from
    what the check of the close digests proves of its log (in :func:`_recover_groups`); every other group goes
    through every check one by one (:func:`_check_group`)."""
    gid, _name, first, snap_idx, _snap_term, partial, term, _vote, commit = row[:9]
    return not (term is None or partial or gid in bad_snapshot_groups or first.__class__ is not int
                or snap_idx.__class__ is not int or commit.__class__ is not int
                or (durable_of.get(gid) or 0) != snap_idx or (first > 1 and snap_idx < first - 1))


def _closed_alone(pre: _Preread, segs: Sequence[tuple[int, int, int | None]], first: object,
                  report: RecoveryReport) -> OpenCheck | None:
    """The usual shape of a small group: its only segment is open, starts at its first index and matches what
    the last clean close recorded (:func:`check_close_digests`). Then returns ``(records, payload bytes,
    sidecar checksum, content digest, last term, span digest, span bytes)``, what :func:`_scan` would conclude, without building its
    record walker (an open of 10,000 such groups spent a third of its time there), and counts the records
    as validated; else None (the caller runs :func:`_scan`)."""
    done = pre.closed.get(segs[0][0]) if len(segs) == 1 and segs[0][2] is None else None
    if done is None or segs[0][1] != first or first.__class__ is not int:
        return None
    report.entries_validated += done[0]
    report.bytes_validated += done[1]
    return done[:7]


def recover_snapshots(store: OpeningStore, conn: apsw.Connection,
                      report: RecoveryReport) -> set[int]:
    """Snapshot part of the recovery on open (inside the open transaction on ``conn``).

    * A WRITING **local** snapshot is an orphan of a crash (its writer is gone): its manifest is
      deleted and its chunks removed.
    * A WRITING **install** (streamed from a leader) is kept for resumption
      (``store.snapshots(g).install(index, term)`` continues at the bytes durably received), unless a
      durable snapshot at or above its index exists: then it is stale and removed.
    * Every DURABLE manifest is checked cheaply (no blob is read): manifest CRC32, chunks present with
      contiguous sequence numbers, chunk count and total size as recorded, delta links (parent durable,
      same group, not newer). Chunk CRCs and the sha256 are checked on every read of a snapshot and by
      ``raft-sqlite verify``. A problem raises :class:`CorruptionError` unless the policy is PARTIAL,
      which records it and marks the group recovered_partially (returned as a set of group ids).
    * Chunks in chunks.db owned by no manifest (a crash between deleting a manifest and its chunks)
      are removed.
    """
    policy = store.recovery_policy
    rows = db_rows(conn.execute("SELECT snapshot_id, group_id, idx, term, kind, parent_id, status, size, chunk_count, "
                                "checksum, structures, source, crc32 FROM snapshots ORDER BY snapshot_id"))
    by_id = {r[0]: r for r in rows}
    # (read only when there are snapshots: 10,000 groups without any spent ~15 ms here)
    names: dict[Any, Any] = dict(db_rows(conn.execute("SELECT group_id, name FROM groups"))) if rows else {}
    gsnap: dict[Any, Any] = dict(db_rows(conn.execute("SELECT group_id, snapshot_index FROM groups"))) if rows else {}
    doomed: list[int] = []
    bad: set[int] = set()
    sstore = SnapshotStore.of(store.kernel)
    chunks = store.kernel.chunks_conn
    for r in rows:
        sid, gid, idx, term, kind, parent, status, size, count, checksum, structures, source, crc = r
        where = f"{store.path}: group {names.get(gid, gid)!r}: snapshot {sid} (index {idx})"
        if status == "WRITING":
            if source == "local" or idx <= gsnap.get(gid, 0):
                doomed.append(sid)
                report.dropped.append({"group": names.get(gid), "what": "orphan snapshot" if source == "local"
                                       else "stale partial install", "snapshot_id": sid, "index": idx})
                log.info("%s: removing %s", where, report.dropped[-1]["what"])
            continue
        report.snapshots_validated += 1
        problem = None
        if manifest_fields_crc(sid, gid, idx, term, kind, parent, status, size, count, checksum, structures,
                               source) != crc:
            problem = "manifest fails its CRC check"
        elif kind == "DELTA" and (parent not in by_id or by_id[parent][6] != "DURABLE" or by_id[parent][1] != gid
                                  or by_id[parent][2] > idx or parent >= sid):
            problem = f"broken chain link to parent {parent}"
        else:
            shape = db_rows(chunks.execute("SELECT seq, length(data) FROM snapshot_chunks WHERE key >= ? AND key < ? "
                                           "ORDER BY key", (sid * layout.CHUNK_SEQ_SPAN, (sid + 1) * layout.CHUNK_SEQ_SPAN)))
            if [q for q, _ in shape] != list(range(len(shape))) or len(shape) != count:
                problem = f"chunks missing ({len(shape)} present, {count} recorded)"
            elif sum(n for _, n in shape) != size:
                problem = f"chunks hold {sum(n for _, n in shape)} bytes, manifest says {size}"
        if problem is not None:
            _problem(store, report, CorruptionError, f"{where}: {problem}",
                     drop_ok=policy is RecoveryPolicy.PARTIAL)
            bad.add(gid)
    for sid in doomed:
        conn.execute("DELETE FROM snapshots WHERE snapshot_id=? AND status='WRITING'", (sid,))
    keep = set(by_id) - set(doomed)
    with store.kernel.gc_lock, store.kernel.chunks_lock:
        stray = [sid for sid in sstore.chunk_snapshot_ids(chunks) if sid not in keep]
        if stray:
            chunks.execute("BEGIN IMMEDIATE")
            try:
                for sid in stray:
                    chunks.execute("DELETE FROM snapshot_chunks WHERE key >= ? AND key < ?",
                                   (sid * layout.CHUNK_SEQ_SPAN, (sid + 1) * layout.CHUNK_SEQ_SPAN))
                chunks.execute("COMMIT")
            except BaseException:
                # a failed COMMIT may have rolled back already (SQLITE_FULL does): a ROLLBACK then raises
                # "no transaction is active" and hides the error that matters (a full disk: the open
                # releases the disk reserve and retries only when it sees that one)
                if not chunks.getautocommit():
                    chunks.execute("ROLLBACK")
                raise
            log.info("%s: removed chunks of %d orphan snapshot(s): %s", store.kernel.chunks_path, len(stray), stray)
    return bad


class _OpenScan:
    """Open-time record-by-record validation of one group's log from its first index (the slow path of
    :func:`_scan`), on the shared :class:`~raft_sqlite.logscan.RecordScanner`: it stops at the first
    problem that matters on open (a gap or damaged index column, a CRC mismatch, a term decrease, a record
    naming the wrong segment), recorded in the report with ``bad`` = its index."""

    def __init__(self, store: OpeningStore, conn: apsw.Connection, report: RecoveryReport, gid: int, name: str,
                 first: int, segments: Sequence[tuple[int, int, int | None]] | None = None) -> None:
        self.report = report
        self.where = f"{store.path}: group {name!r}"
        self.sc = RecordScanner(conn, gid, prev=first - 1, segments=segments)
        self.bad: int | None = None
        #: content digest, span digest and span bytes of the open segment by id, when :func:`check_open_segment`
        #: computed them
        self.open_content: dict[int, tuple[int, int | None, int | None]] = {}
        #: the index from which the last stretch (the open segment's whole check or the final walk) folded
        #: every record: the open segment's state can be taken from it only if that is its first index
        self.open_start: int | None = None

    def folded(self, sid: int, lo: int, first: int) -> Folded | None:
        """The open segment ``sid`` = ``lo..`` as this validation (which found nothing wrong) folded it: records,
        bytes, sidecar (and content digest, when :func:`check_open_segment` computed it), if it covered the
        segment from its first index (the walk is contiguous from the group's first index to its last record,
        and a record naming another segment stops it); else None (the segment is then read again). A stretch
        that began elsewhere (after a sealed segment overlapping the open one) folded only part of it: found
        by review."""
        if not _at_or_above(lo, first) or self.open_start != lo:
            return None
        checksum, records, nbytes = self.sc.sidecar(sid)
        content, span, span_bytes = self.open_content.get(sid, (None, None, None))
        return records, nbytes, checksum, content, span, span_bytes

    @property
    def expect(self) -> int:
        """The next index to check (one above the last one accepted)."""
        assert self.sc.prev is not None  # set to first - 1 at construction
        return self.sc.prev + 1

    def scan(self, stop: int | None) -> bool:
        """Check records ``expect .. stop`` (inclusive; None: to the end). False on the first problem
        (recorded in the report, ``bad`` = its index)."""
        sc, rep, where = self.sc, self.report, self.where
        rows, nbytes = sc.rows, sc.nbytes
        bad = None
        for f in sc.walk(self.expect, SPAN - 1 if stop is None else stop):
            kind = f.kind
            if kind == "index" or kind == "gap":
                assert f.expected is not None  # prev is never None here
                rep.problems.append(f"{where}: log gap: index {f.expected} is missing (next present: {f.idx_col})")
                bad = f.expected
            elif kind == "crc":
                rep.problems.append(f"{where}: CRC mismatch in log entry {f.idx} (segment {f.segment})")
                bad = f.idx
            elif kind == "term":
                rep.problems.append(f"{where}: term decreases at log entry {f.idx}")
                bad = f.idx
            elif kind == "not_own":
                rep.problems.append(f"{where}: log entry {f.idx} names segment {f.segment}, not {f.own}")
                bad = f.idx
            else:
                continue  # a segment row missing or not holding the record: verify reports those
            break
        if bad is None and stop is not None and self.expect <= stop:
            rep.problems.append(f"{where}: log gap: index {self.expect} is missing")
            bad = self.expect
        rep.entries_validated += sc.rows - rows
        rep.bytes_validated += sc.nbytes - nbytes
        self.bad = bad
        return bad is None


def _at_or_above(lo: object, first: object) -> bool:
    """``lo >= first`` for the integers they should be (a damaged column's value is never compared here: its
    segment is then checked record by record, which reports it)."""
    return lo.__class__ is int and first.__class__ is int and lo >= first


def _scan(store: OpeningStore, conn: apsw.Connection, report: RecoveryReport, gid: int, name: str,
          first: int, segments: Sequence[tuple[int, int, int | None]], sealed: Sequence[SealedSegment],
          checked: Mapping[int, SegmentCheck | None],
          closed: Mapping[int, ClosedCheck] | None = None) -> tuple[int, int, int | None, _OpenScan]:
    """Verify record CRCs, contiguity and sidecar checksums of the group's log from ``first`` on.
    Returns ``(last_index, last_term, first_bad_index_or_None, scan)``: on a problem, ``last_index`` is
    the end of the valid prefix.

    Sealed segments with a content digest are checked with one SQLite aggregate each
    (:func:`check_sealed_segment`); the rest (the open segment, a segment partly below ``first``,
    segments sealed before revision 0003, and a segment whose aggregate check fails) record by record,
    which also pinpoints the first bad index. The open segment is first checked as a whole when it is the
    group's last segment row and the checks reached its first index (:func:`check_open_segment`: one query,
    no Python loop per record), and walked only if that fails. ``segments``: every segment row of the group
    ``(segment_id, first_index, last_index)``; ``sealed``: its sealed ones ending at or above ``first``,
    whole rows; ``checked``: the aggregate's result per sealed segment id (:func:`check_segments`); ``closed``:
    the open segments that match what the last clean close recorded (:func:`check_close_digests`), accepted
    as a whole like a sealed segment whose aggregate checks out."""
    where = f"{store.path}: group {name!r}"
    rs = _OpenScan(store, conn, report, gid, name, first, segments)
    sc = rs.sc
    for sid, lo, hi, cnt, _bytes, cks, content in sealed:
        if lo == rs.expect and content is not None:
            ok = checked.get(sid)
            if ok is not None and ok[0] >= sc.last_term:
                sc.last_term = ok[1]
                sc.prev = hi
                report.entries_validated += cnt
                report.bytes_validated += ok[2]
                report.segments_validated += 1
                continue
            suspect = True
        else:
            suspect = False
        # record by record: the part of this segment at or above first (and any gap before it)
        if not rs.scan(hi):
            return rs.expect - 1, sc.last_term, rs.bad, rs
        if lo < first:
            continue  # partly compacted: the verify command checks it whole
        report.segments_validated += 1
        if sc.sidecar(sid)[0] != cks:
            report.problems.append(f"{where}: segment {sid} ({lo}..{hi}) fails its sidecar checksum")
            return lo - 1, sc.last_term, lo, rs
        if suspect:  # every record checks out one by one, so the segment row itself is damaged
            report.problems.append(f"{where}: segment {sid} ({lo}..{hi}) fails its content digest or counts")
            return lo - 1, sc.last_term, lo, rs
    tail = segments[-1] if segments else None
    if (tail is not None and tail[2] is None and tail[1] == rs.expect
            and (len(segments) < 2 or segments[-2][1] != tail[1])):
        # the open segment, last and alone at its first index (so every record from there on must name it)
        done = None if closed is None else closed.get(tail[0])
        if done is not None and done[7] is not None and done[7] >= sc.last_term:
            whole: OpenCheck | None = done[:7]
        else:
            whole = check_open_segment(conn, gid * SPAN, tail[0], tail[1], sc.last_term)
        if whole is not None:
            rs.open_start = tail[1]
            n, nbytes, checksum, content, last_term, span, span_bytes = whole
            if n:
                sc.prev, sc.last_term = tail[1] + n - 1, last_term
                sc.running[tail[0]] = [checksum, n, nbytes]
                rs.open_content[tail[0]] = (content, span, span_bytes)
                report.entries_validated += n
                report.bytes_validated += nbytes
            return rs.expect - 1, sc.last_term, None, rs
    rs.open_start = rs.expect
    if not rs.scan(None):  # the open segment, record by record
        return rs.expect - 1, sc.last_term, rs.bad, rs
    return rs.expect - 1, sc.last_term, None, rs


def _drop_tail(conn: apsw.Connection, gid: int, keep_through: int, commit: int) -> None:
    """Drop the group's records after ``keep_through`` (a damaged tail) and lower its commit index to
    ``commit`` first, so that the guard trigger lets the delete pass (the permit covers the rest)."""
    conn.execute("UPDATE raft_meta SET commit_index=min(commit_index, ?) WHERE group_id=?", (commit, gid))
    cut_after(conn, gid, keep_through)
