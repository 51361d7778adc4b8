"""Prometheus metrics for a node's store (optional extra ``metrics``: needs ``prometheus_client``).

The library itself never imports this module; importing it without prometheus_client raises an
ImportError that says what to install. Two ways to get metrics:

* In the node process: ``m = StoreMetrics(store)`` attaches to an open :class:`~raft_sqlite.NodeStore`
  and fills ``m.registry`` (a ``prometheus_client.CollectorRegistry``; pass your own, e.g.
  ``prometheus_client.REGISTRY``, to merge with other metrics). Expose it with
  ``prometheus_client.start_http_server(9100, registry=m.registry)`` or mount
  ``prometheus_client.make_wsgi_app(m.registry)`` in your web app. Several stores of one process (several
  data_dirs) may share one registry: every series carries a ``node_id`` label, and a second
  ``StoreMetrics`` of the *same* node_id on one registry is refused (:class:`ValueError`).
* For a stopped node: ``raft-sqlite metrics DATA_DIR`` (:func:`render_data_dir`, :func:`collect_data_dir`)
  prints the text format (or JSON) of everything that is stored in the files, or writes it atomically
  for node_exporter's textfile collector (:func:`write_textfile`). The histograms and counters
  (commit and fsync latency, appends) live only in the running process: nothing of them is persisted.

Points in time are exported as ``*_timestamp_seconds`` (unix time), never as ages: a textfile written
once keeps its value, and ``time() - raft_sqlite_backup_timestamp_seconds`` is the age in PromQL.

Cost: the append path pays one listener call per commit (``on_commit``, through ``store.kernel.add_listener``)
plus one dict insert per append call (the counting happens in the commit listener); every state metric
(entries, bytes, segments, snapshots, backups, recovery) is read from the database when Prometheus scrapes,
on a pooled read connection, with bounded queries. The fsync histogram adds nothing to the append path:
it times only the syncs the store issues from Python, outside COMMIT (see ``raft_sqlite_fsync_seconds``).
In FULL/EXTRA the WAL sync of each commit happens inside SQLite's COMMIT and is part of
``raft_sqlite_commit_seconds``: timing it alone would need a Python VFS on the write connection, one Python
call per read and write of every commit (see :mod:`raft_sqlite.pacedvfs` for what that cost when measured).

Metrics (every series also carries ``node_id``; other labels in braces):

===================================================  =========  ======================================================
``raft_sqlite_info{cluster_id,version,fsync_mode,schema}``  gauge  always 1: the node's identity, the raft_sqlite
                                                                version that exported it, the fsync mode of the
                                                                last open and the schema (alembic) revision
``raft_sqlite_commit_seconds``                       histogram  duration of each group commit (BEGIN..COMMIT; in
                                                                FULL/EXTRA this includes SQLite's WAL fsync)
``raft_sqlite_fsync_seconds{file}``                  histogram  each sync the store issues itself, outside COMMIT:
                                                                ``wal`` (NORMAL's interval sync; the background
                                                                checkpointer's WAL sync), ``db`` (raft.db: the
                                                                checkpointer's paced syncs, a checkpoint recorded
                                                                as durable), ``hwm`` (the WAL high-water mark).
                                                                Not SQLite's WAL sync inside COMMIT (FULL/EXTRA):
                                                                that one is in commit_seconds
``raft_sqlite_group_commit_batch_size``              histogram  write requests coalesced into one commit
``raft_sqlite_entries_appended_total``               counter    log entries appended (all groups) since attach
``raft_sqlite_bytes_appended_total``                 counter    payload bytes appended since attach
``raft_sqlite_segment_rotations_total``              counter    segments sealed since attach
``raft_sqlite_validation_errors_total{kind}``        counter    problems found by recovery on open and by
                                                                :meth:`StoreMetrics.observe_verify` (kinds of
                                                                :data:`raft_sqlite.verify.PROBLEM_KINDS`)
``raft_sqlite_log_entries{group}``                   gauge      entries in the log (``last - first + 1``)
``raft_sqlite_log_stored_bytes{group}``              gauge      payload bytes stored (incl. compacted, not yet deleted)
``raft_sqlite_log_first_index{group}``               gauge      first index
``raft_sqlite_log_last_index{group}``                gauge      last index
``raft_sqlite_commit_index{group}``                  gauge      Raft commit index
``raft_sqlite_current_term{group}``                  gauge      Raft current term
``raft_sqlite_segments{group}``                      gauge      log segments (open + sealed)
``raft_sqlite_oldest_segment_timestamp_seconds{group}``  gauge  when the oldest segment still stored was created
``raft_sqlite_snapshot_index{group}``                gauge      index of the newest DURABLE snapshot (0: none)
``raft_sqlite_snapshot_duration_seconds{group}``     gauge      time the newest DURABLE snapshot took to write
``raft_sqlite_snapshot_bytes{group}``                gauge      size of the newest DURABLE snapshot
``raft_sqlite_snapshot_timestamp_seconds{group}``    gauge      when the newest DURABLE snapshot was finished
``raft_sqlite_recovered_partially{group}``           gauge      1 if the group was recovered under PARTIAL
``raft_sqlite_backups``                              gauge      backups recorded in the store
``raft_sqlite_backup_timestamp_seconds``             gauge      when the newest backup was taken (absent: never)
``raft_sqlite_backup_duration_seconds``              gauge      duration of the newest backup
``raft_sqlite_backup_bytes``                         gauge      size of the newest backup
``raft_sqlite_restore_drill_success``                gauge      1 if the newest restore drill passed, else 0 (absent: none)
``raft_sqlite_restore_drill_timestamp_seconds``      gauge      when the newest restore drill ended
``raft_sqlite_restore_drill_duration_seconds``       gauge      duration of the newest restore drill
``raft_sqlite_restore_drill_bytes``                  gauge      bytes the newest restore drill restored
``raft_sqlite_restore_drill_backup_age_seconds``     gauge      age of the drilled backup when it was drilled (fixed)
``raft_sqlite_recovery_timestamp_seconds``           gauge      when the last recovery on open ran
``raft_sqlite_recovery_duration_seconds``            gauge      duration of the last recovery on open
``raft_sqlite_recovery_outcome{outcome}``            gauge      1 for the last recovery's outcome, 0 for the others
===================================================  =========  ======================================================

Renamed in this version (a textfile froze the ages): ``raft_sqlite_oldest_segment_age_seconds``,
``raft_sqlite_snapshot_age_seconds`` and ``raft_sqlite_backup_age_seconds`` are replaced by the
``*_timestamp_seconds`` gauges above, in the live registry and in the CLI alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import apsw

try:
    import prometheus_client  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError("raft_sqlite.metrics needs prometheus_client: pip install 'raft_sqlite[metrics]'") from exc

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import fsio, layout
from .backup import DRILL_SETTING, drill_gauges
from .entry import LogEntry
from .errors import RaftSqliteError
from .fsync import FsyncMode
from .migrate import current_revision
from .status import GroupStatus, read_group_status
from .store import NodeStore
from .version import __version__

if TYPE_CHECKING:
    from .verify import VerifyReport

COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: a fdatasync of a small file takes 60-150 us on this project's VM when idle: the lowest bucket is below
FSYNC_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RECOVERY_OUTCOMES = ("created", "clean", "truncated", "partial")
#: the label every series carries: the store's node_id (several stores may share a registry)
NODE_LABEL = "node_id"
#: ``file`` values of ``raft_sqlite_fsync_seconds`` (see :class:`raft_sqlite.commit.SyncListener`)
SYNC_FILES = ("wal", "db", "hwm")


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
    """What one scrape reads of one store (in one read transaction)."""

    node_id: str
    cluster_id: str
    #: the fsync mode recorded by the last open ("" if none)
    fsync_mode: str
    #: the alembic revision of the schema ("" for none)
    schema: str
    groups: list[GroupStatus]
    backups: int
    #: newest backup: (created_at, duration, size), None if never backed up
    last_backup: tuple[float, float, int] | None
    #: last recovery on open: (outcome, duration, details JSON, at), None if none recorded
    recovery: tuple[str, float | None, str | None, float] | None
    #: the newest restore drill's report (``backup.DrillReport.to_dict``), None if none recorded
    drill: dict[str, object] | None = None


Reader = Callable[[Callable[[apsw.Connection], _State]], _State]


class _StateCollector(Collector):
    """Reads the stored state of every attached store at scrape time, through each one's ``read(fn)``
    (fn(conn) -> value), and merges them into one family per metric name."""

    def __init__(self, *, include_validation: bool = False):
        self._include_validation = include_validation
        #: node_id -> reader; replaced (copy-on-write), never mutated: a scrape iterates it unlocked
        self.sources: dict[str, Reader] = {}

    def describe(self) -> list[Metric]:
        return []  # state metrics are dynamic: skip registry collision checks at registration

    def collect(self) -> Iterator[Metric]:
        states = []
        for _node, read in sorted(self.sources.items()):
            try:
                states.append(read(_read_state))
            except (RaftSqliteError, OSError):
                continue  # store closed or unreadable: no state metrics of it this scrape
        if states:
            yield from _families(states, self._include_validation)


def _read_state(conn: apsw.Connection) -> _State:
    conn.execute("BEGIN")
    try:
        node = conn.execute("SELECT node_id, cluster_id FROM node").fetchone()
        mode = conn.execute("SELECT value FROM settings WHERE key='fsync_mode'").fetchone()
        schema = current_revision(conn)
        groups = read_group_status(conn)
        count = conn.execute("SELECT count(*) FROM backups").fetchone()
        assert count is not None  # count(*) yields one row even over no rows
        last_backup = conn.execute("SELECT created_at, duration, size FROM backups ORDER BY backup_id DESC "
                                   "LIMIT 1").fetchone()
        ev = conn.execute("SELECT outcome, duration, details, at FROM recovery_events WHERE kind='open' "
                          "ORDER BY event_id DESC LIMIT 1").fetchone()
        drill_row = conn.execute("SELECT value FROM settings WHERE key=?", (DRILL_SETTING,)).fetchone()
    finally:
        conn.execute("COMMIT")
    drill = None
    if drill_row is not None:
        with contextlib.suppress(ValueError, TypeError):
            drill = json.loads(drill_row[0])
    node_id, cluster_id = (str(node[0]), str(node[1])) if node is not None else ("", "")
    return _State(node_id, cluster_id, "" if mode is None else str(mode[0]), schema or "", groups, count[0],
                  last_backup, ev, drill if isinstance(drill, dict) else None)


def _families(states: list[_State], include_validation: bool) -> Iterator[Metric]:
    """One family per metric name, with the samples of every state in ``states`` (families without any
    sample are left out)."""
    node = [NODE_LABEL]

    def per_group(name: str, doc: str, value: Callable[[GroupStatus], float | None]) -> GaugeMetricFamily:
        f = GaugeMetricFamily(name, doc, labels=[*node, "group"])
        for st in states:
            for g in st.groups:
                v = value(g)
                if v is not None:
                    f.add_metric([st.node_id, g.name], float(v))
        return f

    def per_node(name: str, doc: str, value: Callable[[_State], float | None]) -> GaugeMetricFamily:
        f = GaugeMetricFamily(name, doc, labels=node)
        for st in states:
            v = value(st)
            if v is not None:
                f.add_metric([st.node_id], float(v))
        return f

    def snap_duration(g: GroupStatus) -> float | None:
        s = g.newest_snapshot
        return None if s is None or s.finished_at is None else s.finished_at - s.created_at

    def backup(i: int) -> Callable[[_State], float | None]:
        return lambda st: None if st.last_backup is None else st.last_backup[i]

    def recovery(fn: Callable[[tuple[str, float | None, str | None, float]], float]) -> Callable[[_State], float | None]:
        return lambda st: None if st.recovery is None else fn(st.recovery)

    info = GaugeMetricFamily("raft_sqlite_info", "Always 1: the node's identity, the raft_sqlite version that "
                             "exported the metrics, the fsync mode of the last open and the schema revision.",
                             labels=[*node, "cluster_id", "version", "fsync_mode", "schema"])
    for st in states:
        info.add_metric([st.node_id, st.cluster_id, __version__, st.fsync_mode, st.schema], 1.0)
    out: list[Metric] = [
        info,
        per_group("raft_sqlite_log_entries", "Entries in the log (last_index - first_index + 1).",
                  lambda g: g.entries),
        per_group("raft_sqlite_log_stored_bytes", "Payload bytes of log records stored (including compacted "
                  "records awaiting whole-segment deletion).", lambda g: g.stored_bytes),
        per_group("raft_sqlite_log_first_index", "First index of the log.", lambda g: g.first_index),
        per_group("raft_sqlite_log_last_index", "Last index of the log.", lambda g: g.last_index),
        per_group("raft_sqlite_commit_index", "Raft commit index.", lambda g: g.commit_index or 0),
        per_group("raft_sqlite_current_term", "Raft current term.", lambda g: g.current_term or 0),
        per_group("raft_sqlite_segments", "Log segments stored (open + sealed).", lambda g: g.segments),
        per_group("raft_sqlite_oldest_segment_timestamp_seconds", "When the oldest log segment still stored was "
                  "created (unix time).", lambda g: g.oldest_segment_created_at),
        per_group("raft_sqlite_snapshot_index", "Index of the newest DURABLE snapshot (0: none).",
                  lambda g: g.snapshot_index),
        per_group("raft_sqlite_snapshot_duration_seconds", "Time the newest DURABLE snapshot took to write.",
                  snap_duration),
        per_group("raft_sqlite_snapshot_bytes", "Size of the newest DURABLE snapshot.",
                  lambda g: None if g.newest_snapshot is None else g.newest_snapshot.size),
        per_group("raft_sqlite_snapshot_timestamp_seconds", "When the newest DURABLE snapshot was finished "
                  "(unix time).", lambda g: None if g.newest_snapshot is None else g.newest_snapshot.finished_at),
        per_group("raft_sqlite_recovered_partially", "1 if the group was recovered under the PARTIAL policy.",
                  lambda g: 1 if g.recovered_partially else 0),
        per_node("raft_sqlite_backups", "Backups recorded in the store.", lambda st: st.backups),
        per_node("raft_sqlite_backup_timestamp_seconds", "When the newest backup was taken (unix time).", backup(0)),
        per_node("raft_sqlite_backup_duration_seconds", "Duration of the newest backup.", backup(1)),
        per_node("raft_sqlite_backup_bytes", "Size of the newest backup.", backup(2)),
    ]
    out += _drill_families(states)
    out += [per_node("raft_sqlite_recovery_timestamp_seconds", "When the last recovery on open ran (unix time).",
                     recovery(lambda ev: ev[3])),
            per_node("raft_sqlite_recovery_duration_seconds", "Duration of the last recovery on open.",
                     recovery(lambda ev: ev[1] or 0.0))]
    out += _recovery_families(states, include_validation)
    yield from (f for f in out if f.samples)


def _drill_families(states: list[_State]) -> list[Metric]:
    drills: dict[str, GaugeMetricFamily] = {}
    for st in states:
        for name, doc, value in (drill_gauges(st.drill) if st.drill is not None else []):
            if name not in drills:
                drills[name] = GaugeMetricFamily(name, doc, labels=[NODE_LABEL])
            drills[name].add_metric([st.node_id], value)
    return list(drills.values())


def _recovery_families(states: list[_State], include_validation: bool) -> list[Metric]:
    outcome = GaugeMetricFamily("raft_sqlite_recovery_outcome", "1 for the outcome of the last recovery on open.",
                                labels=[NODE_LABEL, "outcome"])
    for st in states:
        if st.recovery is not None:
            for o in sorted(set(RECOVERY_OUTCOMES) | {st.recovery[0]}):
                outcome.add_metric([st.node_id, o], 1.0 if o == st.recovery[0] else 0.0)
    if not include_validation:
        return [outcome]
    c = CounterMetricFamily("raft_sqlite_validation_errors", "Problems found by the last recovery on open, by "
                            "kind.", labels=[NODE_LABEL, "kind"])
    for st in states:
        details = None if st.recovery is None else st.recovery[2]
        counts: dict[str, int] = {}
        try:
            for p in (json.loads(details).get("problems", []) if details else []):
                k = classify_problem(str(p))
                counts[k] = counts.get(k, 0) + 1
        except (ValueError, AttributeError):
            pass
        for k in sorted(counts):
            c.add_metric([st.node_id, k], counts[k])
    return [outcome, c]


class _Shared:
    """The metrics of one registry, shared by every :class:`StoreMetrics` attached to it (one child per
    node_id): prometheus_client refuses a second metric of the same name on one registry."""

    def __init__(self, r: CollectorRegistry):
        node = [NODE_LABEL]
        self.commit_seconds = Histogram("raft_sqlite_commit_seconds", "Duration of each group commit "
                                        "(transaction; in FULL/EXTRA including SQLite's WAL fsync).", node,
                                        buckets=COMMIT_BUCKETS, registry=r)
        self.fsync_seconds = Histogram("raft_sqlite_fsync_seconds", "Each sync the store issues itself outside "
                                       "COMMIT, by file (wal: NORMAL's interval sync, the checkpointer's WAL sync; "
                                       "db: raft.db, by the checkpointer; hwm: the WAL high-water mark). SQLite's "
                                       "WAL sync inside COMMIT (FULL/EXTRA) is in raft_sqlite_commit_seconds.",
                                       [*node, "file"],
                                       buckets=FSYNC_BUCKETS, registry=r)
        self.batch_size = Histogram("raft_sqlite_group_commit_batch_size", "Write requests coalesced into one "
                                    "commit.", node, buckets=BATCH_BUCKETS, registry=r)
        self.entries_appended = Counter("raft_sqlite_entries_appended", "Log entries appended (all groups).",
                                        node, registry=r)
        self.bytes_appended = Counter("raft_sqlite_bytes_appended", "Payload bytes appended (all groups).",
                                      node, registry=r)
        self.segment_rotations = Counter("raft_sqlite_segment_rotations", "Log segments sealed (rotations).",
                                         node, registry=r)
        self.validation_errors = Counter("raft_sqlite_validation_errors", "Problems found by validation "
                                         "(recovery on open, verify), by kind.", [*node, "kind"], registry=r)
        self.state = _StateCollector()
        r.register(self.state)
        #: node_id -> the attached StoreMetrics
        self.attached: dict[str, StoreMetrics] = {}


_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, _Shared] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


class StoreMetrics:
    """Prometheus metrics of one open :class:`~raft_sqlite.NodeStore` (see the module docstring for the
    list). Attaching adds it as a listener of the store's kernel (``store.kernel.add_listener``) and counts
    appended entries, bytes and segment rotations, published when their commit succeeds, and times the
    store's own syncs. ``registry`` defaults to a new ``CollectorRegistry``; :meth:`detach` undoes the
    hooks. Every series carries ``node_id=store.node_id``: the stores of one process may share a registry
    (e.g. ``prometheus_client.REGISTRY``), but only one attached StoreMetrics per node_id and registry
    (a second raises :class:`ValueError`: give stores with equal node_ids, of different clusters, one
    registry each).

    Appended entries and bytes are counted when their commit succeeds, once even if the store replays a
    batch, and only if the group's committed log reaches them (a request dropped from its batch is not
    counted)."""

    def __init__(self, store: NodeStore, registry: CollectorRegistry | None = None):
        self.store = store
        self.registry = registry if registry is not None else CollectorRegistry()
        nid = self.node_id = store.node_id
        with _SHARED_LOCK:
            sh = _SHARED.get(self.registry)
            if sh is None:
                sh = _SHARED[self.registry] = _Shared(self.registry)
            if nid in sh.attached:
                raise ValueError(f"this registry already has a StoreMetrics for node_id {nid!r} "
                                 f"({sh.attached[nid].store.data_dir}); detach it first, or give each store with "
                                 "this node_id a registry of its own")
            sh.attached[nid] = self
            sh.state.sources = {**sh.state.sources, nid: store.kernel.read}
        self._shared = sh
        self.commit_seconds = sh.commit_seconds.labels(nid)
        self.batch_size = sh.batch_size.labels(nid)
        self.entries_appended = sh.entries_appended.labels(nid)
        self.bytes_appended = sh.bytes_appended.labels(nid)
        self.segment_rotations = sh.segment_rotations.labels(nid)
        # the files this store's mode syncs, shown from the start (count 0) so that rate() has a series
        self._fsync = {f: sh.fsync_seconds.labels(nid, f) for f in self._sync_files(store)}
        for p in getattr(store.recovery_report, "problems", []):
            sh.validation_errors.labels(nid, classify_problem(str(p))).inc()
        # Written by the commit in progress, keyed so that a batch the store replays (after dropping a
        # failed request) is not counted twice: id(entries list) -> (group_id, last index, entries), and
        # (group_id, segment_id) of sealed segments.
        self._appends: dict[int, tuple[int, int, Sequence[LogEntry]]] = {}
        self._seals: set[tuple[int, int]] = set()
        store.kernel.add_listener(self)

    @staticmethod
    def _sync_files(store: NodeStore) -> tuple[str, ...]:
        return () if FsyncMode(store.fsync) is FsyncMode.OFF else SYNC_FILES  # OFF never syncs

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

    def on_sync(self, file: str, seconds: float) -> None:
        """Sync listener (:class:`raft_sqlite.commit.SyncListener`): the store synced ``file`` itself."""
        h = self._fsync.get(file)
        if h is None:
            h = self._fsync[file] = self._shared.fsync_seconds.labels(self.node_id, file)
        h.observe(seconds)

    def observe_verify(self, report: VerifyReport) -> None:
        """Count the problems of a :class:`raft_sqlite.verify.VerifyReport` by kind."""
        for kind, n in report.counts_by_kind().items():
            self._shared.validation_errors.labels(self.node_id, kind).inc(n)

    def detach(self) -> None:
        """Detach from the store (the registry keeps the counters and histograms collected so far, but the
        store's state metrics stop being collected; another StoreMetrics of this node_id may then attach to
        the registry and continue its counters)."""
        self.store.kernel.remove_listener(self)
        sh = self._shared
        with _SHARED_LOCK:
            if sh.attached.get(self.node_id) is self:
                del sh.attached[self.node_id]
                sh.state.sources = {k: v for k, v in sh.state.sources.items() if k != self.node_id}

    def text(self) -> str:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry).decode()


def collect_data_dir(data_dir: str | os.PathLike[str]) -> list[Metric]:
    """The metric families of what ``data_dir``'s files hold (``raft-sqlite metrics``): the state metrics,
    ``raft_sqlite_info`` and ``raft_sqlite_validation_errors_total`` from the last recovery event. Reads
    through a read-only connection; never writes. No histogram or counter of a running process: those are
    not persisted."""
    from .verify import (
        open_readonly,  # deferred: start-up speed (a process using StoreMetrics never needs it)
    )

    path = os.path.join(os.fspath(data_dir), layout.MAIN_DB)
    conn = open_readonly(path)
    try:
        return list(_families([_read_state(conn)], include_validation=True))
    finally:
        conn.close()


class _Families(Collector):
    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def to_text(families: list[Metric]) -> str:
    """Prometheus text exposition format of ``families``."""
    reg = CollectorRegistry()
    reg.register(_Families(families))
    return generate_latest(reg).decode()


def to_json(families: list[Metric]) -> list[dict[str, Any]]:
    """JSON-ready form of ``families``: ``[{"name", "type", "help", "samples": [{"name", "labels",
    "value"}]}]``, the same families and samples as the text format (counters' samples end in ``_total``)."""
    return [{"name": f.name, "type": f.type, "help": f.documentation,
             "samples": [{"name": s.name, "labels": dict(s.labels), "value": s.value} for s in f.samples]}
            for f in families]


def render_data_dir(data_dir: str | os.PathLike[str]) -> str:
    """Prometheus text format of :func:`collect_data_dir` (what ``raft-sqlite metrics`` prints)."""
    return to_text(collect_data_dir(data_dir))


def write_textfile(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically, as node_exporter's textfile collector expects: a temporary
    file in the same directory (a hidden name ending in ``.tmp``, which the collector ignores), written and
    fsynced, mode 0644, renamed over ``path``, then the directory fsynced. On any error the temporary file
    is removed and ``path`` is left as it was (OSError propagates). A path inside a node's data_dir, or an
    existing SQLite database, is refused first (:class:`~raft_sqlite.errors.OutputRefused`)."""
    fsio.write_output_atomically(path, text.encode(), 0o644)
