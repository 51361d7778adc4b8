"""Prometheus metrics for a node's store (optional extra ``metrics``: needs ``prometheus_client``).

The library itself never imports this module; importing it without prometheus_client raises an
ImportError that says what to install. Two ways to get metrics:

* In the node process: ``m = StoreMetrics(store)`` attaches to an open :class:`~raft_sqlite.NodeStore`
  and fills ``m.registry`` (a ``prometheus_client.CollectorRegistry``; pass your own, e.g.
  ``prometheus_client.REGISTRY``, to merge with other metrics). Expose it with
  ``prometheus_client.start_http_server(9100, registry=m.registry)`` or mount
  ``prometheus_client.make_wsgi_app(m.registry)`` in your web app.
* For a stopped node: ``raft-sqlite metrics DATA_DIR`` (:func:`render_data_dir`) prints the text
  format of everything that is stored in the files (no per-commit counters: those live only in a
  running process).

Cost: the append path pays one listener call per commit (``on_commit``, through ``store.kernel.add_listener``)
plus one dict insert per append call (the counting happens in the commit listener); every state metric (entries, bytes, segments, snapshots, backups, recovery) is read from
the database when Prometheus scrapes, on a pooled read connection, with bounded queries.

Metrics (labels in braces):

==============================================  =========  ======================================================
``raft_sqlite_commit_seconds``                  histogram  duration of each group commit (BEGIN..COMMIT, the fsync)
``raft_sqlite_group_commit_batch_size``         histogram  write requests coalesced into one commit
``raft_sqlite_entries_appended_total``          counter    log entries appended (all groups) since attach
``raft_sqlite_bytes_appended_total``            counter    payload bytes appended since attach
``raft_sqlite_segment_rotations_total``         counter    segments sealed since attach
``raft_sqlite_validation_errors_total{kind}``   counter    problems found by recovery on open and by
                                                           :meth:`StoreMetrics.observe_verify` (kinds of
                                                           :data:`raft_sqlite.verify.PROBLEM_KINDS`)
``raft_sqlite_log_entries{group}``              gauge      entries in the log (``last - first + 1``)
``raft_sqlite_log_stored_bytes{group}``         gauge      payload bytes stored (incl. compacted, not yet deleted)
``raft_sqlite_log_first_index{group}``          gauge      first index
``raft_sqlite_log_last_index{group}``           gauge      last index
``raft_sqlite_commit_index{group}``             gauge      Raft commit index
``raft_sqlite_current_term{group}``             gauge      Raft current term
``raft_sqlite_segments{group}``                 gauge      log segments (open + sealed)
``raft_sqlite_oldest_segment_age_seconds{group}`` gauge    age of the oldest segment still stored
``raft_sqlite_snapshot_index{group}``           gauge      index of the newest DURABLE snapshot (0: none)
``raft_sqlite_snapshot_duration_seconds{group}`` gauge     time the newest DURABLE snapshot took to write
``raft_sqlite_snapshot_bytes{group}``           gauge      size of the newest DURABLE snapshot
``raft_sqlite_snapshot_age_seconds{group}``     gauge      age of the newest DURABLE snapshot
``raft_sqlite_recovered_partially{group}``      gauge      1 if the group was recovered under PARTIAL
``raft_sqlite_backups``                         gauge      backups recorded in the store
``raft_sqlite_backup_age_seconds``              gauge      age of the newest backup (absent: never backed up)
``raft_sqlite_backup_duration_seconds``         gauge      duration of the newest backup
``raft_sqlite_backup_bytes``                    gauge      size of the newest backup
``raft_sqlite_restore_drill_success``           gauge      1 if the newest restore drill passed, else 0 (absent: none)
``raft_sqlite_restore_drill_timestamp_seconds`` gauge      when the newest restore drill ended (unix time)
``raft_sqlite_restore_drill_duration_seconds``  gauge      duration of the newest restore drill
``raft_sqlite_restore_drill_bytes``             gauge      bytes the newest restore drill restored
``raft_sqlite_restore_drill_backup_age_seconds`` gauge     age of the drilled backup when it was drilled
``raft_sqlite_recovery_duration_seconds``       gauge      duration of the last recovery on open
``raft_sqlite_recovery_outcome{outcome}``       gauge      1 for the last recovery's outcome, 0 for the others
==============================================  =========  ======================================================
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import apsw

try:
    import prometheus_client  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError("raft_sqlite.metrics needs prometheus_client: pip install 'raft_sqlite[metrics]'") from exc

import contextlib

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import layout
from .backup import DRILL_SETTING, drill_gauges
from .entry import LogEntry
from .errors import RaftSqliteError
from .status import GroupStatus, read_group_status
from .store import NodeStore

if TYPE_CHECKING:
    from .verify import VerifyReport

COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RECOVERY_OUTCOMES = ("created", "clean", "truncated", "partial")


def classify_problem(message: str) -> str:
    """Map a recovery problem message (:attr:`RecoveryReport.problems`) to a validation error kind."""
    m = message.lower()
    for needle, kind in (("sidecar", "sidecar"), ("crc mismatch", "record_crc"), ("gap", "gap"),
                         ("term decreases", "term"), ("metadata", "metadata"), ("node record", "node"),
                         ("chunk", "snapshot_chunk"), ("snapshot", "snapshot")):
        if needle in m:
            return kind
    return "shape"


@dataclasses.dataclass(frozen=True)
class _State:
    """What one scrape reads (in one read transaction)."""

    now: float
    groups: list[GroupStatus]
    backups: int
    #: newest backup: (created_at, duration, size), None if never backed up
    last_backup: tuple[float, float, int] | None
    #: last recovery on open: (outcome, duration, details JSON), None if none recorded
    recovery: tuple[str, float | None, str | None] | None
    #: the newest restore drill's report (``backup.DrillReport.to_dict``), None if none recorded
    drill: dict[str, object] | None = None


class _StateCollector(Collector):
    """Reads the stored state at scrape time through ``read(fn)`` (fn(conn) -> value)."""

    def __init__(self, read: Callable[[Callable[[apsw.Connection], _State]], _State], *,
                 include_validation: bool = False):
        self._read = read
        self._include_validation = include_validation

    def describe(self) -> list[Metric]:
        return []  # state metrics are dynamic: skip registry collision checks at registration

    def collect(self) -> Iterator[Metric]:
        try:
            st = self._read(_read_state)
        except (RaftSqliteError, OSError):
            return  # store closed or unreadable: no state metrics this scrape
        yield from _families(st, self._include_validation)


def _read_state(conn: apsw.Connection) -> _State:
    now = time.time()
    conn.execute("BEGIN")
    try:
        groups = read_group_status(conn)
        count = conn.execute("SELECT count(*) FROM backups").fetchone()
        assert count is not None  # count(*) yields one row even over no rows
        last_backup = conn.execute("SELECT created_at, duration, size FROM backups ORDER BY backup_id DESC "
                                   "LIMIT 1").fetchone()
        ev = conn.execute("SELECT outcome, duration, details FROM recovery_events WHERE kind='open' "
                          "ORDER BY event_id DESC LIMIT 1").fetchone()
        drill_row = conn.execute("SELECT value FROM settings WHERE key=?", (DRILL_SETTING,)).fetchone()
    finally:
        conn.execute("COMMIT")
    drill = None
    if drill_row is not None:
        with contextlib.suppress(ValueError, TypeError):
            drill = json.loads(drill_row[0])
    return _State(now, groups, count[0], last_backup, ev, drill if isinstance(drill, dict) else None)


def _families(st: _State, include_validation: bool) -> Iterator[Metric]:
    now = st.now

    def gauge(name: str, doc: str, value: Callable[[GroupStatus], float | None]) -> GaugeMetricFamily:
        f = GaugeMetricFamily(name, doc, labels=["group"])
        for g in st.groups:
            v = value(g)
            if v is not None:
                f.add_metric([g.name], float(v))
        return f

    def snap_duration(g: GroupStatus) -> float | None:
        s = g.newest_snapshot
        return None if s is None or s.finished_at is None else s.finished_at - s.created_at

    def snap_age(g: GroupStatus) -> float | None:
        s = g.newest_snapshot
        return None if s is None or s.finished_at is None else now - s.finished_at

    yield gauge("raft_sqlite_log_entries", "Entries in the log (last_index - first_index + 1).",
                lambda g: g.entries)
    yield gauge("raft_sqlite_log_stored_bytes", "Payload bytes of log records stored (including compacted "
                "records awaiting whole-segment deletion).", lambda g: g.stored_bytes)
    yield gauge("raft_sqlite_log_first_index", "First index of the log.", lambda g: g.first_index)
    yield gauge("raft_sqlite_log_last_index", "Last index of the log.", lambda g: g.last_index)
    yield gauge("raft_sqlite_commit_index", "Raft commit index.", lambda g: g.commit_index or 0)
    yield gauge("raft_sqlite_current_term", "Raft current term.", lambda g: g.current_term or 0)
    yield gauge("raft_sqlite_segments", "Log segments stored (open + sealed).", lambda g: g.segments)
    yield gauge("raft_sqlite_oldest_segment_age_seconds", "Age of the oldest log segment still stored.",
                lambda g: None if g.oldest_segment_created_at is None else now - g.oldest_segment_created_at)
    yield gauge("raft_sqlite_snapshot_index", "Index of the newest DURABLE snapshot (0: none).",
                lambda g: g.snapshot_index)
    yield gauge("raft_sqlite_snapshot_duration_seconds", "Time the newest DURABLE snapshot took to write.",
                snap_duration)
    yield gauge("raft_sqlite_snapshot_bytes", "Size of the newest DURABLE snapshot.",
                lambda g: None if g.newest_snapshot is None else g.newest_snapshot.size)
    yield gauge("raft_sqlite_snapshot_age_seconds", "Age of the newest DURABLE snapshot.", snap_age)
    yield gauge("raft_sqlite_recovered_partially", "1 if the group was recovered under the PARTIAL policy.",
                lambda g: 1 if g.recovered_partially else 0)
    yield GaugeMetricFamily("raft_sqlite_backups", "Backups recorded in the store.", value=st.backups)
    lb = st.last_backup
    if lb is not None:
        # the newest backup is the last recorded; a clock set back since must not make its age negative
        yield GaugeMetricFamily("raft_sqlite_backup_age_seconds", "Age of the newest backup.", value=max(0.0, now - lb[0]))
        yield GaugeMetricFamily("raft_sqlite_backup_duration_seconds", "Duration of the newest backup.",
                                value=lb[1])
        yield GaugeMetricFamily("raft_sqlite_backup_bytes", "Size of the newest backup.", value=lb[2])
    if st.drill is not None:
        for name, doc, value in drill_gauges(st.drill):
            yield GaugeMetricFamily(name, doc, value=value)
    ev = st.recovery
    if ev is not None:
        outcome, duration, details = ev
        yield GaugeMetricFamily("raft_sqlite_recovery_duration_seconds", "Duration of the last recovery on open.",
                                value=duration or 0.0)
        f = GaugeMetricFamily("raft_sqlite_recovery_outcome", "1 for the outcome of the last recovery on open.",
                              labels=["outcome"])
        for o in sorted(set(RECOVERY_OUTCOMES) | {outcome}):
            f.add_metric([o], 1.0 if o == outcome else 0.0)
        yield f
        if include_validation:
            c = CounterMetricFamily("raft_sqlite_validation_errors", "Problems found by the last recovery on "
                                    "open, by kind.", labels=["kind"])
            counts: dict[str, int] = {}
            try:
                for p in (json.loads(details).get("problems", []) if details else []):
                    k = classify_problem(str(p))
                    counts[k] = counts.get(k, 0) + 1
            except (ValueError, AttributeError):
                pass
            for k in sorted(counts):
                c.add_metric([k], counts[k])
            yield c


class StoreMetrics:
    """Prometheus metrics of one open :class:`~raft_sqlite.NodeStore` (see the module docstring for the
    list). Attaching adds it as a listener of the store's kernel (``store.kernel.add_listener``) and counts
    appended entries, bytes and segment rotations, published when their commit succeeds. ``registry``
    defaults to a new ``CollectorRegistry``; :meth:`detach` undoes the hooks. One instance per store and
    per registry (metric names carry no store label: give each store of a process its own registry).

    Appended entries and bytes are counted when their commit succeeds, once even if the store replays a
    batch, and only if the group's committed log reaches them (a request dropped from its batch is not
    counted)."""

    def __init__(self, store: NodeStore, registry: CollectorRegistry | None = None):
        self.store = store
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.commit_seconds = Histogram("raft_sqlite_commit_seconds", "Duration of each group commit "
                                        "(transaction + fsync per the fsync mode).", buckets=COMMIT_BUCKETS,
                                        registry=r)
        self.batch_size = Histogram("raft_sqlite_group_commit_batch_size", "Write requests coalesced into one "
                                    "commit.", buckets=BATCH_BUCKETS, registry=r)
        self.entries_appended = Counter("raft_sqlite_entries_appended", "Log entries appended (all groups).",
                                        registry=r)
        self.bytes_appended = Counter("raft_sqlite_bytes_appended", "Payload bytes appended (all groups).",
                                      registry=r)
        self.segment_rotations = Counter("raft_sqlite_segment_rotations", "Log segments sealed (rotations).",
                                         registry=r)
        self.validation_errors = Counter("raft_sqlite_validation_errors", "Problems found by validation "
                                         "(recovery on open, verify), by kind.", ["kind"], registry=r)
        for p in getattr(store.recovery_report, "problems", []):
            self.validation_errors.labels(classify_problem(str(p))).inc()
        self._collector = _StateCollector(store.kernel.read)
        r.register(self._collector)
        # Written by the commit in progress, keyed so that a batch the store replays (after dropping a
        # failed request) is not counted twice: id(entries list) -> (group_id, last index, entries), and
        # (group_id, segment_id) of sealed segments.
        self._appends: dict[int, tuple[int, int, Sequence[LogEntry]]] = {}
        self._seals: set[tuple[int, int]] = set()
        store.kernel.add_listener(self)

    def on_append(self, group_id: int, entries: Sequence[LogEntry]) -> None:
        """Record listener: ``entries`` of ``group_id`` are in the commit being built."""
        if entries:
            self._appends[id(entries)] = (group_id, entries[-1].index, entries)

    def on_seal(self, group_id: int, segment_id: int) -> None:
        """Record listener: a segment is sealed in the commit being built."""
        self._seals.add((group_id, segment_id))

    def on_commit(self, seconds: float, requests: int) -> None:
        """Commit listener: publish what the commit that just succeeded wrote."""
        self.commit_seconds.observe(seconds)
        self.batch_size.observe(requests)
        if self._appends:
            # count an append only if its group's committed log now reaches its last entry (a request the
            # store dropped after queueing its rows does not)
            last = {g.gid: g.last_index for g in self.store.kernel.groups.states()}
            n = b = 0
            for gid, idx, entries in self._appends.values():
                if last.get(gid, -1) >= idx:
                    n += len(entries)
                    b += sum(len(e.data) for e in entries)
            self._appends.clear()
            if n:
                self.entries_appended.inc(n)
                self.bytes_appended.inc(b)
        if self._seals:
            self.segment_rotations.inc(len(self._seals))
            self._seals.clear()

    def observe_verify(self, report: VerifyReport) -> None:
        """Count the problems of a :class:`raft_sqlite.verify.VerifyReport` by kind."""
        for kind, n in report.counts_by_kind().items():
            self.validation_errors.labels(kind).inc(n)

    def detach(self) -> None:
        """Detach from the store (the registry keeps the values collected so far, but state metrics stop
        being collected)."""
        self.store.kernel.remove_listener(self)
        with contextlib.suppress(KeyError):
            self.registry.unregister(self._collector)

    def text(self) -> str:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry).decode()


def render_data_dir(data_dir: str | os.PathLike[str]) -> str:
    """Prometheus text format of what ``data_dir``'s files hold (``raft-sqlite metrics``): the state
    metrics plus ``raft_sqlite_validation_errors_total`` from the last recovery event. Reads through a
    read-only connection; never writes."""
    from .verify import (
        open_readonly,  # deferred: start-up speed (a process using StoreMetrics never needs it)
    )

    path = os.path.join(os.fspath(data_dir), layout.MAIN_DB)
    conn = open_readonly(path)
    try:
        reg = CollectorRegistry()
        reg.register(_StateCollector(lambda fn: fn(conn), include_validation=True))
        return generate_latest(reg).decode()
    finally:
        conn.close()
