"""A transactional SQL state machine: ``store.state(group, schema=..., apply=...)``.

The state of one Raft group is a SQLite database of its own (``data_dir/state/group-<id>.db``) whose tables
the application declares (SQLAlchemy Core ``MetaData`` or DDL text). Committed log entries are applied to it
by the application's ``apply(conn, entry)``, and the index and term of the last applied entry are written in
the **same** SQLite transaction (table ``raft_applied``). So after any crash the database holds the state of
applying entries ``1..last_applied`` exactly once, and :meth:`SqlStateMachine.catch_up` resumes at
``last_applied + 1``: no double apply, no replay from a snapshot.

Snapshots of the state go through the group's snapshot store as the registered structure ``"sql"`` of
``store.state_machine(group)`` (so chains, compaction rules and "no structure silently skipped" are the
existing ones):

* a FULL snapshot is the state database copied by SQLite's online backup API from a read transaction that
  pins the state at ``last_applied`` (apply goes on meanwhile: WAL readers do not block the writer);
* a DELTA is a changeset of the session extension, recorded on the apply connection since the parent
  snapshot (a schema change, a restart or a restore makes the next capture FULL);
* restoring replaces the state atomically: a FULL is written to a temporary file, checked
  (``integrity_check``, its ``raft_applied`` row, its cluster and group) and copied into the live database
  in one transaction by the backup API; a DELTA is applied in one transaction that must end at the
  snapshot's index and term (any conflict aborts it).

Reads (:meth:`SqlStateMachine.read`) run on read-only connections in a read transaction, so they see the
state after some whole batch, never half of one.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import apsw

from . import fsio
from .args import int_arg
from .entry import EntryKind, LogEntry
from .errors import (
    CorruptionError,
    LogCompactedError,
    LogConflictError,
    LogGapError,
    NodeIdentityMismatch,
    RaftSqliteError,
    RecoveryRefused,
    SnapshotError,
    StorageFault,
)
from .objectstore import stream_online_backup
from .snapshot import SnapshotKind, SnapshotManager, SnapshotMeta

log = logging.getLogger("raft_sqlite.sqlstate")

#: folder of the state databases inside a data_dir
STATE_DIR = "state"
#: the structure name of the state database in ``store.state_machine(group)``
STRUCTURE_NAME = "sql"
#: prefix of the temporary files in the state folder (a restore's copy, a capture's changeset)
STATE_TEMP_PREFIX = ".raft_sqlite-"
#: memory the session extension may hold for the changes since the last capture; beyond it they are no longer
#: recorded and the next capture stores the state whole
SESSION_MAX_BYTES = 64 << 20
#: format of the state database's bookkeeping rows
STATE_FORMAT = 1
#: tables the state machine owns inside the state database (user tables must not use these names)
RESERVED_TABLES = ("raft_applied", "raft_state_identity")
#: header of a FULL snapshot blob: magic, page size; then pages 2..N, then page 1 (the online backup
#: writes page 1 last, with its header final)
_FULL_MAGIC = b"RSQLST01"
_FULL_HEAD = struct.Struct("<8sI")
_DELTA_MAGIC = b"RSQLCS01"

_BOOKKEEPING_DDL = (
    "CREATE TABLE raft_state_identity(id INTEGER PRIMARY KEY CHECK (id = 1), cluster_id TEXT NOT NULL, "
    "node_id TEXT NOT NULL, group_name TEXT NOT NULL, format INTEGER NOT NULL, created_at REAL NOT NULL)",
    "CREATE TABLE raft_applied(id INTEGER PRIMARY KEY CHECK (id = 1), applied_index INTEGER NOT NULL, "
    "applied_term INTEGER NOT NULL, crc32 INTEGER NOT NULL)",
)

#: SQLite authorizer codes refused inside ``apply`` (see :meth:`SqlStateMachine._authorize`)
_DENIED_OPS = {apsw.SQLITE_TRANSACTION: "BEGIN/COMMIT/ROLLBACK", apsw.SQLITE_ATTACH: "ATTACH",
               apsw.SQLITE_DETACH: "DETACH",
               # statistics tables have no key: a DELTA would not carry them, and replicas would plan differently
               apsw.SQLITE_ANALYZE: "ANALYZE",
               # TEMP objects live in the connection, not in the state: replicas and restarts would differ
               apsw.SQLITE_CREATE_TEMP_TABLE: "CREATE TEMP TABLE", apsw.SQLITE_CREATE_TEMP_TRIGGER: "CREATE TEMP TRIGGER",
               apsw.SQLITE_CREATE_TEMP_VIEW: "CREATE TEMP VIEW", apsw.SQLITE_CREATE_TEMP_INDEX: "CREATE TEMP INDEX"}
#: ops whose table is ``p2`` (``p1``: the trigger or index)
_ON_TABLE_OPS = (apsw.SQLITE_CREATE_TRIGGER, apsw.SQLITE_DROP_TRIGGER, apsw.SQLITE_CREATE_INDEX,
                 apsw.SQLITE_DROP_INDEX)
#: pragmas refused inside ``apply`` when they set a value: kept in the file header, not in any table, so a
#: DELTA (a changeset of rows) would not carry them
_DENIED_PRAGMA_WRITES = frozenset({"user_version", "application_id"})
#: pragmas refused inside ``apply``: they change durability, locking or the schema behind SQLite's back
#: (the session extension itself reads ``table_info``-like pragmas, which stay allowed)
_DENIED_PRAGMAS = frozenset({"journal_mode", "synchronous", "locking_mode", "wal_checkpoint", "wal_autocheckpoint",
                             "writable_schema", "query_only", "schema_version", "fullfsync", "checkpoint_fullfsync",
                             "auto_vacuum", "incremental_vacuum", "page_size", "ignore_check_constraints",
                             "foreign_keys", "defer_foreign_keys", "journal_size_limit", "temp_store", "mmap_size",
                             # connection behaviour that is not part of the state (replicas would differ)
                             "recursive_triggers", "case_sensitive_like", "reverse_unordered_selects",
                             "optimize", "analysis_limit"})
_WRITE_OPS = (apsw.SQLITE_INSERT, apsw.SQLITE_UPDATE, apsw.SQLITE_DELETE, apsw.SQLITE_DROP_TABLE,
              apsw.SQLITE_ALTER_TABLE)

ApplyFn = Callable[[apsw.Connection, LogEntry], object]
Schema = Any  # sqlalchemy.MetaData | str | Sequence[str] | None


def applied_crc(index: int, term: int) -> int:
    """CRC32 of the ``raft_applied`` row (index and term)."""
    return zlib.crc32(f"{index}|{term}".encode())


def state_file(data_dir: str, gid: int) -> str:
    """Path of the state database of group id ``gid`` in ``data_dir``."""
    return os.path.join(data_dir, STATE_DIR, f"group-{gid}.db")


class StateHost(Protocol):
    """What the state machine needs of its store (a :class:`~raft_sqlite.NodeStore`)."""

    data_dir: str
    node_id: str
    cluster_id: str
    vfs: str | None  #: the apsw VFS the store's files go through (the fault-injection seam): the state's too

    kernel: Any  # the store's Kernel: ``kernel.group(name)`` is the group's published state

    def log(self, group: str) -> Any: ...

    def snapshots(self, group: str) -> SnapshotManager: ...

    def state_machine(self, group: str) -> Any: ...

    def iter_replay(self, group: str, *, upto: int | None = None, chunk: int = 8192,
                    start: int | None = None) -> Iterator[LogEntry]: ...


class ApplyError(RaftSqliteError):
    """The application's ``apply`` raised (or broke the transaction) for an entry: the whole batch was rolled
    back, nothing of it is applied, ``last_applied`` is unchanged. ``index`` is the entry's index; the
    original exception is ``__cause__``."""

    def __init__(self, msg: str, index: int) -> None:
        super().__init__(msg)
        self.index = index


def _ddl_of(schema: Schema) -> list[str]:
    """The CREATE statements of ``schema`` (SQLAlchemy ``MetaData``, one DDL string, or a sequence of them)."""
    if schema is None:
        return []
    if isinstance(schema, str):
        return [schema]
    if isinstance(schema, (list, tuple)):
        if not all(isinstance(s, str) for s in schema):
            raise TypeError("schema: a sequence of DDL statements must hold only str")
        return list(schema)
    sorted_tables = getattr(schema, "sorted_tables", None)
    if sorted_tables is None:
        raise TypeError(f"schema must be a sqlalchemy MetaData, a DDL str or a list of them, not "
                        f"{type(schema).__name__}")
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.schema import CreateIndex, CreateTable
    dialect = sqlite.dialect()
    out = []
    for t in sorted_tables:
        out.append(str(CreateTable(t).compile(dialect=dialect)).strip())
        out.extend(str(CreateIndex(ix).compile(dialect=dialect)).strip() for ix in t.indexes)
    return out


def _reader_authorizer(op: int, p1: str | None, p2: str | None, dbname: str | None, trigger: str | None) -> int:
    """Pooled readers: no ATTACH/DETACH, no TEMP object (either would stay on the connection for the next
    ``read()``)."""
    return apsw.SQLITE_DENY if op in _DENIED_OPS and op != apsw.SQLITE_TRANSACTION else apsw.SQLITE_OK


def _one(conn: apsw.Connection, sql: str, bindings: Sequence[Any] = ()) -> Any:
    row = conn.execute(sql, bindings).fetchone()
    return None if row is None else row[0]


def read_identity(conn: apsw.Connection, where: str) -> tuple[Any, Any, Any, Any]:
    """``(cluster_id, node_id, group_name, format)`` of a state database. :class:`CorruptionError` if it has
    no identity (not a raft_sqlite state database)."""
    try:
        row = conn.execute("SELECT cluster_id, node_id, group_name, format FROM raft_state_identity "
                           "WHERE id=1").fetchone()
    except apsw.SQLError as exc:
        raise CorruptionError(f"{where}: not a raft_sqlite state database ({exc})") from None
    if row is None:
        raise CorruptionError(f"{where}: the state database has no identity row")
    return row[0], row[1], row[2], row[3]


def read_applied(conn: apsw.Connection, where: str) -> tuple[int, int]:
    """``(index, term)`` of the last entry applied to a state database, CRC-checked
    (:class:`CorruptionError` otherwise)."""
    try:
        row = conn.execute("SELECT applied_index, applied_term, crc32 FROM raft_applied WHERE id=1").fetchone()
    except apsw.SQLError as exc:
        raise CorruptionError(f"{where}: the state database has no raft_applied table ({exc})") from None
    if row is None:
        raise CorruptionError(f"{where}: the state database has no raft_applied row")
    index, term, crc = row
    if not (isinstance(index, int) and isinstance(term, int)) or index < 0 or term < 0 \
            or crc != applied_crc(index, term):
        raise CorruptionError(f"{where}: the raft_applied row fails its CRC32 check ({tuple(row)!r})")
    return index, term


class SqlStateMachine:
    """The SQL state machine of one group (use ``store.state(group, schema=..., apply=...)``).

    Thread-safety: every method may be called from any thread; applies, restores and the start of a
    snapshot are serialised; reads run in parallel with them on their own connections.
    """

    def __init__(self, host: StateHost, group: str, gid: int, *, schema: Schema = None,
                 apply: ApplyFn | None = None, durable: bool = False, deltas: bool = True) -> None:
        if apply is not None and not callable(apply):
            raise TypeError(f"apply must be callable (conn, entry), not {type(apply).__name__}")
        self._host, self.group, self.gid = host, group, gid
        self._ddl = _ddl_of(schema)
        self._schema_arg = schema
        self._apply_fn = apply
        self.durable = bool(durable)
        self.deltas = bool(deltas)
        self.path = state_file(host.data_dir, gid)
        self._lock = threading.RLock()  # the write connection, the applied position, the session
        self._snap_lock = threading.Lock()
        self._readers: list[apsw.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._commit_ok = False
        self._epoch = 0  # +1 at every restore: a capture pinned before one must not be a DELTA
        self._fault: BaseException | None = None
        self._in_apply = False
        self._session: apsw.Session | None = None
        self._session_schema: int | None = None  # schema_version when the session started
        self._unsafe_cache: tuple[int, str | None] | None = None  # (schema_version, delta_unsafe)
        # a capture's pin (snapshot()): reader in its read transaction, index, term, changeset file, epoch
        self._pinned: tuple[apsw.Connection, int, int, str | None, int] | None = None
        self._conn = self._open()
        self._conn.set_commit_hook(self._commit_hook)
        self._applied = read_applied(self._conn, self.path)
        self._check_against_log()
        self._restart_session()
        sm = host.state_machine(group)
        if STRUCTURE_NAME not in sm.names():
            sm.register(STRUCTURE_NAME, _StateStructure(self))

    # ------------------------------------------------------------------ open and checks
    def _connect(self, path: str, *, readonly: bool = False) -> apsw.Connection:
        flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        flags |= apsw.SQLITE_OPEN_NOFOLLOW
        vfs = self._host.vfs
        conn = apsw.Connection(path, flags=flags, vfs=vfs) if vfs else apsw.Connection(path, flags=flags)
        conn.set_busy_timeout(60_000)
        return conn

    def _open(self) -> apsw.Connection:
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            fsio.makedirs(folder, mode=0o700, exist_ok=True)
            fsio.sync_dir(self._host.data_dir)
        if not os.path.exists(self.path) and os.path.exists(self.path + "-wal"):
            # SQLite would replay the orphaned WAL into a new empty file: a torn state passed as a real one
            raise CorruptionError(f"{self.path}: the state database is missing but its WAL is present; move "
                                  f"{self.path}-wal away to rebuild the state from the log")
        created = not os.path.exists(self.path)
        if created:  # mode 0600 like the store's files (SQLite gives its -wal/-shm the database's mode)
            fsio.close(fsio.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        conn = self._connect(self.path)
        try:
            # a file this code created and a crash left before its first commit holds no table at all; any
            # other database is checked (read only) before anything is written to it: one without the
            # bookkeeping tables is not ours and is never adopted
            fresh = created or _one(conn, "SELECT count(*) FROM sqlite_schema") == 0
            if not fresh:
                self._check_identity(conn, self.path, exact_node=True)
            conn.execute("PRAGMA journal_mode=WAL").fetchall()
            # keep the WAL file across opens (as raft.db does): a read-only reader (`raft-sqlite sql --state`,
            # `serve`, any SQLite client) of a closed state database then never has to create it
            one = ctypes.c_int(1)
            conn.file_control("main", apsw.SQLITE_FCNTL_PERSIST_WAL, ctypes.addressof(one))
            # why NORMAL by default: every entry applied is already durable in the Raft log, and the
            # applied index commits atomically with the state, so a power loss that drops the newest state
            # transactions only makes the next catch_up apply them again from the log, exactly once
            conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}").fetchall()
            conn.execute("PRAGMA foreign_keys=ON").fetchall()
            if fresh:
                self._create(conn)
                fsio.sync_dir(os.path.dirname(self.path))
        except (apsw.NotADBError, apsw.CorruptError) as exc:
            conn.close()
            raise CorruptionError(f"{self.path}: the state database is damaged ({exc}); delete it (and its -wal, "
                                  "-shm) to rebuild the state from the log and snapshots") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _create(self, conn: apsw.Connection) -> None:
        h = self._host
        conn.execute("BEGIN IMMEDIATE")
        try:
            for ddl in _BOOKKEEPING_DDL:
                conn.execute(ddl)
            conn.execute("INSERT INTO raft_state_identity VALUES (1,?,?,?,?,?)",
                         (h.cluster_id, h.node_id, self.group, STATE_FORMAT, time.time()))
            conn.execute("INSERT INTO raft_applied VALUES (1,0,0,?)", (applied_crc(0, 0),))
            for ddl in self._ddl:
                conn.execute(ddl)
            conn.execute("COMMIT")
        except BaseException:
            if not conn.get_autocommit():
                conn.execute("ROLLBACK")
            raise
        log.info("%s: state database of group %r created (%d schema statements)", self.path, self.group,
                 len(self._ddl))

    def _check_identity(self, conn: apsw.Connection, where: str, *, exact_node: bool) -> None:
        cluster, node, group, fmt = read_identity(conn, where)
        h = self._host
        if fmt != STATE_FORMAT:
            raise NodeIdentityMismatch(f"{where}: state database format {fmt!r}, this code knows {STATE_FORMAT}")
        if cluster != h.cluster_id or group != self.group or (exact_node and node != h.node_id):
            raise NodeIdentityMismatch(
                f"{where}: state database of node {node!r} cluster {cluster!r} group {group!r}, not of node "
                f"{h.node_id!r} cluster {h.cluster_id!r} group {self.group!r}")

    def _check_against_log(self) -> None:
        """Fail closed when the state holds entries the log does not: applied beyond the log's last index
        (the log lost entries the state applied), or a different term at the applied index (a fork)."""
        index, term = self._applied
        if index == 0:
            return
        g = self._host.kernel.group(self.group)
        if index > g.last_index and index > g.snapshot_index:
            raise RecoveryRefused(
                f"{self.path}: the state has applied entries up to {index}, but the log of group {self.group!r} "
                f"ends at {g.last_index}: the log lost entries the state applied. Delete the state database "
                f"(and its -wal, -shm) to rebuild it from the log and snapshots, or restore the log.")
        actual = None
        if g.first_index <= index <= g.last_index:
            actual = self._host.log(self.group).term(index)
        elif index == g.snapshot_index:
            actual = g.snapshot_term
        if actual is not None and actual != term:
            raise RecoveryRefused(
                f"{self.path}: the state applied entry {index} of term {term}, but the log of group "
                f"{self.group!r} has term {actual} there: the state and the log have forked")

    def _resync_applied(self) -> None:
        """Read the applied position back from the write connection (after an error or an interrupt)."""
        try:
            self._applied = read_applied(self._conn, self.path)
        except (apsw.Error, CorruptionError) as exc:
            self._note_fault(exc)

    def _check_replace(self) -> None:
        """Under ``_lock``, before a restore replaces the state: open, and not from inside ``apply``."""
        self._check_open()
        if self._in_apply:
            raise RaftSqliteError(f"group {self.group!r}: the state cannot be restored from inside apply()")

    @contextlib.contextmanager
    def _committing(self) -> Iterator[None]:
        """The state machine's own commit on the write connection (see :meth:`_commit_hook`)."""
        self._commit_ok = True
        try:
            yield
        finally:
            self._commit_ok = False

    def _commit_hook(self) -> bool:
        """Veto (True) every commit of the write connection but the state machine's own: a statement that ends
        the batch's transaction inside ``apply`` (INSERT OR ROLLBACK, RAISE(ROLLBACK)) must not let the
        writes after it autocommit outside any batch, nor may a connection kept by the application."""
        return not self._commit_ok

    def _check_open(self) -> None:
        if self._closed:
            raise RaftSqliteError(f"{self.path}: the state machine of group {self.group!r} is closed")
        if self._fault is not None:
            raise StorageFault(f"{self.path}: the state machine of group {self.group!r} stopped after a storage "
                               f"error ({self._fault!r}); reopen the store") from self._fault

    def _note_fault(self, exc: BaseException) -> None:
        """Fail-stop after an I/O error on the state database: what a failed write or sync left on disk is
        unknown (a retried fsync can report success for data the kernel dropped). The log stays the durable
        record: reopening the store resumes from whatever the state database then holds."""
        if isinstance(exc, apsw.IOError) and self._fault is None:
            self._fault = exc
            log.error("%s: storage error, the state machine of group %r stops: %r", self.path, self.group, exc)

    def opened_with(self, schema: Schema, apply: ApplyFn | None, durable: bool | None = None,
                    deltas: bool | None = None) -> bool:
        """Whether the arguments given (None: not given) are the ones this state machine was opened with."""
        return (schema is None or schema is self._schema_arg) and (apply is None or apply is self._apply_fn) \
            and (durable is None or bool(durable) == self.durable) and (deltas is None or bool(deltas) == self.deltas)

    # ------------------------------------------------------------------ positions
    @property
    def last_applied(self) -> int:
        """Index of the last entry applied to the state (0: none)."""
        return self._applied[0]

    @property
    def applied(self) -> tuple[int, int]:
        """``(index, term)`` of the last entry applied (``(0, 0)``: none)."""
        return self._applied

    # ------------------------------------------------------------------ apply
    def _authorize(self, op: int, p1: str | None, p2: str | None, dbname: str | None,
                   trigger: str | None) -> int:
        """Inside ``apply``: nothing that would break the batch's one transaction or its durability (transaction
        control, ATTACH/DETACH, durability and locking pragmas), nothing a replica or a restart would not have
        (TEMP objects, ANALYZE, connection-behaviour pragmas, ``user_version``/``application_id`` writes), and
        no write, trigger or index on the bookkeeping tables."""
        if op in _DENIED_OPS:
            return apsw.SQLITE_DENY
        if op == apsw.SQLITE_PRAGMA:
            name = (p1 or "").lower()
            if name in _DENIED_PRAGMAS or (p2 is not None and name in _DENIED_PRAGMA_WRITES):
                return apsw.SQLITE_DENY
        if op in _WRITE_OPS and p1 in RESERVED_TABLES:
            return apsw.SQLITE_DENY
        if op in _ON_TABLE_OPS and p2 in RESERVED_TABLES:  # a trigger or an index: p2 names its table
            return apsw.SQLITE_DENY
        return apsw.SQLITE_OK

    def apply(self, entries: Iterable[LogEntry], fn: ApplyFn | None = None) -> int:
        """Apply ``entries`` (committed log entries, in index order) in ONE transaction that also records the
        last one's index and term; returns how many were applied.

        Entries at or below :attr:`last_applied` are skipped (that is what makes a replay after a crash
        apply each entry exactly once); the one AT ``last_applied`` must have its recorded term
        (:class:`LogConflictError` otherwise: a fork). The first new entry must be ``last_applied + 1`` and
        they must be contiguous (:class:`LogGapError`). ``fn`` (default: the ``apply`` given to
        ``store.state``) is called as ``fn(conn, entry)`` for each new entry, inside the transaction; what it
        may not do is refused by an authorizer (:meth:`_authorize`), and a commit hook vetoes any commit but
        the batch's own. If it raises, the whole batch is rolled back and :class:`ApplyError` raised."""
        fn = fn if fn is not None else self._apply_fn
        if fn is None:
            raise TypeError(f"group {self.group!r}: no apply function (pass apply= to store.state() or fn=)")
        with self._lock:
            self._check_open()
            if self._in_apply:
                raise RaftSqliteError(f"group {self.group!r}: apply() called from inside apply()")
            conn = self._conn
            self._commit_ok = False
            n = 0
            cur: LogEntry | None = None
            try:
                if not conn.get_autocommit():  # left open by an interrupt in an earlier call's error path
                    conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                # the position is read inside the transaction, never taken from memory: an interrupt can
                # land between a COMMIT and the update of the cached position
                index, term = read_applied(conn, self.path)
                self._in_apply = True
                # once per batch: setting an authorizer expires every prepared statement (re-prepared, and
                # so re-authorized, on their next use)
                conn.authorizer = self._authorize
                for e in entries:
                    if not isinstance(e, LogEntry):
                        raise TypeError(f"entries must be LogEntry, not {type(e).__name__}")
                    ei = e.index
                    if ei <= index:
                        if ei == index and e.term != term:
                            raise LogConflictError(f"group {self.group!r}: entry {ei} has term {e.term}, the state "
                                                   f"applied term {term} there")
                        continue
                    if ei != index + 1:
                        raise LogGapError(f"group {self.group!r}: entry {ei} does not follow the last applied "
                                          f"{index}")
                    if e.term < term:
                        raise LogConflictError(f"group {self.group!r}: entry {ei} has term {e.term}, below the "
                                               f"term {term} of entry {index}")
                    cur = e
                    fn(conn, e)
                    if conn.get_autocommit():  # e.g. INSERT OR ROLLBACK: the batch is gone
                        raise RaftSqliteError("apply ended the batch's transaction")
                    index, term = ei, e.term
                    n += 1
                    cur = None
                conn.authorizer = None
                if n:
                    conn.execute("UPDATE raft_applied SET applied_index=?, applied_term=?, crc32=? WHERE id=1",
                                 (index, term, applied_crc(index, term)))
                with self._committing():
                    conn.execute("COMMIT")
            except BaseException as exc:
                conn.authorizer = None
                self._note_fault(exc)
                if not conn.get_autocommit():
                    conn.execute("ROLLBACK")
                # the applied position is what the database says: an interrupt (KeyboardInterrupt) may land
                # after the COMMIT returned, and the batch is then applied
                self._resync_applied()
                if cur is not None and isinstance(exc, Exception):
                    raise ApplyError(f"group {self.group!r}: apply of entry {cur.index} failed: {exc!r}; the batch "
                                     "was rolled back", cur.index) from exc
                raise
            finally:
                self._in_apply = False
            self._applied = (index, term)
            if self._session is not None and self._session.memory_used > SESSION_MAX_BYTES:
                # the changes since the last capture outgrew a DELTA's worth: stop recording them (the next
                # capture stores the state whole, and recording starts again there)
                self._session.close()
                self._session = None
            return n

    def catch_up(self, upto: int | None = None, *, batch: int = 1024,
                 progress: Callable[[int, int], object] | None = None) -> int:
        """Apply the group's committed entries after :attr:`last_applied` (up to ``upto``, default the commit
        index), ``batch`` entries per transaction; returns :attr:`last_applied`. When the log no longer
        holds ``last_applied + 1`` (compacted behind a snapshot), the newest snapshot chain is restored
        first (:meth:`restore_snapshot`). ``progress(applied, target)`` is called after each batch."""
        batch = int_arg("batch", batch, 1, 1 << 20)
        g = self._host.kernel.group(self.group)
        hi = g.commit if upto is None else int_arg("upto", upto)
        if hi > g.commit:
            raise ValueError(f"group {self.group!r}: upto={hi} is beyond the commit index {g.commit}; only "
                             "committed entries may be applied")
        if self.last_applied + 1 < g.first_index and self.last_applied < hi:
            self.restore_snapshot()
            if self.last_applied + 1 < g.first_index:
                raise LogCompactedError(f"group {self.group!r}: the state is at {self.last_applied}, the log starts "
                                        f"at {g.first_index} and no snapshot covers the gap")
        buf: list[LogEntry] = []
        if self.last_applied >= hi:
            return self.last_applied
        for e in self._host.iter_replay(self.group, start=self.last_applied + 1, upto=hi, chunk=max(batch, 1024)):
            buf.append(e)
            if len(buf) >= batch:
                self.apply(buf)
                buf = []
                if progress is not None:
                    progress(self.last_applied, hi)
        if buf:
            self.apply(buf)
            if progress is not None:
                progress(self.last_applied, hi)
        return self.last_applied

    def apply_command(self, index: int, term: int, fn: Callable[[apsw.Connection], Any]) -> tuple[bool, Any]:
        """For frameworks that apply one command at a time (PySyncObj's ``@replicated``): run ``fn(conn)`` as
        entry ``index``/``term`` unless that entry is already applied. Returns ``(True, fn's result)``, or
        ``(False, None)`` when the entry was applied before (a replay after restart). Entries of the log
        between :attr:`last_applied` and ``index`` that are NOOP or CONFIG (which engines apply without
        calling the application, e.g. a new leader's no-op) are recorded as applied in the same transaction;
        a NORMAL one there raises :class:`LogGapError`. When the log holds ``index``, its term there must be
        ``term`` (:class:`LogConflictError`). Otherwise the same rules and errors as :meth:`apply`."""
        index = int_arg("index", index)
        term = int_arg("term", term)
        out: list[Any] = []
        with self._lock:
            lg = self._host.log(self.group)
            if self._applied[0] < index and lg.first_index <= index <= lg.last_index \
                    and (logged := lg.term(index)) != term:
                raise LogConflictError(f"group {self.group!r}: entry {index} has term {logged} in the log, not {term}")
            batch = self._gap_entries(index) + [LogEntry(index, term, b"")]

            def run(conn: apsw.Connection, e: LogEntry) -> None:
                if e.index == index:
                    out.append(fn(conn))

            self.apply(batch, run)
        return (True, out[0]) if out else (False, None)

    def _gap_entries(self, index: int) -> list[LogEntry]:
        """The log's entries between :attr:`last_applied` and ``index`` when all of them are NOOP or CONFIG
        entries (an engine applies those without calling the application: they are recorded as applied,
        with nothing to do); [] when there is no gap; :class:`LogGapError` when a NORMAL entry, or one the
        log no longer holds, lies in it."""
        lo = self._applied[0] + 1
        if index <= lo:
            return []
        lg = self._host.log(self.group)
        if lo < lg.first_index or index - 1 > lg.last_index:
            raise LogGapError(f"group {self.group!r}: entry {index} does not follow the last applied {lo - 1}, and "
                              f"the log does not hold the entries in between")
        gap: list[LogEntry] = lg.entries(lo, index)
        normal = [e.index for e in gap if e.kind is EntryKind.NORMAL]
        if normal:
            raise LogGapError(f"group {self.group!r}: entry {index} does not follow the last applied {lo - 1}: entry "
                              f"{normal[0]} in between is a NORMAL entry that was not applied")
        return gap

    # ------------------------------------------------------------------ reads
    @contextlib.contextmanager
    def read(self) -> Iterator[apsw.Connection]:
        """A read-only connection inside a read transaction for the block: every query sees the same state,
        the state after some whole applied batch (never half of one). Apply goes on meanwhile."""
        self._check_open()
        with self._readers_lock:
            conn = self._readers.pop() if self._readers else None
        if conn is None:
            conn = self._connect(self.path, readonly=True)
            conn.execute("PRAGMA query_only=1").fetchall()
            conn.authorizer = _reader_authorizer  # pooled: nothing a query does may outlive its block
        ok = False
        try:
            conn.execute("BEGIN")
            conn.execute("SELECT applied_index FROM raft_applied").fetchall()  # the snapshot starts here
            yield conn
            ok = True
        finally:
            if not conn.get_autocommit():
                conn.execute("ROLLBACK")
            with self._readers_lock:
                pooled = ok and not self._closed and len(self._readers) < 8
                if pooled:
                    self._readers.append(conn)
            if not pooled:
                conn.close()

    def query(self, sql: str, bindings: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read-only query (in its own read transaction)."""
        with self.read() as conn:
            return [tuple(r) for r in conn.execute(sql, bindings)]

    # ------------------------------------------------------------------ snapshots
    @staticmethod
    def _schema_version(conn: apsw.Connection) -> int:
        """SQLite's schema cookie: it changes with every DDL statement (a DROP and a CREATE of the same text
        too), which a changeset of rows does not carry."""
        return int(_one(conn, "PRAGMA schema_version"))

    @staticmethod
    def delta_unsafe(conn: apsw.Connection) -> str | None:
        """Why a changeset of the session extension could restore this schema differently from the live state
        (then every capture stores the state whole), or None. It depends on the schema alone. Each rule was
        found by a test whose restored state differed or could not be restored:

        * a rowid table whose PRIMARY KEY is not the rowid itself (anything but a column declared
          ``INTEGER PRIMARY KEY``; ``INTEGER PRIMARY KEY DESC`` is not an alias either): a changeset does not
          carry the hidden rowid, so a restored replica numbers its rows differently, and later entries that
          read ``rowid`` or scan in rowid order (a query without ORDER BY) give other results; such a key may
          also hold NULL, which the session ignores. Declare such tables ``WITHOUT ROWID`` to keep DELTAs;
        * a table without a PRIMARY KEY (the session ignores it; its rowid mode loses inserts);
        * a key that compares with a collation other than BINARY (a delete of 'a' and an insert of 'A'
          conflict);
        * AUTOINCREMENT (``sqlite_sequence`` has no primary key: its counters would not follow), and the
          ``sqlite_stat*`` tables of ANALYZE (no key either; ANALYZE is refused inside ``apply``);
        * a trigger, or a foreign key with an ON DELETE/UPDATE action: applying the changeset would run
          them a second time over rows the changeset already holds."""
        if _one(conn, "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger'"):
            return "a trigger"
        if _one(conn, "SELECT count(*) FROM sqlite_schema WHERE name = 'sqlite_sequence'"):
            return "AUTOINCREMENT"
        if _one(conn, "SELECT count(*) FROM sqlite_schema WHERE name LIKE 'sqlite_stat%'"):
            return "ANALYZE statistics"
        for t, wr in conn.execute("SELECT name, wr FROM pragma_table_list WHERE schema = 'main' AND type = 'table' "
                                  "AND name NOT LIKE 'sqlite_%'").fetchall():
            if not _one(conn, "SELECT count(*) FROM pragma_table_info(?) WHERE pk > 0", (t,)):
                return f"table {t!r} has no PRIMARY KEY"
            # only a true rowid alias has no index of origin 'pk'
            key_index = [r[0] for r in conn.execute("SELECT name FROM pragma_index_list(?) WHERE origin = 'pk'", (t,))]
            if not wr and key_index:
                return f"table {t!r} is a rowid table whose PRIMARY KEY is not the rowid (declare it WITHOUT ROWID)"
            if _one(conn, "SELECT count(*) FROM pragma_index_list(?) l, pragma_index_xinfo(l.name) x WHERE "
                          "l.origin = 'pk' AND x.key = 1 AND upper(x.coll) != 'BINARY'", (t,)):
                return f"table {t!r} has a PRIMARY KEY with a collation other than BINARY"
            if _one(conn, "SELECT count(*) FROM pragma_foreign_key_list(?) WHERE upper(on_delete) != 'NO ACTION' "
                          "OR upper(on_update) != 'NO ACTION'", (t,)):
                return f"table {t!r} has a foreign key with an ON DELETE/UPDATE action"
        return None

    def _delta_unsafe_cached(self) -> str | None:
        """:meth:`delta_unsafe` of the write connection, computed once per schema version. Under ``_lock``."""
        version = self._schema_version(self._conn)
        if self._unsafe_cache is None or self._unsafe_cache[0] != version:
            self._unsafe_cache = (version, self.delta_unsafe(self._conn))
        return self._unsafe_cache[1]

    def _restart_session(self) -> None:
        """Start recording changes from the current state (the base of the next DELTA), unless deltas are off
        or the schema is one a changeset cannot carry (:meth:`delta_unsafe`). Under ``_lock``."""
        if self._session is not None:
            self._session.close()
            self._session = None
        self._session_schema = None
        if not self.deltas or self._delta_unsafe_cached() is not None:
            return
        s = apsw.Session(self._conn, "main")
        s.attach()
        self._session = s
        self._session_schema = self._schema_version(self._conn)

    def snapshot(self, *, kind: Any = None) -> SnapshotMeta:
        """Take a durable snapshot of the state at :attr:`last_applied` through
        ``store.state_machine(group).capture`` (FULL or DELTA by the chain policy, or ``kind``); apply is
        blocked only while the state is pinned (a read transaction begins and the session's changeset is
        taken), not while the copy is written. Returns the snapshot's :class:`SnapshotMeta`."""
        sm = self._host.state_machine(self.group)
        # the manager's capture lock first: no other capture of the group can move the chain's head (the
        # parent of a DELTA) between the pin below and this capture
        with self._snap_lock, sm.snapshots.capture_lock:
            self._check_open()
            latest = sm.snapshots.latest()
            if latest is not None and latest.structures is None:
                # one owner per group's snapshots: a state snapshot on top of another writer's (e.g. the
                # PySyncObj journal's dumps) would make each unreadable to the other
                raise SnapshotError(f"group {self.group!r}: its snapshots are written by another user of the "
                                    f"group (snapshot {latest.id} holds no structure table, e.g. a PySyncObj "
                                    "dump); state snapshots need a group of their own snapshots")
            reader = self._connect(self.path, readonly=True)
            try:
                with self._lock:
                    if self._in_apply:  # this thread is inside apply: the batch is not committed
                        raise SnapshotError(f"group {self.group!r}: snapshot() cannot run from inside apply()")
                    epoch = self._epoch
                    reader.execute("BEGIN")
                    index, term = read_applied(reader, self.path)
                    if index == 0:
                        raise SnapshotError(f"group {self.group!r}: nothing is applied yet, no state to snapshot")
                    # the changeset is written only when the capture will be a DELTA (its size follows the
                    # changes since the last capture, and apply waits meanwhile)
                    want = SnapshotKind(kind) if kind is not None else None
                    delta: str | None = None
                    if want is SnapshotKind.DELTA or (want is None and sm.delta_parent(index) is not None):
                        delta = self._take_delta()
                    else:
                        self._restart_session()
                    self._pinned = (reader, index, term, delta, epoch)
                try:
                    meta: SnapshotMeta = sm.capture(index, term, kind=kind)
                finally:
                    self._pinned = None
                    if self._epoch != epoch:
                        # a restore replaced the state after the pin: the change tracking now starts from the
                        # restored state, not from this capture (the next capture is FULL)
                        sm.forget_tracking()
                    if delta is not None:
                        with contextlib.suppress(OSError):
                            os.unlink(delta)
                return meta
            finally:
                if not reader.get_autocommit():
                    reader.execute("ROLLBACK")
                reader.close()

    def _take_delta(self) -> str | None:
        """Under ``_lock``: the session's changeset since the last capture (a temporary file's path), and
        a new session from now; None when no DELTA is possible (deltas off, an unsafe schema, a schema change,
        a session in an error state)."""
        s, schema = self._session, self._session_schema
        path = None
        try:
            if s is not None and schema == self._schema_version(self._conn):
                fd, path = tempfile.mkstemp(prefix=STATE_TEMP_PREFIX + "delta-", dir=os.path.dirname(self.path))
                with os.fdopen(fd, "wb") as f:

                    def out(piece: memoryview) -> None:
                        f.write(piece)

                    s.changeset_stream(out)
        except apsw.Error as exc:
            # a session in an error state (e.g. an interrupt while it read a table's layout): no DELTA this
            # time; the capture stores the state whole and recording starts again below
            log.warning("%s: group %r: no changeset for this capture (%r); storing the state whole", self.path,
                        self.group, exc)
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            path = None
        finally:
            self._restart_session()
        return path

    def _snapshot_into(self, write: Callable[[bytes], object], index: int, term: int) -> None:
        pinned = self._pinned
        own = None
        if pinned is None or pinned[1:3] != (index, term):
            # a capture not started by snapshot(): pin here, and restart the change tracking at the same
            # point (a later DELTA on this FULL must hold the changes since this very state)
            own = self._connect(self.path, readonly=True)
            with self._lock:
                own.execute("BEGIN")
                got = read_applied(own, self.path)
                if got == (index, term):
                    self._restart_session()
            if got != (index, term):
                own.execute("ROLLBACK")
                own.close()
                raise SnapshotError(f"group {self.group!r}: the state is at {got[0]}/{got[1]}, not {index}/{term}: "
                                    "take state snapshots with store.state(group).snapshot()")
            src = own
        else:
            src = pinned[0]
        try:
            page_size = int(_one(src, "PRAGMA page_size"))
            write(_FULL_HEAD.pack(_FULL_MAGIC, page_size))

            class _Sink:
                def write(self, data: bytes) -> None:
                    write(data)

            try:
                stream_online_backup(src, os.path.basename(self.path), _Sink(), pages_per_step=None, progress=None,
                                     check_cancel=lambda: None)
            except apsw.Error as exc:
                raise SnapshotError(f"{self.path}: the online backup of the state failed: {exc}") from exc
        finally:
            if own is not None:
                if not own.get_autocommit():
                    own.execute("ROLLBACK")
                own.close()

    def _delta_into(self, write: Callable[[bytes], object], index: int, term: int) -> bool:
        pinned = self._pinned
        if pinned is None or pinned[1:3] != (index, term) or pinned[3] is None or pinned[4] != self._epoch:
            return False
        write(_DELTA_MAGIC)
        with open(pinned[3], "rb") as f:
            while piece := f.read(1 << 20):
                write(piece)
        return True

    def _restore_full(self, read: Callable[[int], bytes], length: int, index: int, term: int) -> None:
        head = read(_FULL_HEAD.size)
        magic, page_size = _FULL_HEAD.unpack(head) if len(head) == _FULL_HEAD.size else (b"", 0)
        body = length - _FULL_HEAD.size
        if magic != _FULL_MAGIC or page_size < 512 or page_size > 65536 or body < page_size or body % page_size:
            raise CorruptionError(f"group {self.group!r}: snapshot at {index}: not a state database copy")
        folder = os.path.dirname(self.path)
        fd, tmp = tempfile.mkstemp(prefix=STATE_TEMP_PREFIX + "restore-", suffix=".db", dir=folder)
        try:
            with os.fdopen(fd, "r+b") as f:
                f.seek(page_size)
                left = body - page_size
                while left > 0:
                    piece = read(min(left, 1 << 20))
                    f.write(piece)
                    left -= len(piece)
                first = read(page_size)
                f.seek(0)
                f.write(first)
            t = self._connect(tmp)
            try:
                if _one(t, "PRAGMA integrity_check") != "ok":
                    raise CorruptionError(f"group {self.group!r}: snapshot at {index}: the state copy fails "
                                          "integrity_check")
                self._check_identity(t, f"snapshot at {index}", exact_node=False)
                got = read_applied(t, f"snapshot at {index}")
                if got != (index, term):
                    raise CorruptionError(f"group {self.group!r}: snapshot at {index}/{term} holds the state at "
                                          f"{got[0]}/{got[1]}")
                # this node's identity, written in the copy before it replaces the state (one atomic step)
                t.execute("UPDATE raft_state_identity SET node_id=? WHERE id=1", (self._host.node_id,))
                with self._lock:
                    self._check_replace()
                    try:
                        with self._committing(), self._conn.backup("main", t, "main") as b:
                            b.step(-1)
                    except apsw.Error as exc:
                        raise SnapshotError(f"{self.path}: replacing the state failed: {exc}") from exc
                    finally:
                        self._epoch += 1
                        self._resync_applied()
                        self._restart_session()
            finally:
                t.close()
        finally:
            for p in (tmp, tmp + "-journal", tmp + "-wal", tmp + "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        log.info("%s: group %r state restored from a full snapshot at %d/%d", self.path, self.group, index, term)

    def _restore_delta(self, read: Callable[[int], bytes], length: int, index: int, term: int) -> None:
        if read(len(_DELTA_MAGIC)) != _DELTA_MAGIC:
            raise CorruptionError(f"group {self.group!r}: snapshot at {index}: not a state changeset")
        data = read(length - len(_DELTA_MAGIC))

        def conflict(reason: int, change: Any) -> int:
            raise CorruptionError(f"group {self.group!r}: the delta at {index} does not apply to this state "
                                  f"(conflict {reason} on table {change.name!r})")

        with self._lock:
            self._check_replace()
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                apsw.Changeset.apply(data, conn, conflict=conflict,
                                     flags=apsw.SQLITE_CHANGESETAPPLY_NOSAVEPOINT)
                got = read_applied(conn, self.path)
                if got != (index, term):
                    raise CorruptionError(f"group {self.group!r}: the delta at {index}/{term} leaves the state at "
                                          f"{got[0]}/{got[1]}")
                with self._committing():
                    conn.execute("COMMIT")
            except BaseException:
                if not conn.get_autocommit():
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._epoch += 1
                self._resync_applied()
                self._restart_session()

    def restore_snapshot(self, *, force: bool = False) -> SnapshotMeta | None:
        """Replace the state with the newest valid snapshot chain of the group (verified before anything is
        touched; see ``StateMachineSnapshotManager.restore``); returns its head, or None if there is none.
        Forward only unless ``force``: when the newest snapshot is not beyond :attr:`last_applied`, nothing is
        touched and None is returned. Each snapshot of the chain is applied in one transaction, so a chain
        that fails half-way (a DELTA that does not apply) leaves the state of an earlier snapshot of it,
        consistent with its applied position; the error propagates."""
        sm = self._host.state_machine(self.group)
        with self._snap_lock:
            latest = sm.snapshots.latest()
            if latest is None or (not force and latest.index <= self.last_applied):
                return None
            meta: SnapshotMeta | None = sm.restore()
            return meta

    def verify(self) -> None:
        """Check the state database: SQLite's ``integrity_check``, its identity and ``raft_applied`` rows, and
        that it does not hold entries the log lacks. Raises :class:`CorruptionError` (or
        :class:`RecoveryRefused`)."""
        with self.read() as conn:
            bad = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            if bad != ["ok"]:
                raise CorruptionError(f"{self.path}: integrity_check: {'; '.join(map(str, bad[:5]))}")
            self._check_identity(conn, self.path, exact_node=True)
            read_applied(conn, self.path)
        self._check_against_log()

    # ------------------------------------------------------------------ close
    def close(self) -> None:
        """Close the state database's connections (the store's close does it). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._session is not None:
                self._session.close()
                self._session = None
            with self._readers_lock:
                readers, self._readers = self._readers, []
            for c in readers:
                c.close()
            self._conn.close()

    def __repr__(self) -> str:
        return f"<SqlStateMachine {self.group!r} {self.path} applied={self._applied[0]}>"


class _StateStructure:
    """The state database as a streaming structure of ``store.state_machine(group)``."""

    def __init__(self, sm: SqlStateMachine) -> None:
        self._sm = sm

    def snapshot_into(self, write: Callable[[bytes], object], index: int, term: int) -> None:
        self._sm._snapshot_into(write, index, term)

    def delta_into(self, write: Callable[[bytes], object], index: int, term: int) -> bool:
        return self._sm._delta_into(write, index, term)

    # ``read`` is the registry's checked blob reader: it hands out at most ``length`` bytes, raises
    # CorruptionError on a short read and checks the blob's sha256 before its last byte
    def restore_from(self, read: Callable[[int], bytes], length: int, index: int, term: int) -> None:
        self._sm._restore_full(read, length, index, term)

    def apply_delta_from(self, read: Callable[[int], bytes], length: int, index: int, term: int) -> None:
        self._sm._restore_delta(read, length, index, term)


__all__ = ["RESERVED_TABLES", "STATE_DIR", "STATE_TEMP_PREFIX", "STRUCTURE_NAME", "ApplyError", "SqlStateMachine",
           "applied_crc", "read_applied", "read_identity", "state_file"]
