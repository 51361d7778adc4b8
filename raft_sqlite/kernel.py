"""The kernel: the one internal interface that the log, metadata, snapshots, the state machine, recovery,
backup, metrics and integrations use to reach a store's connections, group state and commit pipeline.

A :class:`~raft_sqlite.NodeStore` owns one :class:`Kernel` (``store.kernel``): the store opens, recovers
and closes it; everything else goes through the methods below. Each method states its contract, as
etcd's ``Storage`` interface does:

* :meth:`Kernel.run` — one write op through group commit. Durable (per the fsync mode) when it returns;
  refused with nothing written when it raises, except :class:`~raft_sqlite.StorageFault` (unknown
  outcome: the store is fail-stopped).
* :meth:`Kernel.read` — a function on a pooled read-only connection (a WAL reader: never blocks the
  writer, sees the last committed state).
* :meth:`Kernel.raw` — a function on the write connection, serialised with every write.
* :meth:`Kernel.capture` / :meth:`Kernel.submit_all` — record write calls as ops instead of running them,
  then submit many op lists from one thread as separate requests of the same group commit (the asyncio
  facade). Each request answered as :meth:`Kernel.run` would have.
* :meth:`Kernel.group` / :meth:`Kernel.pending_group` — the published (committed) state of a group, or
  the one this thread's open transaction has built. Published states are never mutated.
* :meth:`Kernel.fail` — fail-stop after a storage error outside a commit (a failed sync).

Observers (metrics) attach with :meth:`Kernel.add_listener`; nothing patches the kernel's methods.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import apsw

from . import fsio, layout
from .args import text_arg
from .checkpointer import CHECKPOINT_PAGES, Checkpointer
from .commit import (
    Capture,
    CommitListener,
    CommitPipeline,
    IntervalSyncer,
    R,
    Request,
    StoreStats,
    Tx,
    Write,
    translate,
)
from .entry import LogEntry
from .errors import CorruptionError, GroupNotFoundError, RaftSqliteError, StorageFault
from .fsync import FsyncMode, pragmas_for
from .governor import IoGovernor
from .groupstate import GroupState, GroupTable
from .lock import GcLock
from .pacedvfs import PacedVFS, paced_vfs, store_paced_vfs
from .sqlitewal import HighWaterMark
from .wal import SegmentPolicy, WalCompactor, WalReader, WalWriter

T = TypeVar("T")

#: While the log is busy (other requests committed since the previous segment's),
#: :meth:`Kernel.compact_segments` pauses this many times the previous segment's commit time before the next segment, so that its commits
#: (each holds every append queued behind it) take at most ~1/9 of the log's time and delay under 1% of a
#: busy log's appends. Measured (benchmarks/background.py, 32 segments of 4,096 entries next to single FULL
#: appends): a pause of 1x the commit gave an append p99 of 18.3x idle, 4x gave 2.8x, 8x gave 1.3x; the
#: compaction then took 2.0 s instead of 0.44 s. A quiet log gets no pause.
COMPACTION_PAUSE_FACTOR = 8.0
#: Longest pause of :meth:`Kernel.compact_segments` between two segments (seconds).
COMPACTION_PAUSE_MAX = 0.1


class RecordListener(Protocol):
    """Told what the commit in progress writes to the record stream (metrics). Called on the committing
    thread while the batch is being built: a batch may still be replayed or fail, so a listener counts
    only what :meth:`CommitListener.on_commit` later confirms (e.g. against the published group state)."""

    def on_append(self, group_id: int, entries: Sequence[LogEntry]) -> None: ...

    def on_seal(self, group_id: int, segment_id: int) -> None: ...


class Kernel:
    """Connections, group state and the commit pipeline of one open store (see the module docstring)."""

    def __init__(self, data_dir: str, *, node_id: str, fsync: FsyncMode, fsync_interval: float, vfs: str | None,
                 segment_policy: SegmentPolicy | None, slow_commit_warning: float) -> None:
        self.data_dir = data_dir
        self._path = os.path.join(data_dir, layout.MAIN_DB)  # (read per group at open, per op in messages)
        self._chunks_path = os.path.join(data_dir, layout.CHUNKS_DB)
        self.node_id = node_id
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.vfs = vfs
        #: the Raft record stream: writer (group commit's appends, truncations), reader, compactor
        self.writer = WalWriter(segment_policy, on_rotate=self._sealed)
        self.reader = WalReader()
        self.compactor = WalCompactor()
        self.groups = GroupTable()
        self.pipeline = CommitPipeline(data_dir, self.groups, self.writer, slow_commit_warning=slow_commit_warning)
        self._chunks_conn: apsw.Connection | None = None
        #: Held by a hot backup while it pins its read snapshots (also from another process: a flock);
        #: snapshot retention/orphan removal take it before deleting chunks, so a backup's chunks.db
        #: holds every chunk its raft.db manifests name.
        self.gc_lock = GcLock(os.path.join(data_dir, layout.GC_LOCK_FILE))
        #: Serialises use of ``chunks_conn``.
        self.chunks_lock = threading.RLock()
        self._readers: list[apsw.Connection] = []
        self._all_readers: list[apsw.Connection] = []
        self._record_listeners: list[RecordListener] = []
        #: raft.db's background checkpointer (None until :meth:`start_checkpointer`, and once closing)
        self.checkpointer: Checkpointer | None = None
        #: paces background I/O (snapshots, the checkpointer's bulk pass) by the log's commit latency when
        #: enabled (off by default: see raft_sqlite.governor for the measured trade-off)
        self.governor = IoGovernor(enabled=False)
        self.pipeline.add_listener(self.governor)
        #: the store's pinned descriptors (``PinnedFiles.fd``), set by the store before the checkpointer starts:
        #: with SQLite's default VFS, the paced connection then syncs through them without the GIL
        self.fd_of: Callable[[str], int] | None = None
        self._paced: PacedVFS | None = None

    # ------------------------------------------------------------------ paths and state
    @property
    def path(self) -> str:
        """Path of the main database file (``raft.db``)."""
        return self._path

    @property
    def chunks_path(self) -> str:
        """Path of the snapshot chunk database file (``chunks.db``)."""
        return self._chunks_path

    @property
    def conn(self) -> apsw.Connection:
        """The write connection (only the committer and open-time recovery use it)."""
        conn = self.pipeline.conn
        if conn is None:
            raise RaftSqliteError("the store is not open")
        return conn

    @conn.setter
    def conn(self, conn: apsw.Connection | None) -> None:
        self.pipeline.conn = conn

    @property
    def chunks_conn(self) -> apsw.Connection:
        """The snapshot chunk database's write connection (use under :attr:`chunks_lock`)."""
        conn = self._chunks_conn
        if conn is None:
            raise RaftSqliteError("the store is not open")
        return conn

    @chunks_conn.setter
    def chunks_conn(self, conn: apsw.Connection | None) -> None:
        self._chunks_conn = conn

    @property
    def stats(self) -> StoreStats:
        """Commit counters."""
        return self.pipeline.stats

    @property
    def closed(self) -> bool:
        """True before the store finished opening and after it was closed."""
        return self.pipeline.closed

    @property
    def fault(self) -> BaseException | None:
        """The storage error that made the store fail-stop, or None."""
        return self.pipeline.fault

    @property
    def hwm(self) -> HighWaterMark | None:
        """The WAL high-water mark noted after each synced commit (None in OFF mode)."""
        return self.pipeline.hwm

    @hwm.setter
    def hwm(self, mark: HighWaterMark | None) -> None:
        if mark is not None:
            mark.on_sync = self.pipeline.synced  # its syncs reach the listeners (metrics)
        self.pipeline.hwm = mark

    def mark_open(self) -> None:
        """The store is opening: reads and writes are allowed from now on."""
        self.pipeline.closed = False

    def mark_closed(self) -> None:
        """The store is closing: every later read and write is refused. Waits for the commit in
        progress, then stops the interval syncer (which syncs once more if needed, covering that commit).
        The syncer stays attached until then: a commit finishing meanwhile must not record its unsynced WAL
        as durable in the high-water mark (NORMAL: only the syncer's fdatasync makes it durable)."""
        self.pipeline.closed = True
        self.pipeline.drain()
        ckpt, self.checkpointer = self.checkpointer, None
        if ckpt is not None:
            self.pipeline.remove_listener(ckpt)
            ckpt.stop()
        syncer = self.pipeline.syncer
        if syncer is not None:
            syncer.stop()
            self.pipeline.syncer = None

    def start_checkpointer(self, pages: int = CHECKPOINT_PAGES) -> None:
        """Checkpoint raft.db's WAL on a background thread whenever ``pages`` frames wait to be copied
        (see :mod:`raft_sqlite.checkpointer`); stopped by :meth:`mark_closed`. It reads the WAL index
        through the high-water mark's mapping of -shm, so OFF mode (which keeps no mark) keeps SQLite's
        inline checkpoints only (opening -shm a second time is not an option: closing that descriptor
        would drop SQLite's own locks on the file, see ``sqlitewal.PinnedFiles``)."""
        if self.hwm is None:
            return
        # From now on raft.db may be written after the mark by partial checkpoints: its mtime must not be
        # read as another connection's complete checkpoint (sqlitewal.BACKGROUND), durably before any such
        # write. A failure here fails the open (OSError: the caller fail-stops and translates).
        self.hwm.background = True
        self.hwm.note(sync=True)
        # only the checkpointer checkpoints from now on (and the write connection's close, as before)
        self.conn.execute("PRAGMA wal_autocheckpoint=0").fetchall()
        ckpt = Checkpointer(self, pages=pages, name=f"raft_sqlite-checkpoint-{self.node_id}")
        ckpt.start()
        self.checkpointer = ckpt
        self.pipeline.add_listener(ckpt)

    def start_interval_sync(self) -> None:
        """NORMAL mode: fdatasync the WAL every ``fsync_interval`` seconds when there were commits."""
        syncer = IntervalSyncer(self.pipeline, self.path + "-wal", self.fsync_interval,
                                f"raft_sqlite-sync-{self.node_id}")
        self.pipeline.syncer = syncer
        syncer.start()

    def fail(self, exc: BaseException) -> None:
        """Fail-stop after ``exc`` (a failed sync outside a commit): every later write is refused."""
        self.pipeline.fail(exc)

    def check_open(self) -> None:
        """Raise :class:`RaftSqliteError` if closed, :class:`StorageFault` if fail-stopped."""
        self.pipeline.check_open()

    def translate(self, exc: apsw.Error, what: str) -> RaftSqliteError:
        """The typed error for an apsw error raised during ``what``."""
        return translate(exc, what, self.data_dir)

    # ------------------------------------------------------------------ groups
    def group(self, name: str) -> GroupState:
        """The published (committed) state of group ``name``. Raises when the store is closed."""
        if self.pipeline.closed:
            raise RaftSqliteError("the store is closed")
        try:
            return self.groups[name]
        except KeyError:
            raise GroupNotFoundError(f"{self.data_dir}: group {name!r} does not exist (it was removed)") from None

    def pending_group(self, name: str) -> GroupState:
        """The state of ``name`` as this thread's open transaction leaves it (else the published one)."""
        return self.pipeline.pending_group(name)

    def ensure_group(self, group: str | int) -> str:
        """The name of group ``group`` (an int is its decimal name), created (a commit of its own) unless
        it exists. TypeError/ValueError for a name that is not a non-empty, well-formed str."""
        name = group if isinstance(group, str) else None
        if name is not None and name in self.groups:
            return name
        name = self.name_of(group)
        self.pipeline.ensure(name)
        return name

    @staticmethod
    def name_of(group: str | int) -> str:
        """The name of group ``group`` (an int is its decimal name), checked, whether or not it exists.
        TypeError/ValueError for a name that is not a non-empty, well-formed str."""
        if isinstance(group, str):
            name = group
        elif isinstance(group, int) and not isinstance(group, bool):
            name = str(int(group))
        else:
            raise TypeError(f"group must be a str (or int), not {type(group).__name__}")
        if not name:
            raise ValueError("a group name must not be empty")
        text_arg("group name", name)
        return name

    # ------------------------------------------------------------------ writes
    def run(self, name: str, check: Callable[[GroupState], R], write: Write) -> R:
        """One write op on group ``name`` through group commit: ``check(g)`` validates it against a
        private copy of the group state (raising refuses it, nothing written) and may change the copy;
        ``write(conn, g, check_result)`` runs its SQL in the batch's transaction. Returns ``check``'s
        result once durable. Inside ``store.transaction()`` the op is validated now and committed with
        the block."""
        return self.pipeline.run(name, check, write)

    def raw(self, fn: Callable[[apsw.Connection], T]) -> T:
        """Run ``fn(conn)`` on the write connection, serialised with every write; returns its result."""
        result: T = self.pipeline.raw(fn)
        return result

    def transaction(self) -> contextlib.AbstractContextManager[Tx]:
        """A block whose writes commit together (``store.transaction()``)."""
        return self.pipeline.transaction()

    def in_transaction(self) -> bool:
        """True inside a ``store.transaction()`` block on this thread."""
        return self.pipeline.in_transaction()

    def new_transaction(self) -> Tx:
        """A transaction bound to no thread (the asyncio facade's ``async with store.transaction()``): bind it
        with :meth:`capture` around each write call, then submit its ``ops`` as one request."""
        self.check_open()
        return Tx(self.groups)

    def capture(self, tx: Tx | None = None) -> Capture:
        """Bind ``tx`` to this thread for the block: write calls add their ops to it instead of committing
        (validated at once if ``tx.validate``; the default, a new ``Tx(validate=False)``, only records them,
        to be validated in queue order when applied). Nothing is submitted on exit. No await (or other
        coroutine's code) may run inside the block."""
        return self.pipeline.capture(tx)

    def submit_all(self, reqs: list[Request]) -> None:
        """Submit ``reqs`` (each ``Request(ops)``, ops recorded by :meth:`capture`) all from this thread, in this
        order, through group commit: they share commits with each other and with every other writer, and each
        is answered (``result``: one value per op, or ``error``) exactly as :meth:`run` would have returned
        or raised for it. Returns once every one is answered."""
        self.pipeline.submit_all(reqs)

    def append_records(self, conn: apsw.Connection, g: GroupState, entries: Sequence[LogEntry]) -> None:
        """Queue ``entries`` as records of group ``g`` (a deferred write op: inserted at commit) and tell
        the record listeners."""
        g.seg = self.writer.append(conn, g.gid, g.seg, entries, defer=True)
        for listener in self._record_listeners:
            listener.on_append(g.gid, entries)

    def _sealed(self, group_id: int, segment_id: int) -> None:
        for listener in self._record_listeners:
            listener.on_seal(group_id, segment_id)

    def compact_segments(self, name: str) -> int:
        """Physically delete the sealed segments of ``name`` that lie below ``first_index``, one segment
        per commit. A commit that deletes a segment holds every append queued behind it (measured: ~7 ms
        for 4,096 records), so while the log is busy (other requests committed since the previous
        segment's, or in the same commit) each segment waits :data:`COMPACTION_PAUSE_FACTOR` times the
        previous one's commit time (at most :data:`COMPACTION_PAUSE_MAX` seconds): the log's own commits
        go through in between. It runs on the
        caller's thread, which a busy store therefore holds up to ~9x as long as the deletes take (32
        segments of 4,096 records: ~2 s instead of ~0.3 s): call it off a latency-critical thread. Returns
        records removed."""
        removed = 0
        pause = 0.0
        requests = self.stats.requests
        while True:
            g = self.group(name)  # GroupNotFoundError once removed
            gid = g.gid
            segs = self.read(lambda c: self.compactor.removable(c, gid, g.first_index - 1))
            if not segs:
                return removed
            if pause:
                time.sleep(pause)
            box: list[int] = []

            def write(conn: apsw.Connection, g: GroupState, _: object, seg: tuple[int, int, int] = segs[0]) -> None:
                if g.gid == gid:  # (a group removed and created again under the same name since: not ours)
                    box.append(self.compactor.remove(conn, g.gid, seg))

            t = time.perf_counter()
            self.run(name, lambda g: None, write)
            dt = time.perf_counter() - t
            # busy: other requests committed since the previous segment, before ours or in our own batch
            # (those waited for this segment's commit); the next segment then waits, a quiet log's does not
            now = self.stats.requests
            busy = now - requests > 1
            requests = now
            pause = min(COMPACTION_PAUSE_FACTOR * dt, COMPACTION_PAUSE_MAX) if busy else 0.0
            removed += box[0] if box else 0

    # ------------------------------------------------------------------ listeners
    def add_listener(self, listener: CommitListener | RecordListener) -> None:
        """Attach an observer: one with ``on_commit`` is told of every commit (and, if it also has
        ``on_sync``, of the store's own syncs: ``commit.SyncListener``), one with ``on_append`` /
        ``on_seal`` of what each commit writes to the record stream (it may have both)."""
        if hasattr(listener, "on_commit"):
            self.pipeline.add_listener(listener)  # type: ignore[arg-type]  # checked by hasattr just above
        if hasattr(listener, "on_append"):
            self._record_listeners = [*self._record_listeners, listener]  # type: ignore[list-item]  # idem

    def remove_listener(self, listener: object) -> None:
        """Detach ``listener`` (a no-op if it is not attached)."""
        self.pipeline.remove_listener(listener)  # type: ignore[arg-type]  # identity comparison only
        self._record_listeners = [x for x in self._record_listeners if x is not listener]

    # ------------------------------------------------------------------ connections and reads
    def connect(self, path: str, *, query_only: bool = False, paced: bool = False) -> apsw.Connection:
        """A new apsw connection on ``path`` with the store's pragmas (and VFS). A ``query_only``
        connection never checkpoints on close; the write connection keeps its WAL file across opens.
        ``paced``: for a background writer, its files sync every ``pacedvfs.SYNC_BYTES`` written (see
        :mod:`raft_sqlite.pacedvfs`)."""
        flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOMUTEX
        vfs = self.vfs
        if paced and self.fsync is not FsyncMode.OFF:
            if self.fd_of is not None and not self.vfs:
                if self._paced is None:
                    self._paced = store_paced_vfs(self.fd_of, on_sync=self.pipeline.synced)
                vfs = self._paced.registered_name
            else:
                vfs = paced_vfs(self.vfs)
        conn = apsw.Connection(path, flags=flags, vfs=vfs, statementcachesize=64)
        try:
            conn.setbusytimeout(10_000)
            for k, v in pragmas_for(self.fsync).items():
                conn.execute(f"PRAGMA {k}={v}").fetchall()
            if query_only:
                conn.execute("PRAGMA query_only=1")
                # Only the write connection checkpoints on close: a reader that outlives the store (a
                # backup's source) must not checkpoint and delete the WAL after the store recorded its
                # final high-water mark (see sqlitewal.lost_commits).
                conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
            else:
                one = ctypes.c_int(1)  # keep the WAL file across opens: it is reused, never re-created
                conn.file_control("main", apsw.SQLITE_FCNTL_PERSIST_WAL, ctypes.addressof(one))
        except BaseException:
            conn.close()
            raise
        return conn

    def read(self, fn: Callable[[apsw.Connection], T]) -> T:
        """Run ``fn(conn)`` on a pooled read connection of raft.db (WAL readers never block the writer).
        apsw errors come out typed; text that is not UTF-8 is :class:`CorruptionError`."""
        if self.pipeline.closed:
            raise RaftSqliteError("the store is closed")
        try:
            conn = self._readers.pop()
        except IndexError:
            try:
                conn = self.connect(self.path, query_only=True)
            except apsw.Error as exc:  # e.g. the disk failed: a typed error, like every other read
                raise self.translate(exc, "read") from exc
            self._all_readers.append(conn)
        try:
            return fn(conn)
        except apsw.Error as exc:
            raise self.translate(exc, "read") from exc
        except UnicodeDecodeError as exc:
            raise CorruptionError(f"{self.path}: a text column holds bytes that are not UTF-8 ({exc})") from exc
        finally:
            self._readers.append(conn)

    def track(self, conn: apsw.Connection) -> None:
        """Close ``conn`` (a read connection another module opened with :meth:`connect`, e.g. on chunks.db)
        with the store's connections: never before SQLite's files may be closed (see NodeStore.close)."""
        self._all_readers.append(conn)

    def sync_dir(self) -> None:
        """fsync ``data_dir``, so that names created, renamed or removed in it survive a power cut. Raises
        :class:`StorageFault` (and the store fail-stops) if the sync fails."""
        try:
            fsio.sync_dir(self.data_dir)
        except OSError as exc:
            self.fail(exc)
            raise StorageFault(f"{self.data_dir}: directory sync failed ({exc})") from exc

    def close_connections(self, *, no_checkpoint: bool) -> None:
        """Close every connection (readers, write, chunks). ``no_checkpoint``: forbid SQLite's checkpoint
        on close (after a fault, or a refused open: see NodeStore.close)."""
        def close(c: apsw.Connection | None) -> None:
            if c is not None:
                if no_checkpoint:
                    with contextlib.suppress(apsw.Error):
                        c.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
                with contextlib.suppress(apsw.Error):
                    c.close()
        for c in [*self._all_readers, self.pipeline.conn]:
            close(c)
        with self.chunks_lock:  # a snapshot batch being committed on another thread finishes first (closing a
            close(self._chunks_conn)  # busy connection fails; it would then outlive the pins and their locks)
        self._all_readers.clear()
        self._readers.clear()
        self.gc_lock.close()
        paced, self._paced = self._paced, None
        if paced is not None:  # (the checkpointer's connection was closed when it stopped)
            with contextlib.suppress(apsw.Error):
                paced.unregister()
