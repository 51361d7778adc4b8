"""NodeStore: one node's data_dir, its connections, group commit and recovery on open."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import os
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import apsw

from . import fsio, layout, migrate, reserve, sqlitewal
from .args import float_arg, int_arg, text_arg
from .commit import StoreStats, Tx
from .entry import KINDS, LogEntry
from .errors import (
    CorruptionError,
    DataDirError,
    LogCompactedError,
    NodeIdentityMismatch,
    RaftSqliteError,
    SnapshotError,
    StorageFault,
)
from .fsync import FSYNC_MODES, FsyncMode, pragmas_for
from .governor import IoGovernor
from .groupstate import GroupState, delete_group_rows
from .kernel import Kernel
from .lock import DataDirLock, GcLock, check_data_dir
from .log import PersistentRaftLog
from .metadata import RaftMetadataStore
from .recovery import RecoveryPolicy, RecoveryReport, read_restore_event, recover_groups, recover_sql_objects
from .restorestate import read_restore_state
from .snapshot import SnapshotManager, SnapshotStore
from .sqlstate import STATE_DIR, STATE_TEMP_PREFIX, ApplyFn, Schema, SqlStateMachine, state_file
from .statemachine import StateMachineSnapshotManager
from .wal import BLOB_PAYLOAD, SegmentPolicy, write_close_digests

log = logging.getLogger("raft_sqlite.store")

V = TypeVar("V")

_PAYLOAD = operator.itemgetter(2)



def node_crc(node_id: str, cluster_id: str, fmt: int, created_at: float) -> int:
    """CRC32 stored with the node record."""
    return zlib.crc32(f"{node_id}|{cluster_id}|{fmt}|{created_at!r}".encode())


class NodeStore:
    """One Raft node's durable storage in ``data_dir`` (see :meth:`open`)."""

    # set by :meth:`open`
    kernel: Kernel  #: the store's kernel: connections, group state, commit pipeline (raft_sqlite.kernel)
    data_dir: str
    node_id: str
    cluster_id: str
    fsync: FsyncMode
    fsync_interval: float
    recovery_policy: RecoveryPolicy
    vfs: str | None
    slow_commit_warning: float
    recovery_report: RecoveryReport  #: what the recovery at open found and did
    _wal_problems: list[str]
    _pins: sqlitewal.PinnedFiles
    _lock: DataDirLock | None
    _owns_lock: bool
    _on_commit: _CallbackListener | None

    def __init__(self) -> None:  # use NodeStore.open()
        self._views: dict[tuple[str, str], Any] = {}
        self._state_lock = threading.Lock()

    # ------------------------------------------------------------------ open / close
    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], node_id: str, *, cluster_id: str, fsync: FsyncMode = FsyncMode.FULL,
             fsync_interval: float = 0.05, recovery: RecoveryPolicy = RecoveryPolicy.STRICT,
             vfs: str | None = None, segment_policy: SegmentPolicy | None = None,
             slow_commit_warning: float = 1.0, lock: DataDirLock | None = None) -> NodeStore:
        """Open (creating if needed) the store of node ``node_id`` in ``data_dir``.

        First takes the exclusive lock of ``data_dir`` (:class:`~raft_sqlite.lock.DataDirLock`), held
        until :meth:`close` and dropped by the OS if the process dies: a second open of the same
        data_dir, from any process or this one, raises :class:`~raft_sqlite.DataDirLocked` naming the
        holder, before any file is touched. ``lock`` passes a lock the caller already holds on
        ``data_dir`` (:func:`raft_sqlite.restore` does); the store then uses it and leaves it held on
        close. A ``data_dir`` that exists and is not a directory raises
        :class:`~raft_sqlite.DataDirError` (nothing is created).

        Creates ``data_dir`` with mode 0700 and its database files with mode 0600 (an existing data_dir
        or file with looser permissions is tightened to these, with a warning naming the old mode),
        brings the schema to the current version (alembic runs only when needed), writes the node
        record on creation and refuses (:class:`NodeIdentityMismatch`) a data_dir of another node or
        cluster or of a newer format. Then validates the local data under ``recovery`` (see :class:`RecoveryPolicy`) and
        records a recovery event. ``fsync`` picks the durability of every write
        (:data:`raft_sqlite.fsync.FSYNC_MODES`); with ``NORMAL`` the WAL is synced every
        ``fsync_interval`` seconds by a background thread. ``vfs`` names a registered apsw VFS (the
        seam for fault-injection tests). Use as a context manager, or call :meth:`close`.
        """
        # every parameter is checked before anything touches the disk (not even data_dir is created)
        if not isinstance(node_id, str) or not node_id:
            raise TypeError("node_id must be a non-empty str")
        if not isinstance(cluster_id, str) or not cluster_id:
            raise TypeError("cluster_id must be a non-empty str")
        for what, text in (("node_id", node_id), ("cluster_id", cluster_id)):
            text_arg(what, text)
        data_dir = check_data_dir(data_dir)
        if not data_dir:
            raise TypeError(f"data_dir must be a non-empty str or os.PathLike of str, not {data_dir!r}")
        if "\0" in data_dir:
            raise ValueError(f"data_dir contains a NUL character: {data_dir!r}")
        fsync = FsyncMode(fsync)
        fsync_interval = float_arg("fsync_interval", fsync_interval, layout.MIN_FSYNC_INTERVAL,
                                   layout.MAX_FSYNC_INTERVAL)
        recovery = RecoveryPolicy(recovery)
        if vfs is not None and not isinstance(vfs, str):
            raise TypeError(f"vfs must be a str (a registered apsw VFS name) or None, not {type(vfs).__name__}")
        if segment_policy is not None:
            if not isinstance(segment_policy, SegmentPolicy):
                raise TypeError(f"segment_policy must be a SegmentPolicy or None, not {type(segment_policy).__name__}")
            # a private copy, checked: the caller may change (or break) its object later
            segment_policy = dataclasses.replace(segment_policy)
        slow_commit_warning = float_arg("slow_commit_warning", slow_commit_warning, 0.0, 1e9)
        if lock is not None and not isinstance(lock, DataDirLock):
            raise TypeError(f"lock must be a DataDirLock or None, not {type(lock).__name__}")
        self = cls()
        self.data_dir = data_dir
        self.node_id, self.cluster_id = node_id, cluster_id
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.recovery_policy = recovery
        self.vfs = vfs
        self.slow_commit_warning = slow_commit_warning
        self.kernel = k = Kernel(data_dir, node_id=node_id, fsync=fsync, fsync_interval=fsync_interval, vfs=vfs,
                                 segment_policy=segment_policy, slow_commit_warning=slow_commit_warning)
        k.mark_open()
        self._on_commit = None
        self._wal_problems = []
        #: Python-level reads of the live database files go through descriptors closed only after SQLite
        #: closed the files (closing one would drop SQLite's POSIX locks: see sqlitewal.PinnedFiles)
        self._pins = sqlitewal.PinnedFiles()
        self._lock = None
        self._owns_lock = lock is None
        try:
            try:
                created = self._take_dir(lock)
                self._open_files(created)
                try:
                    self._recover()
                except StorageFault as exc:
                    # A full disk (typically a snapshot that filled it) must not make every reopen fail:
                    # give back the reserve so the recovery can commit and drop the partial snapshot.
                    # Not after a failed sync (self._fault set): retrying would sync again, and a retried
                    # fsync can report success for data the kernel dropped (fail-stop).
                    freed = reserve.release(self.data_dir) \
                        if self.kernel.fault is None and reserve.is_disk_full(exc) else 0
                    if not freed:
                        raise
                    log.warning("%s: disk full while opening (%s): released the %d-byte disk reserve and "
                                "retrying", self.data_dir, exc.__cause__ or exc, freed)
                    self._recover()
                self._reclaim_orphan_space()
                self._sweep_orphan_states()
                reserve.ensure(self.data_dir)
            except UnicodeDecodeError as exc:  # a TEXT column (name, vote, manifest) holds bytes that are not UTF-8
                raise CorruptionError(f"{self.data_dir}: a text column holds bytes that are not UTF-8 ({exc}); "
                                      "the database is damaged") from exc
            self._start_hwm()  # only once the store is known good
            try:
                k.fd_of = self._pins.fd  # the checkpointer's paced syncs go through pinned descriptors
                k.start_checkpointer()
            except apsw.Error as exc:
                raise k.translate(exc, "open") from exc
            except OSError as exc:
                k.fail(exc)
                raise StorageFault(f"{self.path}-hwm: cannot record the WAL high-water mark ({exc})") from exc
        except BaseException as exc:
            if isinstance(exc, StorageFault):
                self.kernel.fail(exc)  # close without SQLite's checkpoint-on-close (see _close_connections)
            self._close_connections(failed_open=True)
            self._release_lock()
            raise
        if FSYNC_MODES[self.fsync]["interval_sync"]:
            k.start_interval_sync()
        return self

    @property
    def path(self) -> str:
        """Path of the main database file (``raft.db``)."""
        return self.kernel.path

    @property
    def chunks_path(self) -> str:
        """Path of the snapshot chunk database file (``chunks.db``)."""
        return self.kernel.chunks_path

    @property
    def governor(self) -> IoGovernor:
        """The store's :class:`~raft_sqlite.governor.IoGovernor`: it paces snapshot writes and background
        checkpoints by the log's own commit latency once ``store.governor.enabled = True`` (off by default:
        a low append p99 under a saturated log costs most of the snapshot's speed, see the module doc);
        ``pauses`` and ``paused_seconds`` count what it did."""
        return self.kernel.governor

    @property
    def stats(self) -> StoreStats:
        """Commit counters (read by metrics and benchmarks)."""
        return self.kernel.stats

    @property
    def gc_lock(self) -> GcLock:
        """Held by a hot backup while it pins its read snapshots (a backup in another process takes its
        flock); snapshot retention and orphan removal take it before deleting chunks, so a backup's
        chunks.db holds every chunk its raft.db manifests name (see :class:`~raft_sqlite.lock.GcLock`)."""
        return self.kernel.gc_lock

    @property
    def chunks_lock(self) -> threading.RLock:
        """Serialises use of :attr:`chunks_conn`."""
        return self.kernel.chunks_lock

    @property
    def chunks_conn(self) -> apsw.Connection:
        """The snapshot chunk database's write connection (use under :attr:`chunks_lock`)."""
        return self.kernel.chunks_conn

    @property
    def on_commit(self) -> Callable[[float, int], None] | None:
        """An optional ``callback(seconds, requests)`` called after each commit (kept for callers of the
        first releases; observers should use ``store.kernel.add_listener``). Its errors are logged, never
        raised to the writer."""
        return None if self._on_commit is None else self._on_commit.fn

    @on_commit.setter
    def on_commit(self, fn: Callable[[float, int], None] | None) -> None:
        if self._on_commit is not None:
            self.kernel.remove_listener(self._on_commit)
        self._on_commit = None if fn is None else _CallbackListener(fn)
        if self._on_commit is not None:
            self.kernel.add_listener(self._on_commit)

    def _take_dir(self, lock: DataDirLock | None) -> bool:
        """Create ``data_dir`` if needed, lock it (or adopt the caller's ``lock``), then tighten the
        modes of data_dir (0700) and of its files (0600). Returns True if a file or the directory was
        created (data_dir is then fsynced once its files exist, in every mode but OFF)."""
        created = not os.path.isdir(self.data_dir)
        if created:
            # the new directories' entries are made durable by _sync_new_store_dirs, before the node record
            try:
                fsio.makedirs(self.data_dir, mode=0o700, exist_ok=True)
                os.chmod(self.data_dir, 0o700)
            except OSError as exc:
                check_data_dir(self.data_dir)  # a file appeared there meanwhile: say so
                raise DataDirError(f"cannot create data_dir {self.data_dir}: {exc.strerror or exc}") from exc
        if lock is None:
            self._lock = DataDirLock.acquire(self.data_dir, node_id=self.node_id)
            created = created or self._lock.created
        else:
            if not lock.held or not os.path.samefile(lock.data_dir, self.data_dir):
                raise ValueError(f"lock {lock!r} is not a held lock of {self.data_dir}")
            self._lock = lock
        self._tighten_modes()
        return created

    def _tighten_modes(self) -> None:
        """data_dir 0700 and every regular file in it 0600 (only group/other bits are removed)."""
        try:
            mode = os.stat(self.data_dir).st_mode
            if mode & 0o077:
                log.warning("%s: data_dir mode was %04o; tightened to 0700", self.data_dir, mode & 0o7777)
                os.chmod(self.data_dir, (mode & 0o7700) | 0o700)
            for entry in os.scandir(self.data_dir):
                if entry.is_file(follow_symlinks=False):
                    fmode = entry.stat(follow_symlinks=False).st_mode
                    if fmode & 0o077:
                        log.warning("%s: file mode was %04o; tightened to 0600", entry.path, fmode & 0o7777)
                        os.chmod(entry.path, fmode & 0o7700)
        except OSError as exc:
            raise DataDirError(f"cannot tighten the permissions in {self.data_dir}: {exc}") from exc

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None and self._owns_lock:
            lock.release()

    def _open_files(self, created: bool) -> None:
        self._refuse_interrupted_restore()
        self._refuse_lost_main_db()
        pre_shm = sqlitewal.read_shm(self.path)  # before SQLite rebuilds it (evidence of a recent checkpoint)
        wal_existed = os.path.exists(self.path + "-wal")
        for name in (layout.MAIN_DB, layout.CHUNKS_DB):
            p = os.path.join(self.data_dir, name)
            if not os.path.exists(p):
                fsio.close(fsio.open(p, os.O_CREAT | os.O_WRONLY, 0o600))
                created = True
        if created and self.fsync is not FsyncMode.OFF:
            # The entries of raft.db and chunks.db: SQLite syncs the directory when it creates a WAL or a
            # journal, never for a database file that already exists (created here). Without this sync a
            # power cut after creation can lose raft.db while its WAL survives (every mode but OFF, whose
            # promise does not cover power loss; found by the creation power-loss campaign).
            self.sync_dir()
        try:
            lost: list[str | None] = [None]

            def check_wal() -> None:  # SQLite has opened the WAL, nothing is written yet (not even a migration)
                lost[0] = sqlitewal.lost_commits(self.path, pre_shm, wal_existed, self._pins.open)

            self.kernel.conn = self._open_current(self.path, layout.MAIN_DB, check_wal)
            self.kernel.chunks_conn = self._open_current(self.chunks_path, layout.CHUNKS_DB)
            # Before anything is written (a write would overwrite the evidence): committed WAL frames
            # that SQLite would silently ignore after a damaged frame are corruption.
            # The scan is skipped only for a store known to write unsynced commits (NORMAL/OFF: several
            # torn transactions are then legitimate). No settings row: the first open's commit (which
            # writes it, and is synced in every mode) is itself in the WAL, maybe damaged: scan.
            row = self.kernel.conn.execute("SELECT value FROM settings WHERE key='fsync_mode'").fetchone()
            if row is None or row[0] in (FsyncMode.FULL.value, FsyncMode.EXTRA.value):
                self._wal_problems = [m for m in (sqlitewal.wal_lost_commits(self.path, self._pins.open),
                                                  sqlitewal.wal_lost_commits(self.chunks_path, self._pins.open)) if m]
            if lost[0] and not self._wal_problems:
                self._wal_problems.append(lost[0])
        except apsw.Error as exc:
            raise self.kernel.translate(exc, "open") from exc

    def _refuse_interrupted_restore(self) -> None:
        """A data_dir holding what an interrupted ``restore()`` left (its placeholder ``raft.db``, or only its
        temporary names) is refused under every policy with a message that says what to do: opening it
        would create a brand-new node with this node's identity, one that forgot the terms and votes the
        operator meant to restore (a double vote waiting to happen). The data_dir lock is held here, so no
        restore is running."""
        try:
            state = read_restore_state(self.data_dir)
        except OSError as exc:
            raise StorageFault(f"{self.path}: cannot read ({exc.strerror or exc})") from exc
        if state.temporaries and state.main_is_database:
            # raft.db is a real database: a restore's last step (raft.db replacing its placeholder) was done,
            # so these are stale temporaries, not an interrupted restore; never refuse a healthy store for them
            log.warning("%s: ignoring leftovers of a restore that completed: %s", self.data_dir,
                        ", ".join(state.temporaries))
        if state.interrupted:
            what = "its placeholder raft.db" if state.placeholder else ", ".join(state.temporaries)
            raise CorruptionError(
                f"{self.data_dir} holds an interrupted restore ({what}): run the restore again into the same "
                "data_dir (it removes these leftovers and completes), or move the data_dir away to start afresh")

    def _refuse_lost_main_db(self) -> None:
        """A missing or empty ``raft.db`` beside evidence that this data_dir held a store (a WAL high-water
        mark, or a ``chunks.db`` the migrations have run on: they run on raft.db first) is refused under
        every recovery policy: opening it would create a brand-new node that forgot its terms, votes and
        log. Restore from a backup, or move the data_dir away to start afresh."""
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            size = None
        if size:
            return
        evidence = []
        if sqlitewal.read_mark(self.path) is not None:
            evidence.append(f"{self.path}-hwm (its WAL high-water mark)")
        if os.path.exists(self.chunks_path):
            with contextlib.suppress(apsw.Error):
                c = apsw.Connection(self.chunks_path, flags=apsw.SQLITE_OPEN_READONLY, vfs=self.vfs)
                try:
                    if c.execute("SELECT 1 FROM sqlite_master WHERE name='alembic_version'").fetchone():
                        evidence.append(f"{self.chunks_path} (its migrated snapshot chunk database)")
                finally:
                    c.close()
        if evidence:
            raise CorruptionError(
                f"{self.path} is {'missing' if size is None else 'empty (0 bytes)'}, but "
                f"{' and '.join(evidence)} show(s) that {self.data_dir} held a store: refusing to create a new "
                "one in its place under any recovery policy (restore from a backup, or move the data_dir away)")

    def _start_hwm(self) -> None:
        """After a successful open: re-anchor the WAL high-water mark (FULL/EXTRA/NORMAL) to the state just
        validated, or remove it (OFF keeps none: its commits are never synced, so a mark would be stale)."""
        try:
            if self.fsync is FsyncMode.OFF:
                with contextlib.suppress(FileNotFoundError):
                    fsio.unlink(self.path + "-hwm")
                return
            mark = self.kernel.hwm = sqlitewal.HighWaterMark(self.path)
            mark.anchor()
        except OSError as exc:
            self.kernel.fail(exc)
            raise StorageFault(f"{self.path}-hwm: cannot record the WAL high-water mark ({exc})") from exc

    def _open_current(self, path: str, db_name: str, check: Callable[[], None] | None = None) -> apsw.Connection:
        """An apsw connection on ``path`` with the schema at head (alembic runs only if it is not).
        ``check()`` runs once SQLite has opened the file, before a migration could write to it."""
        conn = self.kernel.connect(path)
        try:
            if check is not None:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchall()  # SQLite reads the WAL index
                check()
            current = not migrate.needs_upgrade(conn, db_name)
            fresh = not current and migrate.current_revision(conn) is None
        except BaseException as exc:
            conn.close()
            if isinstance(exc, apsw.Error):
                raise self.kernel.translate(exc, f"open of {db_name}") from exc
            raise
        if current:
            return conn
        conn.close()  # never let pysqlite (alembic) and apsw hold the same file open at once
        if fresh:  # creation: through apsw and self.vfs only, so that it is inside the fault models
            try:
                # chunks.db: big pages for big blobs (16x fewer WAL frames, page headers and checksums per MiB)
                migrate.create(path, db_name, self.vfs,
                               layout.CHUNKS_PAGE_SIZE if db_name == layout.CHUNKS_DB else None)
            except apsw.Error as exc:
                raise self.kernel.translate(exc, f"creation of {db_name}") from exc
            return self.kernel.connect(path)
        migrate.upgrade(path, db_name)
        if db_name == layout.MAIN_DB:
            # pysqlite checkpointed everything and removed the WAL: the mark describes a WAL that is gone
            # (nothing is lost); the open re-anchors it once it succeeds
            with contextlib.suppress(FileNotFoundError):
                fsio.unlink(path + "-hwm")
        return self.kernel.connect(path)

    def sync_dir(self) -> None:
        """fsync ``data_dir`` itself, so that names created, renamed or removed in it survive a power cut
        (EXTRA mode does this after creating, renaming or removing files). Raises :class:`StorageFault`
        (and the store fail-stops) if the sync fails."""
        self.kernel.sync_dir()

    def _sync_new_store_dirs(self) -> None:
        """Before the node record of a new store commits: fsync data_dir and every ancestor directory, so that
        the entries of raft.db, chunks.db, data_dir itself and any parent ``makedirs`` created survive a
        power cut (every mode but OFF). Without them a power cut could lose data_dir with every write
        acknowledged since, in every mode (found by the creation power-loss campaign: the syncs of the
        files inside do not make the directory's own entry durable). Keyed on "no node record yet", not on
        "this call created the directory": a first open that died after ``makedirs`` leaves a directory a
        retry did not create, and the retry must sync it all the same (found by an independent review,
        reproduced with the fault model). An ancestor this process may not read (EACCES) is skipped with
        a warning."""
        self.sync_dir()
        d = os.path.abspath(self.data_dir)
        while os.path.dirname(d) != d:
            d = os.path.dirname(d)
            try:
                fsio.sync_dir(d)
            except PermissionError as exc:
                log.warning("%s: cannot fsync ancestor directory %s (%s): its entry may not survive a power cut",
                            self.data_dir, d, exc)
            except OSError as exc:
                self.kernel.fail(exc)
                raise StorageFault(f"{d}: directory sync failed while creating {self.data_dir} ({exc})") from exc

    def _recover(self) -> None:
        report = RecoveryReport(policy=self.recovery_policy.value)
        self.recovery_report = report
        c = self.kernel.conn
        now = time.time()
        row = c.execute("SELECT node_id, cluster_id, format_version, created_at, crc32 FROM node").fetchone()
        new_node = row is None
        if new_node and sqlitewal.read_mark(self.path) is not None:
            # The mark is first written after the node record is committed, so a mark beside a raft.db without
            # one means the record is lost (a lost WAL that held it, or raft.db replaced by a copy taken before
            # it was checkpointed): creating a node here would forget the old one's terms, votes and groups,
            # and no group could be marked recovered_partially, so not even PARTIAL may open it.
            why = self._wal_problems[0] + "; it held the node record too" if self._wal_problems else \
                f"{self.path} holds no node record"
            raise CorruptionError(
                f"{why}, but {self.path}-hwm (its WAL high-water mark) shows that {self.data_dir} held a store: "
                "refusing to create a new node in its place under any recovery policy (restore from a backup, "
                "or move the data_dir away)")
        c.execute("BEGIN IMMEDIATE")
        try:
            if new_node:
                if self.fsync is not FsyncMode.OFF:
                    self._sync_new_store_dirs()
                c.execute("INSERT INTO node(id, node_id, cluster_id, format_version, created_at, crc32) "
                          "VALUES (1,?,?,?,?,?)", (self.node_id, self.cluster_id, layout.FORMAT_VERSION, now,
                                                    node_crc(self.node_id, self.cluster_id, layout.FORMAT_VERSION,
                                                             now)))
                report.outcome = "created"
            else:
                assert row is not None  # (not a new node)
                nid, cid, fmt, created_at, crc = row
                if node_crc(nid, cid, fmt, created_at) != crc:
                    raise CorruptionError(f"{self.path}: node record fails its CRC check")
                if fmt > layout.FORMAT_VERSION:
                    raise NodeIdentityMismatch(f"{self.path}: data format {fmt} is newer than this raft_sqlite "
                                               f"supports ({layout.FORMAT_VERSION})")
                if nid != self.node_id or cid != self.cluster_id:
                    raise NodeIdentityMismatch(
                        f"{self.data_dir} belongs to node {nid!r} of cluster {cid!r}, not node {self.node_id!r} "
                        f"of cluster {self.cluster_id!r}")
            settings = {"fsync_mode": self.fsync.value, "fsync_interval": str(self.fsync_interval),
                        "recovery_policy": self.recovery_policy.value,
                        **{f"pragma.{k}": v for k, v in pragmas_for(self.fsync).items()}}
            c.executemany("INSERT OR REPLACE INTO settings(key, value) VALUES (?,?)", list(settings.items()))
            recover_sql_objects(self, c, report)
            recover_groups(self, c, report, self._wal_problems)
            report.duration = time.monotonic() - report.started
            c.execute("INSERT INTO recovery_events(at, kind, policy, outcome, duration, details) "
                      "VALUES (?,?,?,?,?,?)", (now, "open", report.policy, report.outcome, report.duration,
                                               report.to_json()))
            c.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(apsw.Error):
                c.execute("ROLLBACK")
            if isinstance(exc, apsw.Error):
                raise self.kernel.translate(exc, "open") from exc
            raise
        log.info("%s: %s", self.data_dir, report.summary())
        for d in report.dropped:
            log.warning("%s: dropped %s", self.data_dir, d)
        for d in report.repaired:
            log.warning("%s: repaired %s", self.data_dir, d)
        if FSYNC_MODES[self.fsync]["dir_sync"]:
            self.sync_dir()  # the WAL file now exists
        if self.fsync in (FsyncMode.NORMAL, FsyncMode.OFF):
            # The settings row now names this mode: make it durable before any unsynced commit, so that
            # after a power cut recovery knows the WAL tail was written without syncs (several torn
            # transactions are then expected, not committed data lost).
            try:
                fsio.fdatasync_path(self.path + "-wal")
            except OSError as exc:
                self.kernel.fail(exc)
                raise StorageFault(f"{self.data_dir}: WAL sync failed while opening ({exc})") from exc

    def _sweep_orphan_states(self) -> None:
        """Delete the state databases of groups that no longer exist (a crash after ``remove_group``'s commit
        left them), before any new group can be given the same id, and temporary files a crash left in the
        state folder."""
        folder = os.path.join(self.data_dir, STATE_DIR)
        if not os.path.isdir(folder):
            return
        live = {g.gid for g in self.kernel.groups.states()}
        for fn in sorted(os.listdir(folder)):
            if fn.startswith(STATE_TEMP_PREFIX):  # a restore's or a capture's temporary file, left by a crash
                _remove_state_files(os.path.join(folder, fn))
                continue
            m = _STATE_NAME.fullmatch(fn)
            if m and int(m.group(1)) not in live:
                log.warning("%s: deleting the state database of removed group id %s", self.data_dir, m.group(1))
                _remove_state_files(os.path.join(folder, f"group-{m.group(1)}.db"))

    def _reclaim_orphan_space(self) -> None:
        """After a recovery that dropped an orphan (partial) snapshot, or when the disk reserve is
        missing: checkpoint chunks.db and truncate its WAL, so the disk space the partial snapshot's
        frames took is given back to the file system (a WAL is otherwise reused, never shrunk). Best
        effort: a checkpoint that fails (the disk is still full) leaves the WAL intact and is retried
        at the next open."""
        dropped = any(d.get("what") == "orphan snapshot" for d in self.recovery_report.dropped)
        if not dropped and os.path.exists(reserve.reserve_path(self.data_dir)):
            return
        with self.chunks_lock:
            try:
                c = self.chunks_conn
                # A checkpoint grows chunks.db to the size of its newest committed version. Pages of
                # committed batches of a dropped snapshot are free pages of that version (no
                # auto_vacuum): they stay as room for the next snapshot. A checkpoint that cannot finish
                # would only fill what is left of the disk with them, so it is not started then.
                need = _one(c, "PRAGMA page_count") * _one(c, "PRAGMA page_size") \
                    - os.path.getsize(self.chunks_path)
                if need > reserve.free_bytes(self.data_dir) - (64 << 10):
                    log.warning("%s: not enough free disk space (%d bytes needed) to give the space of dropped "
                                "snapshot data back yet", self.chunks_path, need)
                    # nor at close (SQLite's checkpoint-on-close would do just that); the next open retries
                    c.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
                    return
                # a reader in another process (a live backup's pinned snapshot) must not hold the open up
                # for the connection's 10 s busy timeout: this is best effort, retried at the next open
                c.setbusytimeout(100)
                try:
                    c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                finally:
                    c.setbusytimeout(10_000)
            except (apsw.Error, OSError) as exc:
                log.warning("%s: could not give the space of dropped snapshot data back yet (%s)",
                            self.chunks_path, exc)

    def close(self) -> None:
        """Record each group's open segment for the next open (``close_digests``: one commit through group
        commit, which commit listeners see; a storage error there makes the store fail-stop like any commit,
        and the close goes on), stop background work, close every connection, then release the data_dir
        lock. Idempotent."""
        if "kernel" not in self.__dict__ or self.kernel.closed:
            return
        self._record_close_digests()
        for key in [k for k in self._views if k[0] == "sql"]:
            self._views[key].close()
        self.kernel.mark_closed()  # stops the interval syncer, lets the current leader finish its commit
        self._close_connections()
        self._release_lock()  # only once every connection is closed

    def _record_close_digests(self) -> None:
        """Record every open segment's counts and digests for the next open (``wal.write_close_digests``: it
        then checks them with one aggregate each instead of every record's CRC), in a commit of their own
        through group commit, so that it is ordered after every write acknowledged before close. Skipped
        after a storage fault (no more I/O) and inside a transaction block; a failure is logged and the
        close goes on (the next open then checks the open segments record by record, as after a crash)."""
        k = self.kernel
        if k.fault is not None or k.in_transaction():
            return
        try:
            k.raw(lambda conn: write_close_digests(conn, [(g.seg, g.gid, g.last_term) for g in k.groups.states()
                                                          if g.seg is not None]))
        except RaftSqliteError as exc:
            log.warning("%s: could not record the open segments' digests at close (the next open checks them "
                        "record by record): %s", self.data_dir, exc)

    def _close_connections(self, failed_open: bool = False) -> None:
        # After a storage fault, never let SQLite checkpoint on close: that writes the database and
        # fsyncs the WAL again, and a retried fsync can report success for data the kernel dropped
        # when the first one failed (fail-stop: no I/O at all until the store is reopened). After a
        # refused open neither: the checkpoint would copy only SQLite's valid WAL prefix into raft.db and
        # reset the WAL, destroying the frames past a damaged one that an operator could still salvage.
        faulted = self.kernel.fault is not None or failed_open
        self.kernel.close_connections(no_checkpoint=faulted)
        mark = self.kernel.hwm
        if mark is not None:
            if not faulted:
                # the last close checkpointed the WAL (unless a reader elsewhere held it back): record
                # "checkpointed" so that an emptied WAL (e.g. by a TRUNCATE checkpoint) is known harmless;
                # the background checkpointer is stopped: raft.db's mtime is evidence again
                mark.background = False
                try:
                    mark.note()
                except OSError as exc:
                    log.warning("%s: could not record the WAL high-water mark at close: %s", self.data_dir, exc)
            mark.close()
            self.kernel.hwm = None
        self._pins.close()  # only now: SQLite has closed the files

    def __enter__(self) -> NodeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ groups and views
    def groups(self) -> list[str]:
        """Names of the groups this node hosts."""
        return self.kernel.groups.names()

    def remove_group(self, group: str | int) -> bool:
        """Remove group ``group`` and everything this node stores for it: its log records and segments, its
        hard state (term, vote, commit index), its snapshots and the group itself. Returns False (nothing
        written) if the node has no such group.

        Atomic: raft.db loses every row of the group in one commit (one fsync in FULL mode); a crash before
        it leaves the group whole, after it gone. The snapshots' chunks in chunks.db are deleted right after
        that commit; a crash in between leaves them as orphans, which the next open removes (they are
        never read: no manifest names them). Held under ``gc_lock``, so a hot backup never copies a
        manifest without its chunks.

        Raises :class:`SnapshotError` (nothing written) while a snapshot of the group is being written or
        read in this process, and :class:`RaftSqliteError` inside :meth:`transaction`. Views taken before
        (``store.log(name)``, ``metadata``, ``snapshots``) raise :class:`GroupNotFoundError` on reads and
        writes (nothing written), as does work started on the group before (a compaction, a snapshot write
        or install: they never bring it back); asking the store for the name again (``store.log(name)``)
        creates a new, empty group (a multi-Raft node re-adding a region starts it from an empty log too)."""
        k = self.kernel
        name = k.name_of(group)
        k.check_open()
        if k.in_transaction():
            raise RaftSqliteError("remove_group() cannot run inside store.transaction(): its chunks are deleted "
                                  "after its own commit")
        sstore = SnapshotStore.of(k)
        with k.gc_lock:
            g = k.groups.get(name)
            if g is None:
                return False
            gid = g.gid
            ids = k.read(lambda c: {int(r[0]) for r in c.execute("SELECT snapshot_id FROM snapshots WHERE group_id=?",
                                                                   (gid,))})
            busy = sorted(ids & sstore.busy())
            if busy:
                raise SnapshotError(f"group {name!r}: not removed: snapshot(s) {busy} are being written or read")
            deleted: list[int] = []

            def check(st: GroupState) -> None:
                st.removed = True

            def write(conn: apsw.Connection, st: GroupState, _: object) -> None:
                deleted.extend(delete_group_rows(conn, st.gid))

            sql = self._views.get(("sql", name))
            k.run(name, check, write)
            if deleted:
                sstore.delete_chunks(deleted)
            if sql is not None:
                sql.close()
            _remove_state_files(state_file(self.data_dir, gid))  # after a crash first: the next open's sweep
        for kind in ("log", "meta", "snap", "sm", "sql"):
            self._views.pop((kind, name), None)
        log.info("%s: group %r removed (%d snapshot(s))", self.data_dir, name, len(deleted))
        return True

    def log(self, group: str | int = "default") -> PersistentRaftLog:
        """The :class:`PersistentRaftLog` of ``group`` (created on first use)."""
        return self._view("log", group, lambda name: PersistentRaftLog(self.kernel, name))

    def metadata(self, group: str | int = "default") -> RaftMetadataStore:
        """The :class:`RaftMetadataStore` of ``group`` (created on first use)."""
        return self._view("meta", group, lambda name: RaftMetadataStore(self.kernel, name))

    def snapshots(self, group: str | int = "default") -> SnapshotManager:
        """The :class:`~raft_sqlite.snapshot.SnapshotManager` of ``group``."""
        return self._view("snap", group, lambda name: SnapshotManager(self.kernel, name))

    def state_machine(self, group: str | int = "default") -> StateMachineSnapshotManager:
        """The :class:`~raft_sqlite.statemachine.StateMachineSnapshotManager` of ``group``."""
        return self._view("sm", group, lambda name: StateMachineSnapshotManager(self, name))

    def state(self, group: str | int = "default", *, schema: Schema = None, apply: ApplyFn | None = None,
              durable: bool | None = None, deltas: bool | None = None) -> SqlStateMachine:
        """The SQL state machine of ``group`` (:class:`~raft_sqlite.sqlstate.SqlStateMachine`): its state is the
        SQLite database ``data_dir/state/group-<id>.db``, created on first use with the tables of ``schema``
        (a SQLAlchemy ``MetaData``, a DDL string or a list of them; run once, when the file is created).
        ``apply(conn, entry)`` applies one committed entry inside the batch's transaction, which also records
        the applied index and term. ``durable`` syncs every applied batch (default: no; the log is the
        durable record, and an applied batch lost to power loss is applied again). ``deltas`` (default: yes)
        records the changes between snapshots with SQLite's session extension so that snapshots can be
        DELTAs (a schema a changeset cannot carry is stored whole: ``SqlStateMachine.delta_unsafe``).

        Opening checks the database (its identity, the CRC of its applied position, and that the log holds
        what it applied: :class:`RecoveryRefused` otherwise) and registers it as structure ``"sql"`` of
        :meth:`state_machine`. Later calls return the same object (arguments given again must not differ:
        ValueError)."""
        name = self.kernel.ensure_group(group)
        cur: SqlStateMachine | None = self._views.get(("sql", name))
        if cur is not None:
            if not cur.opened_with(schema, apply, durable, deltas):
                raise ValueError(f"group {name!r}: the state machine is already open with other arguments (schema, "
                                 "apply, durable or deltas)")
            return cur
        with self._state_lock:
            cur = self._views.get(("sql", name))
            if cur is None:
                cur = SqlStateMachine(self, name, self.kernel.group(name).gid, schema=schema, apply=apply,
                                      durable=bool(durable), deltas=True if deltas is None else bool(deltas))
                self._views[("sql", name)] = cur
            return cur

    def _view(self, kind: str, group: str | int, factory: Callable[[str], V]) -> V:
        name = self.kernel.ensure_group(group)
        v: V | None = self._views.get((kind, name))  # (kind, name) keys hold the factory's type
        if v is None:  # setdefault: two threads asking at once get the same view
            made: V = self._views.setdefault((kind, name), factory(name))
            return made
        return v

    # ------------------------------------------------------------------ write path
    def transaction(self) -> contextlib.AbstractContextManager[Tx]:
        """Group writes (log and metadata, any groups) into one atomic commit with one fsync.

        Inside the block, write calls validate at once against the state the transaction has built
        (a bad call raises and is not added) and return as usual, but nothing is durable until the
        block exits; if the block raises, nothing is written. Reads inside the block see the last
        *committed* state. Transactions do not nest.
        """
        return self.kernel.transaction()

    # ------------------------------------------------------------------ replay (start-up)
    def iter_replay(self, group: str | int = "default", *, upto: int | None = None, chunk: int = 8192,
                    start: int | None = None) -> Iterator[LogEntry]:
        """Yield the log entries a state machine must apply at start-up, in index order: those after the
        newest durable snapshot (``snapshot_index + 1``, or ``first_index``; or from ``start``) up to
        ``upto`` (default: the commit index; pass ``log.last_index`` to include uncommitted entries).
        Entries are read ``chunk`` (>= 1) at a time (bounded memory). Their CRCs were verified when the store
        was opened (and entries written since were written by this process), so they are not checked a
        second time. Raises :class:`LogCompactedError` if ``start`` is below ``first_index``."""
        chunk = int_arg("chunk", chunk, 1, 1 << 30)
        name = self.kernel.ensure_group(group)
        new, kinds = tuple.__new__, KINDS
        for rows in self._replay_rows(name, upto, start, chunk):
            for i, t, p, k in rows:
                kind = kinds.get(k)
                if kind is None:
                    raise CorruptionError(f"{self.path}: group {name!r}: log entry {i} has a damaged kind ({k!r})")
                yield new(LogEntry, (i, t, p, kind))

    def _replay_rows(self, name: str, upto: int | None, start: int | None,
                     chunk: int) -> Iterator[list[tuple[Any, ...]]]:
        """Rows ``(index, term, payload, kind)`` to replay (see :meth:`iter_replay`), ``chunk`` at a time.
        :meth:`iter_replay` turns them into LogEntry one at a time (a replay of millions of entries must
        not keep batches of new objects alive: the cyclic GC would scan them over and over)."""
        g = self.kernel.group(name)
        hi = g.commit if upto is None else min(int(upto), g.last_index)
        lo = max(g.first_index, g.snapshot_index + 1) if start is None else int(start)
        if lo < g.first_index:
            raise LogCompactedError(f"group {name!r}: replay from {lo} needs compacted entries (first index "
                                    f"{g.first_index})")
        # the index comes from the key (unique, so the count below proves contiguity); a payload that is not
        # a BLOB reads as NULL; CRCs were verified on open and are not checked a second time
        sql = f"SELECT key - ?, term, {BLOB_PAYLOAD}, kind FROM log_entries WHERE key >= ? AND key <= ? ORDER BY key"
        base = g.gid * layout.KEY_SPAN
        while lo <= hi:
            top = min(hi, lo + chunk - 1)
            rows = self.kernel.read(lambda c: c.execute(sql, (base, base + lo, base + top)).fetchall())
            if len(rows) != top - lo + 1:
                raise CorruptionError(f"{self.path}: group {name!r}: entries {lo}..{top} are not all present")
            if None in map(_PAYLOAD, rows):
                bad = lo + next(k for k, r in enumerate(rows) if r[2] is None)
                raise CorruptionError(f"{self.path}: group {name!r}: log entry {bad} is not a BLOB")
            yield rows
            lo = top + 1

    def replay(self, group: str | int = "default", apply: Callable[[LogEntry], object] | None = None, *,
               upto: int | None = None) -> int:
        """Start-up replay for ``group``. If structures are registered with :meth:`state_machine`,
        first load the newest valid snapshot chain into them (``StateMachineSnapshotManager.restore``,
        which falls back to an older chain when the newest is corrupt); then call ``apply(entry)`` for
        every log entry after the restored snapshot up to ``upto`` (default: the commit index), in
        order. Without registered structures, replay starts after the newest durable snapshot (the
        caller loads snapshot bytes itself through :meth:`snapshots`). Returns the index of the last
        entry applied (the snapshot's index when there was nothing to replay). If an older chain had
        to be used and the log no longer holds the entries after it, raises
        :class:`LogCompactedError`."""
        name = self.kernel.ensure_group(group)
        if ("sql", name) in self._views:
            raise RaftSqliteError(f"group {name!r} has a SQL state machine: resume it with "
                                  "store.state(group).catch_up(), not replay()")
        sm = self._views.get(("sm", name))
        start = None
        last = self.kernel.group(name).snapshot_index
        if sm is not None and sm.names():
            meta = sm.restore()
            start = (meta.index + 1) if meta is not None else self.kernel.group(name).first_index
            last = meta.index if meta is not None else 0
        for e in self.iter_replay(name, upto=upto, start=start):
            if apply is not None:
                apply(e)
            last = e.index
        return last

    # ------------------------------------------------------------------ read path
    def pragmas(self) -> dict[str, object]:
        """The pragma values in force on the write connection, read back from SQLite."""
        names = ("journal_mode", "synchronous", "fullfsync", "checkpoint_fullfsync", "wal_autocheckpoint",
                 "journal_size_limit", "cache_size", "page_size")
        return self.kernel.raw(lambda conn: {n: _one(conn, f"PRAGMA {n}") for n in names})

    @property
    def fault(self) -> BaseException | None:
        """The storage error that made the store fail-stop, or None."""
        return self.kernel.fault

    @property
    def restored_from(self) -> dict[str, Any] | None:
        """None unless this data_dir was made by :func:`raft_sqlite.restore`; then the newest restore
        event as a dict: ``kind`` (``"node_replacement"`` | ``"quorum_loss_restore"``), ``at`` (unix time
        of the restore), ``backup_path``, ``backup_created_at`` (the instant the backup describes) and
        ``groups`` {name: {term, voted_for, commit_index, last_index, snapshot_index} at the backup}.
        After a node replacement the node may have voted, after that point, in any term from the
        group's backup ``term`` on: it must not grant votes until it has caught up (see docs/backup.md)."""
        return self.kernel.read(read_restore_event)


_STATE_NAME = re.compile(r"group-(\d+)\.db(?:-wal|-shm)?")


def _remove_state_files(path: str) -> None:
    """Delete a state database and its WAL/shm (a removed group's); a failure is logged (the next open's sweep
    retries)."""
    for p in (path, path + "-wal", path + "-shm"):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("%s: could not delete the state of a removed group: %s", p, exc)


class _CallbackListener:
    """Adapts a plain ``on_commit(seconds, requests)`` callback to a commit listener."""

    def __init__(self, fn: Callable[[float, int], None]) -> None:
        self.fn = fn

    def on_commit(self, seconds: float, requests: int) -> None:
        self.fn(seconds, requests)


def _one(conn: apsw.Connection, sql: str) -> Any:
    """The first column of the first row of ``sql`` (a PRAGMA read back)."""
    row = conn.execute(sql).fetchone()
    assert row is not None  # a PRAGMA that reads a setting always returns one row
    return row[0]
